"""Config loading: layered files, overrides, one-line errors naming key and file."""

import dataclasses
import re
import subprocess
import sys
import typing

import pytest

from vnca import config, configs, schema
from vnca.errors import ConfigError


def test_paper_configs_load_with_the_paper_settings():
    d = config.load("configs/doubling.yaml")
    assert (d.model.variant, d.model.z_dim, d.train.batch_size, d.train.clip_norm) == (
        "doubling", 256, 32, 10.0)
    n = config.load("configs/nondoubling.yaml")
    assert (n.model.z_dim, n.model.update_prob, n.data.pad_to, n.train.batch_size) == (128, 0.5, 28, 128)
    assert n.train.pool.enabled and n.train.pool.size == 1024
    b = config.load("configs/baseline.yaml")
    assert (b.model.variant, b.train.clip_norm, b.train.clip_order) == ("baseline", 1.0, "before_adam")
    for c in (d, n, b):
        assert c.train.steps == 100_000 and c.train.learning_rate == 1e-4 and not c.smoke


def test_smoke_overlay_keeps_the_variant_and_shrinks_the_run():
    c = config.load(["configs/nondoubling.yaml", "configs/smoke.yaml"])
    assert c.smoke and c.model.variant == "nondoubling" and c.data.pad_to == 28
    assert c.train.steps == 20 and c.model.z_dim == 16 and c.train.pool.enabled


def test_set_overrides_are_typed():
    c = config.load("configs/doubling.yaml", ["train.batch_size=64", "model.eval_steps=36",
                                             "train.learning_rate=3e-4", "tier=smoke"])
    assert c.train.batch_size == 64 and c.model.eval_steps == 36
    assert c.train.learning_rate == pytest.approx(3e-4) and c.smoke is True


def test_dump_and_loads_round_trip():
    c = config.load(["configs/nondoubling.yaml", "configs/smoke.yaml"], ["model.eval_steps=7"])
    assert config.loads(config.dump(c)) == c


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  zdim: 3\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    msg = str(e.value)
    assert "model.zdim" in msg and str(p) in msg and "\n" not in msg


def test_wrong_type_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: 'train.batch_size' must be an integer in "
                       r"\[1, 2147483647\], got \"lots\"$"):
        config.load(p)


