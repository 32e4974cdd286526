"""The package's imports go one way (README, "Code layout"): base ← data, ops ← models ← engine ← engine.inference
← engine.training ← engine.studies, and no two modules import each other, directly or around a circle (imports
inside functions included). Read from the source with ``ast``, so a lazy import cannot hide a layer violation."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sparse_detr"

# Prefix → rank; a module may import modules of its own rank or lower. The longest matching prefix decides.
RANKS = {
    "sparse_detr": 0,  # errors, progress, box_ops, config
    "sparse_detr.data": 1,
    "sparse_detr.ops": 1,
    "sparse_detr.models": 2,
    "sparse_detr.engine": 3,  # the shared runtime: checkpoints, atomic writes, dist, logging, cli, timing
    "sparse_detr.engine.inference": 4,
    "sparse_detr.engine.training": 5,
    "sparse_detr.engine.studies": 6,
}
SEPARATE = {("sparse_detr.data", "sparse_detr.ops"), ("sparse_detr.ops", "sparse_detr.data")}  # same rank, unrelated


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _group(name: str) -> str:
    return max((p for p in RANKS if name == p or name.startswith(p + ".")), key=len)


def _imports(path: Path, name: str) -> set[str]:
    """Every sparse_detr module ``path`` imports (absolute or relative, at any depth of the file)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p, _module_name(p)) for p in PACKAGE.rglob("*.py")}


def test_imports_go_one_way():
    graph = _graph()
    assert "sparse_detr.engine.training.train" in graph and "sparse_detr.models.detector" in graph  # the scan works
    wrong = []
    for module, imported in graph.items():
        if module == "sparse_detr":  # the package's public facade (Predictor, build_model) re-exports from above
            continue
        for other in imported:
            a, b = _group(module), _group(other)
            if RANKS[b] > RANKS[a] or (a, b) in SEPARATE:
                wrong.append(f"{module} imports {other}")
    assert wrong == [], "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + ".") or node == "sparse_detr":  # a package's __init__ re-exporting its modules
                continue
            if state.get(nxt) == 1:
                cycles.append(" → ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} → {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)
