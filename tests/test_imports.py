"""The package's import structure: every module imports on its own, the import graph between tomec's
modules has no cycle, the library never imports the benchmark scripts (``bench/``, ``tomec.bench``),
and the graph passes and the op layer name no merging method.

The modules are found, not listed: ``tomec``'s own folder and every folder the distribution maps
into it (``pyproject.toml``'s ``package-dir``: ``kernels/``, ``passes/``, ``bench/``), walked with
``pkgutil``, subpackages included (``tomec.ops`` and whatever others appear)."""

from __future__ import annotations

import ast
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional


import tomec

ROOT = Path(__file__).resolve().parents[1]
BENCH = "tomec.bench"
# The merging methods by name (the registry's names are added: a new method is covered too).
METHOD_NAMES = frozenset({"tome", "tofu", "pitome", "dct", "diffrate", "mctf", "ltmp", "atc", "fpet", "dtem",
                          "crossget"})


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    in_function: bool

    def __str__(self) -> str:
        where = "a function-level import" if self.in_function else "import"
        return f"{self.source} -> {self.target} ({where}, line {self.line})"


def _package_dir(text: str) -> dict[str, str]:
    """``[tool.setuptools.package-dir]`` of a pyproject.toml (tomllib from Python 3.11; before it,
    the section's ``"package" = "folder"`` lines)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        section = re.search(r"^\[tool\.setuptools\.package-dir\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
        return dict(re.findall(r'^"([^"]+)"\s*=\s*"([^"]+)"', section.group(1), re.M)) if section else {}
    return tomllib.loads(text).get("tool", {}).get("setuptools", {}).get("package-dir", {})


@lru_cache(maxsize=None)
def package_folders() -> tuple[tuple[str, Path], ...]:
    """``(package, folder)`` of tomec and of each package the distribution maps from a folder of its
    own (from a checkout, ``pyproject.toml`` says which; an installed tomec has them all inside)."""
    folders = {"tomec": Path(tomec.__file__).resolve().parent}
    pyproject = ROOT / "pyproject.toml"
    if pyproject.is_file():
        for package, folder in _package_dir(pyproject.read_text()).items():
            if package.startswith("tomec.") and (ROOT / folder / "__init__.py").is_file():
                folders[package] = (ROOT / folder).resolve()
    return tuple(sorted(folders.items()))


@lru_cache(maxsize=None)
def modules() -> tuple[Module, ...]:
    """Every module of the package: the packages above and everything ``pkgutil.walk_packages``
    finds under their folders (each walked on its own folder: ``tomec.__path__`` also holds the
    checkout's root when tomec runs from one, and walking that would find tomec inside itself)."""
    found: dict[str, Module] = {}
    errors: list[str] = []
    for package, folder in package_folders():
        found[package] = Module(package, folder / "__init__.py", True)
        for info in pkgutil.walk_packages([str(folder)], prefix=package + ".", onerror=errors.append):
            if info.name in found or info.name.rsplit(".", 1)[-1] == "__main__":
                continue
            base = Path(info.module_finder.path) / info.name.rsplit(".", 1)[-1]
            path = base / "__init__.py" if info.ispkg else base.with_suffix(".py")
            if path.is_file():  # not a compiled extension
                found[info.name] = Module(info.name, path, info.ispkg)
    assert not errors, f"packages that did not import while walking: {errors}"
    return tuple(sorted(found.values(), key=lambda m: m.name))


def test_the_walk_finds_the_package():
    names = {m.name for m in modules()}
    assert {"tomec", "tomec.cli", "tomec.ops", "tomec.ops.merge", "tomec.kernels", "tomec.passes",
            "tomec.bench", "tomec.bench.throughput"} <= names
    assert not any(".tomec." in n or n.startswith("tomec.tests") for n in names)  # the checkout's root: not walked


# --- (a) every module imports alone ------------------------------------------------------------

# Each module in a fresh process forked from one that has imported torch and the other third-party
# libraries most modules need, and nothing of tomec: those take seconds to import (triton alone ~2 s
# per kernel module), which forking pays once, and a fork can register tomec's torch.library ops
# again, which a re-import in one process cannot. As many forks at a time as there are cores.
_PRELOADED = ("torch", "torch.fx", "torch._dynamo", "numpy", "tqdm", "triton")
_IMPORT_EACH = r"""
import importlib, json, os, sys, traceback
names, out, workers, preloaded = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
for library in preloaded:
    try:
        importlib.import_module(library)
    except ImportError:  # optional here (triton on a machine without it): the module's own import says
        pass
assert not any(n == "tomec" or n.startswith("tomec.") for n in sys.modules), "a library imported tomec"
running, failed = {}, {}

def reap():
    pid, status = os.wait()
    name = running.pop(pid)
    code = os.waitstatus_to_exitcode(status)
    if code:
        path = os.path.join(out, name + ".txt")
        failed[name] = open(path).read() if os.path.exists(path) else f"exit status {code}"

for name in names:
    while len(running) >= workers:
        reap()
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            importlib.import_module(name)
        except BaseException:
            with open(os.path.join(out, name + ".txt"), "w") as f:
                f.write(traceback.format_exc())
            code = 1
        os._exit(code)  # no atexit handlers, no flushing of what the parent had buffered
    running[pid] = name
while running:
    reap()
print(json.dumps(failed))
"""


def test_every_module_imports_alone(tmp_path):
    names = [m.name for m in modules()]
    workers = str(min(4, os.cpu_count() or 1))
    preloaded = ",".join(_PRELOADED)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The working directory: not the checkout's root, where bench/, kernels/ and tests/ would be
    # importable under their folder names.
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(names), str(tmp_path), workers, preloaded],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failed, "modules that do not import on their own:\n" + "\n".join(
        f"--- {name}\n{text.strip().splitlines()[-1]}\n{text[-1500:]}" for name, text in failed.items())


