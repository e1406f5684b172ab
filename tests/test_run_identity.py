"""A run's config is its identity (cachetrain.run.identity): drift is refused by name, --from-stage retrains
from a stage and records why, and stage indices and k are range-checked in every subcommand."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cachetrain.cli import main
from cachetrain.run.identity import config_hash, differences, stage_config_ok
from cachetrain.config import Config
from tests.conftest import synthetic_raw, write_config


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 3-stage run trained to the end once; tests copy it so each starts from the same files."""
    root = tmp_path_factory.mktemp("identity")
    cfg = write_config(root / "tiny.yaml", synthetic_raw(root / "run"))
    assert main(["train", "--config", str(cfg)]) == 0
    return root


@pytest.fixture
def run_dir(trained, tmp_path):
    import shutil
    shutil.copytree(trained / "run", tmp_path / "run")
    cfg = write_config(tmp_path / "tiny.yaml", synthetic_raw(tmp_path / "run"))
    return cfg, tmp_path / "run"


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_changed_result_key_is_refused_naming_key_and_both_values(run_dir, capsys):
    cfg, run = run_dir
    before = (run / "config.yaml").read_bytes()
    ckpt = (run / "stages" / "stage_1" / "checkpoint.pt").read_bytes()
    code, _, err = cli(capsys, "train", "--config", str(cfg), "--set", "train.batch_size=64")
    line = one_line(err)
    assert code == 2
    assert "train.batch_size 32 -> 64" in line and "--from-stage" in line and "new run" in line
    assert (run / "config.yaml").read_bytes() == before
    assert (run / "stages" / "stage_1" / "checkpoint.pt").read_bytes() == ckpt


def test_a_width_change_leaves_config_yaml_byte_identical_even_for_read_only_commands(run_dir, capsys):
    cfg, run = run_dir
    before = (run / "config.yaml").read_bytes()
    for command in ("stage", "status", "eval", "verify"):
        code, _, err = cli(capsys, command, "--config", str(cfg), "--set", "model.width=24")
        assert code == 2 and "model.width 8 -> 24" in one_line(err), (command, err)
    assert (run / "config.yaml").read_bytes() == before


def test_keys_that_cannot_change_results_may_differ(run_dir, capsys):
    cfg, run = run_dir
    before = (run / "config.yaml").read_bytes()
    code, out, err = cli(capsys, "train", "--config", str(cfg), "--set", "loader.workers=1",
                         "--set", "train.checkpoint_steps=3")
    assert code == 0, err
    assert (run / "config.yaml").read_bytes() == before  # written once, when the run started


def test_from_stage_retrains_that_stage_and_later_and_records_the_change(run_dir, capsys):
    cfg, run = run_dir
    kept = (run / "stages" / "stage_0" / "checkpoint.pt").read_bytes()
    code, out, err = cli(capsys, "train", "--config", str(cfg), "--set", "train.lr=0.01", "--from-stage", "1")
    assert code == 0, err
    assert (run / "stages" / "stage_0" / "checkpoint.pt").read_bytes() == kept
    for j in (1, 2):
        ck = torch.load(run / "stages" / f"stage_{j}" / "checkpoint.pt", weights_only=True)
        assert ck["config"]["train"]["lr"] == 0.01
    # the new config is the run's now: the same command again is accepted and trains nothing
    code, out, _ = cli(capsys, "status", "--config", str(cfg), "--set", "train.lr=0.01")
    assert code == 0
    assert "from stage 1: train.lr 0.05 -> 0.01" in out
    assert config_hash(Config.from_dict(synthetic_raw(run, train={"lr": 0.01}))) in out
    # and the old config is now the one that differs
    code, _, err = cli(capsys, "status", "--config", str(cfg))
    assert code == 2 and "train.lr 0.01 -> 0.05" in one_line(err)


def test_from_stage_after_zero_cannot_keep_stages_of_another_width(run_dir, capsys):
    cfg, run = run_dir
    code, _, err = cli(capsys, "train", "--config", str(cfg), "--set", "model.width=12", "--from-stage", "1")
    assert code == 2 and "model.width" in one_line(err) and "--from-stage 0" in err


