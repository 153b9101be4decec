"""Run every benchmark and append the figures, with the machine, to benchmarks/RESULTS.md."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_memory  # noqa: E402
import bench_throughput  # noqa: E402
import bench_volume  # noqa: E402
from common import machine  # noqa: E402


def main() -> None:
    t = bench_throughput.run()
    m = bench_memory.run()
    v = bench_volume.run()
    lines = [
        f"\n## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC — {machine()}\n",
        f"Throughput, {t['size']}² derived SpaceNet mosaic, demo U-Net (256² patches, overlap 0.25, batch 4), "
        f"device {t['device']}, segpipe with {t['workers']} Dask workers × 1 thread:\n",
        "| measure | Mpx/s |", "|---|---|",
        f"| model forward only (no overlap, no I/O) | {t['forward_mpx_s']:.3f} |",
        f"| MONAI sliding_window_inference (Gaussian, in memory) | {t['monai_mpx_s']:.3f} |",
        f"| segpipe end to end (ingest → logits → stitch → COG) | {t['segpipe_mpx_s']:.3f} |",
        "",
        f"Ratios: end-to-end / forward-only = **{t['e2e_over_forward']:.2f}**, end-to-end / MONAI = "
        f"**{t['e2e_over_monai']:.2f}**; class maps agree with MONAI on {100 * t['class_agreement_with_monai']:.3f}% "
        "of pixels (segpipe stores logits as float16).\n",
        "Peak RSS (client + scheduler + 2 workers), whole run, U-Net:\n",
        "| scene | pixels | peak RSS MiB | seconds |", "|---|---|---|---|",
        f"| 1× | {m[1]['size']}² | {m[1]['peak_rss_mib']:.0f} | {m[1]['seconds']:.1f} |",
        f"| 16× | {m[16]['size']}² | {m[16]['peak_rss_mib']:.0f} | {m[16]['seconds']:.1f} |",
        "",
        f"Peak RSS ratio 16× / 1× = **{m['ratio_16x_over_1x']:.2f}**.\n",
        f"Volume, the real head CT ({' × '.join(map(str, v['shape']))} voxels, NIfTI), 3-D U-Net (base 8, depth 3), "
        f"64³ patches, overlap 0.25, batch 2, 128³ blocks, device {v['device']}:\n",
        "| measure | Mvoxel/s |", "|---|---|",
        f"| model forward only | {v['forward_mvox_s']:.3f} |",
        f"| MONAI sliding_window_inference (Gaussian, in memory) | {v['monai_mvox_s']:.3f} |",
        f"| segpipe end to end (NIfTI → Zarr → logits → stitch → NIfTI) | {v['segpipe_mvox_s']:.3f} |",
        "",
        f"Ratios: end-to-end / forward-only = **{v['e2e_over_forward']:.2f}**, end-to-end / MONAI = "
        f"**{v['e2e_over_monai']:.2f}**; class volumes agree with MONAI on {100 * v['agreement']:.3f}% of voxels "
        f"(random weights; MONAI put {100 * v['class1_share']:.1f}% of voxels in class 1).\n",
    ]
    text = "\n".join(lines)
    print(text)
    results = Path(__file__).parent / "RESULTS.md"
    if not results.exists():
        results.write_text("# Benchmark results\n\nProduced by `make bench` (benchmarks/run_all.py); newest last.\n")
    with results.open("a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
