"""The package layout as rules on imports, read from the source with ``ast`` (nothing is imported).

Every import counts: module level, inside functions, under ``if TYPE_CHECKING:``, ``from pkg import sub``
(an edge to ``pkg`` and to ``pkg.sub``), and dynamic ``importlib.import_module`` calls. Checked:

* no import cycle between modules;
* the direction of the packages: the top (``amct``, ``cli``, ``caffe``, ``demo``) -> ``workflows`` ->
  ``passes``, ``engine``, ``emulation``, ``analysis`` -> ``quant`` -> ``model`` -> ``proto``, with
  ``errors``/``log`` usable everywhere and ``common`` (classes users subclass) by the workflows and above;
  ``emulation`` and ``analysis`` may use the engine, the engine uses none of them;
* ``caffe/python_layers.py`` imports nothing of ours (it runs inside a stock pycaffe, without torch);
* the engine's layer package imports every layer family, so the registry it exports is complete;
* in ``tests/``, no module imports a test module (``tests/test_*.py``): what tests share lives in
  ``tests/helpers.py``, the other helper modules and ``tests/references/``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = "amct_caffe"
SRC = Path(__file__).resolve().parent.parent / "src" / ROOT
TESTS = Path(__file__).resolve().parent

#: Generated protobuf modules: not ours to lay out (they import only google.protobuf).
GENERATED_SUFFIX = "_pb2"

#: package -> the packages of ours it may import besides itself. "" is the top-level ``amct_caffe``
#: package (``__init__.py``); a plain module (``amct.py``, ``cli.py``...) is its own package.
BASE = {"errors", "log"}
BELOW_WORKFLOWS = {"common", "passes", "engine", "emulation", "analysis", "quant", "model", "proto"} | BASE
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "common": BASE,
    "log": {"errors"},
    "proto": set(),
    "model": {"proto"} | BASE,
    "quant": {"model", "proto"} | BASE,
    "engine": {"quant", "model", "proto"} | BASE,
    "emulation": {"engine", "quant", "model", "proto"} | BASE,
    "analysis": {"emulation", "engine", "quant", "model", "proto"} | BASE,
    "passes": {"quant", "model", "proto"} | BASE,
    "workflows": BELOW_WORKFLOWS,
    "caffe": {"workflows"} | BELOW_WORKFLOWS,
    "amct": {"workflows"} | BELOW_WORKFLOWS,
    "demo": {"", "amct", "caffe", "workflows"} | BELOW_WORKFLOWS,
    "cli": {"", "amct", "caffe", "demo", "workflows"} | BELOW_WORKFLOWS,
    "": {"amct"},
}


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: dict[str, int] = field(default_factory=dict)  # target module -> first line

    @property
    def package(self) -> str:
        """The package relative imports and ``__name__`` resolve against."""
        return self.name if self.is_package else self.name.rpartition(".")[0]

    @property
    def area(self) -> str:
        """The top-level package (or module) of ours it belongs to; "" for ``amct_caffe`` itself."""
        parts = self.name.split(".")
        return parts[1] if len(parts) > 1 else ""


def discover() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = [ROOT, *path.relative_to(SRC).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        name = ".".join(parts)
        if not name.endswith(GENERATED_SUFFIX):
            modules[name] = Module(name, path, is_package)
    return modules


def _ours(name: str) -> bool:
    return name == ROOT or name.startswith(ROOT + ".")


def _resolve_from(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_dynamic_import(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in {"import_module", "__import__"}


def _targets(module: Module, tree: ast.Module, known: set[str]) -> Iterator[tuple[str, int]]:
    constants = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, node)
            yield base, node.lineno
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    yield f"{base}.{alias.name}", node.lineno
        elif isinstance(node, ast.Call) and _is_dynamic_import(node) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                yield arg.value, node.lineno
                continue
            # A computed name: any module of ours this module names in a string, absolute or relative to
            # its package (``f"{__name__}.{name}"`` in a package's lazy ``__getattr__``).
            for text in constants:
                for candidate in (text, f"{module.package}.{text}"):
                    if candidate in known:
                        yield candidate, node.lineno


def import_graph() -> dict[str, Module]:
    modules = discover()
    known = set(modules)
    for module in modules.values():
        tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
        for target, line in _targets(module, tree, known):
            if not _ours(target) or target == module.name or target.endswith(GENERATED_SUFFIX):
                continue
            module.imports.setdefault(target, line)
    return modules


GRAPH = import_graph()


def _where(module: Module, target: str) -> str:
    return f"{module.path.relative_to(SRC.parent)}:{module.imports[target]} imports {target}"


def test_every_import_of_ours_resolves():
    unknown = [_where(m, t) for m in GRAPH.values() for t in m.imports if t not in GRAPH]
    assert not unknown, "imports of modules that do not exist:\n" + "\n".join(unknown)


def _cycles(graph: dict[str, Module]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        on_stack.add(name)
        for target in graph[name].imports:
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in on_stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == name:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return found


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    report = []
    for component in cycles:
        members = set(component)
        report.append(" <-> ".join(component))
        report += ["    " + _where(GRAPH[m], t) for m in component for t in GRAPH[m].imports if t in members]
    assert not cycles, "import cycles:\n" + "\n".join(report)


def test_cycle_finder_sees_a_cycle_through_a_function_level_import():
    """The check above is only as good as its parser: a cycle hidden in a function must be found."""
    a = Module("amct_caffe.a", SRC / "a.py", False, {"amct_caffe.b": 1})
    b = Module("amct_caffe.b", SRC / "b.py", False)
    tree = ast.parse("def f():\n    from amct_caffe import a\n")
    b.imports = dict(_targets(b, tree, {"amct_caffe.a", "amct_caffe.b"}))
    assert _cycles({"amct_caffe.a": a, "amct_caffe.b": b}) == [["amct_caffe.a", "amct_caffe.b"]]


@pytest.mark.parametrize("area", sorted(ALLOWED))
def test_package_direction(area: str):
    wrong = [
        _where(m, t) for m in GRAPH.values() if m.area == area for t in m.imports
        if t in GRAPH and GRAPH[t].area != area and GRAPH[t].area not in ALLOWED[area]
    ]
    assert not wrong, f"'{area or ROOT}' may import only {sorted(ALLOWED[area])}:\n" + "\n".join(wrong)


def test_every_area_has_a_rule():
    assert {m.area for m in GRAPH.values()} <= set(ALLOWED)


def test_python_layers_import_nothing_of_ours():
    module = GRAPH[f"{ROOT}.caffe.python_layers"]
    assert not module.imports, sorted(module.imports)


def test_layer_package_imports_every_family():
    package = f"{ROOT}.engine.layers"
    families = {name for name in GRAPH if name.startswith(package + ".")} - {
        f"{package}.base", f"{package}.registry"
    }
    assert families <= set(GRAPH[package].imports), sorted(families - set(GRAPH[package].imports))


# -- the tests' own modules ----------------------------------------------------------------------------------
def _test_module_name(path: Path) -> str:
    """The dotted name of a module under ``tests/`` (``tests.references.quant``)."""
    parts = path.relative_to(TESTS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_test_module(name: str) -> bool:
    """A ``test_*`` module of a package (``tests.test_x``, not a name ``test_x`` inside ``tests.helpers``),
    or a bare ``test_x`` as imported with ``tests/`` on the path."""
    *package, last = name.split(".")
    return last.startswith("test_") and (not package or TESTS.parent.joinpath(*package).is_dir())


def imported_test_modules(path: Path, tree: ast.Module) -> Iterator[tuple[str, int]]:
    """The test modules ``tree`` (the file ``path`` under ``tests/``) imports, with their lines."""
    module = Module(_test_module_name(path), path, path.name == "__init__.py")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, node)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and _is_dynamic_import(node) and node.args:
            arg = node.args[0]
            names = [arg.value] if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else []
        else:
            continue
        for name in names:
            if _is_test_module(name):
                yield name, node.lineno


def test_no_test_module_imports_a_test_module():
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found += [f"{path.relative_to(TESTS.parent)}:{line} imports {name}"
                  for name, line in imported_test_modules(path, tree)]
    assert not found, ("test modules import test modules (move what they share to tests/helpers.py or "
                       "tests/references/):\n" + "\n".join(found))


def test_test_import_finder_sees_every_form():
    """The check above is only as good as its parser: each way of importing a test module is found."""
    source = (
        "import tests.test_a\n"
        "from tests.test_b import x\n"
        "from tests import test_c, helpers\n"
        "from .test_d import y\n"
        "from . import test_e\n"
        "def f():\n"
        "    import test_f\n"
        "    importlib.import_module('tests.test_g')\n"
        "from tests.helpers import test_like_name_in_a_helper\n"
        "from tests.references import quant\n"
    )
    found = {name for name, _ in imported_test_modules(TESTS / "x.py", ast.parse(source))}
    assert {"tests.test_a", "tests.test_b", "tests.test_c", "tests.test_d", "tests.test_e", "test_f",
            "tests.test_g"} <= found
    assert not {n for n in found if "helpers" in n or "references" in n}, found
