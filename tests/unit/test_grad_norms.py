"""The big-batch norms |p.grad|^2: the host fast path and the fused device path against a float64 reference."""

import pytest
import torch
from torch import nn

import noisescale as ns
from noisescale.grad_norms import grad_sq_norms, grad_sq_norms_host


def _params_with_grads() -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    shapes_dtypes = [
        ((300, 7), torch.float32),
        ((5,), torch.float64),
        ((64, 3), torch.float16),  # squares above 65504 overflow in fp16: must be reduced in float32
        ((9, 4), torch.bfloat16),
        ((3, 3), torch.float32),  # left without a gradient below
    ]
    params = []
    for shape, dtype in shapes_dtypes:
        p = nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = (torch.randn(shape, generator=gen) * 40).to(dtype)
        params.append(p)
    params[-1].grad = None
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([[1, 2, 1, 7]])).pow(2).sum().backward()  # repeated id 1: entries that coalesce
    params.append(emb.weight)
    return params


def _reference(params: list[nn.Parameter]) -> list[float]:
    out = []
    for p in params:
        g = p.grad
        if g is None:
            out.append(0.0)
            continue
        dense = g.to_dense() if g.is_sparse else g
        out.append(float(dense.double().square().sum()))
    return out


def test_host_and_device_paths_match_a_float64_reference_for_every_kind_of_gradient() -> None:
    params = _params_with_grads()
    expected = _reference(params)
    assert expected[2] > 65504.0  # the fp16 case does overflow a half-precision sum of squares
    host = grad_sq_norms_host(params)
    device = grad_sq_norms(params, torch.device("cpu")).tolist()
    assert host == pytest.approx(expected, rel=1e-5)
    assert device == pytest.approx(expected, rel=1e-5)
    assert host[4] == 0.0 and device[4] == 0.0


def test_no_gradients_at_all_gives_zeros() -> None:
    params = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, 2))]
    assert grad_sq_norms_host(params) == [0.0, 0.0]
    assert grad_sq_norms(params, torch.device("cpu")).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("source", ["example", "microbatch"])
def test_monitor_measures_a_sparse_embedding_like_its_dense_twin(source: str) -> None:
    """``nn.Embedding(sparse=True)`` gives sparse gradients: to the micro-batch hooks and to the big-batch norm.

    Both must read them as the dense ones.
    """
    micro = 2 if source == "microbatch" else 1

    def run(sparse: bool) -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(12, 6, sparse=sparse), nn.Flatten(), nn.Linear(6 * 5, 3)).double()
        monitor = ns.GNSMonitor(model, source=source)
        gen = torch.Generator().manual_seed(1)
        out = []
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            ids = torch.randint(0, 12, (16, 5), generator=gen)
            y = torch.randint(0, 3, (16,), generator=gen)
            for ids_j, y_j in zip(ids.chunk(micro), y.chunk(micro), strict=True):
                (nn.functional.cross_entropy(model(ids_j), y_j) / micro).backward()
            m = monitor.step(batch_size=16)
            assert m.source == source
            assert m.grad_sq_raw is not None and m.trace_cov_raw is not None
            out += [m.grad_sq_raw, m.trace_cov_raw]
        monitor.close()
        return out

    dense, sparse = run(False), run(True)
    assert sparse == pytest.approx(dense, rel=1e-9)
