"""The checkout as Python sees it: `python -m pytest` and `python -c` put the root first on
sys.path, a benchmark script its own folder, pytest the test folder -- so a module or package there
is imported in place of an installed one of the same name. (A root `kernels/` and then
`benchmarks/kernels.py` hid the PyPI package `kernels`, which transformers >= 5.25 imports: `import
diffusers` failed.) Only prg_fast may be a package at the root, and no module in those folders may
have the name of one Python can import elsewhere."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import prg_fast
import prg_fast.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_the_only_package_at_the_root_is_prg_fast():
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["prg_fast"], f"package folders at the checkout's root shadow installed packages: {packages}"


def test_kernels_is_a_plain_subpackage_of_prg_fast():
    # no package_dir mapping or link: an uninstalled copy of the tree (the GPU machine's) imports it as is
    assert Path(prg_fast.kernels.__file__).parent == Path(prg_fast.__file__).parent / "kernels"


def test_from_the_root_import_kernels_is_not_ours():
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')"
    origin = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    ours = {str(ROOT / "kernels" / "__init__.py"), str(ROOT / "kernels.py")}  # (a venv may live below ROOT)
    assert origin not in ours, f"`import kernels` from the root finds {origin}"


# names imported by libraries prg_fast works with, whether or not installed here
KNOWN_INSTALLED_NAMES = {"kernels"}


def _names_on_first_paths():
    """{module name: its file} for the folders that stand first on sys.path when run as intended."""
    names = {p.name: p for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "prg_fast"}
    for folder in ("benchmarks", "python_tests"):
        names.update({p.stem: p for p in (ROOT / folder).glob("*.py") if p.stem != "conftest"})
    return names


def test_no_module_on_the_first_paths_shadows_an_importable_one():
    names = _names_on_first_paths()
    code = ("import importlib.util as u, json, sys; "
            "print(json.dumps([n for n in sys.argv[1:] if u.find_spec(n) is not None]))")
    # from an empty folder, so only what is installed (and the standard library) is found
    found = json.loads(subprocess.run([sys.executable, "-c", code, *sorted(names)], cwd=Path(__file__).anchor,
                                      capture_output=True, text=True, check=True).stdout)
    clashes = sorted(set(found) | (KNOWN_INSTALLED_NAMES & set(names)))
    assert not clashes, {n: str(names[n].relative_to(ROOT)) for n in clashes}


# -- the engine's shape (issue 35): strategies side by side, short chains, short functions -----------

import ast  # noqa: E402
import functools  # noqa: E402

ENGINE = ROOT / "prg_fast" / "ode"
STRATEGIES = ("stored_adjoint", "reversible_adjoint", "backprop")  # each runs its own forward and backward


def _engine_imports():
    """{module: the engine modules it imports} for prg_fast/ode (relative imports, at any depth)."""
    modules = {p.stem: p for p in ENGINE.glob("*.py")}
    edges = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
                found |= {t for t in targets if t in modules and t != name}
        edges[name] = found
    return edges


def test_no_strategy_module_imports_another():
    edges = _engine_imports()
    for name in STRATEGIES:
        assert not edges[name] & set(STRATEGIES), (name, edges[name] & set(STRATEGIES))


def test_the_engines_longest_import_chain_is_at_most_7_modules():
    edges = _engine_imports()

    @functools.lru_cache(maxsize=None)
    def depth(name):  # the longest chain of imports starting at `name`, counted in modules
        return 1 + max((depth(t) for t in edges[name]), default=0)

    longest = max((depth(n), n) for n in edges if n != "__init__")  # the package face only hands names on
    assert longest[0] <= 7, longest


def test_engine_functions_fit_a_screen_and_classes_stay_small():
    too_long = []
    for path in sorted(ENGINE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > 50:
                too_long.append(f"{path.name}:{node.name} (function, {lines} lines)")
            if isinstance(node, ast.ClassDef) and lines > 120:
                too_long.append(f"{path.name}:{node.name} (class, {lines} lines)")
    assert not too_long, too_long
