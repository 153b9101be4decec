"""Where a run puts everything, computed once when the job is checked: :class:`RunLayout`.

Why one value: the scene's fingerprint opens a remote source to read its metadata, and stages that each rebuilt
paths and fingerprints could disagree with one another; ingest, segment, instances, periods and the flows read
them from here. It lives in ``io``, below tiling and the methods, so that every stage can be handed it; the
fingerprints themselves are made by the stages that own them (ingest's of the source, the methods' of the
result) and given to it, never recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segpipe.io import exports
from segpipe.io.result import SEGMENT_STAGE
from segpipe.io.store import store_in

SCENE_STORE, RESULT_STORE, WORK_STORE, INSTANCES_STORE = ("scene.zarr", "result.zarr", "work.zarr",
                                                          "instances_work.zarr")
METRICS = "metrics"
POLYGONS = "objects.gpkg"
ITEM = "item.json"  # the run's STAC Item (segpipe.report.stac_item), images with a CRS only
METRIC_FILES = ("summary.json", "tiles.csv", "tiles.geojson", "report.html", "objects.csv", "objects.json",
                "truth_objects.csv")
# What a run may write in its output besides the stores. With overwrite, those the run did not write again are
# the old settings' (a COG where the job now asks for NIfTI, scores where it has no truth any more).
OUTPUT_FILES = (*exports.output_files(), POLYGONS, *(f"{METRICS}/{n}" for n in METRIC_FILES), ITEM)


def scene_path(root: str | Path) -> str:
    """The scene store under a store root (the output folder, or the job's ``store:``)."""
    return store_in(root, SCENE_STORE)


def result_path(root: str | Path) -> str:
    """The result store under a store root: what exports, metrics and :func:`segpipe.api.open_result` read."""
    return store_in(root, RESULT_STORE)


def work_path(root: str | Path) -> str:
    """The work store (a model's logits, region growing's labels) under a store root."""
    return store_in(root, WORK_STORE)


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run and what its stores are made from.

    ``store_root`` is where the Zarr stores go (the output folder unless the job says ``store:``);
    ``exports`` are the export names the run writes; ``instances_fp`` is None when the job asks for no
    instances; ``polygons`` says whether :attr:`polygons_path` is written.
    """

    output: Path
    store_root: str
    exports: tuple[str, ...]
    scene_fp: dict[str, Any]
    result_fp: dict[str, Any]
    instances_fp: dict[str, Any] | None = None
    polygons: bool = False  # whether the objects' polygons are written (instances asked for, on an image)

    @property
    def scene_store(self) -> str:
        return scene_path(self.store_root)

    @property
    def result_store(self) -> str:
        return result_path(self.store_root)

    @property
    def work_store(self) -> str:
        return work_path(self.store_root)

    @property
    def instances_store(self) -> str:
        return store_in(self.store_root, INSTANCES_STORE)

    @property
    def segment_mark(self) -> str:
        """The completion mark of a final result tile (beside the result store): what a resuming run and the
        change product read to know which tiles, or whether the whole result, are done."""
        return SEGMENT_STAGE

    def stores(self) -> list[str]:
        """Every store a job keeps, derived from one another: replaced together."""
        return [self.scene_store, self.result_store, self.work_store, self.instances_store]

    @property
    def metrics_dir(self) -> Path:
        return self.output / METRICS

    @property
    def summary_path(self) -> Path:
        return self.metrics_dir / "summary.json"

    @property
    def html_path(self) -> Path:
        return self.metrics_dir / "report.html"

    @property
    def polygons_path(self) -> Path:
        return self.output / POLYGONS

    @property
    def item_path(self) -> Path:
        """The run's STAC Item, written last (it lists every other file with its checksum)."""
        return self.output / ITEM

    def output_files(self) -> list[Path]:
        """Every file a run of any settings may leave in this output (:data:`OUTPUT_FILES`)."""
        return [self.output / name for name in OUTPUT_FILES]
