"""The errors effllm raises for bad input: each names the problem and the fix.

The CLI prints them as one line, without a traceback; library users can catch `EffllmError`.
"""


class EffllmError(Exception):
    """Base class of effllm's user-facing errors."""


class ConfigError(EffllmError, ValueError):
    """A configuration that cannot work (raised before any allocation)."""


class DataError(EffllmError):
    """Prepared data that is missing, empty, corrupt or inconsistent."""


class CheckpointError(EffllmError):
    """A checkpoint that is missing, corrupt, truncated or written for another model."""


class OutputError(EffllmError):
    """An output location that would replace or delete something effllm did not write."""


class TrainingDiverged(EffllmError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(EffllmError):
    """Training was stopped (Ctrl-C, SIGTERM); says which checkpoint, if any, a resume continues
    from. `exit_code`: what the command exits with (128 + the signal, as a shell reports it)."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
