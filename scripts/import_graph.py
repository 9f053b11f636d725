"""Print the import graph of the project's own packages and check its two rules.

Reads the sources (it imports nothing), so it runs on any tree, broken or not:

    python scripts/import_graph.py [--edges] [ROOT]

Every ``import``/``from ... import`` of a project module (at module level or inside a function,
with relative imports resolved) is an edge ``importer -> imported``; ``importlib.import_module``
and ``find_spec`` calls with a literal module name count too (dynamic imports). It reports

- cycles: strongly connected components of more than one module (module-level imports only:
  an import inside a function does not run at import time, so it cannot deadlock, but it still
  ties the two modules together; ``--all-cycles`` counts those edges as well);
- upward imports: a core module (``qalora``) importing orchestration (``qalora_pipeline`` or the
  top-level ``tasks``/``flows`` of older layouts).

Exit status 1 when either is found.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

CORE = ("qalora",)
ORCHESTRATION = ("qalora_pipeline", "tasks", "flows")
DYNAMIC = {"import_module", "find_spec", "__import__"}


def _modules(root: Path) -> dict[str, Path]:
    """module name -> file, for every .py under the project's package folders."""
    out: dict[str, Path] = {}
    for top in (*CORE, *ORCHESTRATION):
        base = root / top
        if not base.is_dir():
            continue
        for f in sorted(base.rglob("*.py")):
            if "__pycache__" in f.parts:
                continue
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or is inside (``a.b.func`` -> ``a.b``)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _edges(mod: str, path: Path, known: dict[str, Path]) -> set[tuple[str, str, str]]:
    """(importer, imported, kind) with kind 'top' (module level), 'local' (in a function) or 'dynamic'."""
    tree = ast.parse(path.read_text(), str(path))
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    edges: set[tuple[str, str, str]] = set()

    def add(target: str | None, kind: str) -> None:
        if target and target != mod:
            edges.add((mod, target, kind))

    def visit(node: ast.AST, in_function: bool) -> None:
        kind = "local" if in_function else "top"
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_resolve(alias.name, known), kind)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                add(_resolve(f"{base}.{alias.name}", known) or _resolve(base, known), kind)
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if name in DYNAMIC:
                for arg in node.args[:1]:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        add(_resolve(arg.value, known), "dynamic")
                    elif isinstance(arg, ast.Name):  # a loop over literal names: report what the loop names
                        for lit in ast.walk(tree):
                            if isinstance(lit, ast.Constant) and isinstance(lit.value, str) and lit.value in known:
                                add(lit.value, "dynamic")
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return edges


def _cycles(nodes: list[str], adj: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(adj.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in nodes:
        if v not in index:
            strong(v)
    return out


def _layer(mod: str) -> str:
    return "core" if mod.split(".")[0] in CORE else "orchestration"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--edges", action="store_true", help="print every edge")
    ap.add_argument("--all-cycles", action="store_true", help="count imports inside functions for cycles too")
    args = ap.parse_args(argv)
    known = _modules(args.root)
    edges = sorted(set().union(*(_edges(m, p, known) for m, p in known.items())))
    if args.edges:
        for a, b, kind in edges:
            print(f"{a} -> {b}" + ("" if kind == "top" else f"  [{kind}]"))
    cycle_kinds = {"top", "local", "dynamic"} if args.all_cycles else {"top"}
    adj: dict[str, set[str]] = {}
    for a, b, kind in edges:
        if kind in cycle_kinds:
            adj.setdefault(a, set()).add(b)
    cycles = _cycles(sorted(known), adj)
    upward = [(a, b, k) for a, b, k in edges if _layer(a) == "core" and _layer(b) == "orchestration"]
    n_core = sum(_layer(m) == "core" for m in known)
    print(f"{len(known)} modules ({n_core} core, {len(known) - n_core} orchestration), {len(edges)} edges")
    print(f"cycles ({'all imports' if args.all_cycles else 'module-level imports'}): {len(cycles)}")
    for c in cycles:
        print("  " + " <-> ".join(c))
    print(f"upward imports (core -> orchestration): {len(upward)}")
    for a, b, kind in upward:
        print(f"  {a} -> {b}  [{kind}]")
    return 1 if cycles or upward else 0


if __name__ == "__main__":
    sys.exit(main())
