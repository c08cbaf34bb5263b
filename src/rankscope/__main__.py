"""`python -m rankscope`: the same as the `rankscope` command."""

import sys

from .cli import main

sys.exit(main())
