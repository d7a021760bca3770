"""Imports point down the layers of DESIGN.md, and the inference side (medsim.runtime, medsim.deploy) never loads
torch or monai.

The layer order is written out here, lowest first. A module may import from its own layer and from lower ones;
every import counts, including the lazy ones inside functions (they run sooner or later).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "medsim"

#: lowest first; ``medsim`` is the package root (``__version__``). errors/files/threads are base utilities that
#: every layer may import; viz draws PNG/HTML with NumPy + PIL and is used by data (contact sheets) and deploy.
#: runtime sits right above data: the model layer reads its attention geometry, export and deploy run its runners.
LAYERS: list[set[str]] = [
    {"medsim", "errors", "files", "threads", "preprocessing"},
    {"viz"},
    {"data"},
    {"runtime"},
    {"nn"},
    {"losses", "ssl", "metrics"},
    {"engines"},
    {"export"},
    {"deploy"},
    {"cli"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
#: on top of the layer order: what the inference side must never reach, even where the order would allow it
FORBIDDEN = {
    "runtime": {"nn", "losses", "ssl", "engines", "export", "deploy"},
    "deploy": {"nn", "losses", "ssl", "engines", "export"},
}
HEAVY = ("torch", "monai")
#: (importing module, imported module) pairs allowed against the rules above, each with its reason; keep empty
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _nodes(tree: ast.AST, *, top_level: bool) -> list[ast.AST]:
    """All nodes, or (``top_level``) those that run at import time: not inside a function body."""
    if not top_level:
        return list(ast.walk(tree))
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        todo += [c for c in ast.iter_child_nodes(node)
                 if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    return out


def _imports(path: Path, *, top_level: bool = False) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names; relative imports resolved), with its line; ``top_level``:
    only the imports that run when the module is imported."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    for node in _nodes(ast.parse(path.read_text(encoding="utf-8"), str(path)), top_level=top_level):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((name, node.lineno))
            # `from medsim import runtime` imports the submodule medsim.runtime
            found += [(f"{name}.{a.name}", node.lineno) for a in node.names
                      if (PKG.parent / f"{name}.{a.name}".replace(".", "/")).with_suffix(".py").is_file()
                      or (PKG.parent / f"{name}.{a.name}".replace(".", "/")).is_dir()]
    return found


def _layer(module: str) -> str:
    """``medsim.deploy.engine`` → ``deploy``; ``medsim`` → ``medsim``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


GRAPH = {_module_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}
#: only the imports that run at import time (function bodies excluded)
LOAD_GRAPH = {_module_name(p): _imports(p, top_level=True) for p in sorted(PKG.rglob("*.py"))}


def _violations() -> list[str]:
    bad = []
    for mod, imported in GRAPH.items():
        src = _layer(mod)
        for name, line in imported:
            top = name.split(".")[0]
            if top in HEAVY and src in FORBIDDEN:
                bad.append(f"{mod}:{line} imports {name} ({src} must stay torch/monai-free)")
                continue
            if top != "medsim" or (mod, name) in KNOWN_EXCEPTIONS:
                continue
            dst = _layer(name)
            if dst not in RANK:
                bad.append(f"{mod}:{line} imports {name}: layer '{dst}' is not in LAYERS (add it in its place)")
            elif src not in RANK:
                bad.append(f"{mod}: layer '{src}' is not in LAYERS (add it in its place)")
            elif RANK[dst] > RANK[src] and RANK[dst] > 0:
                bad.append(f"{mod}:{line} imports {name}: '{src}' is below '{dst}' (imports point down only)")
            elif dst in FORBIDDEN.get(src, ()):
                bad.append(f"{mod}:{line} imports {name}: {src} must not import {dst}")
    return bad


def test_imports_point_down_the_layers():
    assert not _violations(), "\n".join(_violations())


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (strongly connected components with more than one module; Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_loops_in_runtime_export_and_deploy():
    """Lazy imports included: a loop (deploy had engine → preprocess → volume → tasks → engine) means two modules
    each need the other, i.e. one job split wrongly between them."""
    graph = {m: {n for n, _ in imps if n in GRAPH and n != m} for m, imps in GRAPH.items()}
    loops = [c for c in _cycles(graph) if any(_layer(m) in ("runtime", "export", "deploy") for m in c)]
    assert not loops, loops
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the finder finds


def test_every_package_has_a_layer():
    assert {_layer(m) for m in GRAPH} <= set(RANK)


def test_loading_the_inference_side_loads_no_torch_through_other_modules():
    """Transitively, for every runtime/deploy module (the subprocess test below imports a list of them): the
    modules loaded with it (imports outside function bodies, and the packages above each) import no torch/monai.
    Lazy imports in the lower layers' other functions (``medsim.threads.set_threads``, MONAI's ``DicomReader``)
    are allowed: the inference side never calls them, and its own modules may not import torch at all."""
    def closure(start: set[str]) -> set[str]:
        seen, todo = set(), list(start)
        while todo:
            m = todo.pop()
            if m in seen or m not in LOAD_GRAPH:
                continue
            seen.add(m)
            parts = m.split(".")
            todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b
            todo += [n for n, _ in LOAD_GRAPH[m] if n.startswith("medsim")]
        return seen

    for layer in ("runtime", "deploy"):
        reached = closure({m for m in LOAD_GRAPH if _layer(m) == layer})
        heavy = sorted(f"{m} → {n}" for m in reached for n, _ in LOAD_GRAPH[m] if n.split(".")[0] in HEAVY)
        assert not heavy, f"{layer} reaches torch/monai through: {heavy}"


def test_no_private_names_imported_across_modules():
    """``from medsim.x import _name`` couples two modules to an implementation detail: use public names."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medsim") and path.parent.name in (
                    "runtime", "deploy"):
                bad += [f"{_module_name(path)}:{node.lineno} imports {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and a.name != "__version__"]
    assert not bad, bad


def test_the_checker_sees_a_violation(tmp_path):
    """The rules bite: an upward, a forbidden and a heavy import are each reported."""
    GRAPH["medsim.runtime._probe"] = [("medsim.deploy.engine", 1), ("torch", 2)]
    GRAPH["medsim.nn._probe"] = [("medsim.engines.trainer", 3)]
    try:
        text = "\n".join(_violations())
    finally:
        del GRAPH["medsim.runtime._probe"], GRAPH["medsim.nn._probe"]
    assert "medsim.runtime._probe:1" in text and "medsim.runtime._probe:2" in text and "medsim.nn._probe:3" in text


@pytest.mark.parametrize("modules", [
    "medsim.runtime, medsim.runtime.runners, medsim.runtime.preprocess, medsim.runtime.volume, "
    "medsim.runtime.geometry, medsim.runtime.manifest",
    "medsim.deploy, medsim.deploy.engine, medsim.deploy.preprocess, medsim.deploy.volume, medsim.deploy.localizer, "
    "medsim.deploy.geometry, medsim.deploy.tasks, medsim.deploy.index",
])
def test_runtime_and_deploy_import_without_torch_or_monai(modules):
    code = (f"import sys\nimport {modules}\n"
            "from medsim.deploy import EmbeddingEngine, Localizer, CaseIndex, DeployError, preprocess_image\n"
            "from medsim.runtime import OrtRunner, TrtRunner, run_batched, load_manifest\n"
            "bad = [m for m in ('torch', 'monai') if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
