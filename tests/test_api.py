"""segpipe from Python: files, DataArrays and plain arrays in, a lazy xarray Dataset out, same answers as the CLI."""

from __future__ import annotations

import json
import warnings

import dask.array
import numpy as np
import pytest
import rasterio
import rioxarray
import xarray as xr
from conftest import BUILDINGS, SCENE
from medical import ct_affine, load_ct, write_nifti

import segpipe


def test_a_file_segments_to_a_dataset_with_true_dtypes_crs_and_metrics(tmp_path, client):
    ds = segpipe.segment(str(SCENE), "otsu", tile_size=256, truth=str(BUILDINGS), output=tmp_path / "out",
                         client=client, progress=False, class_names=["background", "building"],
                         instances={"classes": [1]})
    assert ds["class"].dtype == np.uint8 and ds["class"].dims == ("y", "x") and ds["truth"].dtype == np.uint8
    assert isinstance(ds["class"].data, dask.array.Array)  # lazy: nothing read until asked for
    assert ds.attrs["output"] == str(tmp_path / "out")
    ids = ds["instances"].values
    assert ds["instances"].dtype == np.uint32 and ids.max() > 1 and (ids[ds["class"].values != 1] == 0).all()
    assert len(ds.segpipe.objects) == int(ids.max())  # one row per object in metrics/objects.csv
    with rasterio.open(SCENE) as src:
        assert ds.rio.crs == src.crs and ds.rio.transform().almost_equals(src.transform)
        assert ds["class"].rio.nodata == 255
        cog = rasterio.open(tmp_path / "out" / "segmentation.tif").read(1)
    np.testing.assert_array_equal(ds["class"].values, cog)  # lazy on result.zarr, same pixels as the COG
    summary = json.loads((tmp_path / "out" / "metrics" / "summary.json").read_text())["summary"]
    assert ds.attrs["mean_iou"] == summary["global_mean_iou"]
    assert ds.attrs["iou_building"] == summary["global_iou"]["building"]
    tiles = ds.segpipe.tiles
    assert len(tiles) == 16 and set(tiles["tile"]) >= {"0_0", "3_3"} and "iou_building" in tiles
    # Plain xarray, no segpipe: the uint8 map stays uint8 and no warning is raised (consolidated metadata).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = xr.open_zarr(tmp_path / "out" / "result.zarr")
    assert plain["class"].dtype == np.uint8 and plain["instances"].dtype == np.uint32
    assert "spatial_ref" in plain.coords
    again = segpipe.open_result(tmp_path / "out")
    xr.testing.assert_identical(again["class"], ds["class"])
    assert again.attrs["mean_iou"] == ds.attrs["mean_iou"]


def test_a_dataarray_and_a_numpy_array_give_the_class_map_of_the_file(tmp_path, client):
    method = {"name": "kmeans", "params": {"k": 3, "seed": 0}}
    by_file = segpipe.segment(SCENE, method, tile_size=256, output=tmp_path / "file", client=client,
                              progress=False)
    da = rioxarray.open_rasterio(SCENE)  # (band, y, x) with its CRS and transform
    by_da = segpipe.segment(da, method, tile_size=256, output=tmp_path / "da", client=client, progress=False)
    np.testing.assert_array_equal(by_da["class"].values, by_file["class"].values)
    assert by_da.rio.crs == by_file.rio.crs
    by_np = segpipe.segment(da.values[0], method, tile_size=512, crs=da.rio.crs, transform=da.rio.transform(),
                            output=tmp_path / "np", client=client, progress=False)
    np.testing.assert_array_equal(by_np["class"].values, by_file["class"].values)  # any tile size, same map
    # Made by odc-geo itself (its GeoBox and wrap_xr, no rioxarray involved in making it).
    from odc.geo.geobox import GeoBox
    from odc.geo.xr import wrap_xr

    odc = wrap_xr(da.values[0], GeoBox(da.shape[1:], da.rio.transform(), da.rio.crs))
    by_odc = segpipe.segment(odc, method, tile_size=256, output=tmp_path / "odc", client=client, progress=False)
    np.testing.assert_array_equal(by_odc["class"].values, by_file["class"].values)
    # A dask array, computed a strip at a time into the source file: the same map again.
    lazy = dask.array.from_array(da.values[0], chunks=300)
    by_dask = segpipe.segment(lazy, method, tile_size=256, crs=da.rio.crs, transform=da.rio.transform(),
                              output=tmp_path / "dask", client=client, progress=False)
    np.testing.assert_array_equal(by_dask["class"].values, by_file["class"].values)
    # The same array again resumes: the source file is kept, not rewritten.
    src = tmp_path / "np" / "source.tif"
    stamp = src.stat().st_mtime_ns
    segpipe.segment(da.values[0], method, tile_size=512, crs=da.rio.crs, transform=da.rio.transform(),
                    output=tmp_path / "np", client=client, progress=False)
    assert src.stat().st_mtime_ns == stamp


