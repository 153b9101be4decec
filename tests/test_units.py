"""Units of work: guided units cover every item once, in order, and shrink to one item at the tail;
model batches are fixed by the scene alone, full except the scene's last one."""

import numpy as np
import pytest
import zarr
from helpers import run

from segpipe.io.scene import Scene
from segpipe.methods.segment import patch_batches
from segpipe.runtime.units import guided_units
from segpipe.tiling.grid import PatchGrid


@pytest.mark.parametrize("n,slots", [(1, 2), (7, 2), (1024, 2), (1024, 16), (130, 3)])
def test_guided_units_partition_in_order_and_end_with_single_items(n, slots):
    items = list(range(n))
    units = guided_units(items, slots)
    assert [i for u in units for i in u] == items
    sizes = [len(u) for u in units]
    assert sizes == sorted(sizes, reverse=True)  # large first, so the tail is short
    assert sizes[-1] == 1
    assert sizes[0] == -(-n // (2 * slots))
    assert len(units) < 2 * slots * (np.log(max(n, 2)) + 2)  # few tasks, not one per item


def test_batches_are_full_except_the_last_and_do_not_depend_on_tiles(tmp_path, client, big_scene):
    o = run(client, tmp_path / "o", input=str(big_scene), tile_size=512, method={"name": "otsu"})
    scene = Scene(o.scene)
    batches = patch_batches(client, scene, 128, 0.25, 8)
    assert all(len(b) == 8 for b in batches[:-1]) and 1 <= len(batches[-1]) <= 8
    patches = [idx for b in batches for idx in b]
    grid = PatchGrid(scene.shape, 128, 0.25)
    valid = zarr.open_array(o.scene, path="valid", mode="r")[:] > 0
    expected = [(i, j) for i in range(grid.counts[0]) for j in range(grid.counts[1])
                if valid[grid.window((i, j)).slices].any()]
    assert patches == expected  # global row-major order, patches without a valid pixel left out
    assert len(expected) < grid.counts[0] * grid.counts[1]  # the scene's nodata strip removes some
