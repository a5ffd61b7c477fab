"""Save and load trained parameters (the final `params.msgpack` of a model directory)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import serialization

from vnca import artifacts, config
from vnca.errors import ConfigError, DataError
from vnca.fileio import write_atomic
from vnca.models.vae import VAE, build_model


def save_params(path: str | Path, params) -> None:
    """Write params atomically: a temporary file renamed into place."""
    write_atomic(path, serialization.to_bytes(jax.device_get(params)))


def load_model(model_dir: str | Path) -> tuple[config.Config, VAE, dict]:
    """(config, model, params) of a directory written by `vnca train`; one-line errors.

    Parameters that are not all finite (a diverged run) are refused here, before anything is
    computed with them.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DataError(f"{model_dir}: model directory not found")
    cfg_path = model_dir / artifacts.RESOLVED_CONFIG
    params_path = model_dir / artifacts.PARAMS
    if not cfg_path.is_file():
        raise DataError(f"{cfg_path}: missing; is {model_dir} a directory written by `vnca train`?")
    if not params_path.is_file():
        raise DataError(f"{params_path}: missing; training did not finish (rerun `vnca train` "
                        "with the same --out to resume)")
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{cfg_path}: cannot read ({' '.join(str(e).split())})") from None
    try:
        cfg = config.loads(text, str(cfg_path), complete=True)
    except ConfigError as e:
        raise DataError(f"{cfg_path}: not a config of this version of vnca ({e})") from None
    model = build_model(cfg)
    template = jax.eval_shape(model.init, jax.random.key(0))
    try:
        raw = serialization.msgpack_restore(params_path.read_bytes())
    except Exception:  # noqa: BLE001 -- msgpack raises several unrelated types on corrupt input
        raise DataError(f"{params_path}: corrupt or truncated parameter file") from None
    want = jax.tree_util.tree_map(lambda a: tuple(a.shape), template)
    try:
        got = jax.tree_util.tree_map(lambda a: tuple(a.shape), raw)
    except Exception:  # noqa: BLE001 -- any malformed tree is a mismatch
        got = None
    if got != want:
        raise DataError(f"{params_path}: parameters do not match the model in {cfg_path} "
                        "(trained for a different config?)")
    leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(raw)]
    if not all(np.issubdtype(a.dtype, np.floating) for a in leaves):
        raise DataError(f"{params_path}: parameters are not all floating-point arrays")
    bad = sum(int(np.size(a) - np.count_nonzero(np.isfinite(a))) for a in leaves)
    if bad:
        total = sum(int(np.size(a)) for a in leaves)
        raise DataError(f"{params_path}: {bad:,} of {total:,} parameters are NaN or infinite "
                        "(the training run diverged); retrain, e.g. with a lower "
                        "train.learning_rate")
    params = serialization.from_state_dict(template, raw)
    return cfg, model, params
