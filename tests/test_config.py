"""Config loading: layered files, overrides, one-line errors naming key and file."""

import subprocess
import sys

import pytest

from vnca import config
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
    with pytest.raises(ConfigError, match=r"bad.yaml: train.batch_size must be int, got 'lots'"):
        config.load(p)


def test_bad_choice_and_bad_override():
    with pytest.raises(ConfigError, match="model.variance_head must be one of"):
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
