"""prg_fast.compat: the one module that touches private PyTorch internals. A canary per function
fails loudly when a torch release changes the internal's behaviour (the function's docstring says
the versions it was checked on), the fallbacks stay exact or raise a clear error, and a scan of the
package keeps every other module on torch's public API."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch.nn.utils import parametrize

import prg_fast
from prg_fast import compat

PACKAGE = Path(prg_fast.__file__).parent


# -- the scan ---------------------------------------------------------------------------------

# names starting with "_" that prg_fast reads and that are not torch's (Python's, the standard
# library's, or prg_fast's own), by the file that reads them
ALLOWED = {
    "cli/args.py": {"_format_action", "_get_help_string"},  # argparse.HelpFormatter's, through super()
}


def _private_uses(path: Path):
    """(line, name) for every private name the file reads from another object: an attribute whose
    name starts with "_" (not a dunder) on anything but self/cls/super(), such a name passed to
    getattr/hasattr/setattr/delattr, and imports from torch's private modules."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                continue
            yield node.lineno, node.attr
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2:
            owner, name = node.args[:2]
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and name.value.startswith("_") \
                    and not name.value.startswith("__"):
                yield node.lineno, name.value
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("torch") and any(part.startswith("_") for part in node.module.split(".")):
                yield node.lineno, node.module
            elif node.module.startswith("torch"):
                for alias in node.names:
                    if alias.name.startswith("_"):
                        yield node.lineno, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("torch") and any(p.startswith("_") for p in alias.name.split(".")):
                    yield node.lineno, alias.name


def test_no_module_but_compat_touches_a_private_torch_name():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "compat.py":
            continue
        allowed = ALLOWED.get(rel, set())
        found += [f"{rel}:{line}: {name}" for line, name in _private_uses(path) if name not in allowed]
    assert not found, "private names outside prg_fast/compat.py (add a function there):\n" + "\n".join(found)


