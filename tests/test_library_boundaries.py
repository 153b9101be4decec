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
