"""The report's document model (`Heading`, `Para`, `Table`, `Figures` of `Fig`), rendered
twice: to one self-contained HTML page (every image a base64 data URI, the style inline, so it
opens from a file and Vertex AI can show it as an HTML artifact) and to Markdown with its
images copied to `figures/`."""

from __future__ import annotations

import base64
import dataclasses
import html
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from vnca import artifacts
from vnca.fileio import write_atomic
from vnca.report.load import png_dims
from vnca.report.tables import MISSING

SMALL_IMAGE_PX = 360  # narrower PNGs are shown scaled up to this width, unsmoothed


@dataclasses.dataclass
class Heading:
    text: str
    level: int = 2
    anchor: str = ""


@dataclasses.dataclass
class Para:
    text: str
    banner: str = ""  # a tier ("smoke", "demo", "cpu"): the text is that tier's banner


@dataclasses.dataclass
class Table:
    frame: pd.DataFrame
    table_id: str
    numeric: bool = False  # right-align the cells after the first column


@dataclasses.dataclass
class Fig:
    title: str
    png: bytes | None  # None: not produced
    md_path: str  # relative to OUT, used when png is not None
    caption: str = ""
    missing: str = "not produced"


@dataclasses.dataclass
class Figures:
    figs: list
    fig_id: str = ""



_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1400px;
 padding:0 16px;color:#1b1b1b;line-height:1.45;box-sizing:border-box}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.8em}
h3{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}
table.num td:not(:first-child),table.num th:not(:first-child){text-align:right}
table.num td{white-space:nowrap}
.banner{background:#fff3cd;border:2px solid #d39e00;color:#5c4400;padding:12px 16px;
 font-weight:600;font-size:1.1em;border-radius:4px;margin:8px 0}
.row{display:flex;flex-wrap:wrap;gap:16px 24px;align-items:flex-start;margin:8px 0}
figure{margin:0;flex:0 1 auto;max-width:100%}
figure img{display:block;max-width:100%;height:auto;border:1px solid #eee}
figure img.small{image-rendering:pixelated;width:min(100%,360px)}
figcaption{font-size:0.95em;color:#333;margin-top:4px;font-weight:600}
.missing{color:#888;font-style:italic;border:1px dashed #ccc;padding:12px 8px;text-align:center;
 width:240px}
"""


def render_html(blocks: Sequence) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>VNCA report</title>", f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            anchor = f' id="{html.escape(b.anchor)}"' if b.anchor else ""
            out.append(f"<h{b.level}{anchor}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            if b.banner:
                out.append(f'<div id="{html.escape(b.banner)}-banner" class="banner" '
                           f'role="alert">{html.escape(b.text)}</div>')
            else:
                out.append(f"<p>{html.escape(b.text)}</p>")
        elif isinstance(b, Table):
            out.append(b.frame.to_html(index=False, table_id=b.table_id, escape=True,
                                       border=0, na_rep=MISSING,
                                       classes="num" if b.numeric else None))
        elif isinstance(b, Figures):
            fid = f' id="{html.escape(b.fig_id)}"' if b.fig_id else ""
            out.append(f'<div class="row"{fid}>')
            for f in b.figs:
                title = html.escape(f.title)
                if f.png is not None:
                    data = base64.b64encode(f.png).decode("ascii")
                    w, h = png_dims(f.png)
                    # Small images (raw digit grids) are scaled up without smoothing.
                    small = ' class="small"' if w < SMALL_IMAGE_PX else ""
                    out.append(f'<figure><img{small} src="data:image/png;base64,{data}" '
                               f'width="{w}" height="{h}" alt="{title}">'
                               f"<figcaption>{title}</figcaption></figure>")
                else:
                    out.append(f'<figure><div class="missing">{html.escape(f.missing)}</div>'
                               f"<figcaption>{title}</figcaption></figure>")
            out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(_md_cell(c) for c in cols) + " |",
             "|" + "|".join(["---"] * len(cols)) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
    return "\n".join(lines)


def render_markdown(blocks: Sequence) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            out.append(f"> **{b.text}**" if b.banner else b.text)
        elif isinstance(b, Table):
            out.append(markdown_table(b.frame))
        elif isinstance(b, Figures):
            for f in b.figs:
                if f.png is not None:
                    out.append(f"**{f.title}**\n\n![{f.title}]({f.md_path})")
                else:
                    out.append(f"**{f.title}**: *{f.missing}*")
    return "\n\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Entry point (I/O on the output side).


# ---------------------------------------------------------------------------------------------
# Output (the only writes).


def write_report(blocks: Sequence, out_dir: str | Path) -> Path:
    """Write `figures/`, `report.md` and, last, `report.html`; returns the HTML's path."""
    out = artifacts.make_out_dir(out_dir)
    final = out / "figures"
    # A fresh hidden sibling, made with plain mkdir so that it gets the umask's mode.
    staging = final.with_name(f".figures.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        staging.mkdir()
        for b in blocks:
            if isinstance(b, Figures):
                for f in b.figs:
                    if f.png is not None:
                        p = staging / Path(f.md_path).relative_to("figures")
                        p.parent.mkdir(parents=True, exist_ok=True)
                        p.write_bytes(f.png)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_atomic(out / artifacts.REPORT_MD, render_markdown(blocks))
    html_path = out / artifacts.REPORT_HTML
    write_atomic(html_path, render_html(blocks))
    return html_path
