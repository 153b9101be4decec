"""Where a volume lies: xarray coordinates and OME-Zarr transforms land on the NIfTI's world positions.

Real data: the Colin27 ``ch2`` MRI template (181 x 217 x 181, 1 mm, MNI frame, axes along R, A, S) and copies
derived from it here:

- ``flipped``: ch2 with its i axis reversed (data mirrored along i, the affine's first column negated, so x runs
  towards L as in DICOM-derived files) and the whole volume moved by ``SHIFT`` mm, written in the scanner frame
  (sform code 1): the same anatomy, at a known other place, stored backwards along x.
- ``slice``: one axial slice (k = 90) of ch2 given a 2.5 mm slice thickness: a single-slice volume.
- ``oblique``: a 64^3 crop of ch2 with its affine turned 15 degrees about S: axes that are not the world's.

Each goes through segpipe (otsu; fcm with probabilities for the slice) with NIfTI and OME-Zarr exports. World
positions are checked against nibabel's ``apply_affine`` on the exported NIfTI: from ``open_result``'s coordinates
(and rioxarray's transform), and from the OME-Zarr metadata read as plain JSON (not segpipe's reader), for every
voxel of every level, within 1e-3 mm.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr
import zarr
from helpers import run
from medical import CH2, write_nifti
from nibabel.affines import apply_affine
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel

import segpipe

TOL = 1e-3  # mm
SHIFT = np.array([12.5, -30.25, 7.0])  # mm, the flipped copy's move
THICK = 2.5  # mm, the single slice's thickness
EXPORTS = ["nifti", "ome-zarr"]


def ch2_zyx() -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(CH2))
    return np.asarray(img.dataobj).transpose(2, 1, 0), img.affine


def flipped_copy(path: Path) -> Path:
    """ch2 mirrored along i with the affine that keeps each voxel's anatomy, then moved by ``SHIFT``."""
    zyx, a = ch2_zyx()
    b = a.copy()
    b[:3, 0] = -a[:3, 0]
    b[:3, 3] = a[:3, :3] @ [zyx.shape[2] - 1, 0, 0] + a[:3, 3] + SHIFT  # new voxel 0 = old voxel 180
    return write_nifti(path, zyx[:, :, ::-1], b, code=1)


def slice_copy(path: Path, k: int = 90) -> Path:
    """Axial slice ``k`` of ch2 as a one-slice volume ``THICK`` mm thick, where that slice lies."""
    zyx, a = ch2_zyx()
    b = a.copy()
    b[:3, 3] = apply_affine(a, [0, 0, k])
    b[:3, 2] = a[:3, 2] / np.linalg.norm(a[:3, 2]) * THICK
    return write_nifti(path, zyx[k:k + 1], b, code=4)


def oblique_copy(path: Path) -> Path:
    """A 64^3 crop of ch2 whose affine is turned 15 degrees about S (around the crop's first voxel)."""
    zyx, a = ch2_zyx()
    t = np.deg2rad(15.0)
    turn = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    b = a.copy()
    b[:3, :3] = turn @ a[:3, :3]
    b[:3, 3] = apply_affine(a, [60, 80, 60])
    return write_nifti(path, zyx[60:124, 80:144, 60:124].copy(), b, code=1)


JOBS = {
    "ch2": (lambda root: CH2, {"method": {"name": "otsu"}}),
    "flipped": (lambda root: flipped_copy(root / "flipped.nii.gz"), {"method": {"name": "otsu"}}),
    "oblique": (lambda root: oblique_copy(root / "oblique.nii.gz"), {"method": {"name": "otsu"}, "tile_size": 64}),
    "slice": (lambda root: slice_copy(root / "slice.nii.gz"),
              {"method": {"name": "fcm", "params": {"c": 3}}, "probabilities": True}),
}


