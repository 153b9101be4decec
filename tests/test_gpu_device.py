"""On a real CUDA device (skipped without one; ``pytest -m gpu`` on a GPU host).

The scheduling around the device is tested on every machine in tests/test_gpu_resources.py; these check
what only a device can show: the forward pass really runs there, under autocast and channels_last, the
class map stays within near-ties of the CPU's, every worker drives its own device, and a real
out-of-memory error is survived.
"""

import numpy as np
import pytest
import torch
from conftest import DEMO_MODEL, SCENE
from helpers import class_map

from segpipe.config import job_from_dict
from segpipe.methods.device_loop import BatchForward
from segpipe.pipeline import check, run_job
from segpipe.runtime.cluster import connect

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _job(tmp_path, name, **cluster):
    method = {"name": "unet", "model": str(DEMO_MODEL), "patch_size": 256, "batch_size": 8}
    return job_from_dict({"input": str(SCENE), "output": str(tmp_path / name), "tile_size": 512, "method": method,
                          "cluster": cluster}, tmp_path)


def test_demo_model_on_the_gpu_matches_the_cpu(tmp_path, client):
    job = _job(tmp_path, "gpu", gpu="yes")
    with connect(job.cluster) as gpu_client:
        devices = gpu_client.run(lambda: (torch.cuda.is_available(),  # the UUID as text: torch's own type won't pickle
                                           torch.cuda.is_available() and str(torch.cuda.get_device_properties(0).uuid)))
        outcome = run_job(check(job), gpu_client)
    gpu_workers = [d for d in devices.values() if d[0]]
    assert len(gpu_workers) == torch.cuda.device_count()
    assert len({uuid for _, uuid in gpu_workers}) == len(gpu_workers)  # each its own device as cuda:0; CPU workers none
    cpu = class_map(run_job(check(_job(tmp_path, "cpu", gpu="no")), client))
    assert (class_map(outcome) == cpu).mean() >= 0.999


def test_the_device_loop_runs_on_the_device_in_channels_last_and_float16():
    from segpipe.models.checkpoint import load_model

    model, spec = load_model(DEMO_MODEL, "cuda")
    run = BatchForward(model, "cuda", 4)
    batch = np.random.default_rng(0).standard_normal((3, spec.in_channels, 256, 256)).astype(np.float32)
    x, n, done = run.stage(batch)
    assert x.is_cuda and n == 3 and done is not None and x.is_contiguous(memory_format=torch.channels_last)
    out = run((x, n, done))
    assert out.shape == (3, spec.n_classes - 1, 256, 256) and out.dtype == np.float16


def test_a_real_out_of_memory_error_is_survived():
    from segpipe.models.checkpoint import load_model

    model, spec = load_model(DEMO_MODEL, "cuda")
    batch = np.random.default_rng(0).standard_normal((64, spec.in_channels, 512, 512)).astype(np.float32)
    whole = BatchForward(model, "cuda", 64)
    reference = whole(whole.stage(batch))
    staged = BatchForward(model, "cuda", 64).stage(batch)  # the input itself is on the device before the cap
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    used = torch.cuda.memory_allocated()
    # room for a few 512² patches' activations, not for 64 of them
    torch.cuda.set_per_process_memory_fraction((used + 256 * 2**20) / torch.cuda.get_device_properties(0).total_memory)
    try:
        run = BatchForward(model, "cuda", 64)
        out = run(staged)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert run.micro < 64
    assert (np.sign(out) == np.sign(reference)).mean() > 0.999
