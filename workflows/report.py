"""The HTML run report: per image its status, counts, timings, skipped tiles and a picture."""

from __future__ import annotations

import html
import json
from pathlib import Path
from urllib.parse import quote

import geopandas as gpd

from pipeline.preview import render_overlay
from pipeline.writers import atomic_path
from workflows.ledger import Ledger

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{border-bottom:1px solid #ddd;padding:.4em .8em;text-align:right;vertical-align:top}
td:first-child,th:first-child,td.text{text-align:left}.failed{color:#b00}img{max-width:320px}"""


def _picture(row, folder: Path, max_size: int) -> str:
    """A thumbnail with the polygons drawn, made once per result (kept while the result is)."""
    out_dir = folder.parent / Path(row["output_dir"]).name  # the ledger's folders are in its output directory
    png = folder / f"{out_dir.name}.png"
    gpkg = out_dir / "instances.gpkg"
    if not png.is_file() or png.stat().st_mtime < gpkg.stat().st_mtime:
        with atomic_path(png) as tmp:
            render_overlay(row["path"], gpd.read_file(gpkg, layer="instances"), tmp, max_size=max_size)
    return f'<img src="{html.escape(quote(png.name))}" alt="{html.escape(out_dir.name)}">'  # a '#' or '%' in a name is a URL's


def write_report(out_root: Path, title: str, max_size: int = 512) -> Path:
    """``OUT/report/index.html`` from the ledger; pictures in ``OUT/report/*.png``."""
    folder = out_root / "report"
    folder.mkdir(parents=True, exist_ok=True)
    with Ledger(out_root) as ledger:
        rows = ledger.rows()
    lines = []
    for row in rows:
        name = html.escape(Path(row["path"]).name)
        if row["status"] != "done":
            lines.append(f'<tr><td>{name}</td><td class="text {row["status"]}">{row["status"]}</td>'
                         f'<td colspan="5" class="text failed">{html.escape(row["error"] or "")}</td></tr>')
            continue
        counts = json.loads(row["counts"] or "{}")
        tiles, skipped = row["tiles"] or 0, row["tiles_skipped"] or 0
        try:
            picture = _picture(row, folder, max_size)
        except Exception as err:  # a picture must never sink the report
            picture = f'<span class="failed">no picture: {html.escape(str(err))}</span>'
        lines.append(
            f"<tr><td>{name}</td><td class='text'>done</td><td>{row['instances']}</td>"
            f"<td class='text'>{html.escape(', '.join(f'{k}: {v}' for k, v in counts.items()))}</td>"
            f"<td>{row['seconds'] or 0:.1f}</td><td>{skipped}/{tiles} ({skipped / max(tiles, 1):.0%})</td><td>{picture}</td></tr>"
        )
    done = sum(r["status"] == "done" for r in rows)
    page = (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>"
        f"<h1>{html.escape(title)}</h1><p>{done} of {len(rows)} images done; ledger: {html.escape(str(out_root / 'ledger.sqlite'))}</p>"
        "<table><tr><th>image</th><th>status</th><th>instances</th><th>per class</th><th>seconds</th>"
        "<th>tiles skipped</th><th>picture</th></tr>" + "".join(lines) + "</table>"
    )
    index = folder / "index.html"
    with atomic_path(index) as tmp:
        tmp.write_text(page)
    return index
