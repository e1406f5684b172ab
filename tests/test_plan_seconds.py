"""The seconds model's new terms, each against numbers worked out by hand: decoding the images, zstd's
ratio and its work, the storage tiers (page cache, disk, object store with and without local copies),
the CPU where decoding and computing share the cores, and the break-even read rate, with a plan whose
choice flips where the decode rate crosses the break-even point.

Every case is two stages in the same units: 1 FLOP/s, so FLOPs are seconds; a stage-0 block of 2 FLOPs a
sample (a training step of 6, an evaluation of 3), stage 1 of 4 (12, 6); 10 bytes a stored sample; 10
training and 5 test samples, 2 epochs. Only stage 0 can be cached (the last stage never is)."""

from __future__ import annotations

import math

import pytest

from cachetrain.plan.planner import Rates, StageCost, Workload, break_even, describe, evaluate, plan

W = Workload(train=10, test=5, epochs=2)
BIG = 10**9


def stages(stored: float | None = None) -> list[StageCost]:
    zstd = {"float16": stored} if stored is not None else {}
    return [StageCost(0, (1, 1, 1), 2.0, 6.0, {"float16": 10}, 3.0, zstd),
            StageCost(1, (1, 1, 1), 4.0, 12.0, {"float16": 10}, 6.0, zstd)]


def rates(decode: float | None = None, **kw) -> Rates:
    """Reads at 5 B/s (2 s a sample), writes at 2 B/s (5 s a sample)."""
    return Rates(1.0, 5.0, 2.0, decode_samples_per_s=decode, **kw)


def test_decoding_caps_every_pass_that_starts_from_the_images():
    """Decoding at 1/25 images/s (25 s an image) is slower than any stage's compute here. Recomputing:
    stage 0 trains on images, 2 epochs x 15 samples x 25 s = 750 s; stage 1 also starts from the images:
    750 s. Caching stage 0: its pass decodes too (15 x max(2, 25, 5) = 375 s), then stage 1 reads the
    cache, compute-bound: 2 x (10 x 12 + 5 x 6) = 300 s."""
    r = rates(decode=1 / 25)
    assert evaluate(stages(), W, (), "float16", r).cost == pytest.approx(750 + 750)
    assert evaluate(stages(), W, (0,), "float16", r).cost == pytest.approx(750 + 375 + 300)
    # without a decode rate, decoding keeps up: the model as it was (stage 0: 2 x (10 x 6 + 5 x 3) = 150 s)
    assert evaluate(stages(), W, (), "float16", rates()).cost == pytest.approx(150 + 2 * (10 * 14 + 5 * 8))


def test_plan_flips_where_the_decode_rate_crosses_the_break_even_point():
    """Above 14 s an image, decoding bounds every pass from the images: recomputing stage 1's input costs
    2 x 15 x d = 30 d, caching stage 0 costs its pass 15 d plus 300 s of reading it: equal at d = 20 s, a
    decode rate of 0.05 images/s. Slower decoding (25 s: 750 against 675) caches stage 0; faster (16 s:
    480 against 540) does not."""
    slow, fast = rates(decode=1 / 25), rates(decode=1 / 16)
    assert plan(stages(), W, BIG, "float16", slow).cached == (0,)
    assert plan(stages(), W, BIG, "float16", slow).cost == pytest.approx(750 + 375 + 300)
    assert plan(stages(), W, BIG, "float16", fast).cached == ()
    assert plan(stages(), W, BIG, "float16", fast).cost == pytest.approx(480 + 480)
    # on either side of 20 s, just off it
    assert plan(stages(), W, BIG, "float16", rates(decode=1 / 20.5)).cached == (0,)
    assert plan(stages(), W, BIG, "float16", rates(decode=1 / 19.5)).cached == ()


