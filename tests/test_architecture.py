"""The house rules of the package layout (DESIGN.md section 2), checked on the source.

Data flows one way: text -> IR -> layers -> training -> compression / export -> CLI.
Each stage is a package; a module imports only from its own stage or a stage below
it, at any depth (imports inside functions count), and no modules import each
other round a loop.  The framework-free core imports no TensorFlow, Keras or JAX.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "keras_decomp"

# stage of each top-level part of the package, lowest first
STAGES = {"errors": 0, "operators": 1, "language": 2, "fitting": 3, "layers": 4, "training": 5,
          "compression": 6, "export": 7, "cli": 8}
FACADE = "keras_decomp"  # the package's __init__: the public API, may import any stage
CORE = ("keras_decomp.operators", "keras_decomp.language", "keras_decomp.fitting")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    assert len(found) > 40, "the package walk found too few modules"
    return found


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """Every keras_decomp module that ``path`` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import a.b.c`` of a non-module attribute
                target = target.rpartition(".")[0]
            if target.startswith(FACADE) and target != name:
                found.add(target)
    return found


def stage(name: str) -> int | None:
    parts = name.split(".")
    return STAGES.get(parts[1]) if len(parts) > 1 else None


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_the_graph_sees_imports_inside_functions(graph):
    # guards the walker itself: cli.main imports the training stage inside its command functions only
    assert "keras_decomp.training.staging" in graph["keras_decomp.cli.main"]
    assert "keras_decomp.operators.structures.registry" in graph["keras_decomp.language.lower"]


def test_every_module_belongs_to_a_stage(graph):
    loose = [name for name in graph if name != FACADE and stage(name) is None
             and name.split(".")[1] not in ("grammar", "datasets")]
    assert loose == []


def upward_imports(graph) -> list[str]:
    return [f"{source} (stage {stage(source)}) imports {target} (stage {stage(target)})"
            for source, targets in graph.items() if source != FACADE
            for target in targets if target == FACADE or stage(target) > stage(source)]


def circles(graph) -> list[list[str]]:
    """Strongly connected components of two or more modules (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_imports_run_to_the_same_stage_or_below(graph):
    assert upward_imports(graph) == []


def test_no_import_circles(graph):
    assert circles(graph) == []


def test_the_checks_find_planted_faults(graph):
    # an upward import: the IR reaching into the language
    planted = {**graph, "keras_decomp.operators.ir": graph["keras_decomp.operators.ir"] | {"keras_decomp.language.lower"}}
    assert upward_imports(planted) == ["keras_decomp.operators.ir (stage 1) imports keras_decomp.language.lower (stage 2)"]
    # lower -> registry -> ir, and now ir -> lower: one circle of (at least) those three
    (loop,) = circles(planted)
    assert {"keras_decomp.operators.ir", "keras_decomp.language.lower",
            "keras_decomp.operators.structures.registry"} <= set(loop)
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_modules_stay_short():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_core_loads_no_framework():
    code = ("import sys\n"
            "import keras_decomp, keras_decomp.operators, keras_decomp.language, keras_decomp.fitting\n"
            "import keras_decomp.fitting.approximate, keras_decomp.export\n"
            "keras_decomp.approximate(__import__('numpy').eye(6), 'sss(p=2, d=2) + lowrank(r=1)')\n"
            "print(sorted(m for m in ('tensorflow', 'keras', 'jax') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_core_modules_do_not_name_a_framework():
    frameworks = ("tensorflow", "keras", "jax")
    named = []
    for package in CORE:
        for path in (PACKAGE.parent / package.replace(".", "/")).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                named += [f"{module_name(path)}: {n}" for n in names if n.split(".")[0] in frameworks]
    assert named == []