@pytest.fixture(scope="module")
def runs(client, tmp_path_factory) -> dict[str, Path]:
    """The output folder of each job in ``JOBS``, run on first use only (the whole-ch2 ones are the slow ones)."""
    root = tmp_path_factory.mktemp("world")

    class Runs(dict):
        def __missing__(self, name: str) -> Path:
            source, job = JOBS[name]
            run(client, root / name, input=str(source(root)), exports=EXPORTS, **{"tile_size": 128, **job})
            self[name] = root / name
            return self[name]

    return Runs()


def nifti(out: Path) -> nib.Nifti1Image:
    return nib.load(str(out / "segmentation.nii.gz"))


def voxel_world(affine: np.ndarray, shape_zyx: tuple[int, ...], z: int) -> np.ndarray:
    """NIfTI world positions (R, A, S) of slice ``z`` of a (z, y, x) grid, shape (y, x, 3)."""
    j, i = np.meshgrid(np.arange(shape_zyx[1]), np.arange(shape_zyx[2]), indexing="ij")
    return apply_affine(affine, np.stack([i, j, np.full_like(i, z)], axis=-1))


def assert_coords_are_nifti_world(ds: xr.Dataset, img: nib.Nifti1Image) -> None:
    """Every voxel's (x, y, z) coordinates from the Dataset are its NIfTI position (R, A, S)."""
    x, y, z = (ds[d].values for d in "xyz")
    depth = ds["class"].shape[0]
    for k in range(depth):
        w = voxel_world(img.affine, ds["class"].shape, k)
        np.testing.assert_allclose(w[..., 0], np.broadcast_to(x, w.shape[:2]), atol=TOL)
        np.testing.assert_allclose(w[..., 1], np.broadcast_to(y[:, None], w.shape[:2]), atol=TOL)
        np.testing.assert_allclose(w[..., 2], z[k], atol=TOL)