def test_break_even_read_rate_by_hand_and_the_plan_flips_across_it():
    """Decoding at 25 s an image: without the cache the run costs 1500 s. With it, stage 0 (750 s) and its
    caching pass (375 s) leave 375 s for stage 1 to read the cache in. Reading 10 B at R B/s takes 10/R s a
    sample, longer than the 12 s step once R < 10/12, and stage 1 then costs 2 x 15 x 10/R = 300/R: 375 s at
    R = 0.8 B/s, the break-even. A tier at 0.9 B/s caches stage 0, one at 0.7 B/s does not."""
    r = rates(decode=1 / 25)
    assert break_even(stages(), W, (0,), 0, "float16", r) == pytest.approx(0.8, rel=1e-6)
    assert break_even(stages(), W, (), 0, "float16", r) == pytest.approx(0.8, rel=1e-6)  # same, from either plan
    assert plan(stages(), W, BIG, "float16", Rates(1.0, 0.9, 2.0, decode_samples_per_s=1 / 25)).cached == (0,)
    assert plan(stages(), W, BIG, "float16", Rates(1.0, 0.7, 2.0, decode_samples_per_s=1 / 25)).cached == ()
    # decoding at 16 s an image: stage 1 reading the cache costs at least 300 s, more than the 240 s its
    # pass leaves: no read rate makes it pay
    assert break_even(stages(), W, (), 0, "float16", rates(decode=1 / 16)) is None
    # the plan as printed carries both figures: the tier's rate beside the break-even
    row = describe(stages(), W, plan(stages(), W, BIG, "float16", r), "float16", r)["stages"][0]
    assert row["break_even_read_bytes_per_s"] == pytest.approx(0.8, rel=1e-6) and row["tier_read_bytes_per_s"] == 5.0
    assert "break_even_read_bytes_per_s" not in describe(stages(), W, plan(stages(), W, BIG, "float16", r),
                                                          "float16", r)["stages"][1]  # the last stage: never cached


def test_on_a_cpu_decoding_and_computing_add_up():
    """The device is the host's CPU: a sample takes its compute plus its decode. Decoding at 1 s an image,
    stage 0 recomputing: 2 x (10 x (6 + 1) + 5 x (3 + 1)) = 180 s; stage 1 from the images: 2 x (10 x (14 + 1)
    + 5 x (8 + 1)) = 390 s. A GPU (overlapping them) takes 150 + 360 s."""
    cpu = rates(decode=1.0, host_shares_compute=True)
    assert evaluate(stages(), W, (), "float16", cpu).cost == pytest.approx(180 + 390)
    assert evaluate(stages(), W, (), "float16", rates(decode=1.0)).cost == pytest.approx(150 + 360)


def test_zstd_stores_fewer_bytes_and_costs_its_decoding():
    """zstd at ratio 2: 5 stored bytes a sample, read at 0.5 B/s: 10 s a sample instead of 20 s raw.
    Decompressing 10 raw bytes at 2 B/s is 5 s of host work a sample. Stage 1 reading cache 0 (GPU: the
    longest of compute, host and read): 2 x (10 x max(12, 5, 10) + 5 x max(6, 5, 10)) = 340 s; raw: 2 x (10 x 20
    + 5 x 20) = 600 s. Caching stage 0 writes 5 B at 2 B/s (2.5 s) and compresses 10 raw bytes at 4 B/s (2.5 s):
    15 x max(2, 2.5, 2.5) = 37.5 s."""
    r = Rates(1.0, 0.5, 2.0, decompress_bytes_per_s=2.0, compress_bytes_per_s=4.0)
    zstd, raw = stages(stored=5.0), stages()
    assert r.train(zstd, W, 0, 1, "float16") == pytest.approx(340)
    assert r.train(raw, W, 0, 1, "float16") == pytest.approx(600)
    assert r.build(zstd, W, -1, 0, "float16") == pytest.approx(37.5)
    # on a CPU the decompression adds to the step: 2 x (10 x max(12 + 5, 10) + 5 x max(6 + 5, 10)) = 450 s
    cpu = Rates(1.0, 0.5, 2.0, decompress_bytes_per_s=2.0, host_shares_compute=True)
    assert cpu.train(zstd, W, 0, 1, "float16") == pytest.approx(450)


