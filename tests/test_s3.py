"""Caches on S3-compatible object storage (cache.location = s3://bucket/prefix), against a real S3 server
on loopback: moto's server mode, started by these tests in a thread of this process (as zarr-python and
s3fs test themselves). No network beyond 127.0.0.1, no credentials but dummy ones."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("s3fs", reason="the s3 extra (pip install 'cachetrain[s3]') is part of [dev]")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is part of [dev]")

from cachetrain.cache import CacheError, CacheReader  # noqa: E402
from cachetrain.run import StageState
from cachetrain.cache.copies import LocalCopies  # noqa: E402
from cachetrain.cache.loader import CacheLoader  # noqa: E402
from cachetrain.cache.manifest import content_digest  # noqa: E402
from cachetrain.cache.location import RemotePath, _filesystem, location  # noqa: E402
from cachetrain.cache.verify import verify_store  # noqa: E402
from tests.conftest import (cli_in_process, flip_bytes, make_store, sample_ids, synthetic_raw, tiny_greedy, tiny_run,  # noqa: E402
                            write_config)

BUCKET = "cachetrain-test"


class S3Server:
    """moto's S3 server on 127.0.0.1; `stop`/`start` take it down and bring it back on the same port, with
    the same objects (moto keeps them in this process)."""

    def __init__(self):
        self.port = 0
        self._server = None

    def start(self) -> None:
        self._server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]

    def stop(self) -> None:
        self._server.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def s3():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = S3Server()
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": server.endpoint, "AWS_MAX_ATTEMPTS": "3"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _filesystem.cache_clear()
    RemotePath(f"s3://{BUCKET}").fs.mkdir(BUCKET)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _filesystem.cache_clear()


@pytest.fixture
def prefix(s3, request) -> RemotePath:
    """A fresh prefix in the test bucket for one test."""
    return RemotePath(f"s3://{BUCKET}/{request.node.name}")


def _epoch(reader: CacheReader, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = CacheLoader(reader, torch.device("cpu"), workers=0)
    order = np.random.default_rng(seed).permutation(reader.info.num_samples)
    return [(x.clone(), y.clone()) for x, y in loader.batches(order, 40)]


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_a_store_on_s3_holds_the_local_store_s_bytes_and_loads_the_same_batches(tmp_path, prefix, codec):
    local = make_store(tmp_path / "train.zarr", codec=codec)
    remote = make_store(prefix / "train.zarr", codec=codec)
    assert remote.remote and remote.info == local.info
    assert content_digest(prefix / "train.zarr") == content_digest(tmp_path / "train.zarr") is not None
    for c in range(local.info.num_chunks):  # the same chunk bytes, crc32c included
        assert remote.chunk_path(c).read_bytes() == local.chunk_path(c).read_bytes()
    got, want = _epoch(remote), _epoch(local)
    assert len(got) == len(want)
    for (xr, yr), (xl, yl) in zip(got, want):
        assert torch.equal(xr, xl) and torch.equal(yr, yl)
    assert sorted(sample_ids(got).tolist()) == list(range(local.info.num_samples))


@pytest.mark.slow
def test_a_run_with_its_caches_on_s3_trains_as_one_with_local_caches(tmp_path, prefix):
    two = {"arch": "layercnn", "stages": 2, "width": 8, "downsample": [1], "k": 2}
    rows_local = tiny_greedy(tmp_path / "local", model=two).train_all()
    config = write_config(tmp_path / "remote.yaml", synthetic_raw(
        tmp_path / "remote", model=two, cache={"location": str(prefix), "remote_copies": str(tmp_path / "copies")}))
    assert cli_in_process(["train", "--config", str(config)]).returncode == 0
    assert any((tmp_path / "copies").rglob("features_c_*"))  # stage 1 kept the chunks it fetched
    remote = tiny_greedy(tmp_path / "remote", model=two, cache={"location": str(prefix)})
    assert isinstance(remote.run.layout.store(0, "train"), RemotePath)
    rows_remote = remote.state.status()
    assert [r.test_acc for r in rows_remote] == [r.test_acc for r in rows_local]  # the same bytes, the same run
    assert not (tmp_path / "remote" / "cache").exists()  # nothing of the cache went to the local run folder
    assert (prefix / "remote" / "stage_0" / "train.zarr" / "zarr.json").exists()
    assert remote.run.layout.store_key(remote.run.layout.store(0, "test")) == "cache/stage_0/test.zarr"
    # the lineage check reads the remote stores' digests: the last stage is trained, not stale
    assert remote.state.stage_state(1) is StageState.TRAINED

    # a fork copies the stores within the bucket (no hard links there) and its stage 1 reads them as they are
    out = cli_in_process(["fork", "--run", str(tmp_path / "remote"), "--at", "1", "--to", str(tmp_path / "child"),
                          "--set", "train.lr=0.01"])
    assert out.returncode == 0, out.stderr
    child = tiny_greedy(tmp_path / "child", model=two, cache={"location": str(prefix)}, train={"lr": 0.01})
    assert child.state.stage_state(0) is StageState.TRAINED and child.state.first_unfinished() == 1
    for name in ("train.zarr", "test.zarr"):
        assert content_digest(prefix / "child" / "stage_0" / name) == content_digest(prefix / "remote" / "stage_0" / name)


@pytest.mark.slow
def test_verify_names_a_corrupt_object_and_repair_rewrites_it(tmp_path, prefix):
    two = {"arch": "layercnn", "stages": 2, "width": 8, "downsample": [1], "k": 2}
    config, _ = tiny_run(tmp_path, model=two, cache={"location": str(prefix)})
    assert cli_in_process(["stage", "--config", str(config)]).returncode == 0
    greedy = tiny_greedy(tmp_path / "run", model=two, cache={"location": str(prefix)})
    store = greedy.run.layout.store(0, "train")
    reader = CacheReader(store)
    obj = reader.chunk_path(1)
    good = obj.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    obj.write_bytes(bytes(bad))

    with pytest.raises(CacheError, match=r"chunk 1 \(samples .*\) is corrupt: its crc32c"):
        CacheReader(store).fetch_chunk(1)
    problems = verify_store(store)
    assert [(p.chunk, p.problem.split(":")[0]) for p in problems] == [(1, "corrupt")]
    out = cli_in_process(["verify", "--config", str(config)])
    assert out.returncode == 1 and f"{store}: chunk 1" in out.stdout.replace("\n", "")

    assert cli_in_process(["cache", "--config", str(config), "--j", "0", "--repair"]).returncode == 0
    assert obj.read_bytes() == good and verify_store(store) == []


def test_a_missing_object_is_named_and_the_store_is_damaged_until_repaired(tmp_path, prefix):
    reader = make_store(prefix / "train.zarr")
    reader.chunk_path(2).unlink()
    with pytest.raises(CacheError, match=r"damaged: chunk 2 \(samples 64-95\) is missing"):
        CacheReader(prefix / "train.zarr", "fp")
    assert [p.chunk for p in verify_store(prefix / "train.zarr")] == [2]


def test_a_missing_bucket_is_one_line_before_any_work(tmp_path, s3):
    config, _ = tiny_run(tmp_path, cache={"location": "s3://no-such-bucket/x"})
    out = cli_in_process(["stage", "--config", str(config)])
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert "s3://no-such-bucket/x/run: bucket 'no-such-bucket' not found" in out.stderr
    assert not (tmp_path / "run" / "stages").exists()  # nothing trained


def test_credentials_in_the_url_are_refused_without_echoing_them(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", synthetic_raw(tmp_path / "run",
                                                               cache={"location": "s3://AKIAXXX:supersecret@bucket/x"}))
    out = cli_in_process(["status", "--config", str(config)])
    assert out.returncode == 2 and "cache.location" in out.stderr and "supersecret" not in out.stderr


def attempts(monkeypatch, n: int) -> None:
    """AWS_MAX_ATTEMPTS=n from the next request on (the file system is made again with it)."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(n))
    _filesystem.cache_clear()


