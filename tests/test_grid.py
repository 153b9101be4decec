import itertools

import numpy as np
import pytest

from segpipe.geometry import Box
from segpipe.tiling.grid import PatchGrid, TileGrid, gaussian_importance, patch_starts


@pytest.mark.parametrize("length,patch,stride", [(900, 256, 192), (256, 256, 192), (100, 256, 192),
                                                 (2100, 128, 96), (1000, 64, 64)])
def test_patch_starts_cover_the_axis(length, patch, stride):
    starts = patch_starts(length, patch, stride)
    covered = np.zeros(max(length, patch), bool)
    for s in starts:
        covered[s:s + patch] = True
    assert covered[:length].all()
    assert starts == sorted(set(starts))
    assert all(b - a <= stride for a, b in zip(starts, starts[1:], strict=False))
    assert starts[-1] + patch == max(length, patch)


@pytest.mark.parametrize("tile", [64, 128, 512, 1024])
def test_overlapping_lists_exactly_the_tiles_a_patch_touches(tile):
    """What decides when a stitched patch may be freed: every tile it touches, no other."""
    pg, tg = PatchGrid((1000, 1300), 128, 0.25), TileGrid((1000, 1300), tile)
    for idx in itertools.product(*(range(c) for c in pg.counts)):
        w = pg.window(idx)
        expect = [t.key for t in tg if w.overlaps(t.core)]
        assert [t.key for t in tg.overlapping(w)] == expect and expect


def test_covering_lists_exactly_the_intersecting_patches():
    pg = PatchGrid((700, 700), 128, 0.5)
    w = Box.rc(100, 200, 300, 260)
    expect = [(i, j) for i in range(pg.counts[0]) for j in range(pg.counts[1])
              if pg.window((i, j)).row0 < 300 and pg.window((i, j)).row1 > 100
              and pg.window((i, j)).col0 < 260 and pg.window((i, j)).col1 > 200]
    assert pg.covering(w) == expect


def test_gaussian_importance_is_positive_symmetric_and_peaks_centre():
    g = gaussian_importance((64, 64))
    assert g.min() > 0 and g.max() == 1.0
    np.testing.assert_array_equal(g, g.T)
    np.testing.assert_array_equal(g, g[::-1, ::-1])
    assert g[31, 31] == g.max() and g[0, 0] < 1e-3


def test_tile_transform_offsets_the_scene_affine():
    from affine import Affine
    t = TileGrid((1000, 1000), 256).tile((1, 2))
    a = Affine(0.5, 0, 100.0, 0, -0.5, 900.0)
    assert t.transform(a) @ (0, 0) == a @ (512, 256)


def test_three_dimensional_grids_cover():
    pg = PatchGrid((70, 200, 190), (32, 64, 64), 0.25)
    owners = list(itertools.product(*(range(c) for c in pg.counts)))
    assert len(owners[0]) == 3
    tg = TileGrid((70, 200, 190), 64)
    assert {t.key for idx in owners for t in tg.overlapping(pg.window(idx))} == {t.key for t in tg}
    covered = np.zeros((70, 200, 190), int)
    for idx in owners:
        covered[pg.window(idx).intersect(Box.of((70, 200, 190))).slices] += 1
    assert covered.min() >= 1
    box = Box((10, 20, 30), (40, 90, 100))
    expect = [idx for idx in sorted(owners) if all(
        a < hi and a + p > lo for a, p, lo, hi in zip(pg.window(idx).start, pg.size, box.start, box.stop, strict=True))]
    assert pg.covering(box) == expect
    g = gaussian_importance((16, 32, 32))
    assert g.shape == (16, 32, 32) and g.min() > 0 and g.max() == 1.0
