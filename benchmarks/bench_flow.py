"""The Prefect flow vs the CLI on the same 1024-tile otsu job (issue 8 goal: flow <= 1.10 x CLI).

A scheduled deployment talks to a Prefect server that is already running, so one server is started
here first (on loopback) and the flow runs point at it; each contender is a whole child process
(``python -m segpipe_flows.segment_scene JOB`` and ``segpipe run JOB``), alternated and repeated, with a third
contender that only times ``import prefect`` after segpipe's own imports: the floor of flow / CLI.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from common import ROOT, alternate, load_average, mosaic_scene, prefect_server, run_sampled, segpipe_cli

# A flow process cannot avoid importing Prefect; the CLI never does. (CLI + this import) / CLI is thus the
# least flow / CLI any flow can reach on this job, before a single task is run.
PREFECT_IMPORT = ("import time; import segpipe.pipeline, segpipe.runtime.cluster; t = time.perf_counter(); "
                  "import prefect; from prefect import flow, task; print(time.perf_counter() - t)")


def run(size: int = 4096, tile: int = 128, reps: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scene = mosaic_scene(tmp / "scene.tif", size)
        with prefect_server(tmp) as env:
            n = {"k": 0}

            def job(kind: str) -> Path:
                n["k"] += 1
                return tmp / f"{kind}{n['k']}"

            def cli() -> dict:
                spec = {"input": str(scene), "output": str(job("cli")), "tile_size": tile, "method": {"name": "otsu"},
                        "cluster": {"n_workers": 2, "threads_per_worker": 1}}
                return run_sampled(segpipe_cli(spec, tmp / "cli.yaml"))

            def flow() -> dict:
                spec = {"input": str(scene), "output": str(job("flow")), "tile_size": tile, "method": {"name": "otsu"},
                        "cluster": {"n_workers": 2, "threads_per_worker": 1}}
                flow_job = str(tmp / "flow.yaml")
                command = segpipe_cli(spec, tmp / "flow.yaml")[:2] + ["segpipe_flows.segment_scene", flow_job]
                return run_sampled(command, env=env)

            def prefect_import() -> float:
                """Seconds that importing Prefect adds to a process that has segpipe's pipeline loaded already."""
                r = run_sampled([sys.executable, "-c", PREFECT_IMPORT], env=env, lines=True)
                numbers = [t for _, t in r["lines"] if t.replace(".", "", 1).isdigit()]  # stderr is merged in
                return float(numbers[-1])

            res = alternate({"cli": cli, "flow": flow, "prefect_import": prefect_import}, reps)
    c = [r["seconds"] for r in res["cli"]]
    f = [r["seconds"] for r in res["flow"]]
    imp = res["prefect_import"]
    return {"size": size, "tile": tile, "reps": reps, "cli_s": c, "flow_s": f, "prefect_import_s": imp,
            "floor": [(a + i) / a for a, i in zip(c, imp, strict=True)],
            "flow_over_cli": [b / a for a, b in zip(c, f, strict=True)],
            "cli_peak_rss_mib": [r["peak_rss_mib"] for r in res["cli"]],
            "flow_peak_rss_mib": [r["peak_rss_mib"] for r in res["flow"]], "load": load_average(), "root": str(ROOT)}


if __name__ == "__main__":
    print(run())
