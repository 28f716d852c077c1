"""reverse/generate with cuda_graph=True: replays equal eager; misuse is refused clearly."""
import pytest
import torch

import prg_fast
from prg_fast.ode import graphs

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
