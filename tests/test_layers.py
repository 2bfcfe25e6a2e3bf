"""The package's import structure: no cycles, and no import upward from a lower layer.

Every ``import`` of a medseg module counts, at the top of a file or inside a function (a
deferred import still ties the two modules together); only ``if TYPE_CHECKING:`` blocks, which
never run, are left out. Lowest layer first; a module may import its own layer and those below.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "medseg"

LAYERS = [
    ["medseg._version", "medseg.errors"],  # facts with no dependencies
    ["medseg.files", "medseg.atomic", "medseg.device"],  # file names, atomic writes, devices
    ["medseg.config", "medseg.dicom"],
    ["medseg.io"],  # volumes with their geometry (DICOM series through medseg.dicom)
    ["medseg.data"],  # datasets, plans, MONAI pipelines
    ["medseg.checkpoint"],  # the checkpoint file (config + plan + weights)
    ["medseg.models"],  # networks, and building them from a config or checkpoint
    ["medseg.evaluation"],  # metrics, pictures, folder evaluation, QC report
    ["medseg.inference"],  # prediction (training's validation runs its sliding window)
    ["medseg.training"],
    ["medseg.demo"],
    ["medseg.cli", "medseg.__main__", "medseg"],  # the command line, and the lazy public API
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The medseg modules a file imports (``from medseg.x import y`` counts ``medseg.x.y`` when
    that is a module)."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node):
            if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                return
            self.generic_visit(node)

        def visit_Import(self, node):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "medseg")

        def visit_ImportFrom(self, node):
            if node.level or not node.module or node.module.split(".")[0] != "medseg":
                return
            found.add(node.module)
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if _is_module(sub):
                    found.add(sub)

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def _is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    graph = {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}
    # importing medseg.x.y runs medseg/x/__init__.py first: that edge is not a choice the file made
    return {m: {d for d in deps if d != m and not m.startswith(d + ".")} for m, deps in graph.items()}


def _layer(module: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best[0]


def test_every_module_has_a_layer():
    for module in _graph():
        _layer(module)


def test_no_import_goes_up_a_layer():
    upward = [
        f"{module} (layer {_layer(module)}) imports {dep} (layer {_layer(dep)})"
        for module, deps in sorted(_graph().items())
        for dep in sorted(deps)
        if _layer(dep) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_finds_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    # The two checks above on a made-up package: they must catch what they are for.
    package = tmp_path / "medseg"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("from medseg.data import plan\n")  # up from the lowest layer
    (package / "data" / "__init__.py").write_text("")
    (package / "data" / "plan.py").write_text("def f():\n    from medseg.data import cache\n")
    (package / "data" / "cache.py").write_text("import medseg.data.plan\n")  # a cycle, one side deferred
    monkeypatch.setattr(sys.modules[__name__], "ROOT", package)
    with pytest.raises(AssertionError, match=r"medseg.errors \(layer 0\) imports medseg.data.plan"):
        test_no_import_goes_up_a_layer()
    with pytest.raises(
        pytest.fail.Exception, match="medseg.data.cache -> medseg.data.plan -> medseg.data.cache"
    ):
        test_no_import_cycles()


@pytest.mark.parametrize(
    "module", ["medseg.io", "medseg.dicom", "medseg.checkpoint", "medseg.inference.predictor"]
)
def test_modules_import_on_their_own(module):
    # In a fresh interpreter, so an import order that only works after another import shows.
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, capture_output=True)