def test_the_scan_finds_each_kind_of_private_use(tmp_path):
    """The scan itself can fail: each kind of use it looks for is found in a sample file."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch\nimport torch._C\nfrom torch._subclasses import fake_tensor\nfrom torch.nn import _reduction\n"
        "t = torch.zeros(1)\nv = t._version\nn = torch._C._get_thing()\nd = getattr(t, '_backward_hooks')\n"
        "ok = self._mine + t.__class__.__name__\n"
    )
    names = sorted(name for _, name in _private_uses(sample))
    assert names == sorted(["torch._C", "torch._subclasses", "_reduction", "_version", "_C", "_get_thing",
                            "_backward_hooks"])


def test_compat_imports_nothing_of_prg_fast():
    tree = ast.parse((PACKAGE / "compat.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("prg_fast"), ast.dump(node)
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("prg_fast") for a in node.names)


def test_every_function_names_the_torch_versions_it_was_checked_on():
    tree = ast.parse((PACKAGE / "compat.py").read_text())
    public = [n for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
    assert public
    for fn in public:
        doc = ast.get_docstring(fn) or ""
        assert "Checked on torch" in doc, fn.name
        assert "Missing" in doc or "where it exists" in doc or "Only reached" in doc, fn.name


# -- tensors ------------------------------------------------------------------------------------

def test_hook_dicts_hold_the_hooks_and_emptying_them_mutes_them():
    p = torch.ones(3, requires_grad=True)
    assert compat.tensor_hook_dicts([p]) == []
    calls = []
    p.register_hook(lambda g: calls.append("grad"))
    p.register_post_accumulate_grad_hook(lambda t: calls.append("post"))
    dicts = compat.tensor_hook_dicts([p])
    assert len(dicts) == 2
    saved = [(d, list(d.items())) for d in dicts]
    for d in dicts:
        d.clear()
    (p * 2).sum().backward()
    torch.autograd.grad((p * 2).sum(), p)
    assert calls == []  # muted: neither ran
    for d, items in saved:
        d.update(items)
    (p * 2).sum().backward()
    assert calls == ["grad", "post"]
    calls.clear()
    torch.autograd.grad((p * 2).sum(), p)
    assert calls == ["grad"]  # torch.autograd.grad runs tensor hooks on the inputs it captures


def test_hook_dicts_missing_is_an_error(monkeypatch):
    monkeypatch.setattr(compat, "_HAS_HOOK_DICTS", False)
    with pytest.raises(RuntimeError, match="_backward_hooks.*adjoint=False"):
        compat.tensor_hook_dicts([torch.ones(1)])


def test_version_moves_with_every_in_place_write_and_is_none_under_inference_mode():
    t = torch.zeros(3)
    v = compat.version(t)
    t.add_(1)
    assert compat.version(t) == v + 1
    t.detach().mul_(2)  # a detached alias shares the counter
    assert compat.version(t) == v + 2
    t.data.mul_(2)  # .data does not
    assert compat.version(t) == v + 2
    with torch.inference_mode():
        u = torch.zeros(3)
    assert compat.version(u) is None


def test_version_missing_is_an_error(monkeypatch):
    monkeypatch.setattr(compat, "_HAS_VERSION", False)
    with pytest.raises(RuntimeError, match="_version"):
        compat.version(torch.zeros(1))


def test_view_base_is_the_viewed_tensor():
    t = torch.zeros(4, 2)
    assert compat.view_base(t) is None
    assert compat.view_base(t[1]) is t
    assert compat.view_base(t.t()) is t
    assert compat.view_base(t.t().contiguous()) is None
    assert compat.view_base(t.clone()) is None


def test_view_base_missing_answers_possibly_a_view(monkeypatch):
    monkeypatch.setattr(compat, "_HAS_BASE", False)
    t = torch.zeros(2)
    assert compat.view_base(t) is t


@pytest.mark.parametrize("fused", [True, False])
def test_foreach_add_adds_in_place(monkeypatch, fused):
    if not fused:
        monkeypatch.setattr(compat, "_foreach_add_", None)
    a, b = [torch.ones(3), torch.zeros(2, dtype=torch.float64)], [torch.full((3,), 2.0), torch.ones(2, dtype=torch.float64)]
    ids = [id(t) for t in a]
    compat.foreach_add_(a, b)
    assert [id(t) for t in a] == ids
    assert torch.equal(a[0], torch.full((3,), 3.0)) and torch.equal(a[1], torch.ones(2, dtype=torch.float64))


# -- autograd graphs ----------------------------------------------------------------------------

def test_sequence_numbers_order_the_nodes_of_a_thread():
    a = torch.ones(2, requires_grad=True)
    before = (a * 2).grad_fn
    start = compat.next_sequence_nr()
    after = (a + 1).grad_fn
    assert compat.sequence_nr(before) < start <= compat.sequence_nr(after)
    assert compat.sequence_nr(after) == start  # the next node made gets exactly the number peeked


def test_next_sequence_nr_without_the_peek_is_the_same_number(monkeypatch):
    monkeypatch.setattr(compat, "_peek_sequence_nr", None)
    a = torch.ones(2, requires_grad=True)
    start = compat.next_sequence_nr()
    assert compat.sequence_nr((a + 1).grad_fn) == start


def test_sequence_nr_missing_is_an_error():
    class Node:  # a node without _sequence_nr()
        pass

    with pytest.raises(RuntimeError, match="_sequence_nr"):
        compat.sequence_nr(Node())


def test_under_transform_sees_every_transform_and_dual_level():
    from torch.autograd import forward_ad

    assert compat.under_transform() is False
    seen = []

    def probe(x):
        seen.append(compat.under_transform())
        return x.sin().sum()

    x = torch.ones(3)
    torch.func.vmap(lambda v: probe(v))(torch.ones(2, 3))
    torch.func.grad(probe)(x)
    torch.func.jvp(probe, (x,), (x,))
    torch.func.jacrev(probe)(x)
    with forward_ad.dual_level():
        seen.append(compat.under_transform())
    assert seen == [True] * 5
    assert compat.under_transform() is False


def test_under_transform_missing_says_yes(monkeypatch):
    monkeypatch.setattr(compat, "_functorch_level", None)
    assert compat.under_transform() is True  # the reference arithmetic: exact, slower


# -- parametrize.cached() -----------------------------------------------------------------------

class _Double(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def test_the_parametrization_cache_is_read_and_handed_over():
    lin = torch.nn.Linear(2, 2)
    parametrize.register_parametrization(lin, "weight", _Double())
    assert compat.cached_parametrizations([lin]) is None  # caching off
    with parametrize.cached():
        assert compat.cached_parametrizations([lin]) is None  # nothing cached yet
        w = lin.weight
        assert lin.weight is w  # cached: the same tensor on every access
        entries = compat.cached_parametrizations([lin])
        assert entries is not None and any(v is w for v in entries.values())
    assert lin.weight is not w  # the block ended: recomputed
    with compat.parametrizations_cached_as(entries):
        assert lin.weight is w  # handed over: the forward's tensor
    assert lin.weight is not w  # and dropped again
    with parametrize.cached():
        outer = lin.weight
        with compat.parametrizations_cached_as(entries):
            assert lin.weight is w
        assert lin.weight is outer  # an enclosing block's cache is put back
    assert compat.cached_parametrizations([lin]) is None


def test_the_parametrization_cache_missing(monkeypatch):
    monkeypatch.setattr(compat, "_HAS_PARAMETRIZE_CACHE", False)
    assert compat.cached_parametrizations([torch.nn.Linear(2, 2)]) is None  # nothing parametrized: nothing cached
    lin = torch.nn.Linear(2, 2)
    parametrize.register_parametrization(lin, "weight", _Double())
    with pytest.raises(RuntimeError, match="parametrize._cache"):
        compat.cached_parametrizations(list(lin.modules()))


# -- tracing ------------------------------------------------------------------------------------

def test_fake_and_functional_tensors_are_traced():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert not compat.is_traced(torch.zeros(2))
    with FakeTensorMode():
        fake = torch.zeros(2)
    assert compat.is_traced(fake)
    mode = compat.functional_tensor_mode()
    assert mode is not None and issubclass(mode, torch.utils._python_dispatch.TorchDispatchMode)
    assert mode.__name__ == "FunctionalTensorMode"


def test_tracing_missing_falls_back_to_is_compiling(monkeypatch):
    monkeypatch.setattr(compat, "_FakeTensor", None)
    assert compat.is_traced(torch.zeros(2)) is False  # not compiling
