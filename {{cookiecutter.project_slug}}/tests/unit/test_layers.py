"""The package's layers, read from its source: a lower layer never imports a higher one, and no
modules import each other in a circle. Every import counts: inside functions and under
TYPE_CHECKING too, since a lazy import is still a dependency."""

import ast
from pathlib import Path

import {{ cookiecutter.package_name }}

PACKAGE = {{ cookiecutter.package_name }}.__name__
ROOT = Path({{ cookiecutter.package_name }}.__file__).parent
# Low to high: a module may import its own layer and the layers before it. Top-level modules
# (settings, messages, errors, stats) are the base; `__main__` belongs with the commands.
LAYERS = ("base", "engine", "lifecycle", "serving", "bench", "cli")


def layer_of(module: str) -> str:
    parts = module.split(".")[1:]
    if parts and parts[0] in LAYERS:
        return parts[0]
    return "cli" if parts == ["__main__"] else "base"


def modules_of(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package under `root` (packages by __init__)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `module` imports, wherever the import statement is."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # `from pkg.cli import bench` imports the module bench
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in known else base)
    return {t for t in targets if t in known and t != module}


def graph_of(root: Path, package: str) -> dict[str, set[str]]:
    found = modules_of(root, package)
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    rank = {layer: n for n, layer in enumerate(LAYERS)}
    return [
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if rank[layer_of(target)] > rank[layer_of(module)]
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_layer_imports_a_higher_one():
    assert upward_imports(graph_of(ROOT, PACKAGE)) == []


def test_no_modules_import_each_other_in_a_circle():
    assert cycles(graph_of(ROOT, PACKAGE)) == []


def test_every_subpackage_is_a_known_layer():
    layers = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert layers <= set(LAYERS)


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "fake"
    for name, source in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(source)
    return root


def test_the_checks_catch_an_upward_import_and_a_circle(tmp_path):
    root = _fake_package(
        tmp_path,
        {
            "engine/__init__.py": "",
            "engine/a.py": "def f():\n    from fake.cli import main\n",
            "cli/__init__.py": "from fake.engine import a\n\ndef main(): ...\n",
            "settings.py": "from . import errors\n",
            "errors.py": "from fake.settings import x\n",
        },
    )
    graph = graph_of(root, "fake")
    assert upward_imports(graph) == ["fake.engine.a (engine) imports fake.cli (cli)"]
    assert cycles(graph) == [["fake.cli", "fake.engine.a"], ["fake.errors", "fake.settings"]]