def test_a_cache_is_read_at_the_rate_of_its_tier():
    """Stage 1 reading cache 0 (10 B a sample, 15 samples: 150 B of stores), compute 12 s (train) / 6 s (eval):
    - page cache (50 B/s, the cache fits in 1000 B of free RAM): compute-bound, 2 x (120 + 30) = 300 s;
    - free RAM 100 B: read from the disk at 0.5 B/s, 20 s a sample: 2 x 15 x 20 = 600 s;
    - an object store at 0.25 B/s (40 s a sample), every epoch: 2 x 15 x 40 = 1200 s;
    - the same with local copies: the first epoch from the store (600 s), the second from the page cache (150 s);
    - copies limited below the cache's 150 B: every epoch from the store again."""
    local = dict(disk_read_bytes_per_s=0.5, free_ram_bytes=1000)
    assert Rates(1.0, 50.0, 2.0, **local).train(stages(), W, 0, 1, "float16") == pytest.approx(300)
    assert Rates(1.0, 50.0, 2.0, disk_read_bytes_per_s=0.5, free_ram_bytes=100).train(
        stages(), W, 0, 1, "float16") == pytest.approx(600)
    bucket = Rates(1.0, 50.0, 2.0, **local, remote_read_bytes_per_s=0.25)
    assert bucket.train(stages(), W, 0, 1, "float16") == pytest.approx(1200)
    copies = Rates(1.0, 50.0, 2.0, **local, remote_read_bytes_per_s=0.25, copies_bytes=1000)
    assert copies.train(stages(), W, 0, 1, "float16") == pytest.approx(600 + 150)
    small = Rates(1.0, 50.0, 2.0, **local, remote_read_bytes_per_s=0.25, copies_bytes=100)
    assert small.train(stages(), W, 0, 1, "float16") == pytest.approx(1200)
    assert (bucket.tier(150), copies.tier(150)) == ("the object store", "the object store, then copies on the page cache")
    # a caching pass writes to the object store at its PUT rate: 10 B at 1 B/s, 15 samples
    assert Rates(1.0, 50.0, 2.0, remote_read_bytes_per_s=0.25, remote_write_bytes_per_s=1.0).build(
        stages(), W, -1, 0, "float16") == pytest.approx(150)


def test_measured_stage_seconds_replace_the_flop_rate():
    """With seconds measured per stage (training step, evaluation, block forward), the FLOP rate no longer
    counts: stage 1 recomputing from the images takes 2 x (10 x (0.5 + 0.1) + 5 x (0.2 + 0.1)) = 15 s, whatever
    flops_per_s says; its caching pass (stage 0, 15 samples) 15 x 0.1 s (the write at 1e9 B/s is nothing)."""
    r = Rates(1e-9, 1e9, 1e9, stage_seconds=((0.3, 0.15, 0.1), (0.5, 0.2, 0.25)))
    assert r.train(stages(), W, -1, 1, "float16") == pytest.approx(15.0)
    assert r.build(stages(), W, -1, 0, "float16") == pytest.approx(1.5)
    assert math.isclose(r.input_rate(stages(), 0, 1, "float16"), 10 / 0.5)  # 10 B per 0.5 s training step


def test_every_pass_over_the_images_pays_the_pipelines_start():
    """Starting the pipeline (its worker processes) costs 1 s a pass. Each epoch reads the images once to train
    and 3 times to evaluate (test, validation, a training subset): 2 x 4 = 8 s more for a stage on the images,
    and a caching pass of stage 0 writes 3 stores (train, val, test) from them: 3 s more. A stage reading a
    cache starts no image pipeline."""
    w = Workload(train=10, test=5, epochs=2, eval_passes=3, eval_stores=2)
    slow, plain = rates(decode=1.0, decode_start_seconds=1.0), rates(decode=1.0)
    assert slow.train(stages(), w, -1, 1, "float16") - plain.train(stages(), w, -1, 1, "float16") == pytest.approx(8)
    assert slow.build(stages(), w, -1, 0, "float16") - plain.build(stages(), w, -1, 0, "float16") == pytest.approx(3)
    assert slow.train(stages(), w, 0, 1, "float16") == pytest.approx(plain.train(stages(), w, 0, 1, "float16"))
