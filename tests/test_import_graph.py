"""The package's import graph (every import, lazy ones included, read with `ast`): no cycle between personalive
modules, the export runtime does not import the exporter, and the pipelines reach `export/` only through
`pipelines.build`; the engine does not import the weights loader; io/ imports only io/ and the errors."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """personalive module -> the personalive modules it imports anywhere in its file."""
    files = {module_name(p): p for p in (SRC / "personalive").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: relative import"
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from package import module`
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (its modules in order, the first repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for dep in sorted(graph[node]):
            cycle = visit(dep)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    graph = import_graph()
    assert "personalive.pipelines.stream" in graph and graph["personalive.export.runtime"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_layers():
    graph = import_graph()
    assert not graph["personalive.export.runtime"] & {"personalive.export.onnx", "personalive.export.tensorrt"}
    assert not {m for m in graph["personalive.export.artifacts"] if m.startswith("personalive.export")}
    assert "personalive.weights" not in graph["personalive.pipelines.stream"]  # the engine does not import the loader
    for name, deps in graph.items():
        if name.startswith("personalive.io."):  # the bottom layer: files and codecs
            assert {m.split(".")[1] for m in deps} <= {"errors", "io"}, f"{name} imports {sorted(deps)}"
        if name.startswith("personalive.pipelines.") and name != "personalive.pipelines.build":
            assert not {m for m in deps if m.startswith("personalive.export")}, f"{name} imports export/"
