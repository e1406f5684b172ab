"""A run's live curves: TensorBoard event files under `<run>/tb/`, written as the run trains.

`tensorboard --logdir runs/` shows every run under runs/ as one TensorBoard run (`<name>/tb`), so the
charts overlay runs, one colour each. The numbers are the run's records (which stay the source of
truth), tagged `<group>/<unit>` so each group lays its units' charts side by side (`<unit>`: `stage_<j>`
or `e2e`; `x`: the unit's optimizer step, so an epoch row sits at x = epoch * steps per epoch):

    train_loss_step, train_acc_step, lr_step  every ~1% of an epoch (cachetrain.train.trainer.step_period):
                                              the epoch's running loss and accuracy so far (what the
                                              progress bar shows), the learning rate
    train_loss, train_acc, val_loss, val_acc, test_loss, test_acc, gap, lr, samples_per_s, data_wait
                                              per epoch: the unit's metrics.jsonl row (`gap`: train minus
                                              val accuracy; `data_wait`: data_seconds / train_seconds)
    by_stage/test_acc, val_acc, train_acc, gap   x = j: greedy stage j's kept epoch (its metrics row)
    by_stage/e2e_test_acc                     x = J-1: the end-to-end network's kept epoch
    by_stage/probe_<pool>_test_acc, by_stage/e2e_probe_<pool>_test_acc   x = j: probes.jsonl rows
    cache/written_mb, cache/write_mb_per_s, cache/disk_mb   x = j: stage j's latest caching pass (MB of
                                              outputs computed in cache.dtype, over the pass's seconds;
                                              its stores' size on disk after it)
    config (text), and the config flattened as hparams (metrics: by_stage/test_acc, e2e_test_acc)

Files. Each unit has one event file at a time (`events.out.tfevents.<s>.<ns>.<unit>`), appended while it
trains; the run's summary (config, hparams, by_stage, cache) is one more (`...run`), rewritten whole, under
a new name, whenever one of its numbers changes. Events wait in memory and reach the file every
FLUSH_SECONDS, and before every checkpoint (flushed and fsynced: what a checkpoint covers is on disk).

Resume. When a unit starts, before its first new event, its file is rewritten: step events up to the
step it resumes from are kept, epoch events are made again from metrics.jsonl (already cut back to the
checkpoint's epoch), and its older files are deleted. So what a killed process wrote after its last
checkpoint goes, and the curves continue without a duplicated or a missing step (on the CPU, with the
values of an uninterrupted run). A rewrite goes to a name TensorBoard does not read (`.<unit>.writing`),
then is renamed in; a crash between that rename and the deletion leaves events twice on disk, which the
next start drops (one event per tag and step, the newest).

Live, TensorBoard's default loader (its data server) takes a rewritten file as it is: a series whose step
goes back has its points replaced from there. Its Python loader (`--load_fast=false`) reads finished runs
alike, but live it adds the rewritten points beside the old ones until it restarts. Only rank 0 writes.
Without the `tensorboard` package the run says so once and trains on without curves.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import google_crc32c  # zarr's dependency: the crc32c TFRecord framing needs, in C

from cachetrain.cache import disk_bytes
from cachetrain.config import Config
from cachetrain.durable import fsync_path, make_dirs
from cachetrain.run.identity import flatten
from cachetrain.run.layout import E2E, RunLayout, Unit
from cachetrain.run.records import Records

FLUSH_SECONDS = 5.0  # TensorBoard reloads every 5 s by default: fresher than that would not show
STEP_TAGS = {"train_loss": "train_loss_step", "train_acc": "train_acc_step", "lr": "lr_step"}
EPOCH_TAGS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "gap", "lr",
              "samples_per_s")
BY_STAGE = {"test_acc": "test_acc", "val_acc": "val_acc", "train_eval_acc": "train_acc", "gap": "gap"}
HPARAM_METRICS = ("by_stage/test_acc", "by_stage/e2e_test_acc")
SUMMARY = "run"  # the summary file's suffix
MISSING = "tensorboard is not installed: no curves in {tb} (pip install tensorboard); training goes on"


def unit_label(unit: Unit) -> str:
    """A unit as a tag suffix and file suffix: `stage_<j>` or `e2e`."""
    return E2E if unit == E2E else f"stage_{unit}"


def epoch_scalars(row: dict) -> dict[str, float]:
    """The per-epoch scalars of one metrics.jsonl row, by group (absent or None values left out)."""
    out = {key: float(row[key]) for key in EPOCH_TAGS if row.get(key) is not None}
    if row.get("data_seconds") is not None and row.get("train_seconds"):
        out["data_wait"] = float(row["data_seconds"]) / float(row["train_seconds"])
    return out


def kept_row(rows: list[dict]) -> dict | None:
    """The row of the epoch whose weights a finished unit keeps: the selected epoch under early stopping,
    else the last."""
    if not rows:
        return None
    keep = rows[-1].get("selected_epoch") or rows[-1]["epoch"]
    return next((r for r in rows if r["epoch"] == keep), rows[-1])


# -- TFRecord framing: length, masked crc32c of the length, data, masked crc32c of the data -------------

def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def records(path: Path) -> Iterator[bytes]:
    """The records of an event file, up to the first one torn by a crash or failing its checksum."""
    data = path.read_bytes()
    at = 0
    while at + 12 <= len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        end = at + 12 + length + 4
        if struct.unpack("<I", data[at + 8:at + 12])[0] != _masked_crc(header) or end > len(data):
            return
        body = data[at + 12:end - 4]
        if struct.unpack("<I", data[end - 4:end])[0] != _masked_crc(body):
            return
        yield body
        at = end


@dataclass(frozen=True)
class Point:
    """One scalar of one tag at one step."""

    tag: str
    step: int
    value: float
    wall: float


class Protos:
    """The tensorboard protobuf classes (imported once per run, when tensorboard is installed) and the
    events this module writes."""

    def __init__(self):
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
        from tensorboard.plugins.text import plugin_data_pb2 as text_data_pb2

        self.event_pb2, self.summary_pb2, self.tensor_pb2 = event_pb2, summary_pb2, tensor_pb2
        self.shape_pb2, self.types_pb2 = tensor_shape_pb2, types_pb2
        self.api_pb2, self.hparams_pb2, self.text_pb2 = api_pb2, plugin_data_pb2, text_data_pb2

    def header(self) -> bytes:
        return frame(self.event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())

    def scalars(self, step: int, values: dict[str, float], wall: float | None = None) -> bytes:
        """One event holding `values` ({tag: value}) at `step`."""
        summary = self.summary_pb2.Summary(value=[self.summary_pb2.Summary.Value(tag=tag, simple_value=value)
                                                  for tag, value in values.items()])
        return frame(self.event_pb2.Event(wall_time=wall or time.time(), step=step, summary=summary)
                     .SerializeToString())

    def points(self, data: bytes) -> list[Point]:
        """The scalars of one event record (none for other kinds of events)."""
        event = self.event_pb2.Event.FromString(data)
        if not event.HasField("summary"):
            return []
        return [Point(v.tag, event.step, v.simple_value, event.wall_time) for v in event.summary.value
                if v.WhichOneof("value") == "simple_value"]

    def _plugin_value(self, tag: str, plugin: str, content: bytes, tensor) -> bytes:
        meta = self.summary_pb2.SummaryMetadata(
            plugin_data=self.summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin, content=content))
        summary = self.summary_pb2.Summary(value=[self.summary_pb2.Summary.Value(tag=tag, metadata=meta,
                                                                                 tensor=tensor)])
        return frame(self.event_pb2.Event(wall_time=time.time(), step=0, summary=summary).SerializeToString())

    def text(self, tag: str, markdown: str) -> bytes:
        tensor = self.tensor_pb2.TensorProto(dtype=self.types_pb2.DT_STRING, string_val=[markdown.encode()],
                                             tensor_shape=self.shape_pb2.TensorShapeProto())
        return self._plugin_value(tag, "text", self.text_pb2.TextPluginData(version=0).SerializeToString(), tensor)

    def hparams(self, values: dict[str, float | str | bool], metrics: Iterable[str]) -> list[bytes]:
        """The hparams plugin's experiment (which hparams and metrics exist) and this run's session (its
        values); the plugin reads each metric's last value from the run's scalars."""
        empty = self.tensor_pb2.TensorProto(dtype=self.types_pb2.DT_FLOAT, tensor_shape=self.shape_pb2.TensorShapeProto(
            dim=[self.shape_pb2.TensorShapeProto.Dim(size=0)]))
        api, data = self.api_pb2, self.hparams_pb2
        experiment = api.Experiment(hparam_infos=[api.HParamInfo(name=name) for name in sorted(values)],
                                    metric_infos=[api.MetricInfo(name=api.MetricName(tag=m)) for m in metrics])
        group = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
        session = data.SessionStartInfo(group_name=group, start_time_secs=time.time())
        for name, value in sorted(values.items()):
            if isinstance(value, bool):
                session.hparams[name].bool_value = value
            elif isinstance(value, (int, float)):
                session.hparams[name].number_value = value
            else:
                session.hparams[name].string_value = str(value)
        return [self._plugin_value("_hparams_/experiment", "hparams",
                                   data.HParamsPluginData(version=0, experiment=experiment).SerializeToString(), empty),
                self._plugin_value("_hparams_/session_start_info", "hparams",
                                   data.HParamsPluginData(version=0, session_start_info=session).SerializeToString(),
                                   empty)]


def flat_config(cfg: Config) -> dict[str, float | str | bool]:
    """The config as hparams: `section.key` -> a number, bool or string (lists and None as their JSON)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in flatten(cfg.to_dict()).items()}


