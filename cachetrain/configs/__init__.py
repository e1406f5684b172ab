"""The built-in configs: YAML files shipped inside the package, so an installed cachetrain (no source tree)
still has its demo, benchmark and ImageNet-layout configs. `--config NAME` takes one by name (`fmnist`);
a path to a file is taken as it is, before any name, so a user's own `fmnist.yaml` wins over ours.
"""

from __future__ import annotations

import re
from pathlib import Path

from cachetrain.errors import ConfigError, Fix

# the folder of this file: package data lies beside the module in a wheel's install and in the checkout alike
HERE = Path(__file__).resolve().parent
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def names() -> list[str]:
    """Every built-in config's name, sorted."""
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def find(name: str) -> Path | None:
    """The file of the built-in config `name` (`fmnist` or `fmnist.yaml`), or None if there is none."""
    stem = name[:-5] if name.endswith(".yaml") else name
    if not NAME.fullmatch(stem):
        return None  # a path with a folder in it, or a name no file of ours could have
    path = HERE / f"{stem}.yaml"
    return path if path.is_file() else None


def resolve(spec: str | Path) -> Path:
    """What `--config SPEC` names: an existing file as it is, else the built-in config of that name.

    Anything else is a one-line error that says both what was looked for and which names are built in."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"{spec}: is a folder; expected a YAML config file or a built-in config "
                          f"({', '.join(names())})")
    builtin = find(str(spec))
    if builtin is not None:
        return builtin
    if path.parent != Path("."):  # a path with a folder in it was meant as a file, not as a name
        raise ConfigError(f"{spec}: config file not found")
    raise ConfigError(f"{spec}: config file not found, and no built-in config has that name "
                      f"(built in: {', '.join(names())})", Fix.of("configs"))


def _description(path: Path) -> str:
    """A built-in config's one-line description: the first comment line of its file."""
    return next((line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")


def listing() -> str:
    """What `cachetrain configs` prints: each built-in config's name and description, and where they lie
    (to copy one and change it)."""
    rows = [(name, _description(HERE / f"{name}.yaml")) for name in names()]
    width = max(len(name) for name, _ in rows)
    lines = ["built-in configs (--config NAME):"]
    lines += [f"  {name:<{width}}  {text}" for name, text in rows]
    lines.append(f"their files: {HERE}")
    return "\n".join(lines)
