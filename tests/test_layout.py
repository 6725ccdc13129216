"""The package's import structure, read statically (ast; nothing is imported):

* no import circles among the modules of ``bespoke_fast`` (``kernels/`` included: it installs as
  ``bespoke_fast.kernels``), neither among the module-level imports nor when the imports inside
  functions (deferred on purpose, e.g. the optional triton kernels) count too: a deferred import
  that runs back up is a circle all the same;
* no module imports another module's private names (``from .x import _name``), at any level.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "bespoke_fast"
KERNELS = REPO / "kernels" / "bespoke_fast_kernels"   # installed as bespoke_fast.kernels

# Private names still imported across modules, each with the reason and the pass that removes
# it. Keep this list short and true: the test fails on anything not listed AND on an entry that
# no longer occurs.
KNOWN_PRIVATE_IMPORTS: set = set()


def package_modules() -> dict:
    """Module name -> source path, for every module of the package and of its kernels."""
    roots = {PACKAGE: REPO / PACKAGE, f"{PACKAGE}.kernels": KERNELS}
    modules = {}
    for prefix, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


def _is_package(name, modules) -> bool:
    return modules[name].name == "__init__.py"


def imports_of(name: str, modules: dict, module_level_only: bool):
    """``(imported module, imported names)`` of each import statement in ``name``: relative
    imports resolved; ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a
    module. With ``module_level_only`` the imports inside functions are skipped (not those
    inside ``try`` / ``if`` at module level)."""
    tree = ast.parse(modules[name].read_text(encoding="utf-8"), str(modules[name]))
    here = name if _is_package(name, modules) else name.rpartition(".")[0]

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            deferred = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                         ast.Lambda))
            if isinstance(child, ast.Import) and not (module_level_only and in_function):
                for alias in child.names:
                    yield alias.name, []
            elif isinstance(child, ast.ImportFrom) and not (module_level_only and in_function):
                base = child.module or ""
                if child.level:
                    anchor = here.split(".")
                    anchor = anchor[:len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [a.name for a in child.names]
                subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
                yield from ((s, []) for s in subs)
                rest = [n for n in names if f"{base}.{n}" not in modules]
                if rest or not subs:
                    yield base, rest
            yield from visit(child, deferred)

    yield from visit(tree, False)


def import_graph(modules: dict, module_level_only: bool = True) -> dict:
    """Module -> the package modules it imports (at module level only, or anywhere)."""
    graph = {}
    for name in modules:
        graph[name] = sorted({m for m, _ in imports_of(name, modules, module_level_only)
                              if m in modules and m != name})
    return graph


def find_cycle(graph: dict):
    """One cycle as a list of modules (first == last), or ``None``."""
    state, stack = {}, []

    def dfs(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_scan_sees_the_package():
    modules = package_modules()
    assert {"bespoke_fast.solvers.base", "bespoke_fast.solvers.files", "bespoke_fast.engine.sampler",
            "bespoke_fast.ops.rk", "bespoke_fast.kernels.bespoke_rk"} <= set(modules)
    graph = import_graph(modules)
    # relative, absolute and "from package import submodule" imports are all edges
    assert "bespoke_fast.solvers.registry" in graph["bespoke_fast.solvers.files"]
    assert "bespoke_fast.ops.table" in graph["bespoke_fast.kernels.bespoke_rk"]
    assert "bespoke_fast.ops.table" in graph["bespoke_fast.engine.bns"]
    # imports inside functions are edges of the full graph only (ops/backend.py imports the
    # triton kernels on use)
    deferred = {m for m in import_graph(modules, module_level_only=False)["bespoke_fast.ops.backend"]
                if m.startswith("bespoke_fast.kernels")}
    assert deferred and not deferred & set(graph["bespoke_fast.ops.backend"])


def test_find_cycle_finds_one():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a"]}) is None


@pytest.mark.parametrize("module_level_only", [True, False], ids=["module-level", "all-imports"])
def test_no_import_cycles(module_level_only):
    cycle = find_cycle(import_graph(package_modules(), module_level_only))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_another_modules_private_names():
    modules = package_modules()
    found = set()
    for name in modules:
        for target, names in imports_of(name, modules, module_level_only=False):
            if target.startswith(PACKAGE) and target != name:
                found |= {(name, target, n) for n in names
                          if n.startswith("_") and not n.startswith("__")}
    new = sorted(found - KNOWN_PRIVATE_IMPORTS)
    assert not new, "private names imported across modules: " + "; ".join(
        f"{m} imports {n} from {t}" for m, t, n in new)
    gone = sorted(KNOWN_PRIVATE_IMPORTS - found)
    assert not gone, f"no longer imported, remove from KNOWN_PRIVATE_IMPORTS: {gone}"


def test_readme_layout_names_every_module_and_only_existing_ones():
    import re
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```")[1]
    named = set(re.findall(r"([\w]+\.py)\b", block))
    files = {p.name for d in (REPO / PACKAGE, KERNELS) for p in d.rglob("*.py")
             if "weights" not in p.parts} | {p.name for d in (REPO, REPO / "bench")
                                             for p in d.glob("*.py")}
    assert named <= files, f"README layout names files that do not exist: {sorted(named - files)}"
    modules = {p.name for d in (REPO / PACKAGE, KERNELS) for p in d.rglob("*.py")
               if p.name != "__init__.py" and p.parent.name != "zoo"}   # zoo/: one entry
    assert modules <= named, f"README layout misses: {sorted(modules - named)}"
    for folder in ("solvers/", "ops/", "engine/", "fitting/", "integrations/", "zoo/", "kernels/"):
        assert folder in block, folder
    assert "bespoke_fast.kernels" in block


# built-in exceptions a user-reachable module may still raise, with why (everything else raises
# the typed errors of bespoke_fast._checks, which subclass the same built-ins: one line in the
# CLI, and ``except ValueError`` code keeps working)
BARE_RAISE_ALLOWED = {
    ("bespoke_fast/fitting/stopping.py", "KeyError"): "Selection's mapping protocol",
    ("bespoke_fast/models.py", "KeyError"): "a missing extra, as a dict lookup would",
    ("bespoke_fast/integrations/diffusers.py", "IndexError"): "diffusers' scheduler protocol",
    ("bespoke_fast/io.py", "ValueError"): "caught inside io.py, never reaches a user",
}
BUILTIN_ERRORS = {"ValueError", "TypeError", "RuntimeError", "KeyError", "IndexError",
                  "FileNotFoundError", "OSError", "Exception", "AssertionError"}


def bare_raises(root: Path) -> list:
    """``(file, exception, line)`` of every ``raise Builtin(...)`` / ``raise Builtin`` below
    ``root`` (an AST scan)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id in BUILTIN_ERRORS:
                found.append((path.relative_to(root.parent).as_posix(), exc.id, node.lineno))
    return sorted(found, key=lambda f: (f[0], f[2]))


