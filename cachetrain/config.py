"""Typed run configuration: YAML file -> frozen dataclasses, with `--set key=value` overrides.

Every section is a frozen dataclass whose field types are the schema. `load_config` walks the YAML
against those types, so an unknown key, a wrong type or an out-of-range value fails at load time
with one line that names the file, the dotted key and what was expected; nothing downstream ever
sees an invalid config. The resolved config (file + overrides) is saved into the run directory.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cachetrain.configs import resolve as resolve_config
from cachetrain.errors import ConfigError
from cachetrain.redact import has_secret, redact


# Field metadata of a key that cannot change what is computed: where things live, how many processes
# read, how often a mid-epoch checkpoint is taken (resume is bit-identical either way), whether
# activations are recomputed in the backward instead of kept (the same gradients: tests/test_memory.py).
# A run accepts a new value for such a key without retraining anything (cachetrain.run.identity).
FREE = {"free": True}


# Field metadata of a key that leaves the training of the first stages alone: `after(j)` marks a key whose
# first greedy stage affected is j (stages 0..j-1 train the same whatever its value); `e2e` says whether it
# changes the end-to-end network. Unmarked result keys affect stage 0 on and the end-to-end network. With
# `stages.<j>.*` (stage j on) this is where `cachetrain sweep` learns which runs of a grid share stages
# (cachetrain.train.sweep): one place, beside each key's declaration.
def after(stage: int | None, e2e: bool = False) -> dict:
    """Metadata of a key whose first affected greedy stage is `stage` (None: no greedy stage)."""
    return {"first_stage": stage, "e2e": e2e}


# Field metadata of a result key added after runs were first identified by their config hash: while it holds
# its default, `cachetrain.run.identity.config_hash` leaves it out, so a run started before the key existed
# keeps the hash it printed then (its config, read through the current schema, gets the default).
def added(meta: dict) -> dict:
    return {**meta, "added": True}


@dataclass(frozen=True)
class KeyScope:
    """What a config key can change: greedy stages first_stage.. (None: none of them), and the end-to-end network."""

    first_stage: int | None
    e2e: bool


def key_scope(key: str) -> KeyScope:
    """The scope of a dotted config key (`train.lr`, `stages.3.lr`), read from the schema's field metadata.
    FREE keys change nothing; `stages.<j>.*` changes stage j on (and not the end-to-end network)."""
    parts = key.split(".")
    if parts[0] == "stages" and len(parts) >= 2 and parts[1].isdigit():
        return KeyScope(int(parts[1]), False)
    cls: Any = Config
    meta: Any = {}
    for part in parts:
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            raise ConfigError(f"{key}: unknown key")
        meta = fields[part].metadata
        cls = typing.get_type_hints(cls)[part]
    if meta.get("free"):
        return KeyScope(None, False)
    if "first_stage" in meta:
        return KeyScope(meta["first_stage"], meta["e2e"])
    return KeyScope(0, True)


@functools.cache
def marked_keys(flag: str) -> dict[str, Any]:
    """{dotted name: default} of every key of the config schema whose field metadata sets `flag` ("free",
    "added"), its sections walked through their types. Cached: the schema does not change in a process, and
    every config hash reads it."""
    def walk(cls: type, prefix: str) -> dict[str, Any]:
        hints, out = typing.get_type_hints(cls), {}
        for f in dataclasses.fields(cls):
            if f.metadata.get(flag):
                out[prefix + f.name] = f.default
            elif dataclasses.is_dataclass(hints[f.name]):
                out.update(walk(hints[f.name], f"{prefix}{f.name}."))
        return out
    return walk(Config, "")


def free_keys() -> frozenset[str]:
    """The keys that cannot change results (`metadata=FREE` where each is declared)."""
    return frozenset(marked_keys("free"))


def added_keys() -> dict[str, Any]:
    """{key: default} of the keys marked `added`: they count in a config's hash only once set otherwise."""
    return dict(marked_keys("added"))


def _check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        shown = repr(got)
        if len(shown) > 120:  # one readable line, whatever was pasted into the value
            shown = shown[:100] + f"... ({len(shown)} characters)"
        raise ConfigError(f"{key}: expected {expected}, got {shown}")


