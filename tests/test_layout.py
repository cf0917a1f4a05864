"""The library's layout: no import cycles, packages that depend one way (DESIGN.md, "Modules").

Read from the source (every `import` of a stnjax module, function-level ones
included; `if TYPE_CHECKING:` blocks are hints, not imports), so a new
cycle fails here before it fails at import time.
"""

import ast
from pathlib import Path

STNJAX = Path(__file__).resolve().parents[1] / "stnjax"

# Lower layers never import higher ones; packages of one layer do not import
# each other. The core modules (checks, fileio, metrics) are layer 0.
LAYERS = {"core": 0, "data": 1, "models": 1, "phantom": 2, "train": 3, "infer": 3, "eval": 4}


def _module_name(path: Path) -> str:
    parts = path.relative_to(STNJAX.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST) -> list[str]:
    """Dotted stnjax modules (or module.attr) a file imports when it runs."""
    out = []

    def visit(node):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stnjax"):
            out.extend(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.extend(a.name for a in node.names if a.name.startswith("stnjax"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in STNJAX.rglob("*.py")}
    files.pop("stnjax")  # the package's own __init__ imports nothing
    graph = {}
    for name, path in files.items():
        deps = set()
        for target in _runtime_imports(ast.parse(path.read_text())):
            while target not in files and target != "stnjax":  # module.attr -> module
                target = target.rpartition(".")[0]
            if target != name and target != "stnjax":
                deps.add(target)
        graph[name] = deps
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or parts[1] in LAYERS else "core"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_packages_depend_one_way():
    bad = []
    for module, deps in _graph().items():
        src = _package(module)
        for dep in deps:
            dst = _package(dep)
            if dst != src and LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{module} ({src}) imports {dep} ({dst})")
    assert not bad, "\n".join(sorted(bad))


def test_every_module_has_a_layer():
    assert {_package(m) for m in _graph()} <= set(LAYERS)


def test_the_checker_sees_a_cycle(tmp_path):
    # The rule itself: a TYPE_CHECKING import is not a runtime import.
    tree = ast.parse("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from stnjax.a import X\n"
                     "def f():\n    from stnjax.b import Y\n")
    assert _runtime_imports(tree) == ["stnjax.b.Y"]


def test_the_library_never_imports_launchers_or_benchmarks():
    for path in STNJAX.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] not in ("launch", "bench", "tests"), path


CONFIG_NAMES = ("config", "cfg")


def _config_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, "name.attr") of every attribute read of a name `config`/`cfg`
    that is not a typed parameter (annotated with a class other than Any)
    of its function, outside the `from_config` methods (the conversion)."""
    out = []

    def visit(node, typed: set[str], in_from_config: bool):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            typed = {a.arg for a in args if a.annotation is not None
                     and ast.unparse(a.annotation) not in ("Any", "typing.Any")}
            in_from_config = node.name == "from_config"
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in CONFIG_NAMES and node.value.id not in typed
                and not in_from_config):
            out.append((node.lineno, f"{node.value.id}.{node.attr}"))
        for child in ast.iter_child_nodes(node):
            visit(child, typed, in_from_config)

    visit(tree, set(), False)
    return out


def test_the_config_is_read_at_the_top_only():
    """No library module imports ml_collections or reads an untyped config
    object (`config.x`): launchers make typed specs (`from_config`), and the
    library takes them."""
    found = []
    for path in STNJAX.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
                    a.name for a in node.names]
                found += [f"{path.name}: imports {n}" for n in names
                          if n.split(".")[0] == "ml_collections"]
        found += [f"{path.name}:{line} reads {what}" for line, what in _config_reads(tree)]
    assert not found, "\n".join(found)


def test_the_config_checker_sees_a_read():
    tree = ast.parse("def f(config):\n    return config.data\n"
                     "def g(config: Spec):\n    return config.data\n"
                     "class S:\n    def from_config(cls, config):\n        return config.x\n")
    assert _config_reads(tree) == [(2, "config.data")]


def test_no_function_over_80_lines():
    # DESIGN.md's rule for the library and the launchers (docstrings included).
    long = []
    for root in (STNJAX, STNJAX.parent / "launch"):
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > 80:
                        long.append(f"{path.relative_to(root.parent)}:{node.lineno} "
                                    f"{node.name} ({n} lines)")
    assert not long, "\n".join(long)


def test_launchers_import_each_other_relatively_and_every_package_is_installed():
    """launch/ is installed as `stnjax.launch` (pyproject.toml): inside it
    `from launch...` would fail once installed, so its modules import each
    other relatively and its config files through `stnjax.launch.configs`;
    and every package folder of the library is in pyproject's list."""
    import tomllib

    root = STNJAX.parent
    bad = []
    for path in (root / "launch").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            bad += [f"{path.relative_to(root)}: imports {n}" for n in names
                    if n.split(".")[0] == "launch"]
    assert not bad, "\n".join(bad)
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(root).parts) for p in STNJAX.rglob("__init__.py")}
    assert folders | {"stnjax.launch", "stnjax.launch.configs"} == set(setuptools["packages"])
    assert setuptools["package-dir"] == {"stnjax.launch": "launch"}