# --- the static import graph ---------------------------------------------------------------------

def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _folder_aliases() -> dict[str, str]:
    """A mapped folder's own name -> its package (``bench`` -> ``tomec.bench``): a script run from
    the checkout's root (``python -m bench.x``) may import its siblings so."""
    return {folder.name: package for package, folder in package_folders() if package != "tomec"}


def _absolute(name: str) -> str:
    first, _, rest = name.partition(".")
    package = _folder_aliases().get(first)
    return name if package is None else package + ("." + rest if rest else "")


def _known(name: str, names: frozenset[str]) -> Optional[str]:
    """The longest prefix of ``name`` that is a module of the package (None: not tomec's)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in names:
            return candidate
    return None


def imports_of(module: Module, names: frozenset[str]) -> list[Edge]:
    """The tomec modules ``module`` imports, at module level and inside functions (relative imports
    resolved; ``if TYPE_CHECKING:`` blocks and a package's lazy ``__getattr__`` left out: they do
    not import when the module does)."""
    tree = ast.parse(module.path.read_text(), str(module.path))
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    edges: list[Edge] = []

    def add(target: Optional[str], node: ast.stmt, in_function: bool) -> None:
        edge = Edge(module.name, target or "", node.lineno, in_function)
        if target is not None and target != module.name and edge not in edges:
            edges.append(edge)

    def visit(nodes: list[ast.stmt], in_function: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(_known(_absolute(alias.name), names), node, in_function)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
                else:
                    base = _absolute(node.module or "")
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    add(submodule if submodule in names else _known(base, names), node, in_function)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse, in_function)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if module.is_package and not in_function and node.name == "__getattr__":
                    continue  # a lazy re-export of submodules, imported on first attribute access
                visit(node.body, True)
            else:
                for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                    children = getattr(node, field, None)
                    if isinstance(children, list):
                        visit([c for c in children if isinstance(c, ast.AST)], in_function)

    visit(tree.body, False)
    return edges


@lru_cache(maxsize=None)
def import_graph() -> dict[str, tuple[Edge, ...]]:
    names = frozenset(m.name for m in modules())
    return {m.name: tuple(imports_of(m, names)) for m in modules()}


def _cycles(graph: dict[str, tuple[Edge, ...]]) -> list[list[Edge]]:
    """One cycle through each strongly connected component of more than one module (Tarjan's
    algorithm, iterative), as the edges that make it: the shortest one back to the component's first
    module by name. (Every module of a component is on some cycle: :func:`_components` lists them.)"""
    return [cycle for _, cycle in _components(graph)]


def _components(graph: dict[str, tuple[Edge, ...]]) -> list[tuple[set[str], list[Edge]]]:
    """Each strongly connected component of more than one module, with one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work: list[tuple[str, Iterator[Edge]]] = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for edge in edges:
                if edge.target not in graph:
                    continue
                if edge.target not in index:
                    index[edge.target] = low[edge.target] = counter
                    counter += 1
                    stack.append(edge.target)
                    on_stack.add(edge.target)
                    work.append((edge.target, iter(graph[edge.target])))
                    break
                if edge.target in on_stack:
                    low[node] = min(low[node], index[edge.target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
    cycles = []
    for component in components:
        start = min(component)
        # The shortest way back to start inside the component (breadth first).
        previous: dict[str, Edge] = {}
        frontier = [start]
        found: Optional[Edge] = None
        while frontier and found is None:
            following = []
            for node in frontier:
                for edge in graph[node]:
                    if edge.target == start:
                        found = edge
                        break
                    if edge.target in component and edge.target not in previous and edge.target != start:
                        previous[edge.target] = edge
                        following.append(edge.target)
                if found is not None:
                    break
            frontier = following
        path = [found]
        while path[0].source != start:
            path.insert(0, previous[path[0].source])
        cycles.append((component, path))
    return sorted(cycles, key=lambda c: c[1][0].source)


def test_the_cycle_finder_reports_a_cycle():
    a_b = Edge("a", "b", 1, False)
    b_c = Edge("b", "c", 2, True)
    c_a = Edge("c", "a", 3, False)
    graph = {"a": (a_b,), "b": (b_c,), "c": (c_a, Edge("c", "d", 4, False)), "d": ()}
    assert _cycles(graph) == [[a_b, b_c, c_a]]
    assert _cycles({"a": (a_b,), "b": (), "c": (c_a,)}) == []


def test_the_import_graph_sees_relative_and_function_level_imports():
    names = frozenset(m.name for m in modules())
    by_name = {m.name: m for m in modules()}
    cli = {(e.target, e.in_function) for e in imports_of(by_name["tomec.cli"], names)}
    assert ("tomec.cli_args", False) in cli and ("tomec.vis", False) in cli
    init = {e.target for e in imports_of(by_name["tomec"], names)}
    assert "tomec.api" in init and "tomec.bench" not in init  # the lazy __getattr__ is no edge


def test_the_import_graph_has_no_cycle():
    """Function-level imports count: a cycle that only a function-level import keeps from failing at
    import time is still a cycle between the modules."""
    graph = import_graph()
    components = _components(graph)
    report = []
    for members, cycle in components:
        inside = [e for m in sorted(members) for e in graph[m] if e.target in members]
        report.append(f"  {len(members)} modules on cycles: {', '.join(sorted(members))}\n"
                      f"    e.g. {' ; '.join(map(str, cycle))}\n"
                      f"    the imports among them: " + "; ".join(map(str, inside)))
    assert not components, f"{len(components)} group(s) of modules that import each other:\n" + "\n".join(report)


def _module_strings(module: Module) -> list[tuple[int, str]]:
    """Literal module names given to ``importlib.import_module`` / ``__import__``."""
    tree = ast.parse(module.path.read_text(), str(module.path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__"):
                out.append((node.lineno, node.args[0].value))
    return out


def test_the_library_never_imports_the_benchmarks():
    """No module outside ``tomec.bench`` imports it (so nothing the library imports does either)."""
    def is_bench(name: str) -> bool:
        return name == BENCH or name.startswith(BENCH + ".")

    bad = [str(e) for name, edges in import_graph().items() if not is_bench(name) for e in edges
           if is_bench(e.target)]
    for module in modules():
        if not is_bench(module.name):
            bad += [f"{module.name}: import_module({text!r}), line {line}" for line, text in _module_strings(module)
                    if is_bench(_absolute(text))]
    assert not bad, "the library imports the benchmark scripts:\n" + "\n".join(bad)


# --- (d) the passes and the op layer are method-agnostic ----------------------------------------

def _code_names(path: Path, skip_imports: bool) -> Iterator[tuple[int, str]]:
    """``(line, name)`` of every name token of the code: comments and strings (docstrings
    included) dropped; with ``skip_imports``, the module-level import statements too."""
    source = path.read_text()
    skipped: set[int] = set()
    if skip_imports:
        for node in ast.parse(source).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                skipped.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.start[0] not in skipped:
            yield token.start[0], token.string


_WORDS = re.compile(r"[A-Za-z]+")  # an identifier's words: tome_match names tome, TofuMerge tofu


def _method_words(name: str, methods: frozenset[str]) -> list[str]:
    words = [w.lower() for w in _WORDS.findall(name)]
    # camelCase splits too (PiToMe keeps its own spelling: the whole word also counts).
    words += [w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])", name)]
    return sorted({w for w in words if w in methods})


def test_method_word_splitting():
    methods = METHOD_NAMES
    assert _method_words("tome_match", methods) == ["tome"]
    assert _method_words("tomec", methods) == [] and _method_words("atcab", methods) == []
    assert _method_words("ops_ltmp", methods) == ["ltmp"] and _method_words("merge", methods) == []


def test_passes_and_ops_name_no_method():
    """``passes/`` and ``tomec/ops/`` hold what every method shares: no code there names a method
    (as a word of an identifier, any case). ``tomec/ops/__init__.py``'s imports are skipped: a
    re-export block for the methods' ops may stay there."""
    from tomec import methods as registry

    names = METHOD_NAMES | {m.lower() for m in registry.available()}
    folders = [folder for package, folder in package_folders() if package == "tomec.passes"]
    folders.append(Path(tomec.__file__).resolve().parent / "ops")
    hits = []
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            reexports = path == folders[-1] / "__init__.py"
            for line, name in _code_names(path, skip_imports=reexports):
                found = _method_words(name, names)
                if found:
                    hits.append(f"{path.relative_to(folder.parent)}:{line}: {name} ({', '.join(found)})")
    assert not hits, f"{len(hits)} names of methods in the shared layers:\n" + "\n".join(hits[:60])
