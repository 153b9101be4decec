"""segpipe as a library: segment a file, URL or array from Python and get an ``xarray.Dataset`` back.

The CLI and the Prefect flows are thin callers of this module, so a notebook gets exactly what a scheduled
run gets: the same checks before anything is written, the same tiles, the same stores, the same resume.

    >>> import segpipe
    >>> ds = segpipe.segment("scene.tif", "otsu", truth="buildings.geojson", output="out")
    >>> ds["class"]                     # (y, x) uint8, lazy on out/result.zarr; ds.rio.crs is the scene's CRS
    >>> ds.segpipe.tiles                # per-tile IoU/Dice as a DataFrame; ds.attrs["mean_iou"], ...
    >>> segpipe.open_result("out")      # the same Dataset later, from another process
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segpipe.errors import InputError
from segpipe.io.layout import result_path
from segpipe.io.paths import is_remote

if TYPE_CHECKING:
    import pandas as pd
    import xarray as xr
    from distributed import Client

    from segpipe.config import JobSpec
    from segpipe.pipeline import Checked, Outcome
    from segpipe.progress import Reporter


def job_spec(source: str | Path | Mapping[str, Any] | list[str | Path], method: str | Mapping[str, Any], *,
             output: str | Path,
             tile_size: int | None = None, truth: str | Path | Mapping[str, Any] | None = None,
             **options: Any) -> JobSpec:
    """A job as the job file would give it, from Python values; validated, nothing read or written.

    ``source`` is a path or URL, a mapping shaped like the job file's mosaic ``input:`` (``{"stac": url,
    "assets": [...], "bbox": [...], "datetime": "2024-06"}``), or a list of rasters to mosaic.
    ``method`` is a method name (``"otsu"``) or a mapping shaped like the job file's ``method:``
    (``{"name": "unet", "model": "model.pt", "patch_size": 256}``); ``truth`` a path or a mapping like
    ``truth:``. Other job settings (``bands``, ``class_names``, ``exports``, ``instances``, ``probabilities``,
    ``cluster``, ``store``, ``level``, ``overwrite``, ...) pass through ``options`` under their job-file names.
    """
    from segpipe.config import job_from_dict

    data: dict[str, Any] = {"input": _input(source), "output": str(output),
                            "method": {"name": method} if isinstance(method, str) else dict(method), **options}
    if tile_size is not None:
        data["tile_size"] = tile_size
    if truth is not None:
        data["truth"] = {"path": str(truth)} if isinstance(truth, str | Path) else dict(truth)
    return job_from_dict(data, Path.cwd())


def _input(source: str | Path | Mapping[str, Any] | list[str | Path]) -> str | dict[str, Any]:
    """The job file's ``input:`` for a source given from Python."""
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, list | tuple):
        return {"rasters": [str(s) for s in source]}
    return str(source)


def check_job(job: JobSpec | str | Path, overrides: Mapping[str, Any] | None = None) -> Checked:
    """Check a job (a :class:`JobSpec`, or a job YAML with ``overrides``) as a run would; writes nothing.

    Raises :class:`segpipe.errors.InputError` with one line naming the problem.
    """
    from segpipe.config import JobSpec, load_job
    from segpipe.pipeline import check

    return check(job if isinstance(job, JobSpec) else load_job(job, dict(overrides or {})))


def cluster_line(c: Checked) -> str:
    """What a run is about to start or reach, said before the seconds that takes."""
    from segpipe.pipeline import in_process
    from segpipe.runtime.cluster import describe

    return f"job checked; {describe(c.job.cluster, in_process(c))}"


def execute(c: Checked, client: Client | None = None, reporter: Reporter | None = None) -> Outcome:
    """Run a checked job: on ``client``, or on the cluster its settings describe (started and closed here).

    ``reporter`` hears the stage lines and per-stage progress (bars on a terminal, lines elsewhere).
    """
    from segpipe.pipeline import in_process, leased, run_job
    from segpipe.progress import reporting
    from segpipe.runtime.cluster import connect

    say = reporter.say if reporter is not None else (lambda _line: None)
    with reporting(reporter), leased(c, say):  # refused at once, before a cluster starts, when the output is held
        if client is not None:
            return run_job(c, client, log=say)
        if not c.job.cluster.creates:  # a created cluster is announced once its settings are checked (connect)
            say(cluster_line(c))
        with connect(c.job.cluster, in_process=in_process(c), say=say) as own:
            return run_job(c, own, log=say)