def test_the_bare_raise_scan_finds_one(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text("def f(x):\n    if x:\n        raise ValueError('bad x')\n"
                              "    raise RuntimeError\n")
    assert bare_raises(pkg) == [("pkg/m.py", "ValueError", 3), ("pkg/m.py", "RuntimeError", 4)]


def test_user_reachable_modules_raise_typed_errors():
    root = Path(__file__).resolve().parents[1] / "bespoke_fast"
    found = bare_raises(root)
    assert found, "the scan saw no raise at all: is the path right?"
    bad = [f"{file}:{line} raises {name}" for file, name, line in found
           if (file, name) not in BARE_RAISE_ALLOWED]
    assert not bad, "raise the typed errors of bespoke_fast._checks instead:\n" + "\n".join(bad)
    used = {(file, name) for file, name, _ in found}
    assert set(BARE_RAISE_ALLOWED) <= used, "stale allow-list entries: " + str(
        set(BARE_RAISE_ALLOWED) - used)


def test_the_fit_job_and_the_cli_name_no_solver_kind():
    """The solver kind is the one seam: the fit job and the CLI ask the kind's trainer
    (``fitting.trainer_for``) instead of testing for a kind's name."""
    from bespoke_fast.solvers.registry import kinds
    names = set(kinds())
    cli = sorted(str(f.relative_to(REPO)) for f in (REPO / "bespoke_fast" / "cli").glob("*.py"))
    assert len(cli) >= 8, cli       # the package's modules: __init__, __main__, common, commands
    for rel in ("bespoke_fast/fitting/job.py", *cli):
        tree = ast.parse((REPO / rel).read_text())
        hits = [node.lineno for node in ast.walk(tree)
                if isinstance(node, ast.Constant) and node.value in names]
        assert not hits, f"{rel} names a solver kind at lines {hits}"
