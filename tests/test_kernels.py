"""MKL-prepacked linears (nanoseek/model/kernels.py): equal to F.linear, never stale, packed once."""
import pytest
import torch
import torch.nn.functional as F

from nanoseek.model import kernels

pytestmark = pytest.mark.skipif(not kernels.MKL, reason="this torch build has no MKL")


@pytest.mark.parametrize("native", [False, True])
def test_packed_linear_equals_linear_follows_updates_and_packs_once(native, monkeypatch):
    """Both kernels (Python, and C++ where it builds): equal to F.linear, one pack per (weight, rows),
    repacked after an in-place update."""
    if native and not kernels.load_native():
        pytest.skip("the C++ kernel cannot be built here")
    if not native:       # call the Python kernel as the compiled graph would, even if C++ is loaded
        monkeypatch.setattr(kernels, "linear", lambda x, w: kernels._packed_linear(x, w))
    torch.manual_seed(0)
    w = torch.randn(96, 48)
    f = (lambda x: kernels.linear(x, w)) if not native else \
        torch.compile(lambda x: kernels.linear(x, w), dynamic=False, fullgraph=True)
    before = kernels.packs_made()
    with torch.no_grad():
        for M in (8, 3):                     # row counts get packs of their own
            x = torch.randn(M, 48)
            for _ in range(3):
                torch.testing.assert_close(f(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
        assert kernels.packs_made() - before == 2           # one pack per (weight, rows), reused
        w.mul_(-2.0)                                          # an in-place update (optimizer step)
        torch.testing.assert_close(f(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
        assert kernels.packs_made() - before == 3
        w.data = w.data * 3                                   # new storage, same version counter
        torch.testing.assert_close(f(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
        x3 = torch.randn(2, 4, 48)                           # leading dims are flattened and restored
        torch.testing.assert_close(torch.ops.nanoseek.packed_linear(x3, w), F.linear(x3, w), rtol=1e-5, atol=1e-5)


def test_linear_outside_compiled_inference_is_plain_linear():
    """Eager, training (grad) and non-fp32 calls never touch the packs."""
    w = torch.randn(16, 8, requires_grad=True)
    x = torch.randn(4, 8)
    before = kernels.stats["packs"]
    y = kernels.linear(x, w)
    y.sum().backward()
    assert w.grad is not None and kernels.stats["packs"] == before
    assert kernels.linear(x.bfloat16(), w.detach().bfloat16()).dtype == torch.bfloat16


def test_packs_are_dropped_with_their_weight():
    w = torch.randn(32, 16)
    with torch.no_grad():
        kernels._packed_linear(torch.randn(2, 16), w)
    key = (w.data_ptr(), 2)
    assert key in kernels._packs
    del w
    assert key not in kernels._packs and key[0] not in kernels._rows
