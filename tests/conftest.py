"""Settings every test process shares."""

import signal
import sys
from pathlib import Path

import pytest

# A shell starts a background job (`cmd &`, nohup, some CI runners) with SIGINT ignored, and Python
# then leaves it ignored; rankscope rightly never installs a handler over an ignored signal. The
# signal tests need Ctrl-C to reach their own process and the children they start (an ignored
# disposition is inherited across exec, a handler is not), so the suite restores Python's default
# for itself, however pytest was started.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The tests import their shared helpers (_studies, _runs, _hf, _muon, _headroom, _corpus,
# _tolerances: modules beside them, never another test module) by bare name. pytest's default import
# mode puts this folder on sys.path already; this keeps them importable under --import-mode=importlib.
TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

# Helpers that assert report the values on failure, as the test modules they came from did.
pytest.register_assert_rewrite("_runs", "_studies")


@pytest.fixture(scope="session")
def whole(tmp_path_factory) -> Path:
    """One uninterrupted tiny run (`_runs.uninterrupted`), the reference that the resume, signal,
    fault and checkpoint tests compare their interrupted runs with; read, never written."""
    from _runs import uninterrupted

    return uninterrupted(tmp_path_factory)
