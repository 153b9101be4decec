"""The library stays Prefect-free: usable from plain Dask."""

import subprocess
import sys


def test_importing_every_segpipe_module_does_not_import_prefect():
    code = (
        "import importlib, pkgutil, sys, segpipe\n"
        "for m in pkgutil.walk_packages(segpipe.__path__, 'segpipe.'):\n"
        "    importlib.import_module(m.name)\n"
        "flows = ('prefect.', 'segpipe_flows', 'flows')\n"
        "bad = sorted(n for n in sys.modules if n == 'prefect' or n.startswith(flows))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_flows_install_under_segpipe_flows_not_a_generic_top_level_name():
    """A wheel holds only ``segpipe`` and ``segpipe_flows``: a top-level ``flows`` would clash with other projects'."""
    import tomllib
    from pathlib import Path

    from setuptools import find_packages

    root = Path(__file__).resolve().parents[1]
    include = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.split(".")[0] for p in find_packages(str(root), include=include)} == {"segpipe", "segpipe_flows"}
    assert not (root / "flows").exists()
    import segpipe_flows

    assert Path(segpipe_flows.__file__).resolve().parent == root / "segpipe_flows"


def test_core_dependencies_leave_torch_unpinned_and_slide_and_dicom_libraries_to_extras():
    """GPU hosts bring their own CUDA build of torch, so the core must not pin it; OpenSlide and pydicom are the
    ``slides`` and ``medical`` extras, which a land-cover install does without."""
    import re
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    core = {re.match(r"[A-Za-z0-9_.-]+", d).group().lower().replace("_", "-"): d for d in project["dependencies"]}
    assert "torch" in core and "==" not in core["torch"]
    assert not {n for n in core if n.startswith(("openslide", "pydicom"))}
    extras = project["optional-dependencies"]
    assert any(d.startswith("openslide-python") for d in extras["slides"])
    assert any(d.startswith("pydicom") for d in extras["medical"])
