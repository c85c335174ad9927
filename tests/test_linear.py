"""models.linear: the oneDNN float32 path gives F.linear's values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from nanotune.models import linear as lin

pytestmark = pytest.mark.skipif(not lin.ONEDNN, reason="no oneDNN matmul in this torch build")


@pytest.mark.parametrize("shape", [(3, 5, 32), (7, 32)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("train_weight", [True, False])
def test_onednn_linear_matches_f_linear(shape, bias, train_weight):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(48, 32, requires_grad=train_weight)
    b = torch.randn(48, requires_grad=True) if bias else None
    grad = torch.randn(*shape[:-1], 48)

    ours = lin.linear(x, w, b)
    assert ours.grad_fn is not None and "OneDNN" in type(ours.grad_fn).__name__
    ours.backward(grad)
    got = [t.grad for t in (x, w, b) if t is not None and t.requires_grad]
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    F.linear(x, w, b).backward(grad)
    want = [t.grad for t in (x, w, b) if t is not None and t.requires_grad]

    torch.testing.assert_close(ours, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_non_float32_autocast_and_no_grad_paths():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    assert not lin._use_onednn(x.bfloat16(), w.bfloat16(), None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin.linear(x, w).dtype == torch.bfloat16  # autocast still applies
    with torch.no_grad():
        torch.testing.assert_close(lin.linear(x, w), x @ w.T)