class EventFile:
    """The event files of one kind in the tb folder (a unit's, or the run summary's): the current one,
    written through a buffer, and the rewrite that replaces all of them."""

    def __init__(self, folder: Path, kind: str):
        self.folder, self.kind = folder, kind
        self.path: Path | None = None
        self.pending: list[bytes] = []
        self.flushed_at = time.monotonic()

    def existing(self) -> list[Path]:
        return sorted(self.folder.glob(f"events.out.tfevents.*.{self.kind}"))

    def replace_all(self, content: list[bytes]) -> None:
        """A new file holding `content` replaces every file of this kind (module docstring: a temp name,
        renamed in, then the old files deleted); later `add`s append to it."""
        old = self.existing()
        make_dirs(self.folder)
        tmp = self.folder / f".{self.kind}.writing"
        with open(tmp, "wb") as f:
            f.write(b"".join(content))
            f.flush()
            os.fsync(f.fileno())
        ns = time.time_ns()
        path = self.folder / f"events.out.tfevents.{ns // 10**9:010d}.{ns % 10**9:09d}.{self.kind}"
        while path.exists() or path in old:
            ns += 1
            path = self.folder / f"events.out.tfevents.{ns // 10**9:010d}.{ns % 10**9:09d}.{self.kind}"
        os.replace(tmp, path)
        fsync_path(self.folder)
        for p in old:
            p.unlink(missing_ok=True)
        self.path, self.pending, self.flushed_at = path, [], time.monotonic()

    def add(self, record: bytes) -> None:
        self.pending.append(record)
        if time.monotonic() - self.flushed_at >= FLUSH_SECONDS:
            self.flush()

    def flush(self, durable: bool = False) -> None:
        if self.path is None:
            return
        if self.pending:
            with open(self.path, "ab") as f:
                f.write(b"".join(self.pending))
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            self.pending = []
        self.flushed_at = time.monotonic()


