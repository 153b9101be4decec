"""A classical job never imports torch, neither in the client nor in its workers."""

import subprocess
import sys
import textwrap

from conftest import SCENE


def test_classical_job_never_imports_torch(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from segpipe.cluster import connect
        from segpipe.config import job_from_dict
        from segpipe.pipeline import check, run_job

        job = job_from_dict({{"input": {str(SCENE)!r}, "output": {str(tmp_path / "out")!r}, "tile_size": 256,
                             "method": {{"name": "otsu"}}, "cluster": {{"n_workers": 2}}}}, Path.cwd())
        checked = check(job)
        with connect(job.cluster) as client:
            run_job(checked, client)
            workers = client.run(lambda: "torch" in sys.modules)
        print("client", "torch" in sys.modules, "workers", sorted(workers.values()))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "client False workers [False, False]"
    assert "Traceback" not in proc.stderr, proc.stderr  # nanny kill warnings are counted by bench_cheap (timing)
    assert (tmp_path / "out" / "segmentation.tif").is_file()
