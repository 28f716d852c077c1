"""reverse/generate with cuda_graph=True: replays equal eager; misuse is refused clearly."""
import pytest
import torch

import prg_fast
from prg_fast.ode import graphs
from prg_fast.ode.description import describe

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_graph_needs_a_cuda_tensor(mlp):
    with pytest.raises(ValueError, match="cuda_graph=True needs x on a CUDA device"):
        prg_fast.reverse(mlp(dim=3), torch.randn(2, 3), steps=2, cuda_graph=True)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_replay_equals_eager(conv, method):
    model = conv(channels=3).cuda().eval()
    with torch.no_grad():
        for _ in range(2):  # second call replays the captured graph with new data
            x = torch.randn(4, 3, 8, 8, device="cuda")
            eager = prg_fast.reverse(model, x, steps=5, method=method)
            graphed = prg_fast.reverse(model, x, steps=5, method=method, cuda_graph=True)
            torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
            back = prg_fast.generate(model, x, steps=5, method=method, cuda_graph=True)
            torch.testing.assert_close(back, prg_fast.generate(model, x, steps=5, method=method), rtol=0, atol=0)
        # parameters updated in place are seen by the replay
        for p in model.parameters():
            p.mul_(0.5)
        torch.testing.assert_close(prg_fast.reverse(model, x, steps=5, method=method, cuda_graph=True),
                                   prg_fast.reverse(model, x, steps=5, method=method), rtol=0, atol=0)
    graphs.clear_cache()


@pytest.mark.cuda
@needs_gpu
def test_refuses_grad_and_check_finite(conv):
    model = conv(channels=3).cuda()
    x = torch.randn(2, 3, 8, 8, device="cuda")
    with pytest.raises(ValueError, match="torch.no_grad"):
        prg_fast.reverse(model, x, steps=2, cuda_graph=True)
    with torch.no_grad(), pytest.raises(ValueError, match="check_finite"):
        prg_fast.reverse(model, x, steps=2, cuda_graph=True, check_finite=True)


# --- cache key, LRU and the "auto" threshold: bookkeeping testable without a GPU ---

def _key(model, x, **kw):
    return graphs.cache_key(model, x, [0.0, 0.5, 1.0], [2], describe(method="euler", backend="auto", **kw))


def test_key_changes_with_training_mode_of_any_submodule(conv):
    model = conv(channels=3)
    x = torch.randn(2, 3, 8, 8)
    before = _key(model, x)
    assert _key(model, x) == before
    next(m for m in model.modules() if m is not model).eval()
    assert _key(model, x) != before


def test_key_changes_with_dtype_and_storage(conv):
    model = conv(channels=3)
    x = torch.randn(2, 3, 8, 8)
    before = _key(model, x)
    model.double()
    after_dtype = _key(model, x)
    assert after_dtype != before
    p = next(model.parameters())
    p.data = p.data.clone()  # new storage: a captured graph would read the freed old one
    assert _key(model, x) != after_dtype


def test_key_changes_with_autocast():
    model = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    plain = _key(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _key(model, x) != plain
    assert _key(model, x) == plain


def test_lru_evicts_least_recently_used():
    cache = graphs.GraphCache(max_size=2)
    built = []

    def capture(name):
        return lambda: built.append(name) or name
    assert cache.get("a", capture("a")) == "a"
    assert cache.get("b", capture("b")) == "b"
    assert cache.get("a", capture("a2")) == "a"  # hit: no capture, "a" becomes most recent
    cache.get("c", capture("c"))  # evicts "b"
    assert built == ["a", "b", "c"] and len(cache) == 2
    assert cache.get("b", capture("b2")) == "b2"
    assert cache.captures == 4
    with pytest.raises(ValueError, match="max_size"):
        graphs.GraphCache(max_size=0)


def test_entries_of_dead_models_are_dropped():
    cache = graphs.GraphCache(max_size=8)
    model = torch.nn.Linear(2, 2)
    x = torch.randn(1, 2)
    cache.get(_key(model, x), lambda: "g")
    del model
    cache.get(_key(torch.nn.Linear(2, 2), x), lambda: "h")
    assert len(cache) == 1


def test_auto_threshold_logic():
    model = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    assert graphs.should_graph(model, x, True) is True
    assert graphs.should_graph(model, x, False) is False
    assert graphs.should_graph(model, x, "auto") is False  # CPU: never pays
    with pytest.raises(ValueError, match="cuda_graph must be"):
        graphs.should_graph(model, x, "yes")
    old = graphs.auto_max_numel()
    try:
        graphs.set_auto_max_numel(8)
        assert graphs.auto_pays(8) and not graphs.auto_pays(9)
    finally:
        graphs.set_auto_max_numel(old)
    with pytest.raises(ValueError, match="numel"):
        graphs.set_auto_max_numel(-1)


def test_auto_on_cpu_runs_eagerly(mlp):
    model = mlp(dim=3)
    x = torch.randn(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(prg_fast.reverse(model, x, steps=3, cuda_graph="auto"),
                                   prg_fast.reverse(model, x, steps=3), rtol=0, atol=0)


@pytest.mark.cuda
@needs_gpu
def test_eval_and_half_after_capture_recapture(conv):
    model = conv(channels=3).cuda().train()
    x = torch.randn(2, 3, 8, 8, device="cuda")
    graphs.clear_cache()
    start = graphs.capture_count()
    with torch.no_grad():
        prg_fast.reverse(model, x, steps=3, method="euler", cuda_graph=True)
        model.eval()
        torch.testing.assert_close(prg_fast.reverse(model, x, steps=3, method="euler", cuda_graph=True),
                                   prg_fast.reverse(model, x, steps=3, method="euler"), rtol=0, atol=0)
        model.half()
        torch.testing.assert_close(prg_fast.reverse(model, x, steps=3, method="euler", cuda_graph=True),
                                   prg_fast.reverse(model, x, steps=3, method="euler"), rtol=0, atol=0)
    assert graphs.capture_count() - start == 3
    graphs.clear_cache()