class RunEvents:
    """The run's event files (module docstring). Rank 0 (`writer`) writes; elsewhere every call does nothing.
    tensorboard is imported at the first event; without it, `say` is called once and nothing is written."""

    def __init__(self, layout: RunLayout, cfg: Config, records: Records, writer: bool, say: Callable[[str], None]):
        self.folder, self.cfg, self.records, self.say = layout.tb, cfg, records, say
        self.writer = writer
        self._protos: Protos | None | bool = None  # False: tensorboard is missing (said once)
        self._summary_file = EventFile(self.folder, SUMMARY)
        self._summary: dict[tuple[str, int], Point] | None = None
        self._summary_written = False  # by this process: its config (and hparams) may differ from the file's

    def protos(self) -> Protos | None:
        if not self.writer or self._protos is False:
            return None
        if self._protos is None:
            try:
                self._protos = Protos()
            except ImportError:
                self._protos = False
                self.say(MISSING.format(tb=self.folder))
                return None
        return self._protos

    def unit(self, unit: Unit, steps: int, epoch: int = 0, batch: int = 0) -> UnitCurves:
        """The curves of a unit that starts at (epoch, batch) (0, 0: from scratch), `steps` per epoch."""
        return UnitCurves(self, unit, steps, epoch, batch)

    # -- the summary: config, hparams, by_stage, cache --------------------------------------------------
    def _points(self) -> dict[tuple[str, int], Point] | None:
        if self.protos() is None:
            return None
        if self._summary is None:
            self._summary = {}
            for path in self._summary_file.existing():
                for rec in records(path):
                    for p in self._protos.points(rec):
                        self._summary[(p.tag, p.step)] = p
        return self._summary

    def _rewrite_summary(self) -> None:
        protos = self._protos
        content = [protos.header(), protos.text("config", _config_markdown(self.cfg)),
                   *protos.hparams(flat_config(self.cfg), HPARAM_METRICS)]
        content += [protos.scalars(p.step, {p.tag: p.value}, p.wall) for p in sorted(self._summary.values(),
                                                                                    key=lambda p: (p.step, p.tag))]
        self._summary_file.replace_all(content)

    def update_summary(self, values: dict[tuple[str, int], float] | None = None,
                       drop: Callable[[str, int], bool] | None = None) -> None:
        """Set `values` ({(tag, step): value}) and remove the points `drop(tag, step)` names, then rewrite the
        summary; with neither, rewrite it (the config may have changed: `--from-stage`)."""
        points = self._points()
        if points is None:
            return
        gone = [k for k in points if drop is not None and drop(*k)]
        for key in gone:
            del points[key]
        now = time.time()
        for (tag, step), value in (values or {}).items():
            points[(tag, step)] = Point(tag, step, float(value), now)
        if gone or values or not self._summary_written:
            self._rewrite_summary()
            self._summary_written = True

    def forget(self, unit: Unit) -> None:
        """A unit trained again from scratch: its by_stage points (and a stage's cache and probe points) go."""
        if unit == E2E:
            self.update_summary(drop=lambda tag, step: tag.startswith("by_stage/e2e_"))
        else:
            self.update_summary(drop=lambda tag, step: step == unit and not tag.startswith("by_stage/e2e_"))

    def unit_finished(self, unit: Unit) -> None:
        """A unit trained to its end: its kept epoch's accuracies go to the by_stage view."""
        if self.protos() is None:
            return
        row = kept_row(self.records.read_metrics(unit))
        if row is None:
            return
        if unit == E2E:
            self.update_summary({("by_stage/e2e_test_acc", self.cfg.model.stages - 1): row["test_acc"]})
            return
        self.update_summary({(f"by_stage/{tag}", unit): row[key] for key, tag in BY_STAGE.items()
                             if row.get(key) is not None})

    def probes(self, rows: list[dict]) -> None:
        """Probe rows (cachetrain.train.diagnostics): their test accuracy at x = stage."""
        self.update_summary({(f"by_stage/{'e2e_' if r['net'] == 'e2e' else ''}probe_{r['pool']}_test_acc",
                              r["stage"]): r["test_acc"] for r in rows})

    def cache_pass(self, j: int, samples: int, sample_bytes: int, seconds: float, stores: list) -> None:
        """One caching pass of stage j: `samples` outputs of `sample_bytes` each computed in `seconds`, into
        `stores` (their size on disk is read after it)."""
        if self.protos() is None:
            return
        written = samples * sample_bytes / 1e6
        self.update_summary({("cache/written_mb", j): written,
                             ("cache/write_mb_per_s", j): written / max(seconds, 1e-9),
                             ("cache/disk_mb", j): sum(disk_bytes(path) for path in stores) / 1e6})


