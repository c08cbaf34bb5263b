"""Settings every test process shares."""

import signal

# A shell starts a background job (`cmd &`, nohup, some CI runners) with SIGINT ignored, and Python
# then leaves it ignored; rankscope rightly never installs a handler over an ignored signal. The
# signal tests need Ctrl-C to reach their own process and the children they start (an ignored
# disposition is inherited across exec, a handler is not), so the suite restores Python's default
# for itself, however pytest was started.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
