"""A single self-contained HTML report: per-tile IoU heatmap over the scene and an overlay quicklook.

Why one file with everything inline (SVG heatmap, PNG quicklook as a data URI, no external
scripts or fonts): it must open from a scheduled run's output folder, an e-mail attachment or an
object store, offline. The heatmap draws every tile (block) at its place in the scene, coloured
by the IoU of one class, with the tile's scores in its tooltip; for volumes it shows the blocks
of the middle z block row and the quicklook the middle slice. Written atomically like every
other report file.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from PIL import Image

from segpipe.io.cog import PALETTE
from segpipe.io.result import NODATA
from segpipe.io.scene import Scene
from segpipe.io.store import write_atomic
from segpipe.report.tables import MetricsReport

QUICKLOOK_PX = 768
MAP_PX = 640
# viridis at 0, 0.25, 0.5, 0.75, 1
RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)


def colour(v: float | None) -> str:
    """Viridis colour of an IoU in [0, 1]; grey where the tile has no score."""
    if v is None or not np.isfinite(v):
        return "#bbbbbb"
    x = min(max(float(v), 0.0), 1.0) * (len(RAMP) - 1)
    k = min(int(x), len(RAMP) - 2)
    r, g, b = RAMP[k] + (RAMP[k + 1] - RAMP[k]) * (x - k)
    return f"#{int(r):02x}{int(g):02x}{int(b):02x}"


def _quicklook(scene: Scene, result_path: str, z: int | None) -> str:
    """Grey scene with class colours blended in (background class left clear), as a PNG data URI."""
    step = max(1, int(np.ceil(max(scene.height, scene.width) / QUICKLOOK_PX)))
    lead = () if z is None else (z,)
    img = np.asarray(scene.image[(slice(None), *lead, slice(None, None, step), slice(None, None, step))], np.float32)
    grey = img.mean(axis=0)
    lo, hi = np.percentile(grey, [1, 99]) if grey.size else (0.0, 1.0)
    g = np.clip((grey - lo) / max(hi - lo, 1e-12), 0, 1) * 255
    rgb = np.repeat(g[..., None], 3, axis=-1)
    cls = np.asarray(zarr.open_array(result_path, path="class", mode="r")[
        (*lead, slice(None, None, step), slice(None, None, step))])
    for k in range(1, int(cls[cls != NODATA].max(initial=0)) + 1):
        m = cls == k
        rgb[m] = 0.45 * rgb[m] + 0.55 * np.asarray(PALETTE[k % len(PALETTE)], float)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _cell(v: Any) -> str:
    """A summary value for a table cell: dicts (AP per class, per IoU threshold) as ``key=value`` pairs."""
    if isinstance(v, dict):
        return ", ".join(f"{html.escape(str(k))}={v2}" for k, v2 in v.items())
    return html.escape(str(v))


def _heatmap(rows: list[dict[str, Any]], shape: tuple[int, int], score: str, key: str) -> str:
    scale = MAP_PX / max(shape)
    w, h = shape[1] * scale, shape[0] * scale
    rects = []
    for r in rows:
        v = r.get(score)
        tip = f"tile {r[key]}: {score} = {'-' if v is None else f'{v:.4f}'}"
        if "objects" in r:
            tip += f", objects {r['objects']}"
        rects.append(
            f'<rect class="tile" data-tile="{r[key]}" data-score="{"" if v is None else v}" '
            f'x="{r["col0"] * scale:.2f}" y="{r["row0"] * scale:.2f}" width="{r["width"] * scale:.2f}" '
            f'height="{r["height"] * scale:.2f}" fill="{colour(v)}" stroke="#ffffff" stroke-width="0.5">'
            f"<title>{html.escape(tip)}</title></rect>")
    return (f'<svg id="heatmap" xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
            f'viewBox="0 0 {w:.2f} {h:.2f}">{"".join(rects)}</svg>')


def write_html_report(report: MetricsReport, scene_path: str, result_path: str, dest: str | Path,
                      title: str, score_class: str | None = None) -> Path:
    """Write ``dest``: summary, heatmap of per-tile IoU of ``score_class`` (default: the last class), quicklook."""
    scene = Scene(scene_path)
    names = report.summary["classes"]
    target = score_class or names[-1]
    volume, key = report.geometry.is_volume, report.geometry.tile_word
    rows = report.rows
    z = None
    if volume:
        middle = scene.shape[0] // 2
        rows = [r for r in rows if r["z0"] <= middle < r["z0"] + r["depth"]]
        z = middle
    score = f"iou_{target}"
    s = report.summary
    summary_rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{s['global_iou'][n]}</td><td>{s['global_dice'][n]}</td></tr>"
        for n in names)
    objects = ""
    if "objects" in s:
        o = s["objects"]
        objects = "<h2>Objects</h2><table id='objects'>" + "".join(
            f"<tr><th>{html.escape(k)}</th><td>{_cell(v)}</td></tr>" for k, v in o.items()) + "</table>"
    legend = "".join(f'<span class="swatch" style="background:{colour(v)}"></span>{v:.2f} '
                     for v in (0.0, 0.25, 0.5, 0.75, 1.0))
    data = json.dumps({"tiles": len(rows), "score": score, "unit": report.geometry.pixel_word, "key": key})
    heatmap = _heatmap(rows, scene.shape[-2:], score, key)
    where = " (middle z)" if volume else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; }}
.swatch {{ display: inline-block; width: 1em; height: 1em; margin: 0 2px 0 8px; vertical-align: middle; }}
.panel {{ display: inline-block; vertical-align: top; margin-right: 2em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Global accuracy {s['global_accuracy']}, mean IoU {s['global_mean_iou']} over {s['pixels']} {s.get('unit', 'pixels')}
(from the summed confusion matrix). <span id="tile-count"></span></p>
<table id="summary"><tr><th>class</th><th>IoU</th><th>Dice</th></tr>{summary_rows}</table>
{objects}
<div class="panel"><h2>IoU of {html.escape(target)} per {key}{where}</h2>{heatmap}
<div id="legend">{legend}</div></div>
<div class="panel"><h2>Overlay quicklook</h2><img id="quicklook" alt="class overlay" width="{MAP_PX}"
 src="{_quicklook(scene, result_path, z)}"></div>
<script>
const info = {data};
const tiles = document.querySelectorAll("#heatmap rect.tile");
const scored = [...tiles].filter(t => t.dataset.score !== "").map(t => parseFloat(t.dataset.score));
const worst = scored.length ? Math.min(...scored).toFixed(4) : "-";
document.getElementById("tile-count").textContent =
  `${{tiles.length}} of ${{info.tiles}} ${{info.key}}s drawn; worst ${{info.score}} ${{worst}}.`;
window.addEventListener("load", () => {{
  const q = document.getElementById("quicklook");
  document.body.dataset.quicklook = `${{q.naturalWidth}}x${{q.naturalHeight}}`;
}});
</script>
</body></html>
"""
    dest = Path(dest)
    write_atomic(dest, page)
    return dest
