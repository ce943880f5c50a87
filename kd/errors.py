"""Error types for problems the user can fix. The CLI prints their message as one line and exits with code 2
(bad input) or 1 (WriteError: the environment)."""


class KDError(Exception):
    """Base class: a problem the user can fix (config, data, checkpoint, a folder that cannot be written), not a
    bug. The CLI exits with 2 for bad input and 1 for WriteError (the environment: disk, permissions)."""


class ConfigError(KDError):
    """An invalid or inconsistent configuration value."""


class DataError(KDError):
    """Missing, malformed or mislabelled data."""


class CheckpointError(KDError):
    """A checkpoint that is corrupt or does not match the model/config it is loaded into."""


class WriteError(KDError):
    """A file that could not be written (disk full, read-only or missing folder); nothing half-written is left."""


class Preempted(Exception):
    """A run stopped by a signal (SIGTERM, SIGUSR1) after writing a checkpoint at a step boundary: not an error;
    the CLI exits with 128 + the signal number, and --run.resume continues the run exactly."""

    def __init__(self, signum: int, step: int, phase: str, path: object):
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} ({phase})")
        self.signum, self.step, self.phase, self.path = signum, step, phase, path


def first_line(e: BaseException, limit: int = 120) -> str:
    """The first line of an exception's message (or its type name), for one-line error reports."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
