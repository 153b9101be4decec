"""The run layout: every path of a run made once when the job is checked, and read by every stage.

Checked on a real run (otsu with instances and building truth on the bundled SpaceNet scene, stores kept apart
from the output with ``store:``): the files and stores the run leaves are exactly the layout's, and the scene's
fingerprint is made once, in ``check()``, however many stages read it.
"""

from __future__ import annotations

from pathlib import Path

from conftest import BUILDINGS, SCENE

from segpipe.config import job_from_dict
from segpipe.io.layout import OUTPUT_FILES
from segpipe.pipeline import check, run_job
from segpipe.tiling import ingest as ingest_module


def _files(root: Path) -> set[str]:
    """Every file under ``root`` outside the Zarr stores, relative to it."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and not any(part.endswith(".zarr") for part in p.relative_to(root).parts)}


def test_a_run_writes_where_its_layout_says_and_fingerprints_its_source_once(client, tmp_path, monkeypatch):
    calls: list[str] = []
    made = ingest_module.source_fingerprint

    def counted(path: str) -> dict:
        calls.append(path)
        return made(path)

    monkeypatch.setattr(ingest_module, "source_fingerprint", counted)
    out, stores = tmp_path / "out", tmp_path / "stores"
    job = job_from_dict({"input": str(SCENE), "output": str(out), "store": str(stores), "tile_size": 128,
                         "method": {"name": "otsu"}, "truth": {"path": str(BUILDINGS)},
                         "instances": {"classes": [1]}}, Path.cwd())
    c = check(job)
    assert calls == [str(SCENE)]  # made once, when checked
    lay = c.layout
    assert (lay.output, lay.exports, lay.polygons) == (out, ("cog",), True)
    assert lay.stores() == [str(stores / n) for n in ("scene.zarr", "result.zarr", "work.zarr", "instances_work.zarr")]

    outcome = run_job(c, client)
    assert calls == [str(SCENE)]  # and never again by ingest, segment, instances or the summary
    assert outcome.scene == lay.scene_store and outcome.result == lay.result_store
    assert outcome.exports == [out / "segmentation.tif", lay.polygons_path]
    written = _files(out)
    assert written <= set(OUTPUT_FILES), written - set(OUTPUT_FILES)
    assert {"segmentation.tif", "objects.gpkg", "metrics/summary.json", "metrics/report.html"} <= written
    assert lay.summary_path.is_file() and lay.html_path.is_file()
    assert sorted(p.name for p in stores.glob("*.zarr")) == ["instances_work.zarr", "result.zarr", "scene.zarr"]
    assert not (out / "result.zarr").exists()  # the stores went to ``store:``, nothing of them to the output
    assert {out / name for name in OUTPUT_FILES} == set(lay.output_files())

