"""Every error a user can fix, in one module: each is raised with one line that names the file, key or
value and what was expected; the CLI prints it as `error: <line>` and exits 2.

An error may name the commands that fix it (`fixes`): each is a `Fix`, a command of the CLI's command
table by name with its options, never a command line written into the message. The message ends with
"; run: A, then B"; the CLI spells each Fix and adds the options that name the user's run
(`--config`, `--run`, `--set`), so the suggestion pastes back as it stands (cachetrain.cli).

Their messages are made safe to print when raised: redacted (`cachetrain.redact`: whatever location a
message quotes, URL credentials and query strings in it never reach a terminal, a log or a file), and one
line whatever they quote (a newline or an escape in a file name or a `--set` value is shown escaped).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cachetrain.redact import redact

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """`text` with its control characters (newline, tab, escape, NUL) written as escapes: one printable line."""
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)


@dataclass(frozen=True)
class Fix:
    """A command to suggest: `command` is a key of the CLI's command table (tests/test_layers.py checks
    every Fix the package builds), `options` its flags in order ({"j": 2, "repair": True} ->
    `--j 2 --repair`). `run`: the run it is for, when that is not the run the user named."""

    command: str
    options: tuple[tuple[str, object], ...] = ()
    run: Path | None = None

    @classmethod
    def of(cls, command: str, run: Path | None = None, **options: object) -> Fix:
        return cls(command, tuple((k, v) for k, v in options.items() if v is not None and v is not False), run)

    def words(self) -> list[str]:
        """The command's words after `cachetrain`, without the run's options: ["cache", "--j", "2", "--repair"]."""
        out = [self.command]
        for key, value in self.options:
            out.append(f"--{key.replace('_', '-')}")
            if value is not True:
                out.append(str(value))
        return out


class UserError(Exception):
    """Base of the errors below: a message, and the commands that fix it (`fixes`, in order)."""

    def __init__(self, message: str = "", *fixes: Fix):
        message = one_line(redact(message))  # safe to print, whatever it quotes
        super().__init__(message)
        self.message, self.fixes = message, tuple(fixes)

    def __reduce__(self):  # a loader's worker process raises it in the training process, fixes included
        return type(self), (self.message, *self.fixes)

    def __str__(self) -> str:
        return self.render(lambda fix: "cachetrain " + " ".join(fix.words()))

    def render(self, spell) -> str:
        """The one line, each fix spelled by `spell(fix)` (the CLI's adds the user's run options)."""
        if not self.fixes:
            return self.message
        return f"{self.message}; run: " + ", then ".join(spell(f) for f in self.fixes)


class ConfigError(UserError, ValueError):
    """A config problem: an unknown key, a wrong type, a value out of range, a config a run does not accept."""


class DataError(UserError, RuntimeError):
    """A missing or malformed dataset: a file, a folder, an image."""


class CacheError(UserError, RuntimeError):
    """A cache store that cannot be used as asked: absent, incomplete, stale, corrupt."""


class StageError(UserError, RuntimeError):
    """A stage that cannot be trained or cached yet, with the command that fixes it."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used: unreadable, unsafe, or for another network."""


class RunLocked(UserError, RuntimeError):
    """Another process holds the run directory."""


class DaliMissing(UserError, RuntimeError):
    """NVIDIA DALI was asked for and is not installed."""

