"""The README's demo: real SpaceNet scene, real labels, the shipped model, through the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from conftest import DEMO_MODEL, SAMPLE, SCENE
from rasterio.features import rasterize

from segpipe.models.checkpoint import read_spec


def test_shipped_model_is_small_and_safe_to_load():
    assert DEMO_MODEL.stat().st_size < 5 * 2**20
    spec = read_spec(DEMO_MODEL)  # weights_only=True inside
    assert spec.in_channels == 1 and spec.class_names == ["background", "building"]
    assert spec.info["train_cols"] == 512


@pytest.mark.slow
def test_demo_job_segments_buildings_and_reports_iou(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "segpipe.cli", "run", str(SAMPLE / "demo.yaml"), "--output",
                           str(tmp_path / "demo")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "global IoU: background=" in proc.stdout and "3_3" in proc.stdout
    summary = json.loads((tmp_path / "demo" / "metrics" / "summary.json").read_text())
    s = summary["summary"]
    assert s["pixels"] == 900 * 900
    assert s["global_iou"]["building"] > 0.55, s["global_iou"]
    held_out = [t for t in summary["tiles"] if t["col0"] >= 512 and t["iou_building"] is not None]
    assert held_out and max(t["iou_building"] for t in held_out) > 0.3, "no generalisation beyond training columns"
    with rasterio.open(tmp_path / "demo" / "segmentation.tif") as cog, rasterio.open(SCENE) as src:
        assert cog.crs == src.crs and cog.bounds == src.bounds
        assert cog.tags()["class_names"] == "background,building"
    assert Path(tmp_path / "demo" / "metrics" / "tiles.geojson").is_file()
    # The demo's class polygons, read by GeoPandas and burned back onto the COG's grid: the COG's classes.
    polygons = gpd.read_parquet(tmp_path / "demo" / "class_polygons.parquet")
    with rasterio.open(tmp_path / "demo" / "segmentation.tif") as cog:
        classes = cog.read(1)
        assert polygons.crs == cog.crs
        burned = rasterize(zip(polygons.geometry, polygons["class_id"], strict=True), out_shape=classes.shape,
                           transform=cog.transform, fill=255, dtype="uint8")
    np.testing.assert_array_equal(burned, classes)
    assert set(polygons["class_name"]) == {"background", "building"}
