"""Forward passes of fixed-size batches on one device, fed so that the device does not wait.

On a GPU worker (how dask-cuda and nnU-Net's predictor feed one):

* batches are read and normalised by CPU threads ahead of the device (:data:`READERS`), copied into
  page-locked (pinned) host memory and sent to the device on a side CUDA stream with non-blocking copies,
  so the copy of batch k+1 overlaps the forward pass of batch k;
* the forward pass runs under float16 autocast with ``channels_last`` memory layout (tensor cores);
* what comes back is already reduced on the device: logits relative to class 0 in float16
  (C-1 channels of 2 bytes instead of C of 4), which is what the work store keeps;
* Zarr writes happen on a writer thread, so the next forward pass does not wait for them either;
* out of memory on the device is survived: the batch is split in halves (then quarters...) and retried,
  and the worker remembers the size that fits for its later batches.

On a CPU worker the same loop runs with one reader prefetching the next batch and writes inline: torch
already uses the worker's cores, more threads would only take them from it.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

# Reader threads (and batches read ahead) per device kind.
READERS = {"cpu": 1, "cuda": 3}


def channels_last(dims: int) -> torch.memory_format:
    return torch.channels_last_3d if dims == 3 else torch.channels_last


class BatchForward:
    """Relative float16 logits of batches of ``batch_size`` patches from ``model`` on ``device``.

    Every call sees the same input shape (a short batch is zero-padded), so CPU kernels pick the same
    algorithm for every batch and results do not depend on how the batches were grouped into tasks.
    ``micro`` is the largest sub-batch that has fitted in device memory; it starts at ``batch_size``.
    """

    def __init__(self, model: torch.nn.Module, device: str, batch_size: int, dims: int = 2,
                 mirror: bool = False) -> None:
        self.model, self.device, self.batch_size, self.dims = model, device, batch_size, dims
        # test-time mirroring: every subset of the spatial axes flipped, the flips' logits averaged
        spatial = range(2, 2 + dims)
        self.flips = [c for k in range(dims + 1) for c in itertools.combinations(spatial, k)] if mirror else [()]
        self.cuda = device.startswith("cuda")
        self.micro = batch_size
        self.copies = torch.cuda.Stream(device) if self.cuda else None
        if self.cuda:
            self.model = model.to(memory_format=channels_last(dims))

    @property
    def kind(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def stage(self, batch: np.ndarray) -> tuple[torch.Tensor, int, torch.cuda.Event | None]:
        """Pad ``batch`` to ``batch_size`` and start its copy to the device; runs on a reader thread.

        Returns the (device or host) tensor, the number of real patches, and the event the copy completes.
        """
        n = batch.shape[0]
        if n < self.batch_size:
            batch = np.concatenate([batch, np.zeros((self.batch_size - n, *batch.shape[1:]), batch.dtype)])
        x = torch.from_numpy(np.ascontiguousarray(batch))
        if not self.cuda:
            return x, n, None
        x = x.pin_memory()
        with torch.cuda.stream(self.copies):
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=channels_last(self.dims))
            done = torch.cuda.Event()
            done.record(self.copies)
        return x, n, done

    def __call__(self, staged: tuple[torch.Tensor, int, torch.cuda.Event | None]) -> np.ndarray:
        """Relative logits (n, C-1, ...) float16 of a staged batch, halving sub-batches on device OOM."""
        x, n, done = staged
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            x.record_stream(stream)  # the caching allocator must not reuse x while this stream reads it
        with torch.inference_mode():
            while True:
                try:
                    parts = [self._forward(x[k:k + self.micro]) for k in range(0, self.batch_size, self.micro)]
                    break
                except torch.OutOfMemoryError:
                    if self.micro == 1:
                        raise
                    torch.cuda.empty_cache()
                    self.micro = max(1, self.micro // 2)
            y = parts[0] if len(parts) == 1 else torch.cat(parts)
            return y[:n].cpu().numpy()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Model logits of ``x`` (averaged over the mirrorings) reduced on the device to classes 1..C-1 minus
        class 0, float16."""
        y = None
        for axes in self.flips:
            part = self._logits(x.flip(axes) if axes else x)
            part = part.flip(axes) if axes else part
            y = part if y is None else y + part
        y = y / len(self.flips) if len(self.flips) > 1 else y
        return (y[:, 1:] - y[:, :1]).to(torch.float16)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            with torch.autocast("cuda", dtype=torch.float16):
                return self.model(x).float()
        return self.model(x).float()
