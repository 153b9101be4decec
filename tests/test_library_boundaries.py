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


def _import_graph(root, top_level_only: bool) -> dict[str, set[str]]:
    """segpipe module -> the segpipe modules it imports (``top_level_only``: at import time, not inside
    functions; imports under ``if TYPE_CHECKING:`` never run and are not counted)."""
    import ast

    modules = {}
    for f in (root / "segpipe").rglob("*.py"):
        name = ".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = f
    graph: dict[str, set[str]] = {}
    for name, f in modules.items():
        tree = ast.parse(f.read_text())
        checking = {id(n) for s in ast.walk(tree) if isinstance(s, ast.If) and "TYPE_CHECKING" in ast.unparse(s.test)
                    for n in ast.walk(s)}
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        deps = set()
        for n in nodes:
            if id(n) in checking:
                continue
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("segpipe"):
                submodules = {f"{n.module}.{a.name}" for a in n.names} & set(modules)  # from pkg import module
                deps |= submodules or {n.module}
            elif isinstance(n, ast.Import):
                deps |= {a.name for a in n.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# ARCHITECTURE.md's layers, low to high. The names registries (export and method names) and the small values
# every stage shares sit with layer 0: they import nothing of segpipe's.
LAYER_0 = {"segpipe.errors", "segpipe.geometry", "segpipe.io.paths", "segpipe.progress", "segpipe.io.exports",
           "segpipe.methods.names"}
LAYERS = {"config": 1, "runtime": 2, "io": 3, "models": 3, "tiling": 4, "methods": 5, "objects": 6, "report": 7}
# Imports against that order: only the package's lazy public API. A new one fails the test.
KNOWN_CROSSINGS = {
    ("segpipe", "segpipe.api"),  # the package's lazy public API (segpipe.segment), by design
}


def _layer(module: str) -> int:
    if module in LAYER_0 or module == "segpipe":
        return 0
    part = module.split(".")[1]
    return LAYERS.get(part, 8)  # pipeline, periods, archive, api, cli


def _crossings(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, deps in graph.items() for b in deps if _layer(b) > _layer(a)}


def test_no_import_cycle_anywhere_and_imports_follow_the_layers():
    """The layering contract (ARCHITECTURE.md): no two modules import each other, directly or round a loop, at
    import time or inside functions (the lazy-import rule); the grid value imports no other module; and no
    module imports from a higher layer except the listed crossings still to be worked down."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    graph = _import_graph(root, top_level_only=False)
    assert _cycles(graph) == []
    assert _cycles(_import_graph(root, top_level_only=True)) == []
    assert graph["segpipe.geometry"] == set() and graph["segpipe.io.paths"] == set()
    assert _crossings(graph) == KNOWN_CROSSINGS


def test_the_cycle_check_finds_a_planted_cycle(tmp_path):
    """The checks fail when a cycle or a crossing is introduced: a copy of the tree with the grid importing a
    reader (a loop), and one with ingest importing the pipeline inside a function (against the layers)."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "segpipe", tmp_path / "segpipe", ignore=shutil.ignore_patterns("__pycache__", "sample"))
    geometry = tmp_path / "segpipe" / "geometry.py"
    geometry.write_text(geometry.read_text() + "\nfrom segpipe.io.raster import RasterInfo  # noqa\n")
    assert "from segpipe.geometry import" in (tmp_path / "segpipe" / "io" / "raster.py").read_text()  # a loop now
    assert {"segpipe.geometry", "segpipe.io.raster"} in _cycles(_import_graph(tmp_path, top_level_only=True))
    ingest = tmp_path / "segpipe" / "tiling" / "ingest.py"
    ingest.write_text(ingest.read_text() + "\n\ndef _late():\n    from segpipe.pipeline import check  # noqa\n")
    assert ("segpipe.tiling.ingest", "segpipe.pipeline") in _crossings(_import_graph(tmp_path, False)) - KNOWN_CROSSINGS
