"""One frozen, typed config tree, loaded from YAML once at the edge.

`load(paths, overrides)` reads one or more YAML files (later files override earlier ones, so
`configs/smoke.yaml` can be layered on top of a variant file), applies `--set key=value`
overrides, and returns a frozen `Config`. The sections below are `vnca.schema` records: each
field's annotation is its type and its bounds, so an unknown key, a value of the wrong type or
out of bounds raises `ConfigError` with one line that names the key and the file (or `--set`)
it came from. `validate` holds the rules that relate fields to one another.

Where the original code (O, rasmusbergpalm/vnca) and the reproduction (R, albertaillet/vnca)
disagree, the choice is a field here; the comment on each field says which value is whose.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from vnca import schema
from vnca.errors import ConfigError
from vnca.schema import Bool, Float, Str

# The model variants, and the sizes of run (`Config.tier`) smallest first: the one place that
# names them. "smoke": configs/smoke.yaml, seconds, for tests; "demo": configs/demo/, the
# bundled sample in minutes; "cpu": configs/cpu/, the full data in about an hour on 2 CPU
# cores; "paper": configs/<variant>.yaml alone. Reports label every number with its tier.
Variant = Literal["baseline", "doubling", "nondoubling"]
VARIANTS: tuple[Variant, ...] = typing.get_args(Variant)
Tier = Literal["smoke", "demo", "cpu", "paper"]
TIERS: tuple[Tier, ...] = typing.get_args(Tier)
Precision = Literal["float32", "bf16_operands"]  # model.precision (models.kernels.PRECISIONS)

# Ints feed int32 counters and PRNG seeds on the device.
INT_MAX = 2**31 - 1
# Most retries of a failed step (each one may repeat hours of accelerator time).
MAX_RETRIES = 5


def Int(least: int, most: int = INT_MAX) -> Any:
    """A config integer: in [least, most], at most INT_MAX."""
    return schema.Int(least, most)


class Section(schema.Record):
    ERROR = ConfigError


@schema.record
class DataConfig(Section):
    # Images are stored 28x28 in the dataset artifact; the model pads them at its input.
    # 32: zero-pad by 2 on every side (O's doubling run, all of R); 28: no padding (O's
    # non-doubling run, Fig. 9).
    pad_to: Int(28, 32) = 32


@schema.record
class ModelConfig(Section):
    variant: Variant = "doubling"
    z_dim: Int(1) = 256
    # Channels of the encoder's first conv (each later conv doubles it) and, mirrored, of the
    # baseline decoder's last ConvT: 32 in the paper (O and R). Smaller only in the CPU tiers.
    conv_width: Int(1) = 32
    # Width of the NCA update network's hidden layers (doubling: = z_dim; non-doubling: 128).
    nca_hidden: Int(1) = 256
    # Encoder head: "log_std" (O: scale = exp(h)) or "log_var" (R: scale = exp(h / 2)).
    variance_head: Literal["log_std", "log_var"] = "log_std"
    # Doubling VNCA: 1x1 seed, `n_doublings` doublings with `steps_per_stage` NCA steps after
    # each (5 x 8 = 40 steps, 32x32), residual update net with `n_residual_blocks` blocks.
    n_doublings: Int(0) = 5
    steps_per_stage: Int(1) = 8
    n_residual_blocks: Int(0) = 4
    # Non-doubling VNCA: T ~ uniform integer in [min_steps, max_steps], the upper end included
    # when `steps_inclusive` (O: Python randint(32, 64)) or excluded (R: jax randint(32, 64)).
    min_steps: Int(1) = 32
    max_steps: Int(1) = 64
    steps_inclusive: Bool = True
    # Steps at evaluation: null draws from the training range as O does; R uses a fixed 36.
    eval_steps: Int(1) | None = None
    # Probability that a cell updates at a step (O's Fig. 9 run: 0.5; R and O's HEAD: 1.0).
    update_prob: Float(gt=0.0, le=1.0) = 0.5
    # Bias on the zero-initialised last 1x1 conv of the non-doubling update net (O: none, R: yes).
    last_layer_bias: Bool = False
    # Side of the square of cells set to zero by damage (O: 14 on 28, R: 16 on 32).
    damage_size: Int(0) = 14
    # Baseline decoder output: "model_padding" decodes 32x32 and scores the pad (O);
    # "neg_inf_padding" decodes 28x28 and pads with -inf logits, so the pad costs 0 nats (R).
    baseline_output: Literal["model_padding", "neg_inf_padding"] = "neg_inf_padding"
    # jax.checkpoint on every NCA step (memory: 40-64 steps at 32x32x256, trap T8).
    remat: Bool = True
    # How convolutions are computed (the same convolutions up to float32 rounding, and the same
    # parameters): "auto" resolves when a run starts to "winograd" on the CPU and "xla" on GPU
    # and TPU, and the run's resolved config records which. "winograd": the NCA's 3x3 convs by
    # F(4x4, 3x3) tiles (4x fewer multiplications; fastest on the CPU); "im2col": one matmul
    # over 9 shifted copies; the encoder's strided and the baseline's transposed convs are
    # im2col matmuls under both. "xla": the backend's own convs for every layer (GPU/TPU; slow
    # inside a scan on XLA:CPU). Neither O nor R: a speed choice, see models/kernels.py.
    conv_algorithm: Literal["auto", "winograd", "im2col", "xla"] = "auto"
    # Precision of every matmul and conv (models/kernels.py): "float32" operands at the
    # backend's default matmul precision, or "bf16_operands": operands rounded to bfloat16,
    # products accumulated in float32, forward and backward; parameters, optimizer state, NCA
    # state and losses stay float32. A TPU computes the latter for float32 at JAX's default
    # precision (so R's runs did); docs/precision.md has the drift measured against float64.
    precision: Precision = "float32"


@schema.record
class PoolConfig(Section):
    enabled: Bool = False
    size: Int(1) = 1024
    # Share of each batch's rows replaced by pool states (O: 64 of 128).
    batch_share: Float(ge=0.0, le=1.0) = 0.5
    # Share of those pool rows that are damaged before regrowing (O: 32 of 64).
    damage_share: Float(ge=0.0, le=1.0) = 0.5
    # First step whose batch takes rows from the pool (O: 0). Before it every row is a fresh
    # image grown from its seed, and the pool only fills. A departure from O when > 0.
    start_step: Int(0) = 0
    # Whether the KL of a pool row's encoding is charged (O: true); its z is never decoded,
    # since the row grows from the pool's state. A departure from O when false.
    kl_on_pool_rows: Bool = True


@schema.record
class TrainConfig(Section):
    steps: Int(1) = 100_000
    batch_size: Int(1) = 32
    learning_rate: Float(gt=0.0) = 1e-4
    beta: Float(ge=0.0) = 1.0
    # Global gradient-norm clip value (O: 10 doubling, 1 non-doubling and baseline).
    clip_norm: Float(gt=0.0) = 10.0
    # "before_adam" clips gradients (O); "after_adam" clips Adam's updates, which never fires
    # at lr 1e-4 (R, trap T1).
    clip_order: Literal["before_adam", "after_adam"] = "before_adam"
    seed: Int(0) = 0
    # Training images: "train" (50,000; `valid` stays held out for monitoring) or "train+valid"
    # (60,000, as O and R train; validation records are then measured on training images).
    train_split: Literal["train", "train+valid"] = "train"
    checkpoint_every: Int(1) = 1000
    keep_checkpoints: Int(1) = 2
    log_every: Int(1) = 100
    # Validation monitoring (validation split, never test): every N steps on `val_images`.
    val_every: Int(0) = 5000
    val_images: Int(0) = 1024
    val_iw_samples: Int(1) = 1
    pool: PoolConfig = dataclasses.field(default_factory=PoolConfig)


@schema.record
class EvalConfig(Section):
    iw_samples: Int(1) = 128
    # Number of test images for the bound; null means all 10,000.
    n_images: Int(1) | None = None
    batch_size: Int(1) = 8
    seed: Int(0) = 0
    n_samples: Int(0) = 64
    n_reconstructions: Int(0) = 32
    # Test reconstructions and prior samples labelled by the dataset's digit classifier
    # (reconstruction accuracy; samples' top-class probability and label histogram).
    classify_images: Int(0) = 1000
    # Test images on which the untrained model's bound is computed, for comparison (0: skip).
    untrained_images: Int(0) = 256
    tsne_images: Int(0) = 5000
    probe_images: Int(0) = 2000
    probe_steps: Int(1) = 2000
    damage_images: Int(0) = 256
    # Damage recovery: grow `damage_at` steps, damage, then grow `recovery_steps` more.
    damage_at: Int(1) = 36
    recovery_steps: Int(1) = 36
    n_interpolations: Int(0) = 4
    interpolation_points: Int(2) = 8


@schema.record
class HardwareConfig(Section):
    """Where the train step runs on Vertex AI; read only by the pipeline factory."""

    tpu_machine_type: Str = "ct5lp-hightpu-8t"
    tpu_topology: Str = "2x4"
    gpu_machine_type: Str = "a2-highgpu-1g"
    gpu_type: Str = "NVIDIA_TESLA_A100"
    gpu_count: Int(1) = 1
    description: Str = "TPU v5e-8 (single host)"
    # Vertex AI only, fixed when the pipeline is compiled (like the machine): how many times a
    # failed train or evaluate step is run again, and how long each of its custom jobs may run
    # before Vertex AI stops it (at most 7 days, the custom jobs' own default).
    retries: Int(0, MAX_RETRIES) = 1
    timeout_hours: Float(ge=0.1, le=168.0) = 24.0


@schema.record
class Config(Section):
    name: Str = "doubling"
    # Which size of run this is (TIERS); the config files of each tier say what it is for.
    tier: Tier = "paper"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    hardware: HardwareConfig = dataclasses.field(default_factory=HardwareConfig)

    @property
    def smoke(self) -> bool:
        """A seconds-scale run whose numbers mean nothing."""
        return self.tier == "smoke"


# ---------------------------------------------------------------------------------------------
# Loading, validation and dumping.


def _merge(base: dict, new: dict, source: str, sources: dict[str, str], prefix: str = "") -> None:
    for key, value in new.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, source, sources, f"{full}.")
        else:
            base[key] = value
            sources[full] = source
            if isinstance(value, dict):
                for sub in flatten(value, f"{full}.", sections=True):
                    sources[sub] = source


def flatten(d: dict, prefix: str = "", sections: bool = False) -> dict[str, Any]:
    """{'a.b.c': value} of a nested dict's leaves (and, with `sections`, of its sections)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            if sections:
                out[f"{prefix}{k}"] = v
            out.update(flatten(v, f"{prefix}{k}.", sections))
        else:
            out[f"{prefix}{k}"] = v
    return out


