"""Units of work: how a stage's items (tiles, batches of patches) are cut into Dask tasks.

Why not one task per item: a Dask task costs a few milliseconds of scheduling, pickling and store
opening, which is more than a cheap method spends on a small tile. Why not a few equal chunks either:
the last chunk to finish decides when the stage ends, and equal chunks leave workers idle at the tail.
Guided self-scheduling does both: consecutive items in units that start large (a fraction of what is
left per worker slot) and shrink to a single item, so per-task overhead is amortised and the stage's
tail is one item long. Units only group items; what each item computes never depends on the grouping,
so results stay identical for any worker count.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, Self, TypeVar

from distributed import Client

from segpipe.progress import Advance, gather
from segpipe.runtime.placement import is_mixed, worker_infos

T = TypeVar("T")


class Cuttable(Protocol):
    """A stage's pass that can be shipped in units of its items, such as :class:`segpipe.tiling.grid.TileRun`
    (named by shape rather than imported: the runtime sits below tiling)."""

    def with_tiles(self, indices: Iterable) -> Self: ...


def guided_units(items: Sequence[T], slots: int, share: int = 2, largest: int | None = None) -> list[list[T]]:
    """Consecutive runs of ``items``, each 1/(share x slots) of what is left, at most ``largest``, at least one."""
    out: list[list[T]] = []
    k, n = 0, len(items)
    per = max(1, share * slots)
    while k < n:
        size = max(1, min(-(-(n - k) // per), largest or n))
        out.append(list(items[k:k + size]))
        k += size
    return out


def worker_slots(client: Client, resources: dict[str, float] | None = None) -> int:
    """Tasks the cluster runs at once: its threads, or its workers holding ``resources`` (e.g. GPUs).

    On a mixed cluster, work without resources of its own runs on the CPU workers only
    (:mod:`segpipe.runtime.placement`): their CPU slots.
    """
    workers = worker_infos(client)
    if resources:
        return max(1, sum(1 for w in workers if all(w.get("resources", {}).get(r, 0) >= v
                                                    for r, v in resources.items())))
    if is_mixed(workers):
        return max(1, sum(int(w["resources"].get("CPU", 0)) for w in workers))
    return max(1, sum(int(w.get("nthreads", 1)) for w in workers))


def run_units(client: Client, fn, run: Cuttable, tiles: Sequence, advance: Advance | None = None, **kw) -> list:
    """Submit ``fn(run with a unit's tiles, **kw)`` for every guided unit of ``tiles`` and gather the results;
    ``advance`` hears how many tiles each finished unit held (:mod:`segpipe.progress`)."""
    units = guided_units(tiles, worker_slots(client))
    futures = [client.submit(fn, run.with_tiles(unit), pure=False, **kw) for unit in units]
    return gather(client, futures, advance, [len(u) for u in units])
