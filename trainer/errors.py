"""Error types and exit codes shared by the CLI and the launcher entry point."""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal with state saved; run the same command again

# `trainer train` names a file here (the exit-code file); rank 0 writes its exit code into it. DeepSpeed's launchers do
# not always pass a rank's code up (the runner dies of SIGTERM; the per-node launcher exits 1 when signalled).
# ("Status" is the run's status.json only: runstatus.py.)
EXIT_CODE_FILE_ENV = "TRAINER_EXIT_CODE_FILE"
# Set to this, rank 0 prints its exit code as a line on stderr instead: across nodes (`trainer train --hostfile`)
# rank 0's machine need not be the one waiting, and the line comes back through pdsh.
EXIT_CODE_TO_STDERR = "-"
EXIT_LINE = "trainer: rank 0 exit code {code}"


class UserError(Exception):
    """A mistake in the user's input (config, hostfile, shards, CLI arguments).

    Reported as one line, without a traceback, and the process exits with code 2. The message
    names the file, the field or line, and what was expected.
    """

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, shared: bool = False):
        super().__init__(message)
        self.message = message
        self.shared = shared  # every rank raised the same error (rank 0 found it and shared it)

    def __str__(self) -> str:
        return self.message

    def lines(self) -> list[str]:
        """One `error: ...` line per problem (a message may list several, one per line)."""
        return [f"error: {line}" for line in self.message.splitlines() if line.strip()]


class NothingToDo(UserError):
    """Not a failure: the run this command would continue is already complete. Said in one line, exit 0.

    With `--resume auto` (the default) a supervisor that restarts a finished job must not train again.
    """

    exit_code = EXIT_OK

    def lines(self) -> list[str]:
        return [f"nothing to do: {line}" for line in self.message.splitlines() if line.strip()]
