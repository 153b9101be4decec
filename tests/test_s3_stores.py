"""Zarr stores on s3:// through fsspec, against a real S3-compatible HTTP server on loopback (moto)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import xarray as xr
from conftest import BUILDINGS, SCENE
from distributed import Client, LocalCluster
from helpers import moto_s3, run

from segpipe.errors import InputError
from segpipe.io.store import Marks

BUCKET = "segpipe"
JOB = {"input": str(SCENE), "tile_size": 256, "chunk_size": 128, "truth": {"path": str(BUILDINGS)},
       "method": {"name": "kmeans", "params": {"k": 3}}}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (:func:`helpers.moto_s3`)."""
    with moto_s3(BUCKET) as s3_client:
        yield s3_client


@pytest.fixture(scope="module")
def s3_client(s3):
    """Worker processes started after the AWS variables are set, as on a cloud cluster."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0",
                      host="127.0.0.1", memory_limit="2GiB") as cluster, Client(cluster) as c:
        yield c


def keys(s3, prefix: str) -> dict[str, object]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["LastModified"] for page in pages for o in page.get("Contents", [])}


@pytest.mark.slow
def test_stores_on_s3_give_the_local_result_and_resume_without_rework(s3, s3_client, client, tmp_path):
    local = run(client, tmp_path / "local", **JOB)
    remote = run(s3_client, tmp_path / "out", store=f"s3://{BUCKET}/runs/a", **JOB)
    assert remote.result == f"s3://{BUCKET}/runs/a/result.zarr"
    stored = keys(s3, "runs/a/")
    assert "runs/a/scene.zarr/zarr.json" in stored and "runs/a/result.zarr/class/zarr.json" in stored
    marks = {k: t for k, t in stored.items() if "/_segpipe_done/" in k}
    # beside the store: one batch mark per shard of the class map (a row of 4 tiles), naming its 16 tiles
    assert sum("/result.zarr/segment.batches/" in k for k in marks) == 4
    assert not [k for k in marks if "/result.zarr/segment/" in k]
    assert len(Marks(remote.result, "segment").keys()) == 16
    assert sum("/result.zarr/class/c/" in k for k in stored) == 4  # a shard per row of tiles, not a chunk each

    ds = xr.open_zarr(remote.result, consolidated=False)  # readable from S3 by any xarray user
    np.testing.assert_array_equal(ds["class"].values, xr.open_zarr(local.result, consolidated=False)["class"].values)
    with rasterio.open(tmp_path / "out" / "segmentation.tif") as a, rasterio.open(local.cog) as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert a.crs == b.crs and a.transform == b.transform
    assert remote.report.summary == local.report.summary

    again = run(s3_client, tmp_path / "out", store=f"s3://{BUCKET}/runs/a", **JOB)
    assert again.report.summary == local.report.summary
    after = keys(s3, "runs/a/")
    assert {k: after[k] for k in marks} == marks  # no stage redone: no mark rewritten
    assert {k: after[k] for k in stored if "/scene.zarr/image/" in k} == \
        {k: stored[k] for k in stored if "/scene.zarr/image/" in k}  # ingest not redone

    with pytest.raises(InputError, match="made from different input or settings"):
        run(s3_client, tmp_path / "other", store=f"s3://{BUCKET}/runs/a", **{**JOB, "chunk_size": 256})
    assert keys(s3, "runs/a/") == after  # the refused run touched nothing
