"""A classical job never imports torch, neither in the client nor in its workers, nor unused exporters."""

import subprocess
import sys
import textwrap

from conftest import SCENE


def test_classical_job_never_imports_torch(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from segpipe.runtime.cluster import connect
        from segpipe.config import job_from_dict
        from segpipe.pipeline import check, run_job

        job = job_from_dict({{"input": {str(SCENE)!r}, "output": {str(tmp_path / "out")!r}, "tile_size": 256,
                             "method": {{"name": "otsu"}}, "cluster": {{"n_workers": 2, "processes": "yes"}}}},
                             Path.cwd())
        checked = check(job)
        with connect(job.cluster) as client:
            run_job(checked, client)
            workers = client.run(lambda: "torch" in sys.modules)
        print("client", "torch" in sys.modules, "workers", sorted(workers.values()))
        print("dask.array", "dask.array" in sys.modules)  # OME-Zarr's writer: not loaded for a COG-only job
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-2:] == ["client False workers [False, False]", "dask.array False"]
    assert "Traceback" not in proc.stderr, proc.stderr  # nanny kill warnings are counted by bench_cheap (timing)
    assert (tmp_path / "out" / "segmentation.tif").is_file()


def test_a_small_classical_job_runs_in_threads_of_its_own_process(tmp_path):
    """processes: auto runs a small classical job in threads: no worker process is started or stopped."""
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from segpipe.runtime.cluster import connect
        from segpipe.config import job_from_dict
        from segpipe.pipeline import check, in_process, run_job

        def spec(method, **cluster):
            return job_from_dict({{"input": {str(SCENE)!r}, "output": {str(tmp_path / "out")!r}, "tile_size": 256,
                                  "method": method, "cluster": cluster}}, Path.cwd())

        unet = {{"name": "unet", "model": "segpipe/sample/unet_spacenet.pt", "patch_size": 256}}
        print(in_process(check(spec(unet))), in_process(check(spec({{"name": "otsu"}}, processes="yes"))),
              in_process(check(spec(unet, processes="no"))))
        checked = check(spec({{"name": "otsu"}}))
        with connect(checked.job.cluster, in_process=in_process(checked)) as client:
            run_job(checked, client)
            pids = set(client.run(os.getpid).values())
            threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
        print(pids == {{os.getpid()}}, threads)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-2:] == ["False False True", "True 2"]
    assert (tmp_path / "out" / "segmentation.tif").is_file()
