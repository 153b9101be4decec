"""GPU scheduling, tested on any machine: the mixed cluster's layout, where each stage's tasks run, and
the device loop's out-of-memory fallback.

Without CUDA, ``gpu: yes`` (with ``gpus`` naming devices) builds the same cluster a GPU host gets: one
GPU-resource worker per device, each with its own CUDA_VISIBLE_DEVICES, plus CPU workers. The GPU workers
then compute on the CPU, so the scheduling is checked on every machine; tests/test_gpu_device.py checks
the device itself where there is one.
"""

import logging

import numpy as np
import pytest
import torch
from conftest import SCENE
from distributed import get_task_stream
from helpers import class_map

from segpipe.config import ClusterSpec, job_from_dict
from segpipe.methods.device_loop import BatchForward
from segpipe.pipeline import check, run_job
from segpipe.runtime.cluster import WORKER_MALLOC_ENV, connect, cuda_visible_devices, use_gpu, worker_layout


def test_gpu_auto_follows_cuda_and_yes_forces_resources():
    assert use_gpu(ClusterSpec(gpu="auto")) == torch.cuda.is_available()
    assert use_gpu(ClusterSpec(gpu="yes")) and not use_gpu(ClusterSpec(gpu="no"))
    assert not use_gpu(ClusterSpec(gpu="auto", scheduler="tcp://127.0.0.1:1"))


def test_each_gpu_worker_sees_its_own_device_first_as_dask_cuda_does():
    devices = ["0", "1", "2", "3"]
    assert [cuda_visible_devices(i, devices) for i in range(4)] == ["0,1,2,3", "1,2,3,0", "2,3,0,1", "3,0,1,2"]
    layout = worker_layout(ClusterSpec(gpu="yes", gpus=["GPU-a", "GPU-b"], n_workers=3, threads_per_worker=2), True)
    gpu = {k: v["options"] for k, v in layout.items() if k.startswith("gpu")}
    cpu = {k: v["options"] for k, v in layout.items() if k.startswith("cpu")}
    assert {k: o["env"]["CUDA_VISIBLE_DEVICES"] for k, o in gpu.items()} == {"gpu-GPU-a": "GPU-a,GPU-b",
                                                                             "gpu-GPU-b": "GPU-b,GPU-a"}
    assert all(o["resources"] == {"GPU": 1} and o["nthreads"] == 1 for o in gpu.values())
    assert len(cpu) == 3 and all(o["resources"] == {"CPU": 2} and o["nthreads"] == 2 for o in cpu.values())
    assert all(o["env"] == {"CUDA_VISIBLE_DEVICES": ""} for o in cpu.values())  # no CUDA context on CPU workers
    plain = worker_layout(ClusterSpec(n_workers=2), False)
    assert list(plain) == ["cpu-0", "cpu-1"] and all("resources" not in v["options"] for v in plain.values())


def _task_workers(stream: list[dict], names: dict[str, str]) -> dict[str, set[str]]:
    """Task prefix -> kinds ("gpu"/"cpu") of the workers that ran it."""
    out: dict[str, set[str]] = {}
    for t in stream:
        prefix = t["key"].rsplit("-", 1)[0] if isinstance(t["key"], str) else str(t["key"][0])
        out.setdefault(prefix.split("-")[0], set()).add(names[t["worker"]].split("-")[0])
    return out


def test_model_tasks_run_on_gpu_workers_and_everything_else_on_cpu_workers(tmp_path, tiny_model, client):
    """A mixed cluster of real worker processes: inference only on GPU workers, each with its own device and
    the malloc settings; ingest, validity scan, stitching, export and metrics only on CPU workers; the class
    map equals the plain cluster's. It names two devices, so it runs where CUDA sees none (the GPU layout then
    computes on the CPU) or at least two; test_gpu_device runs a one-device host's real cluster."""
    if 0 < torch.cuda.device_count() < 2:
        pytest.skip("names devices 0 and 1; this host has one (cluster.gpus naming a missing device is refused)")
    method = {"name": "unet", "model": str(tiny_model), "patch_size": 128}
    cluster = {"gpu": "yes", "gpus": ["0", "1"], "n_workers": 2}
    job = job_from_dict({"input": str(SCENE), "output": str(tmp_path / "gpu"), "tile_size": 256, "method": method,
                         "cluster": cluster}, tmp_path)
    with connect(job.cluster) as gpu_client:
        info = gpu_client.scheduler_info(n_workers=-1)["workers"]
        names = {addr: w["name"] for addr, w in info.items()}
        env = gpu_client.run(lambda: {k: __import__("os").environ.get(k) for k in
                                      ["CUDA_VISIBLE_DEVICES", *WORKER_MALLOC_ENV]})
        seen = {names[a]: e for a, e in env.items()}
        assert seen["gpu-0"]["CUDA_VISIBLE_DEVICES"] == "0,1" and seen["gpu-1"]["CUDA_VISIBLE_DEVICES"] == "1,0"
        assert all(e[k] == v for e in seen.values() for k, v in WORKER_MALLOC_ENV.items()), seen
        assert {names[a]: w["resources"] for a, w in info.items()} == {
            "gpu-0": {"GPU": 1}, "gpu-1": {"GPU": 1}, "cpu-0": {"CPU": 1}, "cpu-1": {"CPU": 1}}
        with get_task_stream(gpu_client) as ts:
            outcome = run_job(check(job), gpu_client)
        ran = _task_workers(ts.data, names)
    assert ran.pop("infer_batches") <= {"gpu"}
    assert {"stitch_tiles", "_ingest_band", "valid_patches_in_rows"} <= set(ran)
    assert all(kinds == {"cpu"} for kinds in ran.values()), ran
    ref = job_from_dict({"input": str(SCENE), "output": str(tmp_path / "cpu"), "tile_size": 256, "method": method},
                        tmp_path)
    gpu_map, cpu_map = class_map(outcome), class_map(run_job(check(ref), client))
    if torch.cuda.is_available():  # AMP float16 on the GPU: near-ties may flip
        assert (gpu_map == cpu_map).mean() > 0.999
    else:
        np.testing.assert_array_equal(gpu_map, cpu_map)


