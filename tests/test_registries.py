"""The registries own their entries: what the config accepts is exactly what the registries can plan and write."""

import typing

from segpipe.config import JobSpec, MethodSpec
from segpipe.io.exports import EXPORTS
from segpipe.methods.classical import CLASSICAL
from segpipe.methods.names import CLASSICAL_NAMES, FAMILY_OF, METHODS
from segpipe.methods.segment import FAMILIES


def _literal_names(annotation) -> set[str]:
    while typing.get_origin(annotation) is not typing.Literal:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return set(typing.get_args(annotation))


def test_every_method_name_the_config_accepts_has_a_family_that_plans_and_runs_it():
    assert _literal_names(MethodSpec.model_fields["name"].annotation) == set(METHODS) == set(FAMILY_OF)
    assert set(FAMILY_OF.values()) == set(FAMILIES)
    assert set(CLASSICAL_NAMES) == set(CLASSICAL)  # the classical methods' own registry, tied to the names


def test_the_config_offers_exactly_the_registered_exports():
    from segpipe import geometry
    from segpipe.io import exports

    assert _literal_names(JobSpec.model_fields["exports"].annotation) == set(EXPORTS)
    assert exports.KINDS == set(geometry.KINDS)


NEW_EXPORT = '''
import sys
from pathlib import Path

import segpipe.io.exports as ex

# The whole of a new export: one entry in the registry ...
ex.EXPORTS["classes-npy"] = ex.Export("classes-npy", ex.IMAGES, frozenset(), ("classes.npy",), "throwaway_export")
ex.NAMES = tuple(ex.EXPORTS)

from distributed import Client

from segpipe.config import job_from_dict
from segpipe.errors import InputError
from segpipe.io.layout import OUTPUT_FILES
from segpipe.pipeline import check, run_job

out = Path(sys.argv[2])
job = job_from_dict({"input": sys.argv[1], "output": str(out), "tile_size": 256, "method": {"name": "otsu"},
                     "exports": ["cog", "classes-npy"]}, Path.cwd())
with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
    outcome = run_job(check(job), client)
print("written", sorted(p.name for p in outcome.exports))
print("listed", "classes.npy" in OUTPUT_FILES)
try:
    check(job_from_dict({"input": sys.argv[3], "output": str(out) + "v", "method": {"name": "otsu"},
                         "exports": ["classes-npy"]}, Path.cwd()))
except InputError as err:
    print("refused", err)
'''

MODULE = '''
"""... and one module: the class map as a NumPy array."""
import numpy as np
import zarr


def write(run):
    path = run.path("classes.npy")
    np.save(path, np.asarray(zarr.open_array(run.result, path="class", mode="r")[:]))
    return [path]
'''


def test_a_new_export_is_one_module_and_one_registry_entry(tmp_path):
    """An export added as the registry says (ARCHITECTURE.md), touching nothing else: the job file accepts its
    name, the run writes it, the overwrite clean-up knows its file, and a volume job naming it is refused."""
    import subprocess
    import sys

    import numpy as np
    import zarr
    from conftest import SCENE
    from medical import load_ct, write_nifti

    (tmp_path / "throwaway_export.py").write_text(MODULE)
    (tmp_path / "run_new_export.py").write_text(NEW_EXPORT)
    ct = load_ct()
    volume = write_nifti(tmp_path / "ct.nii.gz", ct.hu[:8, :64, :64], np.eye(4))
    proc = subprocess.run([sys.executable, str(tmp_path / "run_new_export.py"), str(SCENE), str(tmp_path / "o"),
                           str(volume)], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "written ['classes.npy', 'segmentation.tif']" in lines and "listed True" in lines
    assert any(ln.startswith("refused export 'classes-npy' does not apply to a volume input") for ln in lines)
    classes = zarr.open_array(str(tmp_path / "o" / "result.zarr"), path="class", mode="r")[:]
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "classes.npy"), classes)
