"""The variant configs a pipeline is built from, sized for a tier (imports no kfp).

A variant is one config file (default: configs/baseline.yaml, doubling.yaml, nondoubling.yaml)
with its tier's overlay on top and the `--set key=value` overrides applied; its `name` names
its steps (train-doubling, ...) and its pipeline parameter (config_doubling). `vnca plan`
reads variants too, without building a pipeline. The default configs and the overlays are the
ones installed with vnca (`vnca.configs`, the checkout's configs/ folder as package data), so
any installed copy finds them; a config file the user names is read from where it is.
"""

from __future__ import annotations

import dataclasses
import keyword
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from vnca import config as vnca_config
from vnca import configs
from vnca.config import TIERS
from vnca.errors import ConfigError, UserError

# The folder of the configs installed with vnca (the checkout's configs/ when installed
# editable; site-packages/vnca/configs otherwise).
CONFIG_DIR = configs.directory()
# The pipeline's variants, in the order its steps and the report list them.
DEFAULT_VARIANTS = ("baseline", "doubling", "nondoubling")
# Run sizes (vnca.config.Config.tier): "paper" uses a variant file alone; "smoke" layers
# configs/smoke.yaml on any variant; "demo" and "cpu" layer configs/<tier>/<variant>.yaml.
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    config: vnca_config.Config

    @property
    def text(self) -> str:
        """The config as the pipeline parameter's value (config_text)."""
        return config_text(self.config)


def config_text(cfg: vnca_config.Config) -> str:
    """The config as one line of YAML (flow style), the form a `config_<name>` parameter takes.

    One line, because kfp 2.17.3 copies parameter defaults unescaped into the comment header
    of the compiled YAML, and a multi-line default there makes the file invalid YAML.
    `vnca.config.loads` reads it like any other YAML.
    """
    text = yaml.safe_dump(
        vnca_config.to_dict(cfg), default_flow_style=True, sort_keys=False, width=1 << 30
    )
    return text.strip()


def default_config_paths() -> list[Path]:
    return [configs.path(f"{name}.yaml") for name in DEFAULT_VARIANTS]


def tier_overlay(tier: str, variant: str) -> Path | None:
    """The installed overlay file that sizes a `variant` config for `tier` (None for "paper")."""
    if tier not in TIERS:
        raise UserError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    if tier == "paper":
        return None
    return configs.path("smoke.yaml" if tier == "smoke" else f"{tier}/{variant}.yaml")


def check_variant_names(names: list[str]) -> None:
    """Variant names become step and parameter names: lower-case identifiers, each used once."""
    for name in names:
        if not _NAME.match(name) or keyword.iskeyword(name):
            raise ConfigError(
                f"config name {name!r} cannot name a pipeline variant: use lower-case letters, "
                "digits and underscores, starting with a letter"
            )
    if len(set(names)) != len(names) or not names:
        raise ConfigError(f"the pipeline needs distinct config names, got {names}")


def load_variants(
    configs: Sequence[str | Path | vnca_config.Config] | None = None,
    tier: str = "paper",
    overrides: Sequence[str] = (),
) -> list[Variant]:
    """One Variant per config file (or Config): the `tier`'s overlay for the file's model goes
    on top of each file, then the `key=value` overrides apply to every variant."""
    variants = []
    for item in configs or default_config_paths():
        if isinstance(item, vnca_config.Config):
            if tier != "paper" or overrides:
                raise UserError("tiers and overrides apply to config files, not Config objects")
            cfg = item
        else:
            overlay = tier_overlay(tier, vnca_config.load([item]).model.variant)
            cfg = vnca_config.load([item] + ([overlay] if overlay else []), list(overrides))
        variants.append(Variant(cfg.name, cfg))
    check_variant_names([v.name for v in variants])
    return variants
