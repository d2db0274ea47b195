"""The one-softmax token log-probability (train/logprobs.py) against autograd through the references."""
import pytest
import torch
import torch.nn.functional as F

from nanoseek.train.logprobs import cross_entropy_sum, token_logprob


def _case(dtype, M=37, V=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(M, V, generator=g) * 3).to(dtype)
    targets = torch.randint(0, V, (M,), generator=g)
    targets[[3, 11]] = -100
    return logits, targets


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_torch(dtype, sync_free):
    logits, targets = _case(dtype)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ref = F.cross_entropy(a.float(), targets, ignore_index=-100, reduction="sum")
    got = -token_logprob(b, targets, sync_free=sync_free).sum()       # (sync_free: the GPU default)
    (ref / 7).backward()
    (got / 7).backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    assert b.grad.dtype == dtype
    assert b.grad[3].abs().max() == 0 and b.grad[11].abs().max() == 0
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(b.grad.float(), a.grad.float(), **tol)


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1 / 0.7])
def test_logprob_with_temperature_matches_logsumexp(scale, sync_free):
    logits, targets = _case(torch.float32, seed=1)
    targets[targets < 0] = 0
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    z = a * scale
    ref = z.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
    got = token_logprob(b, targets, scale, sync_free=sync_free)
    w = torch.randn(len(targets))
    (ref * w).sum().backward()
    (got * w).sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)


def test_tiny_probabilities_fall_back_to_logsumexp():
    """A target 200 nats below the best logit: p underflows to 0 in fp32, log p would be -inf."""
    logits = torch.zeros(4, 8)
    logits[:, 0] = 200.0
    targets = torch.tensor([0, 3, 5, 0])
    ref = torch.log_softmax(logits.double(), -1).gather(1, targets[:, None]).squeeze(1)
    for sync_free in (False, True):
        got = token_logprob(logits.clone().requires_grad_(), targets, sync_free=sync_free)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-5)
    assert cross_entropy_sum(logits, targets).item() == pytest.approx(-ref.sum().item(), rel=1e-6)


def test_no_grad_keeps_nothing_and_bad_shapes_are_named():
    logits, targets = _case(torch.float32)
    with torch.no_grad():
        out = token_logprob(logits.requires_grad_(), targets)
    assert out.grad_fn is None
    with pytest.raises(ValueError, match="logits \\(M,V\\)"):
        token_logprob(logits[None], targets)
