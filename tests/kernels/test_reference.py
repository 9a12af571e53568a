"""kernels/reference.py: the readable float64 definition the kernels are checked against is itself
PyTorch's cross-entropy (ignored labels, label smoothing, each reduction, the token-count divisor) and
the linear version is the same loss of `hidden @ weight.T + bias`."""

import pytest
import torch
import torch.nn.functional as F

from fastsft.kernels.reference import cross_entropy_reference, linear_cross_entropy_reference


@pytest.fixture()
def case():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 37, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 37, (12,), generator=g)
    labels[[1, 5, 6]] = -100
    return logits, labels


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_equals_torch_cross_entropy(case, reduction, eps):
    logits, labels = case
    want = F.cross_entropy(logits, labels, reduction=reduction, label_smoothing=eps)
    got = cross_entropy_reference(logits, labels, reduction=reduction, label_smoothing=eps)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_num_items_in_batch_divides_the_sum(case):
    logits, labels = case
    want = F.cross_entropy(logits, labels, reduction="sum") / 50
    torch.testing.assert_close(cross_entropy_reference(logits, labels, num_items_in_batch=50), want)


def test_softcap_and_z_loss(case):
    logits, labels = case
    capped = 5 * torch.tanh(logits / 5)
    lse = torch.logsumexp(capped, -1)
    keep = labels != -100
    want = (F.cross_entropy(capped, labels, reduction="none") + 1e-2 * lse**2)[keep].mean()
    got = cross_entropy_reference(logits, labels, softcap=5.0, lse_square_scale=1e-2)
    torch.testing.assert_close(got, want)


def test_linear_version_is_the_loss_of_the_logits(case):
    _, labels = case
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(12, 16, generator=g)
    weight = torch.randn(37, 16, generator=g)
    bias = torch.randn(37, generator=g)
    want = F.cross_entropy(hidden.double() @ weight.double().T + bias.double(), labels)
    torch.testing.assert_close(linear_cross_entropy_reference(hidden, weight, labels, bias), want)
