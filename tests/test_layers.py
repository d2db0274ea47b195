"""RMSNorm's written-out backward against autograd through F.rms_norm."""
import torch
import torch.nn.functional as F

from nanoseek.model.layers import RMSNorm, _RMSNormFn


def test_rmsnorm_backward_matches_autograd():
    torch.manual_seed(0)
    norm = RMSNorm(24)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, 24) * 2
    g = torch.randn(3, 7, 24)
    a = x.clone().requires_grad_()
    y = norm(a)
    assert y.grad_fn is not None and "RMSNormFn" in type(y.grad_fn).__name__
    y.backward(g)
    b = x.clone().requires_grad_()
    w = norm.weight.detach().clone().requires_grad_()
    ref = F.rms_norm(b, (24,), w, norm.eps)
    ref.backward(g)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.weight.grad, w.grad, rtol=1e-5, atol=1e-5)
    x64 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w64 = torch.rand(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFn.apply(x, w, 1e-6), (x64, w64))
    with torch.no_grad():                          # inference keeps F.rms_norm (fewer ops for tiny rows)
        assert norm(x).grad_fn is None
        torch.testing.assert_close(norm(x), ref.detach(), rtol=0, atol=1e-6)
