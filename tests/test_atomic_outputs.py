"""A failed run never leaves a half-written output over a good one, and leaves no temporary files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import rasterio
from conftest import BUILDINGS, SCENE
from helpers import run

import segpipe.io.cog
import segpipe.io.omezarr

JOB = {"input": str(SCENE), "tile_size": 256, "method": {"name": "otsu"}, "truth": {"path": str(BUILDINGS)},
       "instances": {}, "exports": ["cog", "ome-zarr"]}


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not str(p.relative_to(out)).startswith(("scene.zarr", "result.zarr", "work",
                                                                      "instances_work", "_segpipe_done"))}


class Boom(RuntimeError):
    pass


@pytest.fixture
def good_output(tmp_path, client):
    out = tmp_path / "out"
    run(client, out, **JOB)
    before = snapshot(out)
    assert {"segmentation.tif", "objects.gpkg", "metrics/tiles.csv", "metrics/summary.json",
            "metrics/report.html", "image.ome.zarr/zarr.json"} <= set(before)
    return out, before


def half_then_fail(real):
    """Wrap a writer so that it writes part of its output, then the process 'dies' with an error."""
    def wrapper(*args, **kwargs):
        real(*args, **kwargs)
        raise Boom("disk full")
    return wrapper


@pytest.mark.parametrize("stage", ["cog", "report", "polygons", "ome-zarr"])
def test_a_failing_export_keeps_the_previous_good_output(client, good_output, monkeypatch, stage):
    out, before = good_output
    if stage == "cog":  # GDAL has written the COG's temporary file when the failure hits
        monkeypatch.setattr(segpipe.io.cog.rasterio.shutil, "copy", half_then_fail(segpipe.io.cog.rasterio.shutil.copy))
    elif stage == "report":  # half of the text reaches the disk, then the write fails
        real_write = Path.write_text

        def half_write(self, text, *a, **k):
            real_write(self, text[: len(text) // 2], *a, **k)
            raise Boom("disk full")
        monkeypatch.setattr(Path, "write_text", half_write)
    elif stage == "polygons":
        import pyogrio.raw
        monkeypatch.setattr(pyogrio.raw, "write", half_then_fail(pyogrio.raw.write))
    else:
        real = segpipe.io.omezarr._pyramid
        calls = []

        def pyramid(*a, **k):
            calls.append(1)
            real(*a, **k)
            if len(calls) == 2:  # image written, labels written: die before the rename
                raise Boom("killed")
        monkeypatch.setattr(segpipe.io.omezarr, "_pyramid", pyramid)
    # Other class names (same segmentation, so the run resumes) change every file: a partial overwrite would show.
    with pytest.raises(Boom):
        run(client, out, **{**JOB, "class_names": ["ground", "roof"]})
    after = snapshot(out)
    assert set(after) == set(before), set(after) ^ set(before)  # nothing added: no temporary files left
    changed = {k for k in before if after[k] != before[k]}
    # Exports finished before the failing stage may be replaced, but only by complete new versions.
    exports = ("segmentation.tif", "image.ome.zarr/")
    finished_before = {"cog": (), "ome-zarr": exports[:1], "report": exports,
                       "polygons": (*exports, "metrics/objects.csv", "metrics/truth_objects.csv",
                                    "metrics/objects.json")}[stage]  # AP per class: keyed by class name
    for k in changed:
        assert k.startswith(finished_before), k
        if k.endswith(".tif"):
            with rasterio.open(out / k) as ds:
                assert ds.tags()["class_names"] == "ground,roof" and ds.read(1).shape == (900, 900)
        elif k.endswith(".csv"):
            rows = list(csv.DictReader(io.StringIO(after[k].decode())))
            assert rows and all(r["iou"] is not None for r in rows)  # every row complete
        elif k == "metrics/objects.json":
            assert set(json.loads(after[k])["summary"]["ap_per_class"]) == {"roof"}
        else:
            assert json.loads(after[k])["attributes"]["ome"]["image-label"]["properties"][1]["class"] == "roof"