class UnitCurves:
    """One unit's curves while it trains: step rows and epoch rows, flushed before every checkpoint."""

    def __init__(self, events: RunEvents, unit: Unit, steps: int, epoch: int, batch: int):
        self.events, self.unit, self.steps = events, unit, steps
        self.label = unit_label(unit)
        self.keep_step = epoch * steps + batch  # steps after this one were not checkpointed
        self.keep_epoch = epoch
        self.file = EventFile(events.folder, self.label)
        self.started = False

    def _begin(self) -> Protos | None:
        """At the first event: rewrite this unit's file as the module docstring's "Resume" says."""
        protos = self.events.protos()
        if protos is None or self.started:
            return protos
        self.started = True
        if self.keep_step == 0:
            self.events.forget(self.unit)  # a fresh start: the unit's old final numbers no longer hold
        else:
            self.events.update_summary()  # this process's config, once
        step_tags = {f"{t}/{self.label}" for t in STEP_TAGS.values()}
        kept: dict[tuple[str, int], Point] = {}
        for path in self.file.existing():
            for rec in records(path):
                for p in protos.points(rec):
                    kept[(p.tag, p.step)] = p  # a later file's event for the same tag and step wins
        content = [protos.header()]
        for (tag, step), p in sorted(kept.items(), key=lambda kv: kv[0][1]):
            if tag in step_tags and step <= self.keep_step:
                content.append(protos.scalars(step, {tag: p.value}, p.wall))
        for row in self.events.records.read_metrics(self.unit):
            if row["epoch"] <= self.keep_epoch:
                step = row["epoch"] * self.steps
                for group, value in epoch_scalars(row).items():
                    tag = f"{group}/{self.label}"
                    old = kept.get((tag, step))
                    content.append(protos.scalars(step, {tag: value}, old.wall if old else None))
        self.file.replace_all(content)
        return protos

    def step(self, step: int, row: dict) -> None:
        """A step row (cachetrain.train.trainer.fit): the running train_loss and train_acc, and lr."""
        protos = self._begin()
        if protos is not None:
            self.file.add(protos.scalars(step, {f"{STEP_TAGS[k]}/{self.label}": float(v) for k, v in row.items()
                                                if k in STEP_TAGS and v is not None}))

    def epoch(self, row: dict) -> None:
        """An epoch's metrics row, as it goes to metrics.jsonl."""
        protos = self._begin()
        if protos is not None:
            self.file.add(protos.scalars(row["epoch"] * self.steps,
                                         {f"{g}/{self.label}": v for g, v in epoch_scalars(row).items()}))

    def flush(self) -> None:
        """Before a checkpoint: every event it covers reaches the disk."""
        if self._begin() is not None:
            self.file.flush(durable=True)

    def close(self) -> None:
        if self.started:
            self.file.flush()


def _config_markdown(cfg: Config) -> str:
    import yaml

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    return "\n".join("    " + line for line in text.splitlines())  # a markdown code block
