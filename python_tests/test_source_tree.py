"""The checkout as Python sees it from its root: `python -m pytest`, `python -c` and the benchmarks
put the root first on sys.path, so a package folder there is imported in place of an installed
package of the same name (a root `kernels/` hid the PyPI package `kernels`, which transformers >= 5.25
imports, and `import diffusers` failed). Only prg_fast may be a package at the root."""
from __future__ import annotations

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
    assert not origin.startswith(str(ROOT)), f"`import kernels` from the root finds {origin}"
