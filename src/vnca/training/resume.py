"""Resuming a run: whether the run already in an output directory may be continued with this
config, whether it finished already, and the state to continue from.

A run resumes from its newest intact checkpoint when its config (`config.yaml`, else the one the
checkpoint's metadata holds) differs from this one only in `RESUMABLE_KEYS`; a run past
train.steps, or of another config, is a one-line ConfigError. A run that finished train.steps
already returns its summary and touches nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax

from vnca import artifacts, config, contracts
from vnca.checkpoint import Checkpointer
from vnca.config import Config
from vnca.errors import ConfigError, DataError

# Config keys that may differ when resuming into an existing output directory; everything else
# (model, data, seed, batch size, optimizer structure, pool) must match the checkpoint.
RESUMABLE_KEYS = ("name", "tier", "train.steps", "train.learning_rate", "train.beta",
                  "train.clip_norm", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.log_every", "train.val_every", "train.val_images",
                  "train.val_iw_samples", "eval", "hardware",
                  "model.remat", "model.conv_algorithm")  # the same math, computed differently


def _check_resumable(text: str, source: str, cfg: Config) -> None:
    """The run whose config is `text` must match `cfg` except in RESUMABLE_KEYS."""
    try:
        old = config.loads(text, source)
    except ConfigError as e:
        raise ConfigError(f"{source}: cannot read the config of the run in this directory ({e})")
    a, b = config.flatten(config.to_dict(old)), config.flatten(config.to_dict(cfg))
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)]
    if diff:
        raise ConfigError(f"{source}: the run in this directory has a different config "
                          f"({', '.join(diff)}); use a new --out or the same config")


def _saved_config_text(cfg_path: Path, ckpt: Checkpointer, latest: int) -> tuple[str, str]:
    """(config text, where from) of the run in a directory: config.yaml, else the config the
    checkpoint's metadata holds."""
    if cfg_path.is_file():
        return cfg_path.read_text(), str(cfg_path)
    try:
        text = ckpt.read_meta(latest).get("config")
    except Exception:  # noqa: BLE001 - unreadable metadata: restore_latest sorts it out
        text = None
    return (text, f"{ckpt.directory}/{latest}") if text else ("", "")


def check_prior_run(cfg: Config, out: Path, ckpt: Checkpointer) -> int | None:
    """The latest checkpoint's step, or None; a ConfigError when the run in `out` has another
    config or is past train.steps."""
    latest = ckpt.latest_step()
    if latest is None:
        return None
    text, source = _saved_config_text(out / artifacts.RESOLVED_CONFIG, ckpt, latest)
    if text:
        _check_resumable(text, source, cfg)
    if latest > cfg.train.steps:
        raise ConfigError(f"{ckpt.directory}: holds step {latest}, past "
                          f"train.steps={cfg.train.steps}; use a new --out or more steps")
    return latest


def finished_run(cfg: Config, out: Path, latest: int | None) -> dict | None:
    """The summary of the run in `out` when it finished train.steps already, else None."""
    steps = cfg.train.steps
    summary_path = out / artifacts.TRAIN_SUMMARY
    if latest != steps or not (out / artifacts.PARAMS).is_file() or not summary_path.is_file():
        return None
    try:
        finished = contracts.TrainSummary.read(summary_path)
    except DataError:  # unreadable or of an older version: the run rewrites it
        return None
    return finished.to_dict() if finished.steps == steps else None


def restore_or_init(ckpt: Checkpointer, latest: int | None, abstract: dict, shardings: dict,
                    init: Callable[[], dict]) -> tuple[dict, dict]:
    """(state, meta) of the newest intact checkpoint, or of a fresh state at step 0."""
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restored = ckpt.restore_latest(target) if latest is not None else None
    if restored is None:
        return init(), {"step": 0, "elapsed_s": 0.0, "examples_seen": 0}
    return restored
