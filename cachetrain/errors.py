"""Every error a user can fix, in one module: each is raised with one line that names the file, key or
value and what was expected; the CLI prints it as `error: <line>` and exits 2.

Their messages are made safe to print when raised: redacted (`cachetrain.redact`: whatever location a
message quotes, URL credentials and query strings in it never reach a terminal, a log or a file), and one
line whatever they quote (a newline or an escape in a file name or a `--set` value is shown escaped).
"""

import re

from cachetrain.redact import redact

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """`text` with its control characters (newline, tab, escape, NUL) written as escapes: one printable line."""
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)


class _Redacted(Exception):
    """Redacts its message (its first argument, when it is a string) and keeps it on one line, as raised."""

    def __init__(self, *args):
        if args and isinstance(args[0], str):
            args = (one_line(redact(args[0])), *args[1:])
        super().__init__(*args)


class ConfigError(_Redacted, ValueError):
    """A config problem: an unknown key, a wrong type, a value out of range, a config a run does not accept."""


class DataError(_Redacted, RuntimeError):
    """A missing or malformed dataset: a file, a folder, an image."""


class CacheError(_Redacted, RuntimeError):
    """A cache store that cannot be used as asked: absent, incomplete, stale, corrupt."""


class StageError(_Redacted, RuntimeError):
    """A stage that cannot be trained or cached yet, with the command that fixes it."""


class CheckpointError(_Redacted, RuntimeError):
    """A checkpoint that cannot be used: unreadable, unsafe, or for another network."""


class RunLocked(_Redacted, RuntimeError):
    """Another process holds the run directory."""


class DaliMissing(_Redacted, RuntimeError):
    """NVIDIA DALI was asked for and is not installed."""


USER_ERRORS = (ConfigError, DataError, CacheError, StageError, CheckpointError, RunLocked, DaliMissing)
