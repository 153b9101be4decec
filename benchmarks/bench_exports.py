"""What the users' formats add to a run (issue 28): class polygons, the STAC Item and DICOM-SEG.

Contenders, each a whole ``segpipe run`` child process on 2 workers x 1 thread, alternated round by round:

- ``demo``: the bundled demo job (U-Net on the 900² SpaceNet scene, with truth), ``exports: [cog]`` against
  ``[cog, polygons]``;
- ``ct``: the real head CT of ../shared/DATA.md written as a DICOM series (derived: 108 files from
  ``Cranium.inv3``, tests/medical.py) through the bone 3-D U-Net of tests/data, ``[nifti]`` against
  ``[nifti, dicom-seg]`` (the segment coded as bone tissue): DICOM-SEG applies to neither image job;
- ``scale`` (run separately: one repetition takes minutes): the 1.6 Gpx derived mosaic of bench_scale (40000²,
  otsu, tile 2048), ``[cog]`` against ``[cog, polygons]``, with the peak RSS of the process tree, and the floor
  under any polygons export: GDAL's polygonize alone over the same class map (the otsu map of a panchromatic
  city is salt and pepper, about 7 regions per 1000 pixels, so tracing it costs more than thresholding it).

Every image run writes its STAC Item, so there is no run without one to compare against: its cost is timed by
writing the finished run's Item again in a fresh process (imports included, the same function the run calls),
and set against the run's time. The added share of an export is median(with) ÷ median(without) − 1 of the whole
processes; the export stage's own seconds (summary.json) are given beside it, as they are far less noisy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, SAMPLE, alternate, load_average, mosaic_scene, run_sampled, segpipe_cli

TESTS = ROOT / "tests"
BONE = {"category": {"code": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
        "type": {"code": "3138006", "scheme": "SCT", "meaning": "Bone tissue"}}
CLUSTER = {"n_workers": 2, "threads_per_worker": 1}

# Writes a finished run's STAC Item again, timed from before the import of the Item's code (which the run pays,
# in a process that has not loaded pystac) to the file written; prints the seconds.
ITEM_TIMER = """
import sys, time
from segpipe.api import check_job
from segpipe.io.exports import output_files
c = check_job(sys.argv[1])
exported = [p for p in (c.layout.output / f for f in output_files()) if p.is_file()]
t0 = time.perf_counter()
from segpipe.pipeline import write_item
write_item(c, exported)
print(time.perf_counter() - t0)
"""


# GDAL's polygonize alone (rasterio ``shapes``, 4-connected, a chunk row at a time, in one thread) over a finished
# run's class map: the tracing every polygons export must pay, whatever it does around it; prints the seconds.
TRACE_TIMER = """
import sys, time
import numpy as np, zarr
from rasterio.features import shapes
from segpipe.io.result import NODATA
arr = zarr.open_array(sys.argv[1], path="class", mode="r")
t0 = time.perf_counter()
n = 0
for r in range(0, arr.shape[0], arr.chunks[0]):
    data = np.asarray(arr[r:r + arr.chunks[0]])
    n += sum(1 for _ in shapes(data, mask=data != NODATA, connectivity=4))
