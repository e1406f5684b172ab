"""What fits in GPU memory: the options that lower a stage's peak change no value or gradient, the memory
accounting adds up (by hand on one conv, linear in the batch, growing with the width, the same on meta
tensors as on real ones), `cachetrain plan --gpu-memory` prints the largest batch that fits, and
benchmarks/memory_bench.py runs at a toy size (slow)."""

from __future__ import annotations

import json
import re
import runpy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from cachetrain.cli import main
from cachetrain.config import Config, ModelConfig
from cachetrain.models import build_network, make_head
from cachetrain.models.chain import AvgPool, Chain
from cachetrain.plan.memory import FAKE, VARIANTS, Line, largest_width, measure, memory_table, units
from cachetrain.plan.profile import LiveBytes, step_memory, train_step_flops
from cachetrain.models.factory import StageModel
from cachetrain.step import train_step
from tests.conftest import synthetic_raw, tiny_greedy, write_config

ROOT = Path(__file__).resolve().parent.parent


def stage_model(aux: str, j: int = 1, **options) -> StageModel:
    """Stage j (it opens with space-to-depth) of a tiny layercnn with a k=3 head, built with `options`."""
    cfg = ModelConfig(arch="layercnn", stages=2, width=4, downsample=[1], k=3, aux=aux)
    net = build_network(cfg, (3, 16, 16), seed=0, **options)
    return StageModel(net.stages[j], make_head(cfg, net, j, cfg.k, num_classes=5, seed=0, **options))


def one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list, list]:
    """Outputs, parameter gradients and buffers (BN's running statistics) after a forward and backward."""
    model.train()
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()], [b.clone() for b in model.buffers()]


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return step_memory(model, x, y, torch.optim.SGD(model.parameters(), lr=0.0)).saved_bytes


