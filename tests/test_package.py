"""The package as users get it: built-in configs by name, `--version`, and a wheel that works on its own.

The fast tests check name resolution and the commands that show it. The install test builds the sdist and
the wheel (`python -m build`; the wheel is built from the sdist, so the sdist must carry everything), checks
their metadata (`twine check`), installs the wheel with its declared dependencies into a new venv outside
the checkout, and trains there with a built-in config by name. That venv holds torch and its CUDA libraries
(about 6 GB, minutes to install), so it runs only when CACHETRAIN_INSTALL_TEST=1: `.ci/run` sets it,
`make test` leaves it out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from cachetrain import __version__
from cachetrain.config import load_config
from cachetrain.errors import ConfigError
from tests.conftest import cli, cli_in_process, synthetic_raw, write_config

# the config files shipped in the package, listed from the source tree (not through the code under test)
SHIPPED = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "cachetrain" / "configs").glob("*.yaml"))


def test_a_builtin_config_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    cfg = load_config("fmnist", ["train.epochs=3"])
    assert cfg.name == "fmnist" and cfg.data.name == "fmnist" and cfg.model.stages == 4 and cfg.train.epochs == 3
    assert load_config("fmnist.yaml") == load_config("fmnist")


def test_a_file_wins_over_a_builtin_config_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "fmnist.yaml", synthetic_raw(tmp_path / "run"))  # the user's own fmnist.yaml
    assert load_config("fmnist.yaml").data.name == "synthetic"
    assert load_config("fmnist").data.name == "fmnist"  # no file named plain "fmnist" here: the built-in one


def test_an_unknown_name_is_one_line_naming_the_builtin_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = cli_in_process(["status", "--config", "fmnst"])
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("error: fmnst: config file not found") and all(n in out.stderr for n in SHIPPED)
    # a path (a folder in it) is a path: no list of names, the message it always had
    with pytest.raises(ConfigError, match=r"^configs/fmnist\.yaml: config file not found$"):
        load_config("configs/fmnist.yaml")
    (tmp_path / "somewhere").mkdir()
    with pytest.raises(ConfigError, match="somewhere: is a folder; expected a YAML config file"):
        load_config("somewhere")


def test_configs_command_and_help_list_every_shipped_config():
    out = cli_in_process(["configs"])
    assert out.returncode == 0
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")]
    assert listed == SHIPPED
    assert "The demo" in out.stdout  # each with its description (the file's first comment line)
    help_text = cli_in_process(["--help"]).stdout
    assert all(name in help_text for name in SHIPPED)


def test_version_is_printed_and_is_the_packages():
    proc = cli(["--version"])
    assert proc.returncode == 0 and proc.stdout.strip() == f"cachetrain {__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+([a-z]+\d+)?", __version__)  # PEP 440, as the wheel's name carries it


def _run(args: list, cwd: Path, timeout: float = 1200, **kw) -> subprocess.CompletedProcess:
    """A command to completion; its output in the failure message, so CI's log says what went wrong."""
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CACHETRAIN_INSTALL_TEST") != "1",
                    reason="installs torch into a new venv (~6 GB, minutes): CACHETRAIN_INSTALL_TEST=1, as .ci/run")
def test_the_wheel_installed_outside_the_checkout_trains_with_a_builtin_config(tmp_path, repo_root):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", dist, repo_root], cwd=tmp_path)
    wheel, = dist.glob("cachetrain-*.whl")
    sdist, = dist.glob("cachetrain-*.tar.gz")
    _run([sys.executable, "-m", "twine", "check", "--strict", wheel, sdist], cwd=tmp_path)
    assert wheel.name == f"cachetrain-{__version__}-py3-none-any.whl"  # the version's one place reached the wheel
    shipped = [f"cachetrain/configs/{name}.yaml" for name in SHIPPED]
    with zipfile.ZipFile(wheel) as whl, tarfile.open(sdist) as tar:
        assert set(shipped) <= set(whl.namelist())
        assert {f"cachetrain-{__version__}/{f}" for f in shipped} <= set(tar.getnames())

    venv, work = tmp_path / "venv", tmp_path / "work"  # both outside the checkout
    work.mkdir()
    try:
        _run([sys.executable, "-m", "venv", venv], cwd=tmp_path)  # no --system-site-packages: only what pip installs
        python, exe = venv / "bin" / "python", venv / "bin" / "cachetrain"
        # the checkout must not be importable: no PYTHONPATH, and a folder of its own as the working directory
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        _run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel], cwd=work, env=env)
        where = _run([python, "-c", "import cachetrain; print(cachetrain.__file__)"], cwd=work, env=env).stdout
        assert Path(where.strip()).is_relative_to(venv)
        assert _run([exe, "--version"], cwd=work, env=env).stdout.strip() == f"cachetrain {__version__}"
        listing = _run([exe, "configs"], cwd=work, env=env).stdout
        assert all(f"  {name} " in listing for name in SHIPPED) and str(venv) in listing

        run = work / "run"
        _run([exe, "train", "--config", "fmnist", "--run", run, "--set", "data.train_subset=512",
              "--set", "data.test_subset=256", "--set", "model.stages=2", "--set", "model.width=8",
              "--set", "model.downsample=[1]", "--set", "train.epochs=1", "--set", "train.probes=false"],
             cwd=work, env=env)
        for j in (0, 1):
            rows = [json.loads(line) for line in (run / "stages" / f"stage_{j}" / "metrics.jsonl").read_text()
                    .splitlines()]
            assert [r["epoch"] for r in rows] == [1] and 0 <= rows[0]["test_acc"] <= 1
        status = _run([exe, "status", "--run", run], cwd=work, env=env).stdout
        assert len(re.findall(r"^\W+[01]\W+2\W+trained\W", status, re.M)) == 2  # rows j=0, 1: k=2, trained
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~6 GB: not left for pytest's basetemp to keep
