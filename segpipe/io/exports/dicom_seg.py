"""Export ``dicom-seg``: a DICOM series input's class map as a DICOM Segmentation that refers back to the series.

Why a DICOM Segmentation at all: a PACS, OHIF and 3D Slicer open a SEG beside the CT or MR it was made from,
lined up by the source's Frame of Reference and slice UIDs, where a NIfTI file would need the same grid loaded
by hand. Why highdicom: it writes the Segmentation IOD from the source datasets (patient, study, frame of
reference, per-frame plane positions and source image references, dimension index, bit packing) as the
standard requires and as ``dciodvfy`` checks it; writing those sequences by hand is where SEG writers go wrong.

Why BINARY rather than LABELMAP: a label-map SEG (a newer SOP class, highdicom >= 0.23) is not yet read by most
viewers nor known to Debian's ``dciodvfy``; a BINARY SEG with one bit per voxel and segment, empty frames left
out, is what Slicer, OHIF, dcmqi and pydicom-seg all read, and is about as small once the file is compressed.

What goes in: one segment per class, numbered from 1 in class order, labelled with the class name; class 0 is
left out when the job names it ``background`` (any case), since a SEG's absence of every segment already
says "background". Voxels with no data (NODATA, 255 in the class map) are in no segment. Each segment is
AUTOMATIC, identified as algorithm "segpipe" (its version; family from the method, CID 7162) with the method as
a parameter, and coded as the job's ``dicom_seg.segments`` say, else as SCT "Tissue" (category and type).

Geometry: segpipe stacks a series' slices along their normal without flipping rows or columns
(:func:`segpipe.io.volume.dicom_slices` gives the order), so class-map slice ``k`` is the pixels of slice file
``k``: highdicom takes the datasets in that order and copies each frame's plane position from its source slice.
The whole class map is held in memory (highdicom builds the frames from one array): a SEG is for CT/MR series,
which fit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.errors import InputError
from segpipe.io.exports import ExportRun
from segpipe.io.extras import require

FILE = "segmentation.seg.dcm"
NODATA = 255
GENERIC = {"code": "85756007", "scheme": "SCT", "meaning": "Tissue"}  # CID 7150 / 7151: any tissue
# Method -> algorithm family (CID 7162 "Segmentation Algorithm Families"); methods not listed: a model's
# Artificial Intelligence, else Histogram Analysis.
FAMILY = {
    "otsu": "HistogramAnalysis", "adaptive": "AdaptiveFiltering", "kmeans": "ClusterAnalysis",
    "fcm": "ClusterAnalysis", "watershed": "MorphologicalOperations", "edges": "EdgeDetection",
    "hsv": "MultispectralProcessing", "gabor": "MultiScaleResolutionFiltering",
    "region_growing": "NeighborhoodAnalysis", "split_merge": "NeighborhoodAnalysis",
}
# Patient and study attributes a SEG copies from its source, all Type 2 (present, may be empty): a source without
# them (anonymised, or written by a tool that omits them) gives them empty rather than failing the export.
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")


def segment_classes(class_names: list[str]) -> list[int]:
    """The classes that become segments (segment ``n`` is class ``segment_classes(...)[n - 1]``): every class but
    class 0 when it is named background."""
    skip = 1 if class_names and class_names[0].casefold() == "background" else 0
    return list(range(skip, len(class_names)))


def check(settings: Mapping[str, Any], class_names: list[str]) -> str | None:
    """A coded concept for a class that is no segment: a name the job does not have, or a left-out background."""
    named = {class_names[k] for k in segment_classes(class_names)}
    for name in settings.get("segments", {}):
        if name not in named:
            why = "is class 0, left out of the SEG" if name in class_names else "is not a class of this job"
            return (f"dicom_seg.segments names {name!r}, which {why} (segments: "
                    f"{', '.join(repr(n) for n in sorted(named, key=class_names.index))})")
    return None


def warm() -> None:
    """highdicom and pydicom imported, and the standard's tables highdicom parses when it builds a SEG (its IOD
    module and attribute maps, cached per process) loaded: the writer's fixed cost (:func:`segpipe.io.exports.warm`)."""
    require("pydicom", "medical", "the dicom-seg export")
    require("highdicom", "medical", "the dicom-seg export")
    from highdicom import _standard_utils as standard  # private: a version without these only warms less

    for loader in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
        getattr(standard, loader, lambda: None)()


def write(run: ExportRun) -> list[Path]:
    import zarr

    pydicom = require("pydicom", "medical", "the dicom-seg export")
    hd = require("highdicom", "medical", "the dicom-seg export")
    from pydicom.sr.codedict import codes

    from segpipe import __version__
    from segpipe.io.store import remove_leftovers
    from segpipe.io.volume import dicom_slices

    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom_slices(run.source)]
    for ds in sources:  # in memory only: the source files are never written
        for keyword in TYPE_2:
            if keyword not in ds:
                setattr(ds, keyword, None)
    classes = np.asarray(zarr.open_group(run.result, mode="r")["class"][:])
    if classes.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise InputError(f"the class map {classes.shape} is not on the DICOM series' grid: {run.source}")
    kept = segment_classes(run.class_names)
    to_segment = np.zeros(256, np.uint8)  # class -> segment number; background and NODATA -> 0 (no segment)
    to_segment[kept] = np.arange(1, len(kept) + 1)
    labels = to_segment[classes]

    family = getattr(codes.cid7162, "ArtificialIntelligence" if run.model else FAMILY.get(run.method,
                                                                                          "HistogramAnalysis"))
    algorithm = hd.AlgorithmIdentificationSequence(name="segpipe", family=family, version=__version__,
                                                   parameters={"method": run.method})
    coded = run.settings.get("dicom-seg", {}).get("segments", {})

    def concept(c: Mapping[str, str] | None) -> Any:
        c = c or GENERIC
        return hd.sr.CodedConcept(c["code"], c["scheme"], c["meaning"])

    segments = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=run.class_names[k][:64],
        segmented_property_category=concept(coded.get(run.class_names[k], {}).get("category")),
        segmented_property_type=concept(coded.get(run.class_names[k], {}).get("type")),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
    ) for n, k in enumerate(kept, 1)]
    series_number = int(sources[0].get("SeriesNumber", 0) or 0) + 1000
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=labels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="segpipe",
        manufacturer_model_name=f"segpipe {run.method}"[:64], software_versions=__version__,
        device_serial_number="0", content_label="SEGPIPE", content_description=f"segpipe {run.method}"[:64],
        series_description=f"segpipe {run.method}"[:64])
    dest = run.path(FILE)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        seg.save_as(tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return [dest]
