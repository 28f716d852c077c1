"""The solve description and the adjoint strategy objects (prg_fast/ode/description.py): the
keywords are the objects' short spelling (same gradients, same evaluations), invalid combinations
are refused in one place with a message naming the arguments, and a description is immutable and
hashable (the CUDA-graph cache keys on it)."""
import dataclasses

import pytest
import torch

import prg_fast
from prg_fast.ode import Backprop, ReversibleAdjoint, StoredAdjoint
from prg_fast.ode.description import describe, strategy_from_keywords
from gradient_checks import grads

INF = float("inf")


def _solve_grads(model, x, **kw):
    out = prg_fast.reverse(model, x, steps=3, method="rk4", **kw)
    return grads(out, [x] + list(model.parameters()), seed=0)


@pytest.mark.parametrize("keywords, strategy", [
    (dict(), StoredAdjoint()),
    (dict(memory_budget=INF), StoredAdjoint(memory_budget=INF)),
    (dict(store="steps", memory_budget=0), StoredAdjoint(memory_budget=0, store="steps")),
    (dict(reversible=True), ReversibleAdjoint()),
    (dict(adjoint=False), Backprop()),
    (dict(adjoint=False, reversible=True, reversible_coupling=0.9), Backprop(reversible_coupling=0.9)),
    # "auto" (the default) is the stored adjoint's: elsewhere it does not apply, and is no error
    (dict(reversible=True, memory_budget="auto"), ReversibleAdjoint()),
    (dict(adjoint=False, memory_budget="auto"), Backprop()),
    (dict(reversible=True, memory_budget=None), ReversibleAdjoint()),  # None: the default before "auto"
])
def test_keywords_spell_the_strategy_objects(mlp, keywords, strategy):
    assert strategy_from_keywords(**keywords) == strategy
    model = mlp(dim=3).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    for a, b in zip(_solve_grads(model, x, **keywords), _solve_grads(model, x, adjoint=strategy)):
        assert torch.equal(a, b)


def test_strategy_object_with_strategy_keywords_is_refused(mlp):
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="strategy object.*memory_budget"):
        prg_fast.reverse(mlp(dim=3), x, adjoint=StoredAdjoint(), memory_budget=INF)
    with pytest.raises(ValueError, match="memory_budget=.*reversible=True stores nothing"):
        prg_fast.reverse(mlp(dim=3), x, reversible=True, store="steps")


@pytest.mark.parametrize("make, match", [
    (lambda: StoredAdjoint(store="stage"), 'store must be "stages" or "steps"'),
    (lambda: StoredAdjoint(memory_budget=-1), "memory_budget must be \"auto\""),
    (lambda: ReversibleAdjoint(coupling=0.0), r"reversible_coupling must be a number in \(0, 1\]"),
    (lambda: Backprop(reversible_coupling=2), r"reversible_coupling must be a number in \(0, 1\]"),
    (lambda: StoredAdjoint(preserve_rng_state=1), "preserve_rng_state must be True or False"),
])
def test_bad_strategy_objects_name_the_argument(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_graphs_to_keep_follows_the_budget(monkeypatch):
    cpu = torch.device("cpu")
    for budget, kept in [(None, 0), (0, 0), (INF, 12), (350, 3)]:
        strategy = StoredAdjoint(memory_budget=budget)
        assert strategy.graphs_to_keep(12, 100, strategy.budget_bytes(cpu)) == kept
    assert StoredAdjoint(memory_budget=350).graphs_to_keep(12, None, 350) == 0  # no graph was measured
    # "auto" (the default): half the free memory, as PRG_FAST_FREE_MEMORY_BYTES forces it here
    monkeypatch.setenv("PRG_FAST_FREE_MEMORY_BYTES", "700")
    assert StoredAdjoint().memory_budget == "auto" and StoredAdjoint().budget_bytes(cpu) == 350
    assert StoredAdjoint().graphs_to_keep(12, 100, StoredAdjoint().budget_bytes(cpu)) == 3


def test_description_is_frozen_and_hashable():
    a = describe(method="euler", memory_budget=INF)
    b = describe(method="euler", memory_budget=INF, adjoint_params=[torch.zeros(2, requires_grad=True)])
    assert a == b and hash(a) == hash(b)  # adjoint_params are no part of a captured graph's identity
    assert describe(method="rk4") != a and describe(method="euler", backend="reference") != a
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.check_finite = True
    with pytest.raises(ValueError, match="backend must be one of"):
        describe(backend="fast")