def test_a_numpy_volume_with_a_4x4_affine_runs_like_its_nifti(tmp_path, client):
    ct = load_ct()
    crop = (slice(20, 60), slice(60, 190), slice(40, 210))
    hu, affine = ct.hu[crop], ct_affine(ct)
    nifti = write_nifti(tmp_path / "ct.nii.gz", hu, affine)
    method = "otsu"
    by_file = segpipe.segment(nifti, method, tile_size=64, output=tmp_path / "f", client=client, progress=False)
    by_array = segpipe.segment(hu, method, tile_size=64, transform=affine, output=tmp_path / "a", client=client,
                               progress=False)
    assert by_array["class"].dims == ("z", "y", "x") and by_array["class"].dtype == np.uint8
    np.testing.assert_array_equal(by_array["class"].values, by_file["class"].values)
    np.testing.assert_allclose(by_array.attrs["affine"], by_file.attrs["affine"])


def test_without_output_a_temporary_folder_holds_the_results(tmp_path, client, monkeypatch):
    import tempfile
    from pathlib import Path

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # mkdtemp's folder, so the test leaves nothing behind
    ds = segpipe.segment(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64), "otsu", crs="EPSG:32633",
                         transform=(1, 0, 0, 0, -1, 64), client=client, progress=False)
    out = Path(ds.attrs["output"])
    assert out.parent == tmp_path and out.name.startswith("segpipe-")
    assert ds.attrs["result"] == str(out / "result.zarr") and (out / "segmentation.tif").is_file()


def test_a_model_job_keeps_float16_probabilities_per_class(tmp_path, client, tiny_model):
    with rasterio.open(SCENE) as src:
        pixels, transform, crs = src.read(1, window=((0, 256), (0, 256))), src.transform, src.crs
    ds = segpipe.segment(pixels, {"name": "unet", "model": str(tiny_model), "patch_size": 128}, crs=crs,
                         transform=transform, output=tmp_path / "out", client=client, progress=False,
                         probabilities=True)
    p = ds["probability"]
    assert p.dtype == np.float16 and p.dims == ("class_index", "y", "x") and p.shape == (3, 256, 256)
    assert isinstance(p.data, dask.array.Array)
    np.testing.assert_allclose(p.sum("class_index").values.astype(np.float32), 1.0, atol=1e-2)  # softmax per pixel
    assert "class" in ds.data_vars and list(p["class_name"].values) == ["a", "b", "c"]  # the map: not a coordinate
    assert p.sel(class_index=1).dims == ("y", "x")


@pytest.mark.parametrize("source,kwargs,words", [
    (np.zeros((64, 64), np.uint8), {}, "needs transform="),
    (np.zeros((64, 64), np.uint8), {"transform": (1, 0, 0, 0, -1, 0)}, "needs crs="),
    (np.zeros((64, 64), np.complex64), {"transform": (1, 0, 0, 0, -1, 0), "crs": "EPSG:32633"}, "dtype complex64"),
    (np.zeros((2, 3, 64, 64), np.uint8), {"transform": (1, 0, 0, 0, -1, 0), "crs": "EPSG:32633"}, "(band, y, x)"),
    (np.zeros((64, 64), np.uint8), {"transform": np.eye(4)}, "(z, y, x) volume"),
    (np.zeros((64, 64), np.uint8), {"transform": (1, 0, 0, 0, -1, 0), "crs": "no such crs"}, "not a coordinate"),
])
def test_bad_array_sources_are_one_error_and_write_nothing(tmp_path, source, kwargs, words):
    with pytest.raises(segpipe.InputError, match=None) as err:
        segpipe.segment(source, "otsu", output=tmp_path / "out", progress=False, **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_an_array_refused_by_the_job_checks_leaves_no_source_file(tmp_path):
    """The array is fine but the job is not (a band the array does not have): the source written for the
    checks is taken back, so the output is as it was."""
    a = np.zeros((2, 300, 300), np.uint8)
    with pytest.raises(segpipe.InputError, match="band"):
        segpipe.segment(a, "otsu", bands=[3], transform=(0.5, 0, 0, 0, -0.5, 0), crs="EPSG:32633",
                        output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # it did not exist before: not even an empty folder is left


def test_open_result_without_a_result_is_one_error(tmp_path):
    with pytest.raises(segpipe.InputError, match="no segpipe result"):
        segpipe.open_result(tmp_path)


@pytest.mark.slow
def test_the_example_notebook_session_runs(tmp_path):
    """examples/python_api.py, as the README points a notebook user to it, on the embedded sample."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "python_api.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    iou = float(proc.stdout.split("building IoU ")[1].split(",")[0])
    assert iou > 0.55 and "k-means cluster 2:" in proc.stdout and "building area" in proc.stdout
    assert "probability > 0.9" in proc.stdout
    assert (tmp_path / "unet" / "result.zarr").is_dir() and (tmp_path / "kmeans" / "source.tif").is_file()