def test_bad_choice_and_bad_override():
    with pytest.raises(ConfigError, match="'model.variance_head' must be one of \"log_std\", "):
        config.load("configs/doubling.yaml", ["model.variance_head=log_sigma"])
    with pytest.raises(ConfigError, match="--set train.stepz=3: unknown key|unknown key 'train.stepz'"):
        config.load("configs/doubling.yaml", ["train.stepz=3"])
    with pytest.raises(ConfigError, match="key=value"):
        config.load("configs/doubling.yaml", ["train.steps"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="pad_to must be 32 for the doubling"):
        config.load("configs/doubling.yaml", ["data.pad_to=28"])
    with pytest.raises(ConfigError, match="update_prob"):
        config.load("configs/nondoubling.yaml", ["model.update_prob=0"])


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(p)


def test_cli_reports_a_config_mistake_in_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  batch_sise: 3\n")
    r = subprocess.run([sys.executable, "-m", "vnca.cli", "train", "--config", str(p),
                        "--data", str(tmp_path), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.batch_sise" in lines[0] and "bad.yaml" in lines[0]


# --- every value checked at load, before anything is compiled (issue 13) ---------------------

@pytest.mark.parametrize("override, key", [
    ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("train.log_every=0", "train.log_every"),
    ("train.val_images=-8", "train.val_images"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.learning_rate=.nan", "train.learning_rate"),
    ("train.learning_rate=.inf", "train.learning_rate"),
    ("train.learning_rate=nan", "train.learning_rate"),
    ("train.learning_rate=-1e-4", "train.learning_rate"),
    ("train.beta=-0.5", "train.beta"),
    ("train.clip_norm=0", "train.clip_norm"),
    ("model.steps_per_stage=0", "model.steps_per_stage"),
    ("model.n_residual_blocks=-1", "model.n_residual_blocks"),
    ("model.eval_steps=-3", "model.eval_steps"),
    ("model.eval_steps=0", "model.eval_steps"),
    ("train.seed=-1", "train.seed"),
    ("train.steps=99999999999", "train.steps"),
    ("train.val_iw_samples=0", "train.val_iw_samples"),
    ("train.pool.batch_share=1.5", "train.pool.batch_share"),
    ("eval.iw_samples=0", "eval.iw_samples"),
    ("eval.n_images=0", "eval.n_images"),
    ("eval.damage_at=0", "eval.damage_at"),
    ("eval.tsne_images=2", "eval.tsne_images"),
    ("eval.interpolation_points=1", "eval.interpolation_points"),
    ("hardware.gpu_count=0", "hardware.gpu_count"),
    ("name=' '", "name"),
])
def test_out_of_range_values_fail_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        config.load("configs/doubling.yaml", [override])
    msg = str(e.value)
    assert key in msg and "\n" not in msg and len(msg) < 200


def test_every_number_declares_its_bounds():
    """Every int field is bounded on both sides (ints feed int32 counters and seeds), every
    float is finite: `schema.describe` of each field says so."""
    def leaves(cls, prefix=""):
        for name, field in cls.__pydantic_fields__.items():
            if isinstance(field.default_factory, type):  # a section
                yield from leaves(field.default_factory, f"{prefix}{name}.")
            else:
                yield prefix + name, schema.describe(schema.field_types(cls)[name])

    kinds = dict(leaves(config.Config))
    assert kinds["train.pool.start_step"] == "an integer in [0, 2147483647]"
    assert kinds["model.eval_steps"] == "an integer in [1, 2147483647] or null"
    assert kinds["hardware.timeout_hours"] == "a finite number in [0.1, 168]"
    ints = {k for k, v in kinds.items() if "integer" in v}
    assert ints and all(re.search(r"^an integer in \[\d+, \d+\]", kinds[k]) for k in ints)
    floats = {k for k, v in kinds.items() if "number" in v}
    assert floats and all(kinds[k].startswith("a finite number") for k in floats)


def test_yaml_numbers_are_read_strictly(tmp_path):
    """`1e-4` is the number (YAML 1.1 reads it as a string); a quoted number, a bool for an
    int and a float for an int are refused, an int for a float is taken as the float."""
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rate: 3e-4\n  clip_norm: 1\n")
    c = config.load(["configs/doubling.yaml", p])
    assert c.train.learning_rate == 3e-4 and c.train.clip_norm == 1.0
    assert type(c.train.clip_norm) is float and "clip_norm: 1.0\n" in config.dump(c)
    for text, got in (("train:\n  steps: '3'\n", '"3"'), ("train:\n  steps: true\n", "true"),
                      ("train:\n  steps: 3.0\n", "3.0"),
                      ("train:\n  learning_rate: '1e-4'\n", '"1e-4"'),
                      ("train:\n  pool: {kl_on_pool_rows: 1}\n", "1")):
        p.write_text(text)
        with pytest.raises(ConfigError, match=f"c.yaml: '.+' must be .*, got {re.escape(got)}$"):
            config.load(["configs/doubling.yaml", p])


def test_a_section_built_in_python_is_checked_too():
    """`dataclasses.replace` and the constructors check bounds as loading does (the rules
    across fields are `validate`'s, at load)."""
    cfg = config.Config()
    assert dataclasses.replace(cfg.train, steps=7).steps == 7
    with pytest.raises(ConfigError, match=r"^vnca.config.TrainConfig: 'steps' must be an "
                       r"integer in \[1, 2147483647\], got 0$"):
        dataclasses.replace(cfg.train, steps=0)
    with pytest.raises(ConfigError, match=r"'kl_on_pool_rows' must be true or false, got 1$"):
        config.PoolConfig(kl_on_pool_rows=1)
    with pytest.raises(ConfigError, match=r"unknown key 'stepz' \(known keys of "
                       r"vnca.config.TrainConfig: batch_size, "):
        config.TrainConfig(stepz=3)


def test_the_new_pool_fields_load_with_their_defaults_and_bounds():
    c = config.load("configs/nondoubling.yaml")
    assert (c.train.pool.start_step, c.train.pool.kl_on_pool_rows) == (0, True)
    c = config.load("configs/nondoubling.yaml", ["train.pool.start_step=400",
                                                 "train.pool.kl_on_pool_rows=false"])
    assert (c.train.pool.start_step, c.train.pool.kl_on_pool_rows) == (400, False)
    with pytest.raises(ConfigError, match="'train.pool.start_step' must be an integer in"):
        config.load("configs/nondoubling.yaml", ["train.pool.start_step=-1"])


def test_tiers_and_variants_are_named_once():
    assert config.TIERS == ("smoke", "demo", "cpu", "paper")  # smallest first
    assert config.VARIANTS == ("baseline", "doubling", "nondoubling")
    assert typing.get_args(config.Config.__pydantic_fields__["tier"].annotation) == config.TIERS


def test_every_shipped_config_loads():
    from pathlib import Path

    for tier_file in sorted(Path("configs").rglob("*.yaml")):
        base = f"configs/{tier_file.stem}.yaml"
        paths = [tier_file] if tier_file.parent.name == "configs" else [base, tier_file]
        if tier_file.name == "smoke.yaml":
            paths = ["configs/doubling.yaml", tier_file]
        assert config.load(paths).train.steps >= 1, tier_file


def test_duplicate_keys_are_refused(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("train:\n  steps: 5\nmodel:\n  z_dim: 8\ntrain:\n  batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 5 is not valid YAML \(duplicate key 'train'\)"):
        config.load(p)
    p.write_text("train:\n  steps: 5\n  steps: 6\n")
    with pytest.raises(ConfigError, match="duplicate key 'steps'"):
        config.load(p)


def test_empty_file_is_refused(tmp_path):
    for text in ("", "\n# only a comment\n", "---\n"):
        p = tmp_path / "empty.yaml"
        p.write_text(text)
        with pytest.raises(ConfigError, match="empty.yaml: the file is empty"):
            config.load(["configs/doubling.yaml", p])


def test_non_utf8_file_is_one_line(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 9\)"):
        config.load(p)


def test_alias_bomb_is_refused_in_a_short_line(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, "
              f"*a{i-1}, *a{i-1}, *a{i-1}]" for i in range(1, 9)]
    p = tmp_path / "bomb.yaml"
    p.write_text("train:\n  steps: *a8\n" + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert "aliases" in str(e.value) and len(str(e.value)) < 200
    with pytest.raises(ConfigError) as e:
        config.load("configs/doubling.yaml", ["train.steps=[" + ",".join(["1"] * 10_000) + "]"])
    assert len(str(e.value)) < 300 and "(cut)" in str(e.value)


def test_huge_or_deeply_nested_file_is_refused(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_text("name: x\n" + "#" * (config.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="too large for a config file"):
        config.load(p)
    p.write_text("train: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(ConfigError, match="big.yaml"):
        config.load(p)


def test_a_directory_as_config_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a config file"):
        config.load(tmp_path)


def test_a_resolved_config_lacking_a_key_is_refused_when_it_must_be_complete():
    """A model's config.yaml is `dump` output, which states every key: one without a key (cut
    short at a line break, or from another version) is refused, not filled in with defaults."""
    text = config.dump(config.load(["configs/doubling.yaml"]))
    assert config.loads(text, "full", complete=True) == config.loads(text, "full")
    lines = text.splitlines(keepends=True)
    without = "".join(line for line in lines if not line.strip().startswith("timeout_hours:"))
    assert config.loads(without, "x").hardware.timeout_hours == 24.0  # a user's file: defaults
    with pytest.raises(ConfigError, match=r"^cut: a resolved config without hardware.timeout_h"):
        config.loads(without, "cut", complete=True)
    cut = "".join(lines[: len(lines) // 2])  # every line whole: valid YAML, half the keys
    with pytest.raises(ConfigError, match=r"and \d+ more: cut short"):
        config.loads(cut, "cut", complete=True)


def test_departures_name_the_pool_schedule_and_kl_choices():
    paper = config.load([configs.directory() / "nondoubling.yaml"])
    assert config.departures(paper) == []
    cpu = config.load([configs.directory() / "nondoubling.yaml", configs.directory() / "cpu" / "nondoubling.yaml"])
    assert config.departures(cpu) == [f"pool from step {cpu.train.pool.start_step:,}"]
    both = config.apply_overrides(paper, ["train.pool.start_step=2500",
                                          "train.pool.kl_on_pool_rows=false"])
    assert config.departures(both) == ["pool from step 2,500", "no KL on pool rows"]
    off = config.apply_overrides(both, ["train.pool.enabled=false"])
    assert config.departures(off) == []
