"""Every error a user can fix, in one module: each is raised with one line that names the file, key or
value and what was expected; the CLI prints it as `error: <line>` and exits 2."""


class ConfigError(ValueError):
    """A config problem: an unknown key, a wrong type, a value out of range, a config a run does not accept."""


class DataError(RuntimeError):
    """A missing or malformed dataset: a file, a folder, an image."""


class CacheError(RuntimeError):
    """A cache store that cannot be used as asked: absent, incomplete, stale, corrupt."""


class StageError(RuntimeError):
    """A stage that cannot be trained or cached yet, with the command that fixes it."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, unsafe, or for another network."""


class RunLocked(RuntimeError):
    """Another process holds the run directory."""


class DaliMissing(RuntimeError):
    """NVIDIA DALI was asked for and is not installed."""


USER_ERRORS = (ConfigError, DataError, CacheError, StageError, CheckpointError, RunLocked, DaliMissing)
