"""The error a user can act on: its message is one line (what, where, what to do); the CLI exits 2. And how
the CLI's loops end: exit statuses, Ctrl-C."""


class UserError(Exception):
    """Bad input: a config, a path, a shard, a checkpoint or an address. Printed as one line, exit status
    2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# EX_TEMPFAIL: preempted by SIGTERM, a checkpoint committed; run the same command to resume
PREEMPTED_EXIT = 75


def interruptible() -> None:
    """Ctrl-C (SIGINT) stops a --watch or --serve loop even when the process was started with SIGINT ignored,
    as a shell does for a background job (`cmd &`, nohup): Python then never installs its
    KeyboardInterrupt."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