def test_a_read_retries_while_the_server_is_down_then_fails_in_one_line(prefix, s3, monkeypatch):
    reader = make_store(prefix / "train.zarr", codec="none")
    want = reader.fetch_chunk(3).clone()
    # down for a moment: botocore's backoff retries until it is back. Its waits are jittered (uniform in
    # [0, 1), [0, 2), [0, 4), ... s), so 3 attempts can all fall inside a restart that a loaded machine
    # makes slow (seen in CI); 12 wait 0.5 + 1 + 2 + ... s on average, far longer than any restart
    attempts(monkeypatch, 12)
    s3.stop()
    restart = threading.Timer(0.3, s3.start)
    restart.start()
    try:
        assert torch.equal(reader.fetch_chunk(3), want)
    finally:
        restart.join()
        attempts(monkeypatch, 3)
    # down for good: AWS_MAX_ATTEMPTS (3) attempts, then one line naming the object
    s3.stop()
    try:
        t = time.perf_counter()
        with pytest.raises(CacheError) as err:
            reader.fetch_chunk(4)
        assert time.perf_counter() - t < 30
    finally:
        s3.start()
    line = str(err.value)
    assert "\n" not in line and str(reader.chunk_path(4)) in line and "3 attempts in all" in line


def _connections_for_a_failed_read(monkeypatch, attempts: int) -> int:
    """Connections one read makes to a server that takes each connection and closes it at once."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(attempts))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    _filesystem.cache_clear()
    try:
        with pytest.raises(CacheError, match=f"reading it failed .*{attempts} attempts in all"):
            RemotePath("s3://bucket/some/object").read_bytes()
    finally:
        listener.close()
        _filesystem.cache_clear()  # the next test's file system talks to its own server
    return len(accepted)


def test_a_request_is_tried_aws_max_attempts_times_no_more(monkeypatch):
    # bounded, and by AWS_MAX_ATTEMPTS alone (s3fs's own retries would multiply it)
    once, thrice = (_connections_for_a_failed_read(monkeypatch, n) for n in (1, 3))
    assert thrice == 3 * once and once <= 2


def test_location_parses_urls_and_paths(tmp_path):
    assert location(str(tmp_path)) == tmp_path and location(f"file://{tmp_path}") == tmp_path
    p = location("s3://bucket/a/b/")
    assert isinstance(p, RemotePath) and str(p / "c.zarr") == "s3://bucket/a/b/c.zarr"
    assert p.bucket == "bucket" and (p / "c").parent == p and (p / "x/y").relative_to(p).as_posix() == "x/y"


@pytest.mark.slow
def test_local_copies_serve_later_epochs_stay_under_their_limit_and_are_checked(tmp_path, prefix, monkeypatch):
    make_store(prefix / "train.zarr", codec="none")  # 10 chunks of 576 B samples: 18 KiB + 4 B each
    gets: list[str] = []
    read = RemotePath.read_bytes

    def counting(self, start=None, end=None):
        if "/features/c/" in str(self) and start is None:
            gets.append(str(self))
        return read(self, start, end)
    monkeypatch.setattr(RemotePath, "read_bytes", counting)

    copies = LocalCopies(tmp_path / "copies", limit_bytes=10**9)
    reader = CacheReader(prefix / "train.zarr", "fp", copies=copies)
    first = _epoch(reader)
    assert len(gets) == reader.info.num_chunks
    second = _epoch(CacheReader(prefix / "train.zarr", "fp", copies=copies), seed=0)
    assert len(gets) == reader.info.num_chunks  # no chunk fetched again
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))

    # a copy damaged on the local disk is not used: the object is fetched again, and the batch is right
    copy = next(p for p in (tmp_path / "copies" / "cachetrain-copies").rglob("*") if p.is_file())
    flip_bytes(copy)
    third = _epoch(CacheReader(prefix / "train.zarr", "fp", copies=copies), seed=0)
    assert len(gets) == reader.info.num_chunks + 1
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, third))

    # a limit of 3 chunks: the folder never holds more than that, least recently used out first, and
    # nothing of the given folder outside cachetrain's own subfolder is touched
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "thesis.pdf").write_bytes(b"x" * 10**6)
    small = LocalCopies(tmp_path / "small", limit_bytes=3 * reader.info.raw_chunk_file_bytes)
    small_reader = CacheReader(prefix / "train.zarr", "fp", copies=small)
    for c in range(reader.info.num_chunks):
        small_reader.fetch_chunk(c)
        assert small.size() <= small.limit
    assert (tmp_path / "small" / "thesis.pdf").stat().st_size == 10**6
    kept = sorted(p.name for p in (tmp_path / "small" / "cachetrain-copies").rglob("*") if p.is_file())
    assert kept == sorted(str(small_reader.chunk_path(c).relative_to(small_reader.path)).replace("/", "_")
                          for c in range(reader.info.num_chunks - len(kept), reader.info.num_chunks))


def test_a_network_error_never_makes_a_store_look_stale_and_never_deletes_it(prefix, monkeypatch):
    """One failed GET of the store's metadata during a caching pass is one line; the complete store stays."""
    reader = make_store(prefix / "train.zarr")
    before = sorted((prefix / "train.zarr").sizes().items())
    fs = _filesystem("s3")
    cat = fs.cat_file

    def flaky(path, *args, **kwargs):
        if path.endswith("train.zarr/zarr.json"):
            raise OSError(errno.EIO, "Internal Server Error")  # what s3fs makes of a 500 after the retries
        return cat(path, *args, **kwargs)
    monkeypatch.setattr(fs, "cat_file", flaky)
    with pytest.raises(CacheError, match=r"train.zarr/zarr.json: reading it failed \(OSError: .*Internal Server"):
        make_store(prefix / "train.zarr")  # resume: finds the store complete, unless it cannot read it
    with pytest.raises(CacheError, match=r"zarr.json: reading it failed"):
        verify_store(prefix / "train.zarr")
    monkeypatch.setattr(fs, "cat_file", cat)
    assert sorted((prefix / "train.zarr").sizes().items()) == before
    assert CacheReader(prefix / "train.zarr", "fp").info == reader.info