class _Loader(yaml.SafeLoader):
    """YAML as the config files and `--set` values are read: PyYAML's safe loader (YAML 1.1), which reads
    `1e-9` or `5e-2` (no dot) as text, plus YAML 1.2's floats, so they are numbers as users expect."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass(frozen=True)
class DataConfig:
    # fmnist: torchvision FashionMNIST from the Debian package; imagefolder: <root>/{train,val}/<class>/*;
    # synthetic: seeded random images with a class-dependent pattern (learnable, for tests and benchmarks).
    name: Literal["fmnist", "imagefolder", "synthetic"] = "fmnist"
    root: str | None = field(default=None, metadata=FREE)  # None: $CACHETRAIN_DATA, else the default location
    train_subset: int = 0  # first N training samples (0 = all); a stratified-enough prefix for tests
    test_subset: int = 0
    # validation split, held out of the training split (after train_subset) by a permutation seeded with
    # split_seed alone (cachetrain.data.split): None: 1/12 of it, at least 1 (5,000 of Fashion-MNIST's
    # 60,000); an integer: that many samples (0: no validation split); a number in (0, 1): that fraction
    val_samples: int | float | None = None
    split_seed: int = 0
    # stage-0 augmentation on the images (training split only; caching always uses the plain images)
    crop_padding: int = 2  # random crop with this zero padding (0 = no crop)
    flip: bool = True
    image_size: int = 224  # imagefolder: crop size
    # imagefolder: leave out files that are not decodable images (checked when the dataset is opened, so
    # every epoch sees the same files), count them and print the count; false: a bad file is an error
    skip_bad_images: bool = False
    # synthetic data
    shape: list[int] = field(default_factory=lambda: [3, 32, 32])  # (C, H, W)
    num_classes: int = 10
    synthetic_train: int = 2048
    synthetic_test: int = 512
    synthetic_noise: float = 50.0  # std of the pixel noise around each class template (signal: 40 grey levels)

    def __post_init__(self) -> None:
        _check(self.train_subset >= 0, "data.train_subset", "an integer >= 0", self.train_subset)
        _check(self.test_subset >= 0, "data.test_subset", "an integer >= 0", self.test_subset)
        v = self.val_samples
        # whether it leaves a training sample is known only when the dataset is opened (cachetrain.data.split)
        _check(v is None or (v >= 0 if isinstance(v, int) else 0 < v < 1), "data.val_samples",
               "an integer >= 0, a fraction in (0, 1) or null", v)
        _check(self.crop_padding >= 0, "data.crop_padding", "an integer >= 0", self.crop_padding)
        _check(len(self.shape) == 3 and min(self.shape) >= 1, "data.shape", "[C, H, W] of positive integers", self.shape)
        _check(self.num_classes >= 2, "data.num_classes", "an integer >= 2", self.num_classes)
        _check(self.synthetic_train >= 1, "data.synthetic_train", "an integer >= 1", self.synthetic_train)
        _check(self.synthetic_test >= 1, "data.synthetic_test", "an integer >= 1", self.synthetic_test)
        _check(self.synthetic_noise >= 0, "data.synthetic_noise", "a number >= 0", self.synthetic_noise)
        _check(self.image_size >= 8, "data.image_size", "an integer >= 8", self.image_size)

    @property
    def has_val(self) -> bool:
        """Whether the run has a validation split (and its caches a val store), known without opening the data."""
        return self.val_samples != 0

    @property
    def resolved_root(self) -> Path:
        """Where datasets live: data.root, else $CACHETRAIN_DATA, else ~/.cache/cachetrain."""
        return Path(self.root or os.environ.get("CACHETRAIN_DATA") or Path.home() / ".cache" / "cachetrain")


K_RANGE = (1, 8)  # auxiliary depths k a stage may have (model.k, `stage --k`)


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["layercnn", "vgg", "resnet"] = "layercnn"
    stages: int = 4  # J
    width: int = 64  # layercnn: width of stage 0; vgg/resnet: base width (64 in the published nets)
    k: int = 2  # default auxiliary depth; `cachetrain stage --k` overrides it per stage
    aux: Literal["conv", "sr"] = "conv"  # conv: Belilovsky's head; sr: DGL-style, reduce space first
    aux_width: int = 0  # 0: the stage's output width
    # layercnn only
    downsample: list[int] = field(default_factory=list)  # stages that start with space-to-depth
    input_psi: bool = False  # space-to-depth the input image (Belilovsky's ImageNet layout)
    bn: bool = True

    def __post_init__(self) -> None:
        _check(self.stages >= 1, "model.stages", "an integer >= 1", self.stages)
        _check(self.width >= 1, "model.width", "an integer >= 1", self.width)
        _check(K_RANGE[0] <= self.k <= K_RANGE[1], "model.k", f"an integer in [{K_RANGE[0]}, {K_RANGE[1]}]", self.k)
        _check(self.aux_width >= 0, "model.aux_width", "an integer >= 0", self.aux_width)
        bad = [j for j in self.downsample if not 0 <= j < self.stages] if self.arch == "layercnn" else []
        _check(not bad, "model.downsample", f"stage indices in [0, {self.stages - 1}]", self.downsample)
        # vgg: VGG-11's five pooling-delimited groups; resnet: stem + four residual groups
        if self.arch in ("vgg", "resnet"):
            _check(self.stages <= 5, "model.stages", f"an integer in [1, 5] for arch {self.arch}", self.stages)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2  # per stage
    batch_size: int = 128
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_epochs: int = 15  # step schedule: multiply lr by gamma every step_epochs
    gamma: float = 0.2
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True  # CUDA only
    e2e_epochs: int = field(default=0, metadata=after(None, e2e=True))  # `cachetrain e2e`: epochs of end-to-end
    # training (0: the same as one greedy stage)
    # what the end-to-end network starts from: "scratch" (its seeded initial weights: the baseline) or "greedy"
    # (the run's trained greedy stages and the last stage's head: fine-tuning the assembled network end to end,
    # which needs every stage trained first and holds the whole network's activations, as the baseline does)
    e2e_init: Literal["scratch", "greedy"] = field(default="scratch", metadata=added(after(None, e2e=True)))
    e2e_lr: float | None = field(default=None, metadata=added(after(None, e2e=True)))  # None: train.lr
    # also checkpoint every N optimizer steps within an epoch (0: per epoch only)
    checkpoint_steps: int = field(default=0, metadata=FREE)
    # feature-space augmentation for stages j > 0, applied per batch on the device (off by default)
    feature_crop_padding: int = field(default=0, metadata=after(1))
    feature_flip: bool = field(default=False, metadata=after(1))
    # recompute each BN -> ReLU pair in the backward instead of keeping its output (cachetrain.models.chain):
    # the same values and gradients, less memory, two extra elementwise passes per pair
    checkpoint_activations: bool = field(default=False, metadata=FREE)
    # early stopping on validation loss: stop a stage (and the end-to-end baseline) when its validation loss
    # has not improved for this many epochs, and keep the weights of its best epoch (0: off, keep the last)
    patience: int = 0
    # train early stages less (after Trinh 2019's "slow down" of early layers): stage j of J trains with
    # `slowdown_of` (epochs or lr) scaled by slowdown ** (J - 1 - j); epochs round to the nearest integer >= 1.
    # 1.0: off. stages.<j>.<key> set explicitly wins over it.
    slowdown: float = field(default=1.0, metadata=after(0))
    slowdown_of: Literal["epochs", "lr"] = field(default="epochs", metadata=after(0))
    # after each stage (and after `cachetrain e2e`), fit linear probes on its cached outputs
    # (cachetrain.train.diagnostics); they do not change training
    probes: bool = field(default=True, metadata=FREE)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "an integer >= 1", self.epochs)
        _check(self.batch_size >= 1, "train.batch_size", "an integer >= 1", self.batch_size)
        _check(self.lr > 0, "train.lr", "a number > 0", self.lr)
        _check(0 <= self.momentum < 1, "train.momentum", "a number in [0, 1)", self.momentum)
        _check(self.weight_decay >= 0, "train.weight_decay", "a number >= 0", self.weight_decay)
        _check(self.step_epochs >= 1, "train.step_epochs", "an integer >= 1", self.step_epochs)
        _check(0 < self.gamma <= 1, "train.gamma", "a number in (0, 1]", self.gamma)
        _check(self.e2e_epochs >= 0, "train.e2e_epochs", "an integer >= 0", self.e2e_epochs)
        _check(self.e2e_lr is None or self.e2e_lr > 0, "train.e2e_lr", "a number > 0 or null", self.e2e_lr)
        _check(self.checkpoint_steps >= 0, "train.checkpoint_steps", "an integer >= 0", self.checkpoint_steps)
        _check(self.feature_crop_padding >= 0, "train.feature_crop_padding", "an integer >= 0",
               self.feature_crop_padding)
        _check(self.patience >= 0, "train.patience", "an integer >= 0 (0: no early stopping)", self.patience)
        _check(0 < self.slowdown <= 1, "train.slowdown", "a number in (0, 1] (1: off)", self.slowdown)


@dataclass(frozen=True)
class StageOverrides:
    """`stages.<j>.<key>`: training settings stage j uses instead of train.<key> (unset: train's). Lets any
    stage be trained differently, e.g. fewer epochs or a lower learning rate for early stages."""

    epochs: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    feature_crop_padding: int | None = None
    feature_flip: bool | None = None
    patience: int | None = None

    def set_keys(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# how stage outputs are stored and read back: stage 0 trains the same whatever they are, and stage 1 on reads
# them (a run that differs only here shares its trained stage 0; its stage-0 cache may be rebuilt)
CACHED = after(1)


@dataclass(frozen=True)
class CacheConfig:
    # which stage outputs are cached: all (stages 0..J-2); none (every stage recomputes its input from the
    # images through the frozen stages before it, as the published code does); plan (`cachetrain plan`)
    mode: Literal["all", "none", "plan"] = field(default="all", metadata=CACHED)
    # uint8: affine per-channel quantisation, scale from a calibration pass (quant_percentile of each
    # channel's values; 100 = the max), dequantised by the loader on the device
    dtype: Literal["float16", "bfloat16", "float32", "uint8"] = field(default="float16", metadata=CACHED)
    quant_percentile: float = field(default=100.0, metadata=CACHED)
    # calibration batches spread over the training split (0: all of it, one extra pass)
    quant_batches: int = field(default=8, metadata=CACHED)
    # float16 only: keep this many mantissa bits (numcodecs BitRound; 0 = off, max 10)
    bitround: int = field(default=0, metadata=CACHED)
    # training-set views: view 0 is the plain pass, views 1..V-1 are passes with stage-0 augmentation;
    # the loader draws one view per chunk of samples per epoch
    views: int = field(default=1, metadata=CACHED)
    codec: Literal["zstd", "none"] = field(default="zstd", metadata=CACHED)
    # zstd level: on fp16 ReLU maps here, level 1 compressed as well as level 3 (2.05x vs 2.07x, 3.64x vs
    # 3.53x) at 2-2.5x the speed, and compression is what the caching pass waits for on a CPU
    level: int = field(default=1, metadata=CACHED)
    # target chunk size; a chunk always holds a whole number of samples
    chunk_mib: float = field(default=4.0, metadata=CACHED)
    batch_size: int = field(default=256, metadata=CACHED)  # forward batch of the caching pass, rounded to whole chunks
    # where the stores go: "" -> <run>/cache; else <location>/<run folder name>/stage_<j> (the last part of
    # the run directory, not `name`), with location a folder
    # or an object store URL, s3://bucket/prefix (credentials and endpoint: the AWS_* environment)
    location: str = field(default="", metadata=FREE)
    # a remote store's chunk objects, once fetched, kept on this local folder for the next epochs ("" = off),
    # the least recently used deleted beyond remote_copies_gib (cachetrain/cache/copies.py)
    remote_copies: str = field(default="", metadata=FREE)
    remote_copies_gib: float = field(default=100.0, metadata=FREE)

    def __post_init__(self) -> None:
        _check(1 <= self.level <= 22, "cache.level", "an integer in [1, 22]", self.level)
        _check(50 <= self.quant_percentile <= 100, "cache.quant_percentile", "a number in [50, 100]",
               self.quant_percentile)
        _check(self.quant_batches >= 0, "cache.quant_batches", "an integer >= 0", self.quant_batches)
        _check(0 <= self.bitround <= 10, "cache.bitround", "an integer in [0, 10] (mantissa bits kept)", self.bitround)
        _check(not self.bitround or self.dtype == "float16", "cache.bitround", "0 unless cache.dtype is float16",
               self.bitround)
        _check(1 <= self.views <= 64, "cache.views", "an integer in [1, 64]", self.views)
        _check(self.views == 1 or self.mode == "all", "cache.views", "1 unless cache.mode is 'all'", self.views)
        _check(0.0625 <= self.chunk_mib <= 64, "cache.chunk_mib", "a number in [0.0625, 64]", self.chunk_mib)
        _check(self.batch_size >= 1, "cache.batch_size", "an integer >= 1", self.batch_size)
        _check(self.remote_copies_gib > 0, "cache.remote_copies_gib", "a size in GiB above 0", self.remote_copies_gib)
        scheme, _, rest = self.location.partition("://")
        _check(not rest or "@" not in rest.split("/", 1)[0], "cache.location",
               "a URL without credentials (they come from the AWS_* environment variables)", f"{scheme}://...")
        _check(not rest or rest.split("/", 1)[0], "cache.location", "scheme://bucket/prefix", self.location)
        # "s3:/bucket" would otherwise be a local folder named "s3:"
        _check("://" in self.location or not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", self.location),
               "cache.location", "a folder or scheme://bucket/prefix (with two slashes)", self.location)


@dataclass(frozen=True)
class LoaderConfig:
    # auto: caches through the numpy loader; image folders through DALI on CUDA when it is installed,
    # else torchvision. numpy: never DALI. dali: DALI for cache training batches and image folders.
    backend: Literal["auto", "numpy", "dali"] = "auto"
    order: Literal["quasi_random", "random", "sequential"] = field(default="quasi_random", metadata=CACHED)
    # quasi_random: samples are shuffled within this many consecutive chunks
    window_chunks: int = field(default=4, metadata=CACHED)
    # processes decoding chunks in the background (0: read in the training process)
    workers: int = field(default=1, metadata=FREE)
    prefetch_chunks: int = field(default=4, metadata=FREE)  # chunks each worker reads ahead

    def __post_init__(self) -> None:
        _check(self.window_chunks >= 1, "loader.window_chunks", "an integer >= 1", self.window_chunks)
        _check(self.workers >= 0, "loader.workers", "an integer >= 0", self.workers)
        _check(self.prefetch_chunks >= 1, "loader.prefetch_chunks", "an integer >= 1", self.prefetch_chunks)


@dataclass(frozen=True)
class Config:
    name: str = field(default="run", metadata=FREE)
    run_dir: str = field(default="", metadata=FREE)  # "" -> runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    stages: dict[int, StageOverrides] = field(default_factory=dict)  # per-stage training overrides

    def __post_init__(self) -> None:
        _check(not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", self.run_dir), "run_dir",
               "a local folder (only cache.location may be an object store URL)", self.run_dir)
        bad = [j for j in self.stages if not 0 <= j < self.model.stages]
        _check(not bad, "stages", f"stage indices in [0, {self.model.stages - 1}] (model.stages is "
                                  f"{self.model.stages})", bad)
        for j, over in self.stages.items():  # each override checked by TrainConfig's own rules
            try:
                dataclasses.replace(self.train, **over.set_keys())
            except ConfigError as e:
                raise ConfigError(f"stages.{j}.{str(e).removeprefix('train.')}") from None
        patience = [self.train.patience] + [o.patience for o in self.stages.values() if o.patience]
        _check(self.data.has_val or not any(patience), "train.patience",
               "0 when data.val_samples is 0 (early stopping needs a validation split)", max(patience))

    def stage_train(self, j: int) -> TrainConfig:
        """The training settings of greedy stage j: train.*, then the slowdown rule, then stages.<j>.*."""
        t, depth = self.train, self.model.stages
        scaled: dict[str, Any] = {}
        if t.slowdown < 1:
            factor = t.slowdown ** (depth - 1 - j)
            scaled = {"epochs": max(1, round(t.epochs * factor))} if t.slowdown_of == "epochs" else \
                {"lr": t.lr * factor}
        over = self.stages.get(j)
        return dataclasses.replace(t, **{**scaled, **(over.set_keys() if over else {})})

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        # only the keys set: a saved config stays the file the user wrote (and YAML keys stay ints)
        raw["stages"] = {j: over.set_keys() for j, over in sorted(self.stages.items())}
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> Config:
        try:
            return _build(cls, raw, prefix="")
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Return `value` as type `tp` or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, "a mapping of settings", value)
        return _build(tp, value, prefix=key + ".")
    if origin is Literal:
        _check(value in typing.get_args(tp), key, _type_name(tp), value)
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                # the value has this member's type but not its form (a string with a control character):
                # that member's own error says what is wrong, "a string or null" would not
                if arg in (str, float) and isinstance(value, arg):
                    raise
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is dict:  # stages.<j>: integer keys (YAML ints, or "2" from --set stages.2.lr=...)
        _check(isinstance(value, dict), key, "a mapping of stage index to settings", value)
        key_tp, value_tp = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            ok = isinstance(k, int) or (isinstance(k, str) and k.strip().isdigit())
            _check(ok and not isinstance(k, bool), f"{key}.{k}", "a stage index (an integer)", k)
            out[int(k)] = _coerce(value_tp, v, f"{key}.{int(k)}")
        return out
    if origin is list:
        _check(isinstance(value, list), key, _type_name(tp), value)
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        _check(value is None, key, "null", value)
        return None
    if tp is bool:
        _check(isinstance(value, bool), key, "true/false", value)
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value)
        _check(math.isfinite(value), key, "a finite number", value)
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, "a string", value)
        # names and folders: a newline or an escape would break the one-line errors that quote them, a
        # NUL fails every file system call
        _check(not any(ord(c) < 32 or ord(c) == 127 for c in value), key, "a string without control characters",
               value)
        # a secret in a config would be saved in the run's config.yaml and run.json and printed by status:
        # credentials come from the environment (AWS_*), never from a config
        _check(not has_secret(value), key, "no credentials (user:password@) or query string (?...) in it; "
               "credentials come from the AWS_* environment variables", redact(value))
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this module, not user input


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key; expected one of {', '.join(names)}")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # __post_init__ checks name keys relative to the section; they already carry the section name
        raise ConfigError(str(e)) from None


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` override in place; the value is parsed as YAML (`3`, `true`, `[1, 2]`)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. train.epochs=3")
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    try:
        value = _yaml(text)
    except yaml.YAMLError as e:
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--set {dotted.strip()}={text}: the value {text!r} is not valid YAML ({why}); quote it "
                          f"to mean text, e.g. --set '{dotted.strip()}=\"...\"'") from None
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_config(path)  # an existing file, else a built-in config by name (cachetrain/configs)
    source = str(path) if path else "<defaults>"
    if path is not None:
        try:
            loaded = _yaml(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except OSError as e:  # a folder, unreadable: not a write problem (the CLI's OSError handling says so)
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}); expected a YAML config") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        # an empty file would silently start the default (full-size) run: say so instead
        if loaded is None:
            raise ConfigError(f"{path}: the config file is empty; expected a mapping of sections (see configs/)")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level, got a "
                              f"{type(loaded).__name__}")
        raw = loaded
        raw.setdefault("name", Path(path).stem)
    for assignment in overrides:
        apply_override(raw, assignment)
    if overrides:
        source += " with --set " + " ".join(overrides)
    return Config.from_dict(raw, source=source)


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config atomically and durably: a crash leaves the old file or the new one."""
    from cachetrain.durable import atomic_write

    atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
