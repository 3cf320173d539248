"""The package's layering: no import cycle, and no minitree module imported inside a function."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minitree"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path) -> tuple[set[str], list[str]]:
    """(minitree modules imported at module level, those imported inside functions)."""
    known = modules()
    name, tree = module_name(path), ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top, local = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        else:
            continue
        found = [f for f in found if f.split(".")[0] == "minitree"]
        inside = any(isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)) for p in parents(tree, node))
        (local.extend if inside else top.update)(found)
    return top, local


def parents(tree, target):
    stack = [(tree, [])]
    while stack:
        node, chain = stack.pop()
        if node is target:
            return chain
        stack += [(child, chain + [node]) for child in ast.iter_child_nodes(node)]
    return []


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in set().union(*imports(path)) if m in known and m != name} for name, path in known.items()}


def test_no_import_cycle():
    """Counting imports made inside functions too: those hide a cycle, they do not break it."""
    edges, done, cycles = graph(), set(), []

    def visit(node, path):
        if node in path:
            cycles.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(edges[node]):
            visit(nxt, path + [node])
        done.add(node)

    for node in sorted(edges):
        visit(node, [])
    assert not cycles, f"import cycles: {cycles}"


def test_no_function_local_import_of_minitree():
    local = {name: imports(path)[1] for name, path in modules().items()}
    assert not {k: v for k, v in local.items() if v}


ROOT = PACKAGE.parent


def engine_assignments(source: str) -> list[str]:
    """`engine.x = ...` (or `+=`, or setattr) on anything whose name ends in "engine"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            targets = [ast.Attribute(value=node.args[0], attr="?")]
        for t in targets:
            for a in ast.walk(t):
                if isinstance(a, ast.Attribute) and ast.unparse(a.value).lower().endswith("engine"):
                    found.append(ast.unparse(a))
    return found


def test_nothing_outside_the_engine_assigns_its_attributes():
    """Engine settings are constructor arguments; its state changes through its methods only."""
    assert engine_assignments("engine.timed = True\ns.engine.tree += 1\nsetattr(engine, 'x', 1)") == \
        ["engine.timed", "s.engine.tree", "engine.?"]  # the check sees what it looks for
    files = [p for p in ROOT.rglob("*.py") if p != PACKAGE / "engine.py" and ".git" not in p.parts]
    found = {str(p.relative_to(ROOT)): f for p in files if (f := engine_assignments(p.read_text()))}
    assert not found


def test_importing_minitree_changes_no_torch_setting():
    """Dynamo's and Inductor's process-wide settings change only when a runner compiles."""
    import subprocess
    import sys
    code = ("import torch; before = (torch._dynamo.config.cache_size_limit, torch._inductor.config.size_asserts, "
            "torch._inductor.config.cpp.simdlen); import minitree; "
            "assert before == (torch._dynamo.config.cache_size_limit, torch._inductor.config.size_asserts, "
            "torch._inductor.config.cpp.simdlen)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
