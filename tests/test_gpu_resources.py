"""GPU scheduling: model tasks request `GPU` resources and run on workers that advertise them.

Without CUDA this runs the same code path on CPU (``gpu: yes`` forces the resource request), so
the scheduling logic is tested on every machine; on a CUDA machine ``gpu: auto`` takes it.
"""

import numpy as np
import torch
from conftest import SCENE
from helpers import class_map

from segpipe.cluster import connect, use_gpu
from segpipe.config import ClusterSpec, job_from_dict
from segpipe.pipeline import check, run_job


def test_gpu_auto_follows_cuda_and_yes_forces_resources():
    assert use_gpu(ClusterSpec(gpu="auto")) == torch.cuda.is_available()
    assert use_gpu(ClusterSpec(gpu="yes")) and not use_gpu(ClusterSpec(gpu="no"))
    assert not use_gpu(ClusterSpec(gpu="auto", scheduler="tcp://127.0.0.1:1"))


def test_model_tasks_run_on_gpu_resource_workers(tmp_path, tiny_model, client):
    method = {"name": "unet", "model": str(tiny_model), "patch_size": 128}
    job = job_from_dict({"input": str(SCENE), "output": str(tmp_path / "gpu"), "tile_size": 256, "method": method,
                         "cluster": {"gpu": "yes"}}, tmp_path)
    with connect(job.cluster) as gpu_client:
        resources = gpu_client.run(lambda dask_worker: dict(dask_worker.state.total_resources))
        assert list(resources.values()) == [{"GPU": 1}] * max(1, torch.cuda.device_count())
        outcome = run_job(check(job), gpu_client)
    ref = job_from_dict({"input": str(SCENE), "output": str(tmp_path / "cpu"), "tile_size": 256, "method": method},
                        tmp_path)
    gpu_map, cpu_map = class_map(outcome), class_map(run_job(check(ref), client))
    if torch.cuda.is_available():  # AMP float16 on the GPU: near-ties may flip
        assert (gpu_map == cpu_map).mean() > 0.99
    else:
        np.testing.assert_array_equal(gpu_map, cpu_map)
