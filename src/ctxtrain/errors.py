"""The error a user can act on: its message is one line (what, where, what to do); the CLI exits 2."""


class UserError(Exception):
    """Bad input: a config, a path, a shard, a checkpoint or an address. Printed as one line, exit status 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: preempted by SIGTERM, a checkpoint committed; run the same command to resume