class _Tight(torch.nn.Module):
    """A model that, like a full GPU, fails on batches larger than ``fits``."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        self.fits = fits
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.conv(x)


def test_out_of_memory_halves_the_batch_and_goes_on():
    torch.manual_seed(0)
    model = _Tight(fits=2).eval()
    batch = np.random.default_rng(0).standard_normal((5, 1, 32, 32)).astype(np.float32)
    run = BatchForward(model, "cpu", batch_size=8)
    out = run(run.stage(batch))
    assert run.micro == 2 and out.shape == (5, 2, 32, 32) and out.dtype == np.float16
    with torch.inference_mode():
        y = torch.cat([model.conv(torch.from_numpy(batch[k:k + 1])) for k in range(5)])
    expect = (y[:, 1:] - y[:, :1]).to(torch.float16).numpy()
    np.testing.assert_allclose(out.astype(np.float32), expect.astype(np.float32), atol=2e-3)
    assert run(run.stage(batch[:3])).shape == (3, 2, 32, 32) and run.micro == 2  # later batches start small
    with pytest.raises(torch.OutOfMemoryError):
        BatchForward(_Tight(fits=0).eval(), "cpu", batch_size=4)(BatchForward(model, "cpu", 4).stage(batch[:4]))


def test_a_run_that_ran_out_of_device_memory_says_so_once_and_keeps_its_classes(tmp_path, tiny_model, client,
                                                                               monkeypatch, caplog):
    """In-process workers, so the simulated out-of-memory reaches the real device loop of a whole run."""
    real = BatchForward._forward

    def tight(self, x):
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, x)

    method = {"name": "unet", "model": str(tiny_model), "patch_size": 128, "batch_size": 8}
    base = {"input": str(SCENE), "tile_size": 256, "method": method}
    ref = class_map(run_job(check(job_from_dict({**base, "output": str(tmp_path / "ref")}, tmp_path)), client))
    monkeypatch.setattr(BatchForward, "_forward", tight)
    job = job_from_dict({**base, "output": str(tmp_path / "oom"), "cluster": {"processes": "no"}}, tmp_path)
    with caplog.at_level(logging.WARNING, logger="segpipe"), connect(job.cluster, in_process=True) as local:
        got = class_map(run_job(check(job), local))
    said = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(said) == 1 and "sub-batches of 2" in said[0]
    assert (got == ref).mean() > 0.999  # per-sample results may move in the last bits with the batch size


def test_a_gpu_job_on_a_client_without_gpu_workers_runs_instead_of_waiting(tmp_path, tiny_model, client):
    """``gpu: yes`` (as ``auto`` is on a CUDA host) handed a plain cluster whose workers advertise no GPU: the
    model tasks must not ask for a resource nobody has (they used to wait forever; seen on a real H200 with
    this suite's own ``client``). Bounded so that a regression fails instead of hanging the suite."""
    from concurrent.futures import ThreadPoolExecutor

    method = {"name": "unet", "model": str(tiny_model), "patch_size": 128}
    base = {"input": str(SCENE), "tile_size": 256, "method": method}
    gpu = job_from_dict({**base, "output": str(tmp_path / "gpu"), "cluster": {"gpu": "yes"}}, tmp_path)
    cpu = job_from_dict({**base, "output": str(tmp_path / "cpu"), "cluster": {"gpu": "no"}}, tmp_path)
    with ThreadPoolExecutor(1) as pool:
        got = class_map(pool.submit(run_job, check(gpu), client).result(timeout=600))
    np.testing.assert_array_equal(got, class_map(run_job(check(cpu), client)))


def test_gpus_naming_a_device_this_host_lacks_is_one_line(monkeypatch):
    from types import SimpleNamespace

    from segpipe.errors import InputError
    from segpipe.runtime import cluster

    monkeypatch.setattr(cluster, "cuda_devices", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=f"uuid-{i}"))
    cluster.check_devices(ClusterSpec(gpus=[0, "GPU-uuid-0"]))
    cluster.check_devices(ClusterSpec(gpus=[3], gpu="no"))  # no GPU workers asked for
    cluster.check_devices(ClusterSpec(gpus=[3], scheduler="tcp://127.0.0.1:8786"))  # not this host's devices
    with pytest.raises(InputError, match=r"cluster.gpus names 3, GPU-x, which this host does not have \(1 CUDA"):
        cluster.check_devices(ClusterSpec(gpus=[0, 3, "GPU-x"]))