def test_stage_config_rule_keeps_stages_before_each_change():
    base = Config.from_dict(synthetic_raw("r"))
    lr = Config.from_dict(synthetic_raw("r", train={"lr": 0.01}))
    wd = Config.from_dict(synthetic_raw("r", train={"lr": 0.01, "weight_decay": 0.0}))
    h0, h1, h2 = config_hash(base), config_hash(lr), config_hash(wd)
    history = [{"from_stage": 2, "hash_before": h0, "hash_after": h1},
               {"from_stage": 1, "hash_before": h1, "hash_after": h2}]
    old = base.to_dict()
    assert stage_config_ok(old, wd, history, 0)  # both changes were made from later stages
    assert not stage_config_ok(old, wd, history, 1)  # the second change starts at stage 1
    assert not stage_config_ok(old, wd, history, 2)
    assert stage_config_ok(lr.to_dict(), wd, history, 0)
    assert not stage_config_ok(lr.to_dict(), wd, history, 1)
    assert stage_config_ok(wd.to_dict(), wd, history, 3)
    assert set(differences(base, wd)) == {"train.lr", "train.weight_decay"}


@pytest.mark.parametrize("argv, expected", [
    (["stage", "--k", "0"], "--k 0: expected an auxiliary depth in [1, 8]"),
    (["stage", "--k", "-1"], "--k -1: expected an auxiliary depth in [1, 8]"),
    (["stage", "--k", "99"], "--k 99: expected an auxiliary depth in [1, 8]"),
    (["stage", "--j", "3"], "--j 3: expected a stage index in [0, 2]"),
    (["cache", "--j", "2"], "--j 2: stage 2 has no cache (the last stage is never cached"),
    (["cache", "--j", "-1"], "--j -1: expected a stage index in [0, 2]"),
    (["verify", "--j", "7"], "--j 7: expected a stage index in [0, 2]"),
    (["train", "--from-stage", "3"], "--from-stage 3: expected a stage index in [0, 2]"),
])
def test_out_of_range_stage_and_k_are_refused_in_one_line(run_dir, capsys, argv, expected):
    cfg, run = run_dir
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    code, _, err = cli(capsys, *argv, "--config", str(cfg))
    assert code == 2 and expected in one_line(err)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_cache_of_a_stage_is_refused_when_the_mode_caches_nothing(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", synthetic_raw(tmp_path / "run", cache={"mode": "none"}))
    code, _, err = cli(capsys, "cache", "--config", str(cfg), "--j", "0")
    assert code == 2 and "no stage has one with cache.mode 'none'" in one_line(err)


def test_suggested_commands_repeat_how_the_user_named_the_run(run_dir, capsys):
    cfg, run = run_dir
    chunk = next(p for p in (run / "cache" / "stage_0" / "train.zarr" / "features").rglob("*") if p.is_file()
                 and p.name != "zarr.json")
    chunk.unlink()
    code, out, _ = cli(capsys, "verify", "--config", str(cfg), "--set", "loader.workers=0")
    assert code == 1
    assert f"cachetrain cache --config {cfg} --set loader.workers=0 --j 0 --repair" in out


def test_refusal_from_a_real_process_is_one_line_with_exit_2(run_dir):
    cfg, run = run_dir
    r = subprocess.run([sys.executable, "-m", "cachetrain.cli", "stage", "--config", str(cfg), "--set",
                        "train.epochs=2"], capture_output=True, text=True)
    assert r.returncode == 2
    assert one_line(r.stderr).startswith(f"error: {run / 'config.yaml'}: this run was started with a different config")


def test_the_e2e_baseline_is_retrained_after_a_config_change(run_dir, capsys):
    cfg, run = run_dir
    assert cli(capsys, "e2e", "--config", str(cfg))[0] == 0
    code, out, _ = cli(capsys, "e2e", "--config", str(cfg))
    assert code == 0 and "already trained" in out
    code, out, err = cli(capsys, "e2e", "--config", str(cfg), "--set", "train.lr=0.01", "--from-stage", "0")
    assert code == 0, err
    assert "already trained" not in out
    ck = torch.load(run / "e2e" / "checkpoint.pt", weights_only=True)
    assert ck["config"]["train"]["lr"] == 0.01 and ck["epoch"] == ck["epochs"]


def test_keys_added_since_leave_an_older_runs_config_hash_unchanged():
    """`status` prints a run's config hash; a key added to the schema since the run started must not change it
    while the key holds its default (the old config.yaml has no such key), and must once it is set."""
    from cachetrain.config import Config, added_keys
    from cachetrain.run.identity import config_hash

    assert added_keys() == {"train.e2e_init": "scratch", "train.e2e_lr": None}
    old = Config().to_dict()
    for key in added_keys():
        section, name = key.split(".")
        del old[section][name]  # the config.yaml a run wrote before the key existed
    assert config_hash(old) == config_hash(Config()) == "3dbfacf99ac1"  # what 8960268 printed for the defaults
    assert config_hash(Config.from_dict({"train": {"e2e_init": "greedy"}})) != config_hash(Config())