@pytest.mark.parametrize("aux", ["conv", "sr"])
def test_checkpointed_activations_give_the_same_values_and_gradients_and_keep_less(aux):
    x, y = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.arange(4)
    plain, recomputed = stage_model(aux), stage_model(aux, checkpoint_activations=True)
    assert list(plain.state_dict()) == list(recomputed.state_dict())  # a checkpoint loads into either
    out_a, grads_a, buffers_a = one_step(plain, x, y)
    out_b, grads_b, buffers_b = one_step(recomputed, x, y)
    torch.testing.assert_close(out_b, out_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(buffers_a, buffers_b):  # running statistics moved once, not again by the recomputation
        torch.testing.assert_close(b, a)
    fresh = lambda **o: stage_model(aux, **o)  # noqa: E731
    assert saved_bytes(fresh(checkpoint_activations=True), x, y) < saved_bytes(fresh(), x, y)
    # what it costs: BN and ReLU again, not a conv (the recomputation stops before the conv after them)
    assert train_step_flops(fresh(checkpoint_activations=True), x, y) == train_step_flops(fresh(), x, y)


def test_training_with_checkpointing_gives_the_same_stage_and_builds_recomputing_networks(tmp_path):
    """train.checkpoint_activations reaches the networks greedy and end-to-end training build, and stage 0
    trained with it ends with the same weights as without (CPU, fp32)."""
    from cachetrain.models.factory import e2e_network

    weights = {}
    for on in (False, True):
        g = tiny_greedy(tmp_path / str(on), train={"checkpoint_activations": on})
        assert all(m.recompute == on for m in g.inputs.net.stages.modules() if isinstance(m, Chain))
        assert all(m.recompute == on for m in e2e_network(g.cfg, g.run.data.sample_shape, g.run.data.num_classes).modules() if isinstance(m, Chain))
        g.train_stage(0)
        weights[on] = g.state.checkpoint(0).model
    assert list(weights[True]) == list(weights[False])
    for key, value in weights[False].items():
        torch.testing.assert_close(weights[True][key], value, rtol=1e-5, atol=1e-6)


def test_in_place_relu_gives_the_same_values_and_gradients():
    x, y = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2)), torch.arange(4)
    out_a, grads_a, _ = one_step(stage_model("conv", inplace_relu=False), x, y)
    model = stage_model("conv", inplace_relu=True)
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    out_b, grads_b, _ = one_step(model, x, y)
    torch.testing.assert_close(out_b, out_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("size, out", [(12, 3), (14, 4), (7, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pooling_that_keeps_no_input_has_pytorchs_values_and_gradients(size, out, channels_last):
    x = torch.randn(2, 3, size, size)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(2, 3, out, out)
    nn.AdaptiveAvgPool2d(out)(a).backward(grad)
    ours = AvgPool(out)(b)
    torch.testing.assert_close(ours, nn.AdaptiveAvgPool2d(out)(x))
    ours.backward(grad)
    torch.testing.assert_close(b.grad, a.grad)
    # what it keeps for the backward: nothing of its input's size
    c = x.clone().requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        AvgPool(out)(c * 1)
    assert max(kept, default=0) < x.numel()


def test_count_of_one_conv_by_hand_on_meta_tensors_as_on_real_ones():
    """A bias-free 2->3 conv on a 2x2x4x4 batch, 48 logits, SGD with momentum, fp32."""
    def run(device: str):
        with torch.device(device):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.Flatten())
            x, y = torch.randn(2, 2, 4, 4), torch.randint(0, 48, (2,))
        return step_memory(model, x, y, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))

    meta = run("meta")
    conv_input = 2 * 2 * 4 * 4 * 4  # the batch itself, saved by the conv for its weight gradient
    log_softmax = 2 * 48 * 4  # saved by cross-entropy
    nll = 2 * 8 + 4  # the int64 targets and the total weight
    assert meta.saved_bytes == conv_input + log_softmax + nll
    weights = 3 * 2 * 9 * 4
    assert (meta.param_bytes, meta.grad_bytes, meta.optimizer_bytes) == (weights, weights, weights)
    assert meta.input_bytes == 0  # the conv saved the batch: counted once
    real = run("cpu")
    assert (real.total_bytes, real.live_peak) == (meta.total_bytes, meta.live_peak)


def test_live_peak_of_one_linear_layer_by_hand():
    """A bias-free 4->3 linear layer on a batch of 2, SGD with momentum, after a warm-up: the step holds
    its batch (32 B) and targets (16), the weight, last step's gradient and the momentum (48 each); the
    forward adds the logits and their log-softmax (24 each), the loss and its total weight (4 each). Then
    the old gradient is dropped, and nothing the backward makes at once exceeds that again."""
    with torch.device("meta"):
        model = nn.Linear(4, 3, bias=False)
        x, y = torch.randn(2, 4), torch.randint(0, 3, (2,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mem = step_memory(model, x, y, optimizer, warmup=True)
    held = 32 + 16 + 3 * 48
    assert mem.live_peak == held + 24 + 24 + 4 + 4
    live = LiveBytes()  # and every byte the step made is given back but the new gradient, as large as the old
    live.hold(x, y, model.weight, model.weight.grad, *optimizer.state[model.weight].values())
    with live:
        train_step(model, x, y, optimizer)
    assert live.now == held


def test_adamw_keeps_two_buffers_per_parameter():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.Flatten())
        x, y = torch.randn(2, 2, 4, 4), torch.randint(0, 12, (2,))
    mem = step_memory(model, x, y, torch.optim.AdamW(model.parameters()))
    assert mem.optimizer_bytes == 2 * mem.param_bytes + 4  # exp_avg, exp_avg_sq and a float32 step count


def tiny(**model) -> Config:
    raw = synthetic_raw(Path("unused"), model={"stages": 3, "width": 8, "downsample": [1], "k": 2, **model})
    return Config.from_dict(raw)


def test_count_is_linear_in_the_batch_and_grows_with_the_width():
    cfg = tiny()
    for name, build, shape in units(cfg, (3, 16, 16), 4, VARIANTS[1]):
        m = [measure(build, shape, 4, cfg, b).total_bytes for b in (2, 4, 8)]
        assert m[2] - m[1] == 2 * (m[1] - m[0]) > 0, name
    wide = replace(cfg, model=replace(cfg.model, width=16))
    for (name, build, shape), (_, build_wide, shape_wide) in zip(units(cfg, (3, 16, 16), 4, VARIANTS[1]),
                                                                 units(wide, (3, 16, 16), 4, VARIANTS[1])):
        narrow, broad = (measure(b, s, 4, c, 4) for b, s, c in ((build, shape, cfg), (build_wide, shape_wide, wide)))
        assert broad.total_bytes > narrow.total_bytes and broad.live_peak > narrow.live_peak, name


@pytest.mark.slow
def test_largest_batch_and_width_fit_and_one_more_does_not():
    cfg, budget = tiny(), 2**20
    table = memory_table(cfg, (3, 16, 16), 4, batch=8, budget=budget)
    for row, (name, build, shape) in zip(table["units"], units(cfg, (3, 16, 16), 4, VARIANTS[1])):
        best = row["variants"]["in-place ReLU"]["largest_batch"]
        assert measure(build, shape, 4, cfg, best, FAKE).live_peak <= budget < \
            measure(build, shape, 4, cfg, best + 1, FAKE).live_peak, name
    width = largest_width(cfg, (3, 16, 16), 4, 8, budget, VARIANTS[1], greedy=False, step=4, hi=64)
    assert 0 < width < 64

    def e2e_peak(w: int) -> int:
        wide = replace(cfg, model=replace(cfg.model, width=w))
        _, build, shape = units(wide, (3, 16, 16), 4, VARIANTS[1])[-1]
        return measure(build, shape, 4, wide, 8).live_peak
    assert e2e_peak(width) <= budget < e2e_peak(width + 4)


def test_on_cuda_the_table_reads_the_allocators_peaks(monkeypatch):
    """The CUDA regime's arithmetic, with the allocator's peaks given (this machine may have no GPU): the
    peak at the batch is the measured one, the largest batch comes from the line through the two measured
    batches, and a batch that does not fit the device falls back to the live-peak line."""
    from cachetrain.plan import memory

    cfg = tiny()
    peaks = lambda build, shape, classes, c, batch: 1000 + 100 * batch  # noqa: E731
    monkeypatch.setattr(memory, "cuda_peak", peaks)
    table = memory.memory_table(cfg, (3, 16, 16), 4, batch=8, budget=5000, device="cuda")
    assert table["regime"] == "cuda_peak" and table["precision"] == "bf16 autocast"  # train.amp is on
    cell = table["units"][0]["variants"]["in-place ReLU"]
    assert (cell["peak_bytes"], cell["largest_batch"]) == (1800, 40)
    monkeypatch.setattr(memory, "cuda_peak", lambda *a: None if a[-1] == 8 else peaks(*a))
    table = memory.memory_table(cfg, (3, 16, 16), 4, batch=8, budget=5000, device="cuda")
    cell = table["units"][0]["variants"]["in-place ReLU"]
    assert cell["largest_batch"] == Line(**cell["live_line"]).largest_batch(5000)


@pytest.mark.slow
def test_plan_prints_what_fits_and_the_largest_batch(tmp_path, capsys):
    raw = synthetic_raw(tmp_path / "run")
    path = write_config(tmp_path / "tiny.yaml", raw)
    argv = ["plan", "--config", str(path), "--gpu-memory", "1MiB", "--batch", "8"]
    assert main(argv, console=Console(width=400)) == 0
    out = capsys.readouterr().out
    assert "training memory per stage and end to end" in out and "max" in out
    row = next(line for line in out.splitlines() if line.startswith("│ e2e"))
    cells = [c.strip() for c in row.strip("│").split("│")]
    numbers = [int(c.replace(",", "")) for c in cells if re.fullmatch(r"[\d,]+", c)]
    assert len(numbers) == len(VARIANTS)  # one max-batch column per variant
    cfg = Config.from_dict(raw)
    for variant, largest in zip(VARIANTS, numbers):  # each is the largest batch whose step fits 1 MiB
        _, build, shape = units(cfg, (3, 16, 16), 4, variant)[-1]
        vcfg = variant.apply(cfg)
        assert measure(build, shape, 4, vcfg, largest).live_peak <= 2**20 < \
            measure(build, shape, 4, vcfg, largest + 1).live_peak, variant.name


@pytest.mark.parametrize("size", ["lots", "0GiB", "-3GB"])
def test_plan_refuses_a_bad_memory_size_in_one_line_before_any_work(tmp_path, capsys, size):
    path = write_config(tmp_path / "tiny.yaml", synthetic_raw(tmp_path / "run"))
    assert main(["plan", "--config", str(path), f"--gpu-memory={size}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --gpu-memory {size!r}") and "24GiB" in err
    assert not (tmp_path / "run" / "plan.json").exists()


@pytest.mark.slow
def test_memory_bench_at_a_toy_size(tmp_path):
    out = tmp_path / "memory.json"
    runpy.run_path(str(ROOT / "benchmarks" / "memory_bench.py"), run_name="benchmark")["main"](
        ["--tiny", "--out", str(out)])
    r = json.loads(out.read_text())
    (table,) = r["table"].values()
    names = [v["name"] for v in table["variants"]]
    assert names == ["plain", "in-place ReLU", "+ checkpointing", "+ sr head"]
    assert [u["unit"] for u in table["units"]] == ["stage 0", "stage 1", "e2e"]
    for u in table["units"]:  # each option keeps no more than the variant before it
        counts = [u["variants"][n]["count_bytes"] for n in names]
        assert counts[2] <= counts[1] and counts[3] <= counts[2], u["unit"]
    assert len(r["step_time"]) == 1 and all(
        set(t["over_previous"]) == set(names) for t in r["step_time"].values())
    assert r["headline"] and all(row["width_greedy"] > 0 and row["width_e2e"] > 0 for row in r["headline"].values())
    assert r["h200_check"] is None and "largest_stage_over_e2e_best_count" in r["targets"]