def segment_archive(inputs: str | Path, job: str | Path, output: str | Path, *, scheduler: str | None = None,
                    in_flight: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Segment every item of ``inputs`` (a folder or a glob) with the job template ``job`` into
    ``output/<name>/`` on one cluster (the template's, or the scheduler at ``scheduler``), at most ``in_flight``
    items at once; one row per item (status, global scores, output, error). Without Prefect; the flow
    ``segpipe_flows.archive`` does the same with one Prefect task per item.
    """
    from segpipe.archive import discover
    from segpipe.archive_run import archive_cluster, run_archive

    say = (lambda line: print(f"segpipe: {line}", file=sys.stderr, flush=True)) if progress else (lambda _line: None)
    cluster = None
    if scheduler:
        cluster = archive_cluster(discover(str(inputs), str(output)), str(job)).at(scheduler)
    return [r.row() for r in run_archive(str(inputs), str(job), str(output), cluster=cluster, in_flight=in_flight,
                                         say=say)]


def segment(source: Any, method: str | Mapping[str, Any], *, output: str | Path | None = None,
            tile_size: int | None = None, truth: str | Path | Mapping[str, Any] | None = None,
            client: Client | None = None, crs: Any = None, transform: Any = None, nodata: float | None = None,
            progress: bool = True, **options: Any) -> xr.Dataset:
    """Segment ``source`` tile by tile and return the result as a lazy ``xarray.Dataset``.

    ``source``: a path or URL (GeoTIFF/COG, whole-slide image, NIfTI, DICOM folder), a mosaic (a mapping like
    the job file's mosaic ``input:``, e.g. a STAC search, or a list of rasters), an ``xr.DataArray``
    with a CRS (rioxarray or odc-geo conventions), or a numpy/dask array with ``transform`` (an affine and
    ``crs`` for an image, a 4x4 NIfTI affine for a (z, y, x) volume). An array is written once as
    ``<output>/source.tif`` (``source.nii.gz``) so that checks, resume and provenance work as for a file.

    ``output``: the folder for result.zarr, exports and metrics; a new temporary folder when omitted
    (``ds.attrs["output"]`` says which; it is not removed, the Dataset reads from it). Rerunning into the same
    folder resumes; other settings are refused naming what differs, unless ``overwrite=True``.

    ``client``: run on this Dask client; otherwise a cluster is started from ``cluster=`` settings and closed.
    ``progress``: stage lines and progress on stderr. Other keyword arguments are job settings
    (see :func:`job_spec`). Bad input raises :class:`segpipe.errors.InputError` before anything is written.
    """
    from segpipe.io.lease import output_lease

    out = Path(output) if output is not None else Path(tempfile.mkdtemp(prefix="segpipe-"))
    if out.exists() and not out.is_dir():
        raise InputError(f"output path exists and is not a folder: {out}")
    store = options.get("store")
    # An array source is the first thing written: the lease is taken before it (and the run re-enters it).
    with output_lease(out, str(store) if store else None, f"segpipe.segment() in process {os.getpid()}",
                      (lambda line: print(line, file=sys.stderr)) if progress else (lambda _line: None)):
        return _segment(source, method, out, tile_size, truth, client, crs, transform, nodata, progress, options)


def _segment(source: Any, method: str | Mapping[str, Any], out: Path, tile_size: int | None,
             truth: str | Path | Mapping[str, Any] | None, client: Client | None, crs: Any, transform: Any,
             nodata: float | None, progress: bool, options: dict[str, Any]) -> xr.Dataset:
    from segpipe.io.arrays import array_source, is_array, remove_array_source, write_array_source
    from segpipe.progress import Reporter

    written: Path | None = None
    if is_array(source):
        src = array_source(source, crs=crs, transform=transform, nodata=nodata)
        if src.is_volume and src.nodata is not None:
            options.setdefault("nodata", src.nodata)
        job_spec(out / src.file_name, method, output=out, tile_size=tile_size, truth=truth, **options)
        path, wrote = write_array_source(src, out.resolve())
        written, source = (path if wrote else None), path
    elif crs is not None or transform is not None:
        raise InputError("crs= and transform= place array sources; a file or URL brings its own georeferencing")
    elif nodata is not None:
        options.setdefault("nodata", nodata)
    try:
        c = check_job(job_spec(source, method, output=out, tile_size=tile_size, truth=truth, **options))
    except InputError:
        if written is not None:  # the job is refused: the output stays as it was
            remove_array_source(written)
        raise
    outcome = execute(c, client=client, reporter=Reporter(sys.stderr) if progress else None)
    ds = open_result(outcome.result, metrics=c.layout.metrics_dir)
    ds.attrs["output"] = str(c.job.output)  # where the Dataset reads from: the temporary folder when none was given
    return ds


def open_result(path: str | Path, metrics: str | Path | None = None) -> xr.Dataset:
    """A finished run's result as a lazy ``xarray.Dataset``: ``class`` (and ``truth``, ``instances``,
    ``probability`` when the run made them) in their own dtypes, CRS and transform readable by rioxarray
    (``ds.rio.crs``, ``ds.rio.transform()``) for images. Volumes carry their voxel geometry as attributes (the
    4x4 ``affine``) and, where their axes are the world's (``ds.attrs["world_coordinates"]`` says), ``z``, ``y``,
    ``x`` voxel-centre coordinates in world mm (S, A, R, as nibabel's ``apply_affine`` gives them). ``probability``
    is (class_index, [z,] y, x), labelled by ``class_index`` and ``class_name``: ``sel(class_index=1)``.

    ``path``: the run's output folder, or its ``result.zarr`` (a local path or an fsspec URL such as
    ``s3://bucket/prefix/result.zarr``). ``metrics``: the metrics folder when it is not beside the store.
    Global scores land in ``ds.attrs`` (``accuracy``, ``mean_iou``, ``iou_<class>``, ``dice_<class>``);
    the per-tile table is ``ds.segpipe.tiles``, the whole summary ``ds.segpipe.summary``.
    """
    import xarray as xr

    _register_accessor(xr)
    root = str(path)
    result = root if root.rstrip("/").endswith(".zarr") else result_path(root)
    if not is_remote(result) and not (Path(result) / "zarr.json").is_file():
        raise InputError(f"no segpipe result at {path} (expected a result.zarr from a finished run)")
    with warnings.catch_warnings():  # a store from a killed run has no consolidated metadata: listed instead
        warnings.filterwarnings("ignore", message=".*consolidated metadata.*", category=RuntimeWarning)
        ds = _world_coords(_class_axis(xr.open_zarr(result)))
    folder = Path(metrics) if metrics is not None else (None if is_remote(result) else Path(result).parent / "metrics")
    ds.attrs["result"] = result
    if folder is not None:
        ds.attrs["metrics"] = str(folder)
        summary = _summary(folder)
        if summary and summary.get("summary"):  # scores with truth; stage times alone without
            ds.attrs.update(_global_scores(summary["summary"]))
    return ds


def _class_axis(ds: xr.Dataset) -> xr.Dataset:
    """The probability's class axis labelled by index (``sel(class_index=1)``) and name (``class_name``).

    A store written before the axis was renamed named it ``class`` like the class map, which xarray then made a
    2-D coordinate of it: the map goes back to being a data variable and the axis takes its present name."""
    import numpy as np

    from segpipe.io.result import CLASS_DIM

    if "class" in ds.dims:
        ds = ds.reset_coords("class").rename_dims({"class": CLASS_DIM})
    if "probability" not in ds:
        return ds
    n = ds.sizes[CLASS_DIM]
    names = list(ds["probability"].attrs.get("class_names", []))
    coords: dict[str, Any] = {CLASS_DIM: np.arange(n)}
    if len(names) == n:
        coords["class_name"] = (CLASS_DIM, names)
    return ds.assign_coords(coords)


def _world_coords(ds: xr.Dataset) -> xr.Dataset:
    """A volume's world coordinates where its store has none (written before they were): the same values
    the store now keeps (:func:`segpipe.io.result.volume_coords`)."""
    if ds.attrs.get("kind") != "volume" or "x" in ds.coords:
        return ds
    from segpipe.geometry import SceneGeometry
    from segpipe.io.result import volume_coords, world_attrs

    grid = SceneGeometry.of_attrs(tuple(ds["class"].shape), dict(ds.attrs))
    ds = ds.assign_coords({dim: (dim, values, attrs) for dim, (values, attrs) in volume_coords(grid).items()})
    ds.attrs.update({**world_attrs(grid), **ds.attrs})
    return ds


def _summary(folder: Path) -> dict[str, Any] | None:
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _global_scores(s: Mapping[str, Any]) -> dict[str, float]:
    """The summary's global figures as flat attributes (numbers only: they survive ``to_netcdf``/``to_zarr``)."""
    flat: dict[str, float] = {}
    if "global_accuracy" in s:
        flat["accuracy"] = s["global_accuracy"]
    if "global_mean_iou" in s:
        flat["mean_iou"] = s["global_mean_iou"]
    for key in ("iou", "dice"):
        for name, value in (s.get(f"global_{key}") or {}).items():
            if value is not None:
                flat[f"{key}_{name}"] = value
    return flat


class SegpipeAccessor:
    """``ds.segpipe``: the run's metrics beside the arrays (``summary``, ``tiles``, ``objects``)."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    @property
    def _folder(self) -> Path:
        folder = self._ds.attrs.get("metrics")
        if folder is None:
            raise InputError("this Dataset does not come from segpipe.segment or open_result with a metrics folder")
        return Path(folder)

    @property
    def summary(self) -> dict[str, Any] | None:
        """``metrics/summary.json``: per-stage wall times (and a mosaic's items), with truth also the global scores
        and confusion matrix (``["summary"]``)."""
        return _summary(self._folder)

    @property
    def tiles(self) -> pd.DataFrame | None:
        """One row per tile (block): position, pixels, accuracy, IoU/Dice per class; None without truth."""
        return _table(self._folder / "tiles.csv")

    @property
    def objects(self) -> pd.DataFrame | None:
        """One row per object (instances runs): class, area, centroid, matched truth and IoU."""
        return _table(self._folder / "objects.csv")


def _register_accessor(xr: Any) -> None:
    """``ds.segpipe`` on first use of the API: the CLI never loads xarray."""
    if not hasattr(xr.Dataset, "segpipe"):
        xr.register_dataset_accessor("segpipe")(SegpipeAccessor)


def _table(path: Path) -> pd.DataFrame | None:
    import pandas as pd

    return pd.read_csv(path) if path.is_file() else None
