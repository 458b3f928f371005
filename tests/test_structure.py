"""The project's shape, held by tests: no import circle among its modules at any depth, and the
layers import downwards only (``model/`` is what a worker and the batch job load, so it imports none
of the others; the worker code imports neither training nor the batch job)."""

from __future__ import annotations

from pathlib import Path

from tests.imports import PACKAGES, import_edges, module_files

# package -> the other packages it may import
ALLOWED = {
    "model": set(),
    "handlers": {"model"},
    "batch": {"model"},
    "train": {"model", "batch"},
    "serving": {"model", "handlers", "batch"},
}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    assert cycles(import_edges(module_files())) == []


def test_layers_import_downwards_only() -> None:
    edges = import_edges(module_files())
    wrong = sorted(
        f"{a} -> {b}"
        for a, targets in edges.items()
        for b in targets
        if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in ALLOWED[a.split(".")[0]]
    )
    assert wrong == []


def test_the_checks_see_a_circle_and_a_wrong_arrow(tmp_path: Path) -> None:
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
    (tmp_path / "model" / "a.py").write_text("from train.b import x\n")
    (tmp_path / "train" / "b.py").write_text("def f():\n    import model.a\n")
    edges = import_edges(module_files(tmp_path))
    assert cycles(edges) == [["model.a", "train.b"]]
    assert "train.b" in edges["model.a"]