print(n, time.perf_counter() - t0)
"""


def trace_seconds(result: Path) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-c", TRACE_TIMER, str(result)], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    n, seconds = out.stdout.split()[-2:]
    return int(n), float(seconds)


def item_seconds(job_path: Path) -> float:
    out = subprocess.run([sys.executable, "-c", ITEM_TIMER, str(job_path)], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.split()[-1])


def _contenders(base: dict, tmp: Path, exports: dict[str, list[str]], extra: dict[str, dict],
                time_item: bool, time_trace: bool = False) -> dict:
    """One child-process run per contender; each returns seconds, export-stage seconds, RSS, Item seconds (and,
    with ``time_trace``, the first run's class map traced by GDAL alone)."""
    n = {"k": 0}

    def make(name: str):
        def go() -> dict:
            n["k"] += 1
            out = tmp / f"{name}{n['k']}"
            job = {**base, "output": str(out), "exports": exports[name], **extra.get(name, {})}
            job_path = tmp / f"{name}.yaml"
            r = run_sampled(segpipe_cli(job, job_path))
            stages = json.loads((out / "metrics" / "summary.json").read_text())["stage_seconds"]
            r["export_s"] = stages["export"]
            if time_item:
                r["item_s"] = item_seconds(job_path)
            if time_trace and n["k"] == 1:
                r["regions"], r["trace_s"] = trace_seconds(out / "result.zarr")
            shutil.rmtree(out)
            return r
        return go

    return {name: make(name) for name in exports}


def _summary(res: dict, base: str, other: str) -> dict:
    import numpy as np

    b, o = res[base], res[other]
    out = {f"{k}_s": [r["seconds"] for r in res[k]] for k in (base, other)}
    out.update({f"{k}_export_s": [r["export_s"] for r in res[k]] for k in (base, other)})
    out.update({f"{k}_rss_mib": [r["peak_rss_mib"] for r in res[k]] for k in (base, other)})
    out["added_share"] = float(np.median(out[f"{other}_s"]) / np.median(out[f"{base}_s"]) - 1)
    out["added_share_rounds"] = [y["seconds"] / x["seconds"] - 1 for x, y in zip(b, o, strict=True)]
    out["export_added_s"] = [y["export_s"] - x["export_s"] for x, y in zip(b, o, strict=True)]
    if "trace_s" in b[0]:
        out["regions"], out["trace_s"] = b[0]["regions"], b[0]["trace_s"]
        out["trace_share"] = b[0]["trace_s"] / CLUSTER["n_workers"] / float(np.median(out[f"{base}_s"]))
    if "item_s" in b[0]:
        out["item_s"] = [r["item_s"] for r in b]
        out["item_share"] = [r["item_s"] / r["seconds"] for r in b]
    return out


def demo(reps: int = 3) -> dict:
    """The demo job with and without polygons; the Item's cost against the run without them."""
    import yaml

    base = yaml.safe_load((SAMPLE / "demo.yaml").read_text())
    base["input"] = str(SAMPLE / base["input"])
    base["method"]["model"] = str(SAMPLE / base["method"]["model"])
    base["truth"]["path"] = str(SAMPLE / base["truth"]["path"])
    base["cluster"] = CLUSTER
    with tempfile.TemporaryDirectory() as tmp:
        runs = _contenders(base, Path(tmp), {"cog": ["cog"], "polygons": ["cog", "polygons"]}, {}, time_item=True)
        res = alternate(runs, reps)
    return {"reps": reps, "load": load_average(), **_summary(res, "cog", "polygons")}


def ct(reps: int = 3, slices: int | None = None) -> dict:
    """The head CT as a DICOM series through the bone 3-D U-Net, with and without the DICOM-SEG export;
    ``slices``: only that many slices from the middle, and the central 128² of each (the smoke run)."""
    import dataclasses

    sys.path.insert(0, str(TESTS))
    from medical import load_ct, write_dicom_series

    volume = load_ct()
    if slices is not None:
        z0 = (volume.hu.shape[0] - slices) // 2
        part = (slice(z0, z0 + slices), slice(64, 192), slice(64, 192))
        volume = dataclasses.replace(volume, hu=volume.hu[part], bone=volume.bone[part], head=volume.head[part])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        series = write_dicom_series(tmp / "ct", volume)
        base = {"input": str(series), "tile_size": 128, "class_names": ["background", "bone"],
                "method": {"name": "unet", "model": str(TESTS / "data" / "unet3d_ct_bone.pt"), "patch_size": 32,
                           "overlap": 0.25, "batch_size": 4},
                "cluster": CLUSTER}
        runs = _contenders(base, tmp, {"nifti": ["nifti"], "seg": ["nifti", "dicom-seg"]},
                           {"seg": {"dicom_seg": {"segments": {"bone": BONE}}}}, time_item=False)
        res = alternate(runs, reps)
    return {"reps": reps, "load": load_average(), "voxels": volume.hu.size, **_summary(res, "nifti", "seg")}


def scale(size: int = 40000, tile: int = 2048, reps: int = 3) -> dict:
    """The 1.6 Gpx otsu job with and without polygons (and its Item)."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("SEGPIPE_BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        scene = mosaic_scene(tmp / "scene.tif", size, BIGTIFF="YES", num_threads="all_cpus")
        base = {"input": str(scene), "tile_size": tile, "method": {"name": "otsu"}, "cluster": CLUSTER}
        runs = _contenders(base, tmp, {"cog": ["cog"], "polygons": ["cog", "polygons"]}, {}, time_item=True,
                           time_trace=True)
        res = alternate(runs, reps)
    return {"size": size, "tile": tile, "reps": reps, "load": load_average(), **_summary(res, "cog", "polygons")}


# Per job: its title, the export measured, and the contenders' names without and with it.
LABELS = {"demo": ("Demo job (U-Net, 900² SpaceNet with truth)", "polygons", "cog", "polygons"),
          "ct": ("Head CT as a DICOM series (derived, 108 × 256 × 256, bone 3-D U-Net, patch 32)", "DICOM-SEG",
                 "nifti", "seg"),
          "scale": ("1.6 Gpx otsu (40000² derived mosaic, tile 2048)", "polygons", "cog", "polygons")}


def report(which: str, r: dict) -> list[str]:
    """The markdown rows of one job's figures (run_all.py)."""
    from common import fmt

    title, added, base, other = LABELS[which]
    lines = [f"### What {added} adds: {title} ({r['reps']} rounds; load {r['load']})\n",
             "| contender | seconds (whole process) | export stage s | peak RSS MiB |", "|---|---|---|---|"]
    for k in (base, other):
        lines.append(f"| exports with{'' if k == other else 'out'} {added} | {fmt(r[f'{k}_s'])} | "
                     f"{fmt(r[f'{k}_export_s'], 3)} | {fmt(r[f'{k}_rss_mib'], 0)} |")
    lines += ["", f"- {added} adds **{100 * r['added_share']:+.1f} %** (median over median; per round "
              f"{fmt([100 * v for v in r['added_share_rounds']], 1)} %), the export stage "
              f"{fmt(r['export_added_s'], 3)} s (goal ≤ 10 % of the run)"]
    if "trace_s" in r:
        lines.append(f"- the floor: GDAL's polygonize alone traces the class map's {r['regions']:,} regions in "
                     f"{r['trace_s']:.1f} s of one core; spread over the {CLUSTER['n_workers']} workers that is "
                     f"**{100 * r['trace_share']:.0f} %** of the run without {added}")
    if "item_s" in r:
        lines.append(f"- the STAC Item: {fmt(r['item_s'], 3)} s in a fresh process = "
                     f"**{fmt([100 * v for v in r['item_share']], 2)} %** of the run without {added}")
    return [*lines, ""]


def smoke() -> dict:
    """Every contender once, the CT cut to 16 × 128², the scale job on a 2048² mosaic (tests/test_bench_smoke.py):
    no figure kept."""
    return {"demo": demo(reps=1), "ct": ct(reps=1, slices=16), "scale": scale(size=2048, tile=512, reps=1)}


if __name__ == "__main__":
    if sys.argv[1:] == ["--smoke"]:
        print(json.dumps(smoke(), indent=1))
        sys.exit(0)
    which = sys.argv[1] if len(sys.argv) > 1 else "demo"
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    print(json.dumps({"demo": demo, "ct": ct, "scale": scale}[which](reps=reps), indent=1))
