"""Job specification (YAML), validated with pydantic.

Paths in a job file are relative to the file itself, so a job folder can be moved or shipped
as a whole (the bundled demo job relies on this).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from segpipe.errors import InputError
from segpipe.io.exports import NAMES as EXPORT_NAMES
from segpipe.io.paths import is_remote, local_or_remote, split_series, with_series
from segpipe.methods.names import METHODS, MODEL_METHODS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Largest CRF halo (iterations x radius, pixels) a tile may read around its core: beyond it a tile's window
# is mostly halo, and the kernel so wide that the truncated CRF is no longer a local refinement.
MAX_CRF_HALO = 256


class CRFSpec(_Strict):
    """Mean-field refinement of a model's probabilities (Kraehenbuehl & Koltun's dense CRF, Potts compatibility)
    with its pairwise kernel truncated to a disc of ``radius`` pixels, so that after ``iterations`` a pixel
    depends only on pixels within ``iterations * radius``: the halo that makes it exact per tile."""

    iterations: int = Field(5, ge=1, le=20, description="mean-field iterations")
    theta_alpha: float = Field(2.0, gt=0, description="spatial std (pixels) of the bilateral (appearance) kernel")
    theta_beta: float = Field(0.5, gt=0, description="intensity std of the bilateral kernel, in units of the "
                                                     "image as the model sees it (normalised)")
    theta_gamma: float = Field(1.0, gt=0, description="spatial std (pixels) of the smoothness kernel")
    w_bilateral: float = Field(0.3, ge=0, description="weight of the bilateral kernel, per neighbour")
    w_spatial: float = Field(0.3, ge=0, description="weight of the smoothness kernel, per neighbour")
    radius: int = Field(6, ge=1, le=32, description="truncation of both kernels (pixels); e.g. 3 x theta_alpha")

    @model_validator(mode="after")
    def _halo_bounded(self) -> CRFSpec:
        if self.halo > MAX_CRF_HALO:
            raise ValueError(f"iterations x radius = {self.halo} px of halo around every tile; at most "
                             f"{MAX_CRF_HALO} (fewer iterations or a smaller radius)")
        return self

    @property
    def halo(self) -> int:
        """How far (pixels) the refined class of a pixel can depend on its unary and image."""
        return self.iterations * self.radius


class RefineSpec(_Strict):
    """Refinement of a model's blended logits before the class map: ``crf`` (``refine: crf`` = its defaults)."""

    crf: CRFSpec

    @model_validator(mode="before")
    @classmethod
    def _by_name(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v != "crf":
                raise ValueError(f"unknown refinement {v!r} (known: crf)")
            return {"crf": {}}
        return v


class MethodSpec(_Strict):
    """Which segmentation method and its parameters."""

    name: Literal[METHODS]  # type: ignore[valid-type]
    model: Path | None = None
    patch_size: int = Field(256, ge=16)
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    batch_size: int = Field(8, ge=1)
    tta: Literal["none", "mirror"] = Field("none", description="model test-time augmentation: mirror averages "
                                           "the logits over every flip of the spatial axes (nnU-Net's mirroring; "
                                           "4x the forward passes in 2-D, 8x in 3-D)")
    params: dict[str, Any] = Field(default_factory=dict)
    refine: RefineSpec | None = Field(None, description="model jobs: refine the blended logits, e.g. {crf: {...}}")

    @model_validator(mode="after")
    def _model_takes_no_params(self) -> MethodSpec:
        if self.name in MODEL_METHODS and self.params:
            raise ValueError(f"a model takes no params (got {sorted(self.params)}); its settings are patch_size, "
                             "overlap, batch_size, tta and refine beside model:")
        return self

    @model_validator(mode="after")
    def _refine_needs_model(self) -> MethodSpec:
        if self.refine is not None and self.name not in MODEL_METHODS:
            raise ValueError(f"refine works on a model's probabilities; method {self.name!r} gives classes only")
        return self

    @model_validator(mode="after")
    def _model_needed(self) -> MethodSpec:
        if self.name in MODEL_METHODS and self.model is None:
            raise ValueError(f"method {self.name!r} needs a 'model': a segpipe checkpoint, or a TorchScript or "
                             "ONNX file with its model card")
        return self


class TruthSpec(_Strict):
    """Ground truth: a raster on the scene grid, or a vector file rasterised onto it."""

    path: Path
    layer: str | int | None = Field(None, description="vector truth: the layer (name or index) of a file with several")
    attribute: str | None = Field(None, description="vector truth: the attribute holding each feature's class, as "
                                                    "an id or a name (see classes)")
    value: int = 1
    classes: dict[str, int] | None = Field(None, description="class names of the attribute as class ids, e.g. "
                                                             "{water: 1, crop: 2}; default: the job's class_names")
    ignore: list[int] = Field(default_factory=list, description="truth values to leave out of the metrics (after "
                                                                "remap); besides these only the raster's own "
                                                                "nodata tag is ignored: any other value beyond the "
                                                                "method's classes is an error")
    threshold: float | None = Field(None, description="float truth (a probability or soft mask): class 1 where the "
                                                      "value is above this, else 0; without it float truth must "
                                                      "hold whole numbers")
    all_touched: bool = False
    remap: dict[int, int] = Field(default_factory=dict)
    binarize: bool = Field(False, description="every label > 0 becomes class 1 (masks stored as intensities, "
                                              "e.g. a skull-stripped brain as a brain mask)")
    instances: bool = Field(False, description="raster/volume truth holds instance IDs (0 = background): "
                                               "class 1 is every ID > 0, and objects are matched by ID")


class InstanceSpec(_Strict):
    """Instance labelling: connected components of classes, with global IDs across tiles."""

    classes: list[int] | None = Field(None, description="class ids to split into objects; default all but 0")
    connectivity: Literal["face", "full"] = Field(
        "full", description="full: diagonal neighbours touch (8-connected in 2-D, 26 in 3-D); face: 4 / 6")
    match_iou: float = Field(0.5, gt=0.0, lt=1.0, description="IoU above which a predicted object matches a "
                                                                 "true one (> 0.5 makes matches unique)")
    split: Literal["none", "watershed"] = Field(
        "none", description="watershed: split touching objects, from markers at least marker_distance inside")
    marker_distance: float = Field(3.0, gt=0.0, description="depth of a watershed marker: pixels for images, "
                                                          "millimetres for volumes")
    halo: int = Field(64, ge=0, description="context for watershed splitting; exact where objects fit in it")


class AdaptSpec(_Strict):
    """Adaptive scaling (Dask's ``cluster.adapt``): workers added while tasks wait and removed when idle, between
    ``minimum`` and ``maximum``; a worker that dies (a SLURM job cancelled or out of walltime) is replaced."""

    minimum: int = Field(1, ge=0)
    maximum: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> AdaptSpec:
        if self.minimum > self.maximum:
            raise ValueError(f"adapt.minimum {self.minimum} is above adapt.maximum {self.maximum}")
        return self


class SlurmSpec(_Strict):
    """Workers as SLURM jobs (dask-jobqueue's ``SLURMCluster``), one worker process per job with the cluster's
    ``threads_per_worker`` cores and ``memory_limit`` of memory."""

    queue: str | None = Field(None, description="partition (sbatch -p); default the cluster's default partition")
    account: str | None = Field(None, description="sbatch -A")
    walltime: str = Field("01:00:00", description="each worker job's time limit (sbatch -t)")
    job_directives: list[str] = Field(default_factory=list, description="more #SBATCH lines, e.g. --qos=high, "
                                      "--constraint=skylake")
    prologue: list[str] = Field(default_factory=list, description="shell lines run before each worker starts, "
                                "e.g. 'module load cuda', 'source /path/to/venv/bin/activate'")
    python: str | None = Field(None, description="the Python that runs workers on the nodes; default this one")
    interface: str | None = Field(None, description="network interface the scheduler and workers listen on "
                                  "(e.g. ib0); default the host's address")
    shared_directory: str | None = Field(None, description="a folder every node mounts, for the run's temporary "
                                         "TLS certificates and the workers' logs; default ~/.segpipe")


class GatewaySpec(_Strict):
    """A cluster asked of a Dask Gateway (``Gateway().new_cluster()``); secrets come from the environment only."""

    address: str = Field(description="the gateway's HTTP address, e.g. https://gateway.example.org")
    proxy_address: str | None = Field(None, description="its scheduler proxy (gateway://host:port); default the "
                                      "gateway's own")
    auth: Literal["none", "basic", "kerberos", "jupyterhub"] = "none"
    username: str | None = Field(None, description="basic: the user name (default $USER)")
    password_env: str = Field("DASK_GATEWAY_PASSWORD", description="basic: the environment variable holding the "
                              "password (a password is never written in a job file)")
    token_env: str = Field("JUPYTERHUB_API_TOKEN", description="jupyterhub: the variable holding the API token")
    options: dict[str, Any] = Field(default_factory=dict, description="cluster options the gateway offers "
                                    "(worker_cores, worker_memory, image, ...); see gateway.cluster_options()")


class KubernetesSpec(_Strict):
    """A DaskCluster resource made by the dask-kubernetes operator (``KubeCluster``)."""

    image: str = Field(description="container image with segpipe installed (see infra/Dockerfile)")
    namespace: str = "default"
    cpu: str = Field("2", description="each worker's CPU request and limit")
    memory: str = Field("8Gi", description="each worker's memory request and limit")
    gpu: int = Field(0, ge=0, le=1, description="1: each worker gets one nvidia.com/gpu (and GPU=1)")
    env: dict[str, str] = Field(default_factory=dict, description="more environment for scheduler and workers")


CLUSTER_KINDS = ("local", "scheduler", "slurm", "gateway", "kubernetes")


class ClusterSpec(_Strict):
    """Where the Dask work runs: a LocalCluster made for the job, an existing scheduler, or a cluster segpipe
    creates, scales and tears down on SLURM, a Dask Gateway or Kubernetes (:mod:`segpipe.runtime.cluster`)."""

    kind: Literal[CLUSTER_KINDS] | None = Field(  # type: ignore[valid-type]
        None, description="local, scheduler, slurm, gateway or kubernetes; default scheduler when an address is "
                          "given, else local")
    scheduler: str | None = None
    n_workers: int = Field(2, ge=1, description="workers (a fixed size; adapt scales instead)")
    threads_per_worker: int = Field(1, ge=1, description="threads (cores) of each worker")
    memory_limit: str = "4GiB"
    adapt: AdaptSpec | None = Field(None, description="scale between minimum and maximum workers with the work "
                                    "(slurm, gateway, kubernetes)")
    start_timeout: float = Field(300.0, gt=0, description="seconds to wait for the first worker of a cluster "
                                 "segpipe creates (a SLURM job waits in the queue meanwhile)")
    dashboard: str | None = Field("127.0.0.1:0", description="where a cluster's dashboard listens: loopback by "
                                  "default, an address like 0.0.0.0:8787 to share it, null for none")
    tls: Literal["auto", "yes", "no"] = Field(
        "auto", description="TLS between client, scheduler and workers; auto: on for slurm (a temporary "
                            "certificate per run unless tls_files gives one), the gateway's own TLS for gateway")
    tls_files: dict[Literal["ca", "cert", "key"], str] | None = Field(
        None, description="the run's own certificate authority, certificate and key (PEM files)")
    slurm: SlurmSpec | None = None
    gateway: GatewaySpec | None = None
    kubernetes: KubernetesSpec | None = None
    gpu: Literal["auto", "yes", "no"] = "auto"
    gpus: list[int | str] | None = Field(None, description="devices given a GPU worker each (CUDA_VISIBLE_DEVICES "
                                   "values: indices or GPU-/MIG- UUIDs); default: every device this process sees")
    processes: Literal["auto", "yes", "no"] = Field(
        "auto", description="worker processes (yes) or threads of the segpipe process (no); auto: threads for a "
                            "classical job on a scene of at most 32 Mpx, where starting and stopping worker "
                            "processes costs more than the threads lose to Python's GIL")

    @model_validator(mode="after")
    def _kind(self) -> ClusterSpec:
        """The kind said or implied, and the settings it needs: a kind's own section, and no other's."""
        if self.kind is None:
            self.kind = "scheduler" if self.scheduler else "local"
        if self.kind == "scheduler" and not self.scheduler:
            raise ValueError("cluster kind scheduler needs cluster.scheduler (an address like tcp://10.0.0.5:8786)")
        if self.scheduler and self.kind != "scheduler":
            raise ValueError(f"cluster.scheduler is for kind scheduler, not {self.kind}: segpipe makes a {self.kind} "
                             "cluster itself")
        for section in ("slurm", "gateway", "kubernetes"):
            if getattr(self, section) is not None and self.kind != section:
                raise ValueError(f"cluster.{section} is set but the cluster kind is {self.kind}")
        if self.kind == "slurm" and self.slurm is None:
            self.slurm = SlurmSpec()
        if self.kind in ("gateway", "kubernetes") and getattr(self, self.kind) is None:
            raise ValueError(f"cluster kind {self.kind} needs a cluster.{self.kind} section")
        if self.adapt is not None and self.kind in ("local", "scheduler"):
            raise ValueError(f"cluster.adapt scales a cluster segpipe creates (slurm, gateway, kubernetes), "
                             f"not kind {self.kind}")
        if self.tls == "yes" and self.kind in ("local", "scheduler", "kubernetes"):
            raise ValueError(f"cluster.tls: yes is for slurm and gateway clusters, not kind {self.kind} "
                             "(a local cluster listens on loopback only; a scheduler address says tls:// itself)")
        return self

    def at(self, scheduler: str) -> ClusterSpec:
        """These settings pointed at an existing scheduler (``--scheduler``, a flow's ``scheduler=``)."""
        return self.model_copy(update={"kind": "scheduler", "scheduler": scheduler, "adapt": None, "slurm": None,
                                       "gateway": None, "kubernetes": None})

    @property
    def creates(self) -> bool:
        """Whether segpipe creates the cluster on other machines (slurm, gateway, kubernetes)."""
        return self.kind in ("slurm", "gateway", "kubernetes")

    @field_validator("tls_files")
    @classmethod
    def _pem(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None:
            missing = sorted({"ca", "cert", "key"} - set(v))
            if missing:
                raise ValueError(f"tls_files needs ca, cert and key (missing {', '.join(missing)})")
            for what, path in v.items():
                if not Path(path).is_file():
                    raise ValueError(f"tls_files.{what}: no such file {path}")
        return v

    @field_validator("scheduler")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        """A scheduler address Dask can dial (``tcp://host:port``, ``host:port``, ``tls://...``), checked before
        any work: a bad one would otherwise surface as a traceback from deep inside the client."""
        if v is None:
            return v
        from distributed.comm.addressing import parse_address, parse_host_port

        try:
            scheme, where = parse_address(v, strict=False)
            if scheme in ("tcp", "tls", "ucx", "ws", "wss"):
                parse_host_port(where)
        except ValueError:
            raise ValueError(f"{v!r} is not a Dask scheduler address (e.g. tcp://10.0.0.5:8786)") from None
        return v

    @field_validator("memory_limit")
    @classmethod
    def _bytes(cls, v: str) -> str:
        from dask.utils import parse_bytes

        if v != "auto":
            try:
                parse_bytes(v)
            except ValueError:
                raise ValueError(f"{v!r} is not an amount of memory (e.g. 4GiB, 8GB, auto)") from None
        return v


class QualitySpec(_Strict):
    """A per-item quality band of a mosaic: masks pixels out (clouds, shadows) and ranks items for ``best``."""

    asset: str = Field(description="the quality asset of each item (e.g. a cloud mask, Sentinel-2's SCL, a cloud "
                                   "probability); an item without it is used as if every pixel were clear")
    invalid: list[float] = Field(default_factory=list, description="quality values that make a pixel unusable "
                                 "(e.g. [1] for a 0/1 cloud mask, [3, 8, 9, 10] for SCL shadow and clouds)")
    prefer: Literal["low", "high"] | None = Field(None, description="composite best: per pixel, the item whose "
                                                  "quality value is lowest (cloud probability) or highest")


class MosaicSpec(_Strict):
    """Many scenes onto one output grid: a STAC search or a list/glob of rasters, composited per pixel."""

    stac: str | None = Field(None, description="a STAC API root URL, or a static catalog/collection JSON (path or "
                             "URL) whose items are filtered here")
    rasters: list[str] | str | None = Field(None, description="rasters (paths/URLs) or one glob, instead of STAC")
    collections: list[str] | None = None
    bbox: tuple[float, float, float, float] | None = Field(None, description="west, south, east, north in degrees "
                                                           "(EPSG:4326): the search area, and the output bounds "
                                                           "without an aoi")
    aoi: Path | None = Field(None, description="polygon(s) in any OGR format and CRS: output bounds, and pixels "
                                               "outside are nodata")
    datetime: str | None = Field(None, description="RFC 3339 instant or range: 2024-06, 2024-06-01/2024-06-30, "
                                 "2024-06-01/.. (a period run sets it to its month)")
    max_cloud: float | None = Field(None, ge=0, le=100, description="items with eo:cloud_cover above this are left out")
    assets: list[str] | None = Field(None, description="one asset per band, in band order (e.g. [B04, B03, B02, "
                                     "B08]); rasters: default every band of the first raster")
    crs: str | None = Field(None, description="output CRS; default the first item's")
    resolution: float | None = Field(None, gt=0, description="output pixel size in CRS units; default the first "
                                                             "item's")
    anchor: Literal["native", "edge", "center"] | tuple[float, float] = Field(
        "native", description="where the output grid's pixel edges lie: native = on the items' own pixel grid "
                              "(the first item's when they do not share one; items off it are resampled and "
                              "named), edge = on multiples of the resolution, center = half a pixel past them, "
                              "[fx, fy] = that fraction of a pixel past them (odc-geo's anchors)")
    composite: Literal["first", "median", "best"] = Field(
        "first", description="where items overlap: first = the first valid pixel in item order; median = per band "
                             "median of the valid pixels (rounded for integers); best = the valid pixel with the best "
                             "quality value (quality.prefer)")
    order: Literal["newest", "oldest", "least-cloud"] = Field("newest", description="item order for first (and ties)")
    quality: QualitySpec | None = None
    resampling: Literal["nearest", "bilinear", "cubic", "average", "mode"] = Field(
        "nearest", description="resampling of the bands onto the output grid (the quality band: always nearest)")
    max_items: int = Field(500, ge=1, description="refuse a search that finds more items than this")

    @model_validator(mode="after")
    def _one_source(self) -> MosaicSpec:
        if (self.stac is None) == (self.rasters is None):
            raise ValueError("a mosaic input needs exactly one of 'stac' (a STAC API or catalog) and 'rasters'")
        if self.stac is not None and not self.assets:
            raise ValueError("a STAC input needs 'assets': the item asset of each band, in band order")
        if self.composite == "best" and (self.quality is None or self.quality.prefer is None):
            raise ValueError("composite 'best' needs quality.asset and quality.prefer (low or high)")
        if isinstance(self.anchor, tuple) and not all(0.0 <= f < 1.0 for f in self.anchor):
            raise ValueError(f"anchor fractions must lie in [0, 1) of a pixel, not {list(self.anchor)}")
        return self

    def resolved(self, base: Path) -> MosaicSpec:
        """A copy whose local paths are absolute (relative ones anchored at ``base``)."""
        data = self.model_copy(deep=True)
        if data.stac is not None:
            data.stac = local_or_remote(data.stac, base)
        if isinstance(data.rasters, str):
            data.rasters = data.rasters if is_remote(data.rasters) else str(base / data.rasters)
        elif data.rasters is not None:
            data.rasters = [local_or_remote(r, base) for r in data.rasters]
        if data.aoi is not None and not data.aoi.is_absolute():
            data.aoi = (base / data.aoi).resolve()
        return data


class CodeSpec(_Strict):
    """A coded concept (DICOM code sequence item): e.g. ``{code: "12738006", scheme: SCT, meaning: Brain}``."""

    code: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=16, description="coding scheme designator: SCT, DCM, FMA, ...")
    meaning: str = Field(min_length=1, max_length=64)


class SegmentCodes(_Strict):
    """What one class is, coded: its segmented property category and type (each default: SCT Tissue)."""

    category: CodeSpec | None = None
    type: CodeSpec | None = None


class DicomSegSpec(_Strict):
    """Settings of the ``dicom-seg`` export."""

    segments: dict[str, SegmentCodes] = Field(default_factory=dict, description="class name -> its coded category "
                                              "and type; classes not named get the generic SCT Tissue")


class PolygonsSpec(_Strict):
    """Settings of the ``polygons`` export."""

    format: Literal["parquet", "gpkg", "fgb"] = Field("parquet", description="GeoParquet 1.1 "
                                                      "(class_polygons.parquet), GeoPackage or FlatGeobuf")
    max_vertices: int | None = Field(None, ge=0, description="a region with more corners than this above a "
                                     "multiple of 2048 rows is written in parts cut there, flagged `cut` (default "
                                     "2^22, which bounds the export's memory; 0: never cut)")


# Export name -> the job's field holding its settings (exports without settings have none).
EXPORT_SETTINGS = {"dicom-seg": "dicom_seg", "polygons": "polygons"}


class JobSpec(_Strict):
    """A whole segmentation job."""

    input: str | MosaicSpec = Field(description="GeoTIFF/COG (local path, URL or GDAL /vsi path), whole-slide "
                                    "image, NIfTI file or DICOM series folder; or a mosaic: a STAC search or "
                                    "several rasters onto one grid (see MosaicSpec)")
    series: str | None = Field(None, description="a DICOM folder input holding several series: the one to read, by "
                                                 "its SeriesInstanceUID or SeriesDescription (without it such a "
                                                 "folder is refused, listing its series)")
    output: Path
    store: str | None = Field(None, description="where the Zarr stores (and their completion marks) live: a folder "
                                                "or an fsspec URL such as s3://bucket/prefix; default: output")
    bands: list[int] | None = None
    nodata: float | None = None
    chunk_size: int | None = Field(None, ge=16, description="Zarr chunk edge; default min(512, tile_size) for "
                                   "images, 64 (or tile_size when 64 does not divide it) for volumes")
    tile_size: int = Field(512, ge=64)
    method: MethodSpec
    truth: TruthSpec | None = None
    class_names: list[str] | None = None
    instances: InstanceSpec | None = None
    probabilities: bool = Field(False, description="model and fcm jobs: per-class probabilities (softmax of "
                                "the blended logits; fcm: the memberships) into result.zarr/probability (float16) "
                                "and, for images, probabilities.tif (one uint8 band per class, 0-254 = 0-1, then "
                                "the confidence band)")
    exports: list[Literal[EXPORT_NAMES]] | None = Field(  # type: ignore[valid-type]  (the registry's names)
        None, description="default: cog for rasters; cog and ome-zarr for slides; nifti for volumes")
    dicom_seg: DicomSegSpec | None = Field(None, description="the dicom-seg export's coded concepts per class")
    polygons: PolygonsSpec | None = Field(None, description="the polygons export's file format")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    pixels: Literal["auto", "copy"] = Field(
        "auto", description="auto: a tiled GeoTIFF/COG whose internal tiles nest with the chunks is read in place; "
                            "other inputs, or any input with 'copy', are copied into scene.zarr")
    level: int | None = Field(None, ge=0, description="slides: the pyramid level to read; default the coarsest "
                              "level at least as fine as the model's resolution (level 0 without one)")
    mpp: list[float] | None = Field(None, description="slides: µm per pixel of level 0, x and y (or one value for "
                                                      "both), for a slide that declares none or declares it wrong; "
                                                      "default what the file declares")
    overwrite: bool = Field(False, description="replace stores made from other input or settings in the output "
                                               "(else the run is refused, naming what differs)")
    busy: Literal["refuse", "skip", "wait"] | None = Field(
        None, description="when another run holds the output (segpipe.io.lease): refuse (exit 2, naming it), "
                          "skip (say so and do nothing) or wait until it ends; default refuse for a run, skip for "
                          "a land-cover period and an archive item (a schedule firing while the last run goes on)")
    keep_work: bool = Field(False, description="keep the model's logits work store after a successful run "
                                               "(removed by default: it is scratch, several bytes per pixel)")

    @field_validator("mpp")
    @classmethod
    def _mpp_pair(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) not in (1, 2) or min(v) <= 0):
            raise ValueError("mpp is one or two pixel sizes in µm (x, y), each > 0")
        return v if v is None or len(v) == 2 else [v[0], v[0]]

    @field_validator("bands")
    @classmethod
    def _bands_positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 1):
            raise ValueError("bands are 1-based band numbers and must not be empty")
        return v

    @model_validator(mode="after")
    def _tile_multiple_of_chunk(self) -> JobSpec:
        if self.chunk_size is not None and self.tile_size % self.chunk_size:
            raise ValueError(f"tile_size {self.tile_size} must be a multiple of chunk_size {self.chunk_size}"
                             " so that every tile writes whole chunks")
        return self

    @model_validator(mode="after")
    def _export_settings_asked_for(self) -> JobSpec:
        """Settings for an export the job never writes (codes for a SEG, a polygon format) are a mistake, a
        forgotten ``exports:`` line, not a no-op."""
        for name, key in EXPORT_SETTINGS.items():
            if getattr(self, key) is not None and name not in (self.exports or []):
                raise ValueError(f"{key} settings are given but exports does not name {name}")
        return self

    def export_settings(self) -> dict[str, Any]:
        """Export name -> the job's settings for it, as plain data (the exports sit below the config)."""
        return {name: spec.model_dump(mode="json", exclude_none=True)
                for name, key in EXPORT_SETTINGS.items() if (spec := getattr(self, key)) is not None}

    @model_validator(mode="after")
    def _series_in_input(self) -> JobSpec:
        """Why the series goes into the input path: readers, fingerprints and workers all receive the input as
        one string, which then names the series (:func:`segpipe.io.paths.with_series`)."""
        if self.series is None:
            return self
        if not isinstance(self.input, str) or is_remote(self.input):
            raise ValueError("series picks one DICOM series of a local folder input")
        folder, chosen = split_series(self.input)
        if chosen is None:
            self.input = with_series(folder, self.series)
        elif chosen != self.series:
            raise ValueError(f"the input names DICOM series {chosen!r} already, series says {self.series!r}")
        return self

    @property
    def store_root(self) -> str:
        """Folder or URL prefix holding scene.zarr, result.zarr and the work stores."""
        return self.store if self.store is not None else str(self.output)

    def chunk_for(self, ndim: int) -> int:
        """Chunk edge for a scene of ``ndim`` spatial axes: 512^2 images but 64^3 volumes (same order of bytes)."""
        if self.chunk_size is not None:
            return self.chunk_size
        if ndim == 2:
            return min(512, self.tile_size)
        return 64 if self.tile_size % 64 == 0 else self.tile_size

    def resolved(self, base: Path) -> JobSpec:
        """Return a copy whose relative paths are anchored at ``base``."""
        def fix(p: Path | None) -> Path | None:
            return None if p is None else (p if p.is_absolute() else (base / p)).resolve()
        data = self.model_copy(deep=True)
        data.input = data.input.resolved(base) if isinstance(data.input, MosaicSpec) else \
            local_or_remote(data.input, base)
        data.output = fix(data.output)
        if data.store is not None:
            data.store = local_or_remote(data.store, base)
        if data.method.model is not None:
            data.method.model = fix(data.method.model)
        if data.truth is not None:
            data.truth.path = fix(data.truth.path)
        return data


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "job"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def job_from_dict(data: dict[str, Any], base: Path) -> JobSpec:
    """Validate a job given as a dict (paths relative to ``base``)."""
    try:
        return JobSpec.model_validate(data).resolved(base)
    except ValidationError as exc:
        raise InputError(f"invalid job: {_one_line(exc)}") from None


def load_job(path: str | Path, overrides: dict[str, Any] | None = None) -> JobSpec:
    """Read and validate a job YAML; ``overrides`` are merged (nested dicts merge key by key)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"job file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"job file is not valid YAML ({str(exc).splitlines()[0]}): {p}") from None
    if not isinstance(data, dict):
        raise InputError(f"job file must hold a mapping of settings: {p}")
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return job_from_dict(data, p.parent.resolve())
