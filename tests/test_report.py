"""The report step: tables, figures, smoke banner and errors, from known inputs (`report_inputs`
in tests/conftest.py)."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from vnca import artifacts, config, contracts, reference
from vnca import report as rpt
from vnca.errors import DataError, UserError
from vnca.report import document

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LN2 = math.log(2.0)
SHOWN_ORDER = ["baseline", "doubling", "nondoubling"]  # the report's order of variants


def build(dirs: dict) -> Path:
    return rpt.build_report(dirs["evals"], dirs["trains"], dirs["data"], dirs["out"])


class ReportParser(HTMLParser):
    """Tables by id (rows of cell texts), figure rows by id (caption, img src, missing text)."""

    def __init__(self):
        super().__init__()
        self.tables: dict = {}
        self.rows: dict = {}
        self.banner = None
        self._table = self._cells = self._cell = None
        self._row_id = None
        self._fig = None
        self._text_target = None
        self._div_depth = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._cells = []
        elif tag in ("td", "th") and self._cells is not None:
            self._cell = []
        elif tag == "div":
            self._div_depth += 1
            if "row" in (a.get("class") or "").split():
                self._row_id = a.get("id")
                self.rows[self._row_id] = []
            elif a.get("class") == "missing" and self._fig is not None:
                self._text_target = "missing"
            elif a.get("id") == "smoke-banner":
                self.banner = []
                self._text_target = "banner"
        elif tag == "figure":
            self._fig = {"caption": "", "src": None, "missing": ""}
        elif tag == "img" and self._fig is not None:
            self._fig["src"] = a.get("src")
        elif tag == "figcaption":
            self._text_target = "caption"

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._cells.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._cells is not None:
            self.tables[self._table].append(self._cells)
            self._cells = None
        elif tag == "table":
            self._table = None
        elif tag == "figure":
            self.rows[self._row_id].append(self._fig)
            self._fig = None
        elif tag in ("figcaption", "div"):
            self._text_target = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        elif self._text_target == "banner":
            self.banner.append(data)
        elif self._text_target and self._fig is not None:
            self._fig[self._text_target] += data


def parse(path: Path) -> ReportParser:
    p = ReportParser()
    p.feed(path.read_text())
    return p


def table_dicts(rows: list) -> list:
    header, *body = rows
    return [dict(zip(header, r)) for r in body]


def png_size(data: bytes) -> tuple:
    """(width, height) from a PNG's IHDR chunk."""
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def decode_data_uri(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    return base64.b64decode(src[len(prefix):], validate=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory, report_inputs) -> tuple:
    root = tmp_path_factory.mktemp("report")
    dirs = report_inputs.make(root)
    return dirs, build(dirs)


def test_results_table_numbers(built, report_inputs):
    dirs, html_path = built
    assert html_path == dirs["out"] / artifacts.REPORT_HTML
    rows = table_dicts(parse(html_path).tables["results"])
    details = {r["variant"]: r for r in table_dicts(parse(html_path).tables["run-details"])}
    assert [r["variant"] for r in rows] == ["baseline", "doubling", "nondoubling"]
    for r in rows:
        v = r["variant"]
        mean, se, k, n, steps, wall, hw, ndev = report_inputs.RUNS[v]
        assert r["ours (nats, mean ± se)"] == f"{mean:.2f} ± {se:.2f}"
        assert float(r["bits/dim"]) == pytest.approx(-mean / (LN2 * 784), abs=1e-4)
        paper, repro = reference.PAPER_NATS[v], reference.REPRODUCTION_NATS[v]
        for col, ref in (("paper", paper), ("reproduction", repro)):
            if ref is None:
                assert r[f"{col} (nats)"] == "—" and r[f"diff vs {col} %"] == "—"
            else:
                assert float(r[f"{col} (nats)"]) == pytest.approx(ref)
                expected = (mean - ref) / -ref * 100  # refs are negative log-likelihoods
                assert float(r[f"diff vs {col} %"]) == pytest.approx(expected, abs=0.005)
        d = details[v]
        assert int(d["training steps"].replace(",", "")) == steps
        assert int(d["K (importance samples)"]) == k
        assert int(d["test images"].replace(",", "")) == n
        assert d["hardware"].startswith(hw) and f"({ndev} device" in d["hardware"]
        assert r["run"] == "SMOKE"
        recon, originals, top, _ = report_inputs.QUALITY[v]
        assert r["reconstructions recognised"] == (
            f"{100 * recon:.1f} % (classifier {100 * originals:.1f} %)")
        assert float(r["prior samples: mean top-class probability"]) == pytest.approx(top,
                                                                                      abs=5e-4)
        assert r["untrained model (nats)"] == "-543.25 ± 3.50"
        assert r["trained, same images (nats)"] == "-87.50 (8 images)"
    assert {v: d["commit"] for v, d in details.items()} == {
        "doubling": "0123456789ab", "nondoubling": "fedcba987654+dirty", "baseline": "—"}
    assert {d["departures from the paper's recipe"] for d in details.values()} == {"none"}
    wall = {v: d["training wall time"] for v, d in details.items()}
    assert wall == {"doubling": "1 h 02 min", "nondoubling": "20 min 34 s",
                    "baseline": "42.5 s"}
    # doubling: -85.0 vs paper -84.23 -> 0.77 nats lower -> -0.914 %
    assert table_dicts(parse(html_path).tables["results"])[1]["diff vs paper %"] == "-0.91"
    assert {r["variant"]: r["reconstructions recognised"] for r in rows}["doubling"] == (
        "91.2 % (classifier 93.0 %)")


def test_prior_sample_labels_and_classifier(built, report_inputs):
    _, html_path = built
    doc = parse(html_path)
    rows = {r["variant"]: r for r in table_dicts(doc.tables["prior-labels"])}
    assert list(rows) == ["baseline", "doubling", "nondoubling"]
    for variant, (_, _, top, hist) in report_inputs.QUALITY.items():
        r = rows[variant]
        assert [int(r[str(d)]) for d in range(10)] == hist
        assert int(r["samples"]) == sum(hist)
        assert float(r["mean top-class probability"]) == pytest.approx(top, abs=5e-4)
    assert rows["nondoubling"]["most common"] == "2 (69 %)"  # 22 of 32
    html = html_path.read_text()
    assert ("Digit classifier: MLP, 256 ReLU units (scikit-learn), fit on 60,000 training "
            "images, 97.8 % accurate on the test images.") in html
    assert "80 % or more is the bar" in html


def test_results_frame_raw_numbers(report_inputs):
    m = report_inputs.eval_metrics("doubling", smoke=False, untrained=None, reconstruction=None)
    m = dataclasses.replace(m, iwelbo=dataclasses.replace(m.iwelbo, mean_nats=-84.0))
    df = rpt.results_frame([("doubling", rpt.EvalRun(Path("e"), m, {}, {}, {}), None)])
    r = df.iloc[0]
    assert r["diff_paper_pct"] == pytest.approx(100 * (-84.0 + 84.23) / 84.23)
    assert r["diff_reproduction_pct"] == pytest.approx(100 * (-84.0 + 84.15) / 84.15)
    assert r["steps"] is None and r["hardware"] is None
    assert r["untrained_nats"] is None and r["reconstruction_accuracy"] is None
    assert r["tier"] == "paper" and not r["smoke"]


def test_every_expected_figure_is_embedded(built, report_inputs):
    dirs, html_path = built
    doc = parse(html_path)
    labels = list(report_inputs.RUNS)
    # Re-plotted from arrays.npz for every run that has the arrays; those runs' own PNGs of
    # that figure are not shown again (each thing once).
    replotted = {"tsne.png": {"doubling", "nondoubling"}, "damage_curve.png": {"nondoubling"}}
    for fname in artifacts.EVAL_FIGURES:
        shown = [v for v in SHOWN_ORDER if v not in replotted.get(fname, set())]
        figs = {f["caption"]: f for f in doc.rows[f"fig-{fname.removesuffix('.png')}-runs"]}
        assert list(figs) == shown, fname
        for variant in shown:
            f = figs[variant]
            produced = fname in report_inputs.FIGURES[variant] and not (
                variant == "nondoubling" and fname == "probe.png")
            if produced:
                data = decode_data_uri(f["src"])
                assert data == (dirs["evals"][labels.index(variant)] / fname).read_bytes()
                assert png_size(data) == (20, 12)
            else:
                assert f["src"] is None and f["missing"].startswith("not produced"), (fname,
                                                                                   variant)
    assert "empty file" in {f["caption"]: f for f in doc.rows["fig-probe-runs"]}[
        "nondoubling"]["missing"]
    assert "baseline" in {f["caption"]: f for f in doc.rows["fig-growth-runs"]}[
        "baseline"]["missing"]
    # Figures made by the report itself: non-empty PNGs, legible at most 1,320 px wide.
    (margins,), (pairs,) = doc.rows["match-distributions"], doc.rows["match-pairs"]
    for f in doc.rows["training-curves-fig"] + doc.rows["tsne-panels"] + doc.rows[
            "recovery-curves"] + [margins]:
        w, h = png_size(decode_data_uri(f["src"]))
        assert 200 < w <= 1320 and h > 150, (f["caption"], w, h)
    assert margins["caption"] == "Match margins: percentiles per split"
    assert decode_data_uri(pairs["src"]) == (
        dirs["data"] / artifacts.MATCHED_PAIRS_PNG).read_bytes()
    # t-SNE re-plot: one panel per run with arrays (doubling, nondoubling), side by side.
    w, h = png_size(decode_data_uri(doc.rows["tsne-panels"][0]["src"]))
    assert w > 1.8 * h
    # The training curves have one panel per metric plus validation: wider than tall x 3.
    w, h = png_size(decode_data_uri(doc.rows["training-curves-fig"][0]["src"]))
    assert w > 3 * h
    # Every <img> in the page is a PNG data URI (self-contained: no file or http sources).
    n_imgs = sum(f["src"] is not None for row in doc.rows.values() for f in row)
    html = html_path.read_text()
    assert html.count("<img ") == n_imgs
    assert "http://" not in html and "https://" not in html and 'src="figures' not in html


@pytest.fixture
def eval_run(report_inputs):
    """`eval_run(arrays, metrics=None, variant='nondoubling')`: an `EvalRun` with these
    arrays and metrics (default: the known metrics of the variant)."""

    def make(arrays: dict, metrics=None, variant="nondoubling") -> rpt.EvalRun:
        metrics = metrics or report_inputs.eval_metrics(variant)
        return rpt.EvalRun(Path("e"), metrics, {}, {}, arrays)

    return make


def test_recovery_plot_has_two_curves_per_run(report_inputs, eval_run):
    ll_undamaged, ll_damaged = report_inputs.LL_UNDAMAGED, report_inputs.LL_DAMAGED
    arrays = {"damage_steps_undamaged": np.arange(9), "damage_ll_undamaged": ll_undamaged,
              "damage_steps_damaged": np.arange(4, 9), "damage_ll_damaged": ll_damaged}
    other = dict(arrays, damage_ll_undamaged=ll_undamaged - 10)
    runs = [("nondoubling", eval_run(arrays)), ("nondoubling (b)", eval_run(other)),
            ("doubling", eval_run({}, variant="doubling"))]
    lines = rpt.recovery_lines(runs)
    assert [(label, what) for label, what, *_ in lines] == [
        ("nondoubling", "undamaged"), ("nondoubling", "damaged"),
        ("nondoubling (b)", "undamaged"), ("nondoubling (b)", "damaged")]
    _, _, steps, mean, se, n = lines[0]
    assert steps.tolist() == list(range(9)) and n == 3
    assert mean.tolist() == pytest.approx(ll_undamaged.mean(0).tolist())
    assert se[0] == pytest.approx(ll_undamaged[:, 0].std(ddof=1) / math.sqrt(3))
    _, _, steps, mean, _, _ = lines[1]
    assert steps.tolist() == [4, 5, 6, 7, 8]
    assert mean.tolist() == pytest.approx(ll_damaged.mean(0).tolist())
    png = rpt.plot_recovery_curves(runs)
    assert png[:8] == PNG_SIGNATURE and png_size(png)[0] <= 1320
    # Old arrays (one curve, damage_curve_*) or inconsistent shapes: nothing to re-plot.
    old = {"damage_curve_steps": np.arange(9), "damage_curve_ll": -100.0 - np.arange(9)}
    bad = dict(arrays, damage_steps_damaged=np.arange(3))
    assert rpt.recovery_lines([("a", eval_run(old)), ("b", eval_run(bad))]) == []
    assert rpt.plot_recovery_curves([("a", eval_run(old))]) is None


def test_markdown_references_copied_figures(built):
    dirs, html_path = built
    md = (dirs["out"] / artifacts.REPORT_MD).read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    html_imgs = html_path.read_text().count("<img ")
    assert len(refs) == html_imgs == len(set(refs))
    for ref in refs:
        data = (dirs["out"] / ref).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 60
    assert "figures/doubling/growth.png" in refs
    # baseline: 4 NCA-only figures; nondoubling: interpolations and the empty damage curve
    assert md.count(": *not produced") == 6
    assert md.startswith("# ") and "> **SMOKE RUN" in md


def test_eval_details_and_match_tables(built, report_inputs):
    dirs, html_path = built
    doc = parse(html_path)
    damage = {r["variant"]: r for r in table_dicts(doc.tables["damage"])}
    assert list(damage) == ["doubling", "nondoubling"]  # the baseline has no damage numbers
    d = damage["doubling"]
    assert d["before damage (nats)"] == "-90.00 ± 1.50"
    assert d["just after damage (nats)"] == "-150.00 ± 3.00"
    assert d["after recovery (nats)"] == "-100.00 ± 2.00"
    assert d["undamaged, same step (nats)"] == "-88.00 ± 1.25"
    assert d["recovered share of the damage"] == "80.6 %"  # (-100 + 150) / (-88 + 150)
    assert d["damage at step / recovery steps"] == "4 / 4" and d["images"] == "16"
    latent = {r["variant"]: r for r in table_dicts(doc.tables["latent"])}
    assert latent["doubling"]["probe accuracy %"] == "91.23"
    assert latent["doubling"]["probe train / test images"] == "1,500 / 500"
    assert latent["baseline"]["probe accuracy %"] == "—"
    assert latent["baseline"]["t-SNE images"] == "64"
    assert latent["baseline"]["10-NN label accuracy, encoder means %"] == "81.2"
    assert latent["doubling"]["10-NN label accuracy, encoder means %"] == "—"

    match = {r["field"]: r for r in table_dicts(doc.tables["match-report"])}
    assert table_dicts(doc.tables["match-report"])[0].keys() == {"field", "train", "valid",
                                                                 "test"}
    assert match["rows_changed_by_assignment"]["test"] == "8"
    assert match["rows_changed_by_assignment"]["valid"] == "313"
    assert match["rows_changed_by_assignment"]["train"] == "5"
    assert match["collisions_before_assignment"]["test"] == (
        "distinct: 9,992, references: 8, rows: 16")
    assert match["impossible_pixels"]["test"] == "total: 0, pairs_with_any: 0"
    assert "p0.1: 0.8, p1: 4.99" in match["margin_top1_top2_nats"]["test"]
    assert "p50: 224.8" in match["label_margin_nats"]["valid"]  # 140.5 x 1.6
    assert match["label_histogram"]["test"] == ", ".join(f"{n:,}" for n in report_inputs.LABELS)
    pct = rpt.match_percentiles(contracts.MatchReport.read(dirs["data"] / artifacts.MATCH_REPORT))
    assert set(pct) == {"margin_top1_top2_nats", "label_margin_nats", "assigned_loglik_nats"}
    assert set(pct["margin_top1_top2_nats"]) == {"train", "valid", "test"}
    levels, values = pct["label_margin_nats"]["test"]
    assert levels.tolist() == [0.1, 1, 5, 25, 50, 75, 95]
    assert values[4] == pytest.approx(140.5 * 1.6)
    top = {r["field"]: r["value"] for r in table_dicts(doc.tables["match-summary"])}
    assert (top["source"], top["summary"]) == ("bundled", "3 splits matched")
    assert top["counts"] == "train: 2,000, valid: 500, test: 10,000"
    configs = table_dicts(doc.tables["configs"])
    assert {r["setting"]: r for r in configs}["batch size"]["doubling"] == "8"  # smoke overlay


def test_recovered_share_or_not_meaningful(report_inputs, eval_run):
    known = report_inputs.DAMAGE
    not_meaningful = dataclasses.replace(known, after_damage=-80.0, after_recovery=-81.0,
                                         damage_drop=-8.0, meaningful=False,
                                         recovered_fraction=None)
    assert rpt.recovered_text(not_meaningful) == (
        "not meaningful (damage did not lower the score)")
    assert rpt.recovered_text(known) == "80.6 %"
    assert rpt.recovered_text(dataclasses.replace(known, recovered_fraction=1.25)) == "125.0 %"
    m = report_inputs.eval_metrics("nondoubling", damage=not_meaningful)
    pairs = [("nondoubling", eval_run({}, m), None)]
    (row,) = rpt.damage_frame(pairs).to_dict("records")
    assert row["recovered share of the damage"] == (
        "not meaningful (damage did not lower the score)")
    assert row["just after damage (nats)"] == "-80.00 ± 3.00"


@pytest.mark.parametrize("kind, name, step", [
    ("evals", artifacts.EVAL_METRICS, "vnca evaluate"),
    ("trains", artifacts.TRAIN_SUMMARY, "vnca train"),
    ("trains", artifacts.TRAIN_METRICS, "vnca train"),
    ("data", artifacts.MATCH_REPORT, "vnca prepare-data"),
])
def test_artifact_without_a_version_is_refused(tmp_path, kind, name, step, report_inputs):
    """Files written before the artifacts had versions are not read: one line says which step
    to rerun."""
    dirs = report_inputs.make(tmp_path)
    path = (dirs[kind] if kind == "data" else dirs[kind][1]) / name
    lines = path.read_text().splitlines()
    old = [json.dumps({k: v for k, v in json.loads(line).items() if k != "version"})
           for line in lines] if name.endswith(".jsonl") else None
    path.write_text("\n".join(old) + "\n" if old else json.dumps(
        {k: v for k, v in json.loads(path.read_text()).items() if k != "version"}))
    with pytest.raises(DataError) as e:
        build(dirs)
    assert str(path) in _one_line(e) and "no 'version'" in str(e.value)
    assert f"rerun `{step}`" in str(e.value)


def test_tier_banners(tmp_path, report_inputs):
    dirs = report_inputs.make(tmp_path, smoke=False)
    doc = parse(build(dirs))
    assert doc.banner is None  # paper tier: no banner
    html = (dirs["out"] / artifacts.REPORT_HTML).read_text()
    assert 'class="banner"' not in html
    banners = {
        "demo": ("Demo run: doubling (100,000 steps). Small models trained for minutes on the "
                 "bundled 2,000-image sample on a CPU; not comparable with the paper"),
        "cpu": ("CPU-scale run: doubling (100,000 steps). Reduced models trained on the full "
                "data on a 2-core CPU; not the paper's configuration"),
    }
    for tier, words in banners.items():
        s = dirs["trains"][1] / artifacts.TRAIN_SUMMARY  # t1 holds the doubling run
        s.write_text(json.dumps(dict(json.loads(s.read_text()), tier=tier)))
        html = build(dirs).read_text()
        assert f'<div id="{tier}-banner" class="banner" role="alert">{escape(words)}' in html
        runs = {r["variant"]: r["run"] for r in table_dicts(parse(build(dirs)).tables["results"])}
        assert runs == {"baseline": "paper", "doubling": rpt.TIER_LABELS[tier],
                        "nondoubling": "paper"}
    assert rpt.smallest_tier("paper", None, "demo", "cpu") == "demo"


def test_every_tier_has_a_label_and_every_tier_below_the_paper_a_banner():
    """The tiers are named once (`config.TIERS`); the report's texts cover exactly them."""
    assert tuple(rpt.TIER_LABELS) == config.TIERS
    assert tuple(document.TIER_BANNERS) == config.TIERS[:-1] and config.TIERS[-1] == "paper"


def test_raw_statistics_come_last(built):
    _, html_path = built
    html = html_path.read_text()
    ids = ("results", "prior-labels", "run-details", "damage", "latent", "training-curves-fig",
           "match-summary", "match-distributions", "configs", "inputs-table", "match-report")
    order = [html.index(f'id="{i}"') for i in ids]
    assert order == sorted(order)


def test_smoke_banner(built, tmp_path, report_inputs):
    _, html_path = built
    banner = "".join(parse(html_path).banner)
    assert banner.startswith("SMOKE RUN")
    assert "doubling (100,000 steps)" in banner and "NOT comparable" in banner
    full = report_inputs.make(tmp_path, smoke=False)
    doc = parse(build(full))
    assert doc.banner is None
    assert {r["run"] for r in table_dicts(doc.tables["results"])} == {"paper"}
    # One smoke input anywhere (here only one evaluation's metrics) brings the banner back.
    m = full["evals"][2] / artifacts.EVAL_METRICS
    m.write_text(json.dumps(dict(json.loads(m.read_text()), smoke=True, tier="smoke")))
    doc = parse(build(full))
    assert "".join(doc.banner).startswith("SMOKE RUN: baseline")
    runs = {r["variant"]: r["run"] for r in table_dicts(doc.tables["results"])}
    assert runs == {"baseline": "SMOKE", "doubling": "paper", "nondoubling": "paper"}


def test_variant_comes_from_files_not_argument_order(built, tmp_path):
    dirs, html_path = built
    shuffled = dict(dirs, evals=dirs["evals"][::-1], trains=dirs["trains"][1:] + dirs["trains"][:1],
                    out=tmp_path / "out")
    rows = parse(build(shuffled)).tables["results"]
    assert rows == parse(html_path).tables["results"]


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("which", ["eval", "train", "data", "eval_metrics", "train_summary",
                                   "train_config", "match_report"])
def test_missing_input_is_one_line_error(tmp_path, which, report_inputs):
    dirs = report_inputs.make(tmp_path)
    target = {
        "eval": dirs["evals"][1], "train": dirs["trains"][0], "data": dirs["data"],
        "eval_metrics": dirs["evals"][1] / artifacts.EVAL_METRICS,
        "train_summary": dirs["trains"][2] / artifacts.TRAIN_SUMMARY,
        "train_config": dirs["trains"][2] / artifacts.RESOLVED_CONFIG,
        "match_report": dirs["data"] / artifacts.MATCH_REPORT,
    }[which]
    if target.is_dir():
        target = target.with_name(target.name + "_missing")
        if which == "eval":
            dirs["evals"][1] = target
        elif which == "train":
            dirs["trains"][0] = target
        else:
            dirs["data"] = target
    else:
        target.unlink()
    with pytest.raises(DataError) as e:
        build(dirs)
    assert str(target) in _one_line(e)
    assert not (dirs["out"] / artifacts.REPORT_HTML).exists()


def test_cli_reports_missing_dir_on_one_line(tmp_path, capsys, report_inputs):
    from vnca.cli import main

    dirs = report_inputs.make(tmp_path)
    missing = tmp_path / "nope"
    rc = main(["report", "--evals", str(dirs["evals"][0]), str(missing), "--train",
               *map(str, dirs["trains"]), "--data", str(dirs["data"]), "--out",
               str(dirs["out"])])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("vnca report: error:") and str(missing) in err


def test_corrupt_and_ambiguous_inputs(tmp_path, report_inputs):
    dirs = report_inputs.make(tmp_path)
    m = dirs["evals"][0] / artifacts.EVAL_METRICS
    m.write_text('{"variant": ')
    with pytest.raises(DataError, match="not valid JSON"):
        build(dirs)
    m.write_text(json.dumps({"version": 1, "iwelbo": {}}))
    with pytest.raises(DataError, match="missing 'variant'"):
        build(dirs)
    # Two evaluations of the same variant and name are ambiguous.
    dirs = report_inputs.make(tmp_path / "b")
    copy = tmp_path / "copy"
    shutil.copytree(dirs["evals"][0], copy)
    with pytest.raises(DataError, match="two evaluation directories for doubling") as e:
        rpt.build_report(dirs["evals"] + [copy], dirs["trains"], dirs["data"], dirs["out"])
    assert str(copy) in _one_line(e) and str(dirs["evals"][0]) in str(e.value)
    with pytest.raises(UserError, match="no evaluation directories"):
        rpt.build_report([], dirs["trains"], dirs["data"], dirs["out"])


def test_metrics_jsonl_is_read_tolerantly(tmp_path, report_inputs):
    p = tmp_path / "metrics.jsonl"
    record = report_inputs.train_record
    good = [record(0), record(5, loss=3.0, kl=2.0, recon=-1.0),
            contracts.ValidRecord(step=5, split="valid", val_elbo=-4.0, val_images=8,
                                  val_iw_samples=1),
            record(10, loss=float("nan"), kl=2.5, recon=float("inf")),  # not plotted
            ]
    text = "\n".join(json.dumps(r.to_json()) for r in good) + "\n\n" + '{"step": 15, "lo'
    p.write_text(text)
    records = contracts.read_train_log(p)
    assert records[:3] == good[:3] and len(records) == 4  # the truncated last line is dropped
    tr = rpt.TrainRun(tmp_path, None, None, records)
    curves = rpt.curves_frame([("doubling", tr)])
    got = sorted(map(tuple, curves[["step", "metric", "value"]].itertuples(index=False)))
    assert got == [(5, "kl", 2.0), (5, "loss", 3.0), (5, "recon", -1.0), (5, "val_elbo", -4.0),
                   (10, "kl", 2.5)]
    p.write_text(json.dumps(good[0].to_json()) + "\n{broken\n" + json.dumps(good[1].to_json())
                 + "\n")
    with pytest.raises(DataError, match="line 2"):
        contracts.read_train_log(p)


def test_unpairable_runs_are_one_user_error(tmp_path, capsys, report_inputs):
    """A baseline evaluation beside a doubling model (a TypeError deep in the report before)."""
    from vnca.cli import main

    dirs = report_inputs.make(tmp_path)
    train = {json.loads((t / artifacts.TRAIN_SUMMARY).read_text())["variant"]: t
             for t in dirs["trains"]}
    evals = {json.loads((e / artifacts.EVAL_METRICS).read_text())["variant"]: e
             for e in dirs["evals"]}
    rc = main(["report", "--evals", str(evals["baseline"]), "--train", str(train["doubling"]),
               "--data", str(dirs["data"]), "--out", str(dirs["out"])])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "cannot pair" in err and str(evals["baseline"]) in err
    assert str(train["doubling"]) in err
    # A training run without its evaluation is refused the same way.
    with pytest.raises(UserError, match="training run .* no partner") as e:
        rpt.build_report([evals["baseline"], evals["doubling"]], dirs["trains"], dirs["data"],
                         dirs["out"])
    assert str(train["nondoubling"]) in _one_line(e)
    assert not dirs["out"].exists()


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


def _set(keys: str, value):
    def edit(d):
        *head, last = keys.split(".")
        target = d
        for k in head:
            target = target[k]
        if value is _DROP:
            del target[last]
        else:
            target[last] = value
        return d
    return edit


_DROP = object()


def _lines(*records) -> str:
    """metrics.jsonl text: contracts as stored, dicts as they are."""
    return "".join(json.dumps(r if isinstance(r, dict) else r.to_json()) + "\n"
                   for r in records)


@pytest.mark.parametrize("edit, key", [
    (_set("iwelbo", _DROP), "iwelbo"),
    (_set("iwelbo.mean_nats", "-95.2"), "iwelbo.mean_nats"),
    (_set("iwelbo.mean_nats", float("nan")), "iwelbo.mean_nats"),
    (_set("iwelbo.mean_nats", None), "iwelbo.mean_nats"),
    (_set("iwelbo.mean_nats", True), "iwelbo.mean_nats"),
    (_set("iwelbo.k", 0), "iwelbo.k"),
    (_set("iwelbo", [1, 2]), "iwelbo"),
    (_set("untrained.mean_nats", "bad"), "untrained.mean_nats"),
    (_set("reconstruction", "97%"), "reconstruction"),
    (_set("variant", 3), "variant"),
    (lambda d: [d], "expected a JSON object"),
    (_set("iwelbo.extra", 1), "unknown key 'iwelbo.extra'"),
    (_set("version", contracts.EvalMetrics.VERSION + 1), "rerun `vnca evaluate`"),
])
def test_malformed_eval_metrics_is_one_data_error(tmp_path, edit, key, report_inputs):
    dirs = report_inputs.make(tmp_path)
    path = dirs["evals"][1] / artifacts.EVAL_METRICS
    _edit_json(path, edit)
    with pytest.raises(DataError) as e:
        build(dirs)
    assert str(path) in _one_line(e) and key in str(e.value)
    assert not (dirs["out"] / artifacts.REPORT_HTML).exists()


@pytest.mark.parametrize("name, edit, key", [
    (artifacts.TRAIN_SUMMARY, _set("variant", _DROP), "variant"),
    (artifacts.TRAIN_SUMMARY, _set("variant", "nondoubling"), "differs from model.variant"),
    (artifacts.TRAIN_SUMMARY, _set("steps", "1000"), "steps"),
    (artifacts.TRAIN_SUMMARY, _set("n_devices", 0), "n_devices"),
    (artifacts.TRAIN_SUMMARY, _set("wall_time_s", [1]), "wall_time_s"),
    (artifacts.TRAIN_SUMMARY, lambda d: None, "expected a JSON object"),
    (artifacts.TRAIN_METRICS, '[1, 2]\n{"step": 1}\n', "line 1"),
    (artifacts.TRAIN_METRICS, lambda rec: _lines(rec(1), {"version": 1, "loss": 3.0}, rec(3)),
     "line 2: missing 'step'"),
    (artifacts.TRAIN_METRICS, lambda rec: _lines(dict(rec(1).to_json(), loss="3.0"), rec(2)),
     "'loss'"),
    (artifacts.TRAIN_METRICS, b'{"step": 1}\n\xff\n', "cannot read"),
])
def test_malformed_train_artifacts_are_one_data_error(tmp_path, name, edit, key, report_inputs):
    dirs = report_inputs.make(tmp_path)
    path = dirs["trains"][0] / name
    if isinstance(edit, str):
        path.write_text(edit)
    elif isinstance(edit, bytes):
        path.write_bytes(edit)
    elif name == artifacts.TRAIN_METRICS:  # lines made of known training records
        path.write_text(edit(report_inputs.train_record))
    else:
        _edit_json(path, edit)
    with pytest.raises(DataError) as e:
        build(dirs)
    assert str(path) in _one_line(e) and key in str(e.value)


def test_match_distributions_without_values_are_not_plotted(report_inputs):
    """A split with no finite values has a distribution of only `n` (matching.distribution)."""
    empty = contracts.Distribution(n=0)
    none = report_inputs.match_summary(margin_top1_top2_nats=empty, label_margin_nats=empty,
                                       assigned_loglik_nats=empty)
    report = report_inputs.match_report(splits={"train": none, "valid": none, "test": none})
    assert rpt.match_percentiles(report) == {}
    assert rpt.match_table(report).set_index("field").loc["label_margin_nats", "test"] == "n: 0"
    blocks = rpt.report_blocks([], rpt.DataInfo(Path("d"), report, None, None))
    assert "Match margins: percentiles per split**: *not produced" in rpt.render_markdown(blocks)


def test_report_imports_no_jax():
    code = ("import sys, vnca.report; bad = [m for m in sys.modules if m == 'jax' or "
            "m.startswith(('jax.', 'jaxlib', 'flax', 'optax'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755),
                                                        (0o027, 0o640, 0o750)])
def test_outputs_honour_the_umask(tmp_path, umask, file_mode, dir_mode, report_inputs):
    """report.html / report.md were 0600 and figures/ 0700 (mkstemp, mkdtemp)."""
    dirs = report_inputs.make(tmp_path)
    old = os.umask(umask)
    try:
        build(dirs)
        build(dirs)  # a rebuild replaces figures/ and both files the same way
    finally:
        os.umask(old)
    out = dirs["out"]
    assert mode(out / artifacts.REPORT_HTML) == file_mode
    assert mode(out / artifacts.REPORT_MD) == file_mode
    assert mode(out / "figures") == dir_mode
    figures = list((out / "figures").rglob("*"))
    assert figures and all(mode(p) == (dir_mode if p.is_dir() else file_mode) for p in figures)
    assert sorted(p.name for p in out.iterdir()) == ["figures", "report.html", "report.md"]


def test_out_that_is_a_file_is_refused_before_reading(tmp_path, report_inputs):
    dirs = report_inputs.make(tmp_path)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        with pytest.raises(UserError, match="not a directory") as e:
            build(dict(dirs, out=out))
        assert str(out) in _one_line(e)
    assert a_file.read_text() == "x"
