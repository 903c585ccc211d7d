"""The package's shape: no import cycles between modules, and packages import only from lower layers
(docs/ARCHITECTURE.md). Function-level imports count: a lazy import is still a dependency."""
import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron"

# Lower layers first; a package may import its own modules and any package of a lower layer.
LAYERS = [
    {"errors", "cli", "progress"},
    {"kernels", "tokenizer"},
    {"attention", "data"},
    {"config"},  # reads attention/impls.py, the kernels' capability table
    {"parallel", "hf_remote"},
    {"model"},
    {"checkpointing"},
    {"training", "inference", "convert", "launch"},
    {"evaluation"},
]
LAYER_OF = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def module_imports():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    edges = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("megatron")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
        edges[name] = {m for m in found if m in modules and m != name}
    return edges


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_package_has_a_layer():
    packages = {package_of(m) for m in module_imports()} - {"megatron"}
    assert packages <= set(LAYER_OF), f"add {sorted(packages - set(LAYER_OF))} to LAYERS"


def test_no_import_cycles():
    edges = module_imports()
    state, cycles = {}, []

    def visit(module, stack):
        state[module] = "open"
        stack.append(module)
        for dep in sorted(edges[module]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_packages_import_only_lower_layers():
    wrong = []
    for module, deps in module_imports().items():
        src = package_of(module)
        for dep in deps:
            dst = package_of(dep)
            if src != dst and src in LAYER_OF and LAYER_OF.get(dst, -1) >= LAYER_OF[src]:
                wrong.append(f"{module} imports {dep} (layer {LAYER_OF.get(dst)} >= {LAYER_OF[src]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_a_lower_layer_import_is_detected(tmp_path, monkeypatch):
    """The check itself can fail: a module of a low layer importing a higher one is reported."""
    pkg = tmp_path / "megatron"
    for sub in ("errors", "config"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "errors" / "bad.py").write_text("def f():\n    from megatron.config import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    try:
        test_packages_import_only_lower_layers()
    except AssertionError as err:
        assert "megatron.errors.bad imports megatron.config" in str(err)
    else:
        raise AssertionError("a layer violation went unreported")