# A config file is a few hundred bytes; anything near this is not one.
MAX_CONFIG_BYTES = 1 << 20


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses what a config file never needs: aliases (`*name`, which can
    expand to gigabytes) and duplicate keys in one mapping (YAML keeps the last silently); and
    reads `1e-4` as the number it is (YAML 1.1 reads an exponent without a dot as a string)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "aliases (*name) are not allowed in config files", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark)
            if isinstance(key, str):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _cut(text: str) -> str:
    return text if len(text) <= 80 else text[:80] + "...(cut)"


def _read_yaml(text: str, source: str, allow_empty: bool = False) -> dict:
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text):,} characters is too large for a config file")
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}:{where} is not valid YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config file") from None
    if data is None:
        if allow_empty:
            return {}
        raise ConfigError(f"{source}: the file is empty (a config file needs at least one key)")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    return data


def _read_file(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes is too large for a config file")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {_cut(item)}: expected key=value, for example train.steps=100")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {_cut(item)}: empty key")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    return key.split("."), value


def load(paths: str | Path | list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Load config files (merged in order) and `key=value` overrides into a frozen Config."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    merged: dict = {}
    sources: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            what = "is a directory, not a config file" if path.is_dir() else "config file not found"
            raise ConfigError(f"{path}: {what}")
        _merge(merged, _read_yaml(_read_file(path), str(path)), str(path), sources)
    for item in overrides:
        _set_override(merged, item, sources)
    return validate(from_dict(merged, sources))


def _set_override(merged: dict, item: str, sources: dict[str, str]) -> None:
    parts, value = _parse_override(item)
    node = merged
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {_cut(item)}: {part} is not a section")
    node[parts[-1]] = value
    sources[".".join(parts)] = f"--set {_cut(item)}"


def apply_overrides(cfg: Config, overrides: list[str] = ()) -> Config:
    """`cfg` with `key=value` overrides applied as `load` applies them, validated again."""
    merged = to_dict(cfg)
    sources: dict[str, str] = {"": "config"}
    for item in overrides:
        _set_override(merged, item, sources)
    return validate(from_dict(merged, sources))


def loads(text: str, source: str = "<config>", complete: bool = False) -> Config:
    """Load a config from YAML text (as passed between pipeline steps). `complete`: the text is
    a resolved config (`dump`, a model's config.yaml), which states every key; one that lacks a
    key was cut short or written by another version of vnca, and is refused rather than read
    with defaults filled in."""
    data = _read_yaml(text, source)
    cfg = validate(from_dict(data, {"": source}))
    if complete:
        missing = sorted(set(flatten(to_dict(cfg))) - set(flatten(data)))
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ConfigError(f"{source}: a resolved config without {missing[0]}{more}: cut "
                              "short, or written by another version of vnca")
    return cfg


def from_dict(data: dict, sources: dict[str, str] | None = None) -> Config:
    """`data` (a nested dict as YAML gives it) checked and built; `sources` maps each key
    ("train.steps", "" for the rest) to the file or `--set` that gave it, for error lines."""
    sources = sources or {}
    default = sources.get("", "config")
    return Config.parse(data, lambda key: sources.get(key, default))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    """The resolved config as YAML text; `loads(dump(cfg)) == cfg`."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(dump(cfg))


def validate(cfg: Config) -> Config:
    """The rules that relate fields to one another (each field's own type and bounds are
    checked when it is read); raise ConfigError naming the keys."""
    m, t, d, e = cfg.model, cfg.train, cfg.data, cfg.eval
    if not cfg.name.strip():
        raise ConfigError("name must not be empty")
    if d.pad_to not in (28, 32):
        raise ConfigError(f"data.pad_to must be 28 or 32, got {d.pad_to}")
    if m.variant in ("doubling", "baseline") and d.pad_to != 32:
        raise ConfigError(f"data.pad_to must be 32 for the {m.variant} model, got {d.pad_to}")
    if m.variant == "doubling" and 2**m.n_doublings != d.pad_to:
        raise ConfigError(
            f"model.n_doublings={m.n_doublings} grows a {2**m.n_doublings}x{2**m.n_doublings} "
            f"grid, but data.pad_to is {d.pad_to}"
        )
    if m.min_steps > m.max_steps:
        raise ConfigError(
            f"model.min_steps ({m.min_steps}) must be <= model.max_steps ({m.max_steps})"
        )
    if not m.steps_inclusive and m.min_steps == m.max_steps:
        raise ConfigError("model.min_steps == model.max_steps needs model.steps_inclusive: true")
    if m.damage_size > d.pad_to:
        raise ConfigError(f"model.damage_size must be in [0, {d.pad_to}], got {m.damage_size}")
    if 0 < e.tsne_images < 4:
        raise ConfigError(f"eval.tsne_images must be 0 (skip) or at least 4, got {e.tsne_images}")
    if 0 < e.probe_images < 2:
        raise ConfigError(f"eval.probe_images must be 0 (skip) or at least 2, got "
                          f"{e.probe_images}")
    p = t.pool
    if p.enabled:
        if m.variant != "nondoubling":
            raise ConfigError("train.pool.enabled is only supported for the nondoubling model")
        if p.size < t.batch_size:
            raise ConfigError(f"train.pool.size ({p.size}) must be >= train.batch_size")
    return cfg


def departures(cfg: Config) -> list[str]:
    """The training choices of `cfg` that neither the paper (O) nor the reproduction (R) makes,
    each as a short phrase for the report: knobs that exist only to get small runs learning."""
    p = cfg.train.pool
    out = []
    if p.enabled and p.start_step > 0:
        out.append(f"pool from step {p.start_step:,}")
    if p.enabled and not p.kl_on_pool_rows:
        out.append("no KL on pool rows")
    return out


def max_nca_steps(m: ModelConfig) -> int:
    """Length of the fixed-length scan for the non-doubling VNCA (the largest T drawable)."""
    return m.max_steps if m.steps_inclusive else m.max_steps - 1