def test_a_refused_put_is_one_line_naming_the_store(prefix, monkeypatch):
    fs = _filesystem("s3", asynchronous=True)

    async def refused(path, data, **kwargs):
        raise PermissionError("Access Denied")
    monkeypatch.setattr(fs, "_pipe_file", refused)
    with pytest.raises(CacheError, match=rf"{prefix}/train.zarr: writing the store: access denied"):
        make_store(prefix / "train.zarr")


def test_two_runs_of_one_name_cannot_share_a_cache_location(tmp_path, prefix):
    config_a = write_config(tmp_path / "a.yaml", synthetic_raw(tmp_path / "a" / "exp", cache={"location": str(prefix)}))
    config_b = write_config(tmp_path / "b.yaml", synthetic_raw(tmp_path / "b" / "exp", cache={"location": str(prefix)}))
    assert cli_in_process(["stage", "--config", str(config_a), "--no-cache"]).returncode == 0
    out = cli_in_process(["stage", "--config", str(config_b)])
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert f"holds the caches of run {(tmp_path / 'a' / 'exp').resolve()}" in out.stderr


@pytest.mark.parametrize("url, env, reason", [
    ("s3://Bad_Bucket!/x", {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
     'Invalid bucket name "Bad_Bucket!"'),
    ("s3://bucket/x", {}, "Unable to locate credentials"),
])
def test_an_error_no_retry_can_change_is_not_said_to_be_retried(monkeypatch, url, env, reason):
    # issue 25: missing credentials and an invalid bucket name fail before any request; their line said
    # "retried, 5 attempts" and cut botocore's reason at "Parameter validation failed:"
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup for credentials
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _filesystem.cache_clear()
    try:
        with pytest.raises(CacheError) as e:
            RemotePath(url).read_bytes()
    finally:
        _filesystem.cache_clear()
    line = str(e.value)
    assert reason in line and "\n" not in line
    assert "retried" not in line.replace("not retried", "") and "attempts" not in line
