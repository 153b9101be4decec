"""Run every benchmark and rewrite benchmarks/RESULTS.md with the figures, the machine, date and load.

Each figure is a ratio of contenders measured side by side in one run (alternated, repeated); the
tables give the median and, in brackets, the spread (min–max) of the repetitions. Earlier results stay
in git history and in benchmarks/HISTORY.md. ``python benchmarks/run_all.py NAME ...`` runs only some.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import fmt, load_average, machine  # noqa: E402

HERE = Path(__file__).parent


def throughput() -> list[str]:
    import bench_throughput

    t = bench_throughput.run()
    return [
        f"### U-Net end to end ({t['size']}² derived SpaceNet mosaic, job defaults: tile {t['tile']}, batch "
        f"{t['batch']}, 256² patches, overlap 0.25; real overlap factor {t['overlap_factor']:.3f}; load {t['load']})\n",
        "| contender | Mpx/s |", "|---|---|",
        f"| forward only, 2 worker processes × 1 thread, full batches | {fmt(t['forward_mpx_s'], 3)} |",
        f"| MONAI sliding_window_inference (Gaussian, in memory, 1 process × 2 threads) | {fmt(t['monai_mpx_s'], 3)} |",
        f"| segpipe run (GeoTIFF → COG, start-up and shutdown included) | {fmt(t['segpipe_mpx_s'], 3)} |",
        "",
        f"- end to end ÷ (forward only ÷ overlap factor) = **{fmt(t['e2e_over_cap'])}** (goal ≥ 0.9)",
        f"- end to end ÷ MONAI = **{fmt(t['e2e_over_monai'])}** (goal ≥ 1.15)",
        f"- peak scratch (work store) = **{fmt(t['scratch_b_per_px'])} B/px** (goal ≤ 1); peak RSS of the process "
        f"tree {fmt(t['peak_rss_mib'], 0)} MiB",
        f"- class maps agree with MONAI on {100 * t['agreement_with_monai']:.3f}% of pixels\n",
    ]


def cheap() -> list[str]:
    import bench_cheap

    c = bench_cheap.run()
    return [
        f"### Otsu on {c['tiles']} tiles ({c['size']}², tile {c['tile']}; load {c['load']})\n",
        "| contender | seconds |", "|---|---|",
        f"| segpipe run (whole process) | {fmt(c['segpipe_s'])} |",
        "| plain Dask: rioxarray → histogram → map_overlap → to_zarr → COG (whole process) | "
        f"{fmt(c['plain_dask_s'])} |",
        f"| whole array in one process (compute only) | {fmt(c['whole_array_s'], 3)} |",
        "| the same job with no machinery (whole_file_otsu.py: read, threshold, write COG), whole process | "
        f"{fmt(c['whole_file_process_s'])} |",
        f"| the same, inside the benchmark's warm process | {fmt(c['whole_file_s'])} |",
        "",
        f"- segpipe ÷ plain Dask = **{fmt(c['segpipe_over_plain'])}** (goal ≤ 1.25)",
        f"- segpipe ÷ whole file (whole process) = **{fmt(c['segpipe_over_whole_process'], 1)}** (goal ≤ 3); "
        f"÷ whole file in the warm process = {fmt(c['segpipe_over_whole_file'], 1)}; ÷ whole array (compute "
        f"only) = {fmt(c['segpipe_over_whole'], 1)}",
        f"- peak RSS: segpipe {fmt(c['segpipe_peak_rss_mib'], 0)} MiB, "
        f"plain Dask {fmt(c['plain_peak_rss_mib'], 0)} MiB; "
        f"nanny kill warnings in segpipe runs: {c['nanny_kill_warnings']}\n",
    ]


def ingest() -> list[str]:
    import bench_ingest

    i = bench_ingest.run()
    return [
        f"### Ingest ({i['size']}² uint16 deflate GeoTIFF, 2 workers × 1 thread; load {i['load']})\n",
        "| contender | seconds |", "|---|---|",
        f"| segpipe ingest, tiled source read in place (validity + marks) | {fmt(i['segpipe_s'])} |",
        f"| segpipe ingest, `pixels: copy` (pixels + validity + marks) | {fmt(i['copy_s'])} |",
        f"| rasterio decode of the same rows (+ dataset mask) | {fmt(i['decode_s'])} |",
        f"| rioxarray.open_rasterio(chunks=512).to_zarr | {fmt(i['rioxarray_s'])} |",
        "",
        f"- in place: speed ÷ decode = **{fmt(i['segpipe_over_decode'])}** (goal ≥ 0.8); speed ÷ rioxarray = "
        f"**{fmt(i['segpipe_over_rioxarray'])}** (goal ≥ 1.5)",
        f"- copy: speed ÷ decode = **{fmt(i['copy_over_decode'])}**; speed ÷ rioxarray = "
        f"**{fmt(i['copy_over_rioxarray'])}**\n",
    ]


def export() -> list[str]:
    import bench_export

    e = bench_export.run()
    rows = [f"| {name} | {e[name]['median_s']:.2f} ({e[name]['min_s']:.2f}–{e[name]['max_s']:.2f}) | "
            f"{e[name]['peak_rss_mib']:.0f} | {e[name]['size_mib']:.1f} |" for name in ("old", "new", "new_deflate6")]
    load = "/".join(f"{v:.1f}" for v in e["loadavg_start"])
    return [
        f"### COG export of a {e['size']}² class map (each contender a child process; load {load})\n",
        "| contender | seconds | peak RSS MiB | file MiB |", "|---|---|---|---|", *rows, "",
        f"- new ÷ old time = **{1 / e['new']['speedup_vs_old']:.2f}**; identical pixels and overviews: "
        f"{e['new']['same_pixels_as_old']} (old = the export before issue 8: serial staging write, GDAL builds "
        "the overviews, deflate 6, default block cache)\n",
    ]


def flow() -> list[str]:
    import bench_flow

    f = bench_flow.run()
    return [
        f"### Prefect flow vs CLI (otsu, {f['size']}², tile {f['tile']}, running Prefect server; load {f['load']})\n",
        "| contender | seconds |", "|---|---|",
        f"| segpipe run | {fmt(f['cli_s'])} |",
        f"| python -m segpipe_flows.segment_scene | {fmt(f['flow_s'])} |",
        f"| `import prefect` alone, after segpipe's imports | {fmt(f['prefect_import_s'])} |",
        "",
        f"- flow ÷ CLI = **{fmt(f['flow_over_cli'])}** (goal ≤ 1.10); the floor set by importing Prefect, "
        f"(CLI + import) ÷ CLI = **{fmt(f['floor'])}**; "
        f"peak RSS CLI {fmt(f['cli_peak_rss_mib'], 0)} MiB, flow {fmt(f['flow_peak_rss_mib'], 0)} MiB\n",
    ]


def memory() -> list[str]:
    import bench_memory

    m = bench_memory.run()
    return [
        f"### Peak RSS at 1× and 16× scene size (load {load_average()})\n",
        "| method | 1× MiB | 16× MiB | 16× ÷ 1× |", "|---|---|---|---|",
        *[f"| {name} | {m[name][1]['peak_rss_mib']:.0f} | {m[name][16]['peak_rss_mib']:.0f} | "
          f"**{m[name]['ratio']:.2f}** |" for name in ("otsu", "unet")],
        "", "Goal: 16× ÷ 1× ≤ 1.2.\n",
    ]


def volume() -> list[str]:
    import bench_volume

    v = bench_volume.run()
    return [
        f"### 3-D: the real head CT ({' × '.join(map(str, v['shape']))} voxels, NIfTI), 3-D U-Net, 64³ patches "
        f"(load {load_average()})\n",
        "| contender | Mvoxel/s |", "|---|---|",
        f"| forward only | {v['forward_mvox_s']:.3f} |",
        f"| MONAI sliding_window_inference | {v['monai_mvox_s']:.3f} |",
        f"| segpipe end to end (NIfTI → NIfTI) | {v['segpipe_mvox_s']:.3f} |",
        "", f"- end to end ÷ MONAI = **{v['e2e_over_monai']:.2f}** (one repetition)\n",
    ]


def formats() -> list[str]:
    import bench_formats

    f = bench_formats.run()
    return [
        f"### One model as checkpoint (eager), TorchScript and ONNX ({f['size']}², U-Net end to end; "
        f"load {f['load']})\n",
        "| format | Mpx/s | ÷ eager | class map = eager's |", "|---|---|---|---|",
        f"| eager (segpipe checkpoint) | {fmt(f['mpx_s']['eager'], 3)} | 1 | |",
        *[f"| {k} | {fmt(f['mpx_s'][k], 3)} | **{fmt(f['over_eager'][k])}** | {100 * f['agreement'][k]:.3f} % |"
          for k in ("torchscript", "onnx")],
        "", "Goal (issue 10): TorchScript and ONNX ≥ 0.9 × eager end to end on CPU.\n",
    ]


def resample() -> list[str]:
    import bench_resample

    r = bench_resample.run()
    return [
        f"### A model at its own resolution: 0.5 m demo U-Net on a {r['size']}² scene at 0.5 m and the same area at "
        f"1.0 m ({r['size'] // 2}², resampled to the model's {r['size']}² grid and back; load {r['load']})\n",
        "| scene | model-grid Mpx/s | peak RSS MiB |", "|---|---|---|",
        f"| 0.5 m (the model's own pixel size) | {fmt(r['model_mpx_s']['native'], 3)} | "
        f"{fmt(r['peak_rss_mib']['native'], 0)} |",
        f"| 1.0 m (model grid) | {fmt(r['model_mpx_s']['coarser'], 3)} | {fmt(r['peak_rss_mib']['coarser'], 0)} |",
        "", f"- model grid ÷ native, same model pixels = **{fmt(r['coarser_over_native'])}** (the price of "
        "resampling in, the model-grid blend and the way back)\n",
    ]


def scale() -> list[str]:
    import bench_scale

    r = bench_scale.run()
    return [
        f"### Scale: 1.6 Gpx otsu ({r['size']}², tile {r['tile']}, derived mosaic made in {r['scene_seconds']:.0f} s; "
        f"{r['reps']} repetition(s); load {r['load']})\n",
        "| contender | seconds | peak RSS MiB (process tree) |", "|---|---|---|",
        f"| segpipe run | {fmt(r['segpipe_s'])} | {fmt(r['segpipe_rss_mib'])} |",
        f"| plain Dask (rioxarray → histogram → map_overlap → to_zarr → GDAL COG) | {fmt(r['plain_s'])} | "
        f"{fmt(r['plain_rss_mib'])} |",
        "",
        f"- segpipe ÷ plain Dask = **{fmt(r['ratio'])}** (goal ≤ 2); segpipe peak RSS goal < 1.5 GB; "
        f"export share of the segpipe run = **{fmt(r['export_share'])}** (goal ≤ 0.15)\n",
    ]


def stac_loaders() -> list[str]:
    import bench_stac_loaders

    r = bench_stac_loaders.run()
    n = 4 * r["size"] ** 2 / 1e6
    head = (f"### STAC loaders: 4 items of {r['item']}² (two reprojected to the next UTM zone) onto one "
            f"{r['size']}² grid, {n:.0f} Mpx of (item, y, x), {r['chunk']}² dask chunks, {r['threads']} threads, "
            f"{r['reps']} repetitions; load {r['load']})\n")
    rows = [f"| {name} | {fmt(r[name]['seconds'])} | {fmt(r[name]['mpx_s'], 1)} |"
            for name in ("odc-stac", "stackstac") if name in r]
    blocks = r["odc_vs_blocks"]
    lines = [head, "| loader | seconds | Mpx/s |", "|---|---|---|", *rows, ""]
    if r["has_stackstac"]:
        d = r["odc_vs_stackstac"]
        lines.append(f"- stackstac ÷ odc-stac time = **{fmt(r['stackstac_over_odc'])}**; pixels that differ between "
                     f"them: {d['differ']:,} of {d['pixels']:,} (per item {d['per_item']}: only the reprojected "
                     "items)")
    else:
        lines.append("- stackstac not importable: skipped (it is not a segpipe dependency; see bench_stac_loaders.py)")
    lines.append(f"- odc-stac over the whole grid vs odc-stac block by block (512², as segpipe loads): "
                 f"{blocks['differ']:,} pixels differ (per item {blocks['per_item']}), the reason segpipe fixes its "
                 f"blocks; odc-stac repeated gives identical pixels: {r['odc_repeatable']}\n")
    return lines


def tile_curve() -> list[str]:
    import bench_tile_curve

    r = bench_tile_curve.run(reps=3, large_reps=3, s3_sizes=(1_000, 10_000))
    sizes = ", ".join(f"{s}²" for s in r["sizes"].values())
    return [
        f"### Cost per tile at 10^3–10^5 tiles (otsu, {bench_tile_curve.TILE}-px tiles on {sizes} VRTs repeating the "
        "SpaceNet sample; a `dask scheduler` and 2 `dask worker` processes × 1 thread on loopback, started afresh "
        "for every run; the job is `segpipe run` with `cluster.scheduler`)\n",
        *bench_tile_curve.table(r), "",
    ]


def archive_scale() -> list[str]:
    import bench_archive_scale

    return bench_archive_scale.report(bench_archive_scale.run())


def exports() -> list[str]:
    import bench_exports

    return [*bench_exports.report("demo", bench_exports.demo()), *bench_exports.report("ct", bench_exports.ct())]


def exports_scale() -> list[str]:
    import bench_exports

    return bench_exports.report("scale", bench_exports.scale())


BENCHES = {"throughput": throughput, "cheap": cheap, "ingest": ingest, "export": export, "flow": flow,
           "memory": memory, "volume": volume, "formats": formats, "resample": resample, "scale": scale,
           "stac_loaders": stac_loaders, "tile_curve": tile_curve, "archive_scale": archive_scale,
           "exports": exports, "exports_scale": exports_scale}
# What a plain `make bench` runs (within 30 minutes here); `run_all.py scale` adds minutes per repetition,
# `run_all.py tile_curve` ~15 minutes (10^5 tiles of 64 px), `run_all.py archive_scale` ~20 minutes (1,000 items
# against one 1 Gpx job, 3 rounds at 200 items, the Prefect flow too), `run_all.py exports_scale` the 1.6 Gpx job
# with and without polygons (minutes per round).
DEFAULT = ["throughput", "cheap", "ingest", "export", "flow", "memory", "volume", "formats", "resample",
           "stac_loaders", "exports"]


def main(names: list[str]) -> None:
    started = dt.datetime.now(dt.UTC)
    lines = [
        "# Benchmark results\n",
        f"Rewritten by `make bench` (benchmarks/run_all.py) on {started:%Y-%m-%d %H:%M} UTC — {machine()}; "
        f"load average at the start {load_average()} (1/5/15 min). Each table's contenders ran side by side, "
        "alternated, repeated; figures are medians with the spread (min–max) in brackets. Earlier runs: "
        "benchmarks/HISTORY.md and git history.\n",
        "How to read them: the goals are issue 8's. Whole-process contenders (`segpipe run`, the plain Dask "
        "script, the flow) include interpreter start, cluster start and shutdown, so on small scenes fixed "
        "start-up weighs heavily. Forward-only runs in the same two 1-thread worker processes as segpipe, and "
        "its rate divided by the job's real overlap factor is the ceiling of end-to-end model throughput. The 3-D "
        "table is one repetition and varies by ±15 % run to run on this VM.\n",
    ]
    for name in names or DEFAULT:
        lines += BENCHES[name]()
    text = "\n".join(lines)
    print(text)
    if not names:  # a partial run only prints: RESULTS.md always holds one whole run
        (HERE / "RESULTS.md").write_text(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