def ome_levels(store: Path) -> list[tuple[np.ndarray, np.ndarray, tuple[int, ...]]]:
    """Per level of a multiscale image, read as plain JSON: (scale, translation, shape) of its spatial axes."""
    meta = json.loads((store / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    spatial = [k for k, ax in enumerate(meta["axes"]) if ax["type"] == "space"]
    assert [meta["axes"][k]["name"] for k in spatial] == ["z", "y", "x"]
    out = []
    for ds in meta["datasets"]:
        kinds = [t["type"] for t in ds["coordinateTransformations"]]
        assert kinds == ["scale", "translation"]  # the order NGFF 0.4/0.5 require
        scale, move = (np.asarray(t[t["type"]], float)[spatial] for t in ds["coordinateTransformations"])
        shape = json.loads((store / ds["path"] / "zarr.json").read_text())["shape"]
        out.append((scale, move, tuple(shape[k] for k in spatial)))
    return out


def ome_world(scale: np.ndarray, move: np.ndarray, shape: tuple[int, ...], z: int) -> np.ndarray:
    """OME-Zarr coordinates (z, y, x) of slice ``z`` of a level as (R, A, S) = (x, y, z), shape (y, x, 3)."""
    j, i = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    zyx = np.stack([np.full_like(i, z), j, i], axis=-1) * scale + move
    return zyx[..., ::-1]


def assert_ome_is_nifti_world(store: Path, img: nib.Nifti1Image) -> None:
    """Every voxel of every level lies on a NIfTI voxel centre (within ``TOL``) that holds the same class."""
    labels = np.asarray(img.dataobj)
    inverse = np.linalg.inv(img.affine)
    group = zarr.open_group(str(store), mode="r")
    for level, (scale, move, shape) in enumerate(ome_levels(store)):
        data = np.asarray(group[str(level)])
        for z in range(shape[0]):
            world = ome_world(scale, move, shape, z)
            ijk = apply_affine(inverse, world)
            voxel = np.rint(ijk).astype(int)
            np.testing.assert_allclose(apply_affine(img.affine, voxel), world, atol=TOL)
            np.testing.assert_array_equal(data[z], labels[voxel[..., 0], voxel[..., 1], voxel[..., 2]])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ch2", "flipped"])
def test_open_result_coordinates_are_the_nifti_world_positions(runs, name):
    out = runs[name]
    ds, img = segpipe.open_result(out), nifti(out)
    assert ds["class"].dims == ("z", "y", "x")
    assert ds.attrs["world_coordinates"].startswith("z, y, x coordinates")
    np.testing.assert_array_equal(np.asarray(ds.attrs["affine"]), img.affine)
    assert_coords_are_nifti_world(ds, img)
    assert [ds[d].attrs["world_axis"] for d in "zyx"] == ["S", "A", "R"] and ds["x"].attrs["units"] == "mm"
    # rioxarray's transform, from the coordinates: pixel centres (i + 0.5, j + 0.5) are the voxels' R, A
    t = ds["class"].rio.transform()
    i, j = np.meshgrid(np.arange(ds.sizes["x"]), np.arange(ds.sizes["y"]))
    r, a = t @ (i + 0.5, j + 0.5)
    w = voxel_world(img.affine, ds["class"].shape, 0)
    np.testing.assert_allclose(r, w[..., 0], atol=TOL)
    np.testing.assert_allclose(a, w[..., 1], atol=TOL)
    xmin, _, xmax, _ = ds["class"].rio.bounds()
    edges = sorted(apply_affine(img.affine, [[-0.5, 0, 0], [img.shape[0] - 0.5, 0, 0]])[:, 0])
    assert (xmin, xmax) == pytest.approx(edges, abs=TOL)


@pytest.mark.slow
def test_a_flipped_moved_copy_overlays_the_original_by_world_coordinates(runs):
    """Selecting the copy at the original's coordinates (moved by ``SHIFT``) gives the original's classes."""
    a, b = segpipe.open_result(runs["ch2"]), segpipe.open_result(runs["flipped"])
    assert (np.diff(a["x"].values) > 0).all() and (np.diff(b["x"].values) < 0).all()  # stored backwards along R
    at = b["class"].sel(x=a["x"] + SHIFT[0], y=a["y"] + SHIFT[1], z=a["z"] + SHIFT[2], method="nearest",
                        tolerance=TOL)
    np.testing.assert_array_equal(at.values, a["class"].values)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ch2", "flipped", "slice"])
def test_ome_zarr_transforms_put_every_voxel_of_every_level_on_the_nifti(runs, name):
    out = runs[name]
    img = nifti(out)
    store = out / "image.ome.zarr"
    assert_ome_is_nifti_world(store / "labels" / "segmentation", img)
    labels, image = ome_levels(store / "labels" / "segmentation"), ome_levels(store)
    for (s1, t1, _), (s2, t2, _) in zip(labels, image, strict=True):  # the image pyramid lies where its labels do
        np.testing.assert_array_equal(s1, s2)
        np.testing.assert_array_equal(t1, t2)
    world = json.loads((store / "zarr.json").read_text())["attributes"]["segpipe"]["world"]
    assert world["exact"] is True
    root = zarr.open_group(str(store), mode="r")  # valid OME-Zarr 0.5 with its negative scales and translations
    Image.from_zarr(root)
    ImageLabel.from_zarr(root["labels/segmentation"])
    steps = np.diag(img.affine)[2::-1]  # S, A, R mm per voxel along z, y, x: negative where the axis runs backwards
    np.testing.assert_allclose(labels[0][0], np.abs(steps), atol=1e-9)  # stored reversed there, so scales stay > 0
    assert world["reversed"] == ["zyx"[k] for k in np.flatnonzero(steps < 0)] == (["x"] if name == "flipped" else [])


def test_a_single_slice_keeps_its_thickness_at_every_level(runs):
    out = runs["slice"]
    levels = ome_levels(out / "image.ome.zarr" / "labels" / "segmentation")
    assert len(levels) >= 2
    for k, (scale, move, shape) in enumerate(levels):
        assert shape[0] == 1
        np.testing.assert_allclose(scale, [THICK, 2**k, 2**k])
        np.testing.assert_allclose(move, apply_affine(nifti(out).affine, [0, 0, 0])[::-1], atol=TOL)
    ds = segpipe.open_result(out)
    assert_coords_are_nifti_world(ds, nifti(out))


def test_probability_class_axis_is_not_the_class_map(runs):
    result = runs["slice"] / "result.zarr"
    ds = segpipe.open_result(runs["slice"])
    assert "class" in ds.data_vars and ds["class"].dims == ("z", "y", "x")
    p = ds.probability
    assert p.dims == ("class_index", "z", "y", "x") and p.sizes["class_index"] == 3
    assert list(ds["class_name"].values) == ["class0", "class1", "class2"]
    one = p.sel(class_index=1).values.astype(np.float32)
    np.testing.assert_array_equal(one, np.asarray(zarr.open_array(str(result), path="probability")[1], np.float32))
    cls = ds["class"].values
    plain = xr.open_zarr(str(result))  # without segpipe: the class map stays a data variable too
    assert "class" in plain.data_vars and plain.probability.sel(class_index=1).shape == cls.shape


def test_a_store_from_before_the_rename_opens_the_same(runs, tmp_path):
    """A copy of the slice's store as older versions wrote it: the probability's axis named ``class`` and no
    world coordinates; ``open_result`` gives the same Dataset."""
    old = tmp_path / "result.zarr"
    shutil.copytree(runs["slice"] / "result.zarr", old)
    for dim in "zyx":
        shutil.rmtree(old / dim)
    meta = old / "probability" / "zarr.json"
    spec = json.loads(meta.read_text())
    spec["dimension_names"][0] = "class"
    meta.write_text(json.dumps(spec))
    root = json.loads((old / "zarr.json").read_text())
    root.pop("consolidated_metadata", None)
    for key in ("world_coordinates", "world_frame"):
        root["attributes"].pop(key)
    (old / "zarr.json").write_text(json.dumps(root))
    ds, new = segpipe.open_result(old), segpipe.open_result(runs["slice"])
    assert "class" in ds.data_vars and ds.probability.dims == new.probability.dims
    xr.testing.assert_equal(ds.probability.sel(class_index=2), new.probability.sel(class_index=2))
    for dim in "zyx":
        xr.testing.assert_identical(ds[dim], new[dim])
    assert ds.attrs["world_coordinates"] == new.attrs["world_coordinates"]


def test_an_oblique_volume_says_so_instead_of_inventing_axis_coordinates(runs):
    out = runs["oblique"]
    img = nifti(out)
    ds = segpipe.open_result(out)
    assert not {"x", "y", "z"} & set(ds.coords)
    assert ds.attrs["world_coordinates"].startswith("no z/y/x coordinates: the affine is oblique")
    np.testing.assert_allclose(np.asarray(ds.attrs["affine"]), img.affine, atol=1e-6)
    store = out / "image.ome.zarr" / "labels" / "segmentation"
    world = json.loads((store / "zarr.json").read_text())["attributes"]["segpipe"]["world"]
    assert world["exact"] is False and "cannot express" in world["note"]
    to_world = np.asarray(world["coordinate_to_world"])
    inverse = np.linalg.inv(img.affine)
    labels = np.asarray(img.dataobj)
    group = zarr.open_group(str(store), mode="r")
    for level, (scale, move, shape) in enumerate(ome_levels(store)):
        data = np.asarray(group[str(level)])
        for z in range(shape[0]):
            zyx = ome_world(scale, move, shape, z)[..., ::-1]  # back to the metadata's (z, y, x) coordinates
            world_pos = apply_affine(to_world, zyx)
            voxel = np.rint(apply_affine(inverse, world_pos)).astype(int)
            np.testing.assert_allclose(apply_affine(img.affine, voxel), world_pos, atol=TOL)
            np.testing.assert_array_equal(data[z], labels[voxel[..., 0], voxel[..., 1], voxel[..., 2]])
