"""The Prefect flow vs the CLI on the same 1024-tile otsu job (issue 8 goal: flow <= 1.10 x CLI).

A scheduled deployment talks to a Prefect server that is already running, so one server is started
here first (on loopback) and the flow runs point at it; each contender is a whole child process
(``python -m segpipe_flows.segment_scene JOB`` and ``segpipe run JOB``), alternated and repeated, with a third
contender that only times ``import prefect`` after segpipe's own imports: the floor of flow / CLI.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import ROOT, alternate, load_average, mosaic_scene, run_sampled, segpipe_cli

# A flow process cannot avoid importing Prefect; the CLI never does. (CLI + this import) / CLI is thus the
# least flow / CLI any flow can reach on this job, before a single task is run.
PREFECT_IMPORT = ("import time; import segpipe.pipeline, segpipe.runtime.cluster; t = time.perf_counter(); "
                  "import prefect; from prefect import flow, task; print(time.perf_counter() - t)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(size: int = 4096, tile: int = 128, reps: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scene = mosaic_scene(tmp / "scene.tif", size)
        port = _free_port()
        env = {"PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        prefect = str(Path(sys.executable).parent / "prefect")
        server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 120
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                    break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.5)
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
        finally:
            server.terminate()
            server.wait(timeout=60)
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
