"""SplitLinear (the fused q/k/v projection returning its parts) against nn.Linear followed by split, in float64."""
import pytest
import torch

from megatron_sp.model.split_linear import SplitLinear

SIZES = [8, 4, 4]  # q, k, v of 2 query heads and 1 key/value head of dim 4


def _pair(bias):
    torch.manual_seed(0)
    ours = SplitLinear(6, SIZES, bias=bias).double()
    plain = torch.nn.Linear(6, sum(SIZES), bias=bias).double()
    plain.load_state_dict(ours.state_dict())  # the same parameters, under the same names
    return ours, plain


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2)])
def test_equals_linear_then_split(bias, used):
    """Forward, dx, dW and db within float64 rounding, also when a part gets no gradient (k unused); each
    part is a dense tensor of its own."""
    ours, plain = _pair(bias)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    weights = [torch.randn(2, 5, n, dtype=torch.float64) for n in SIZES]  # a different loss weight per part
    results = []
    for model in (ours, plain):
        xi = x.clone().requires_grad_()
        parts = model(xi) if model is ours else model(xi).split(SIZES, dim=-1)
        sum((parts[i] * weights[i]).sum() for i in used).backward()
        results.append((parts, xi.grad, model.weight.grad, model.bias.grad if bias else None))
    (parts, dx, dw, db), (parts_ref, dx_ref, dw_ref, db_ref) = results
    for p, r in zip(parts, parts_ref):
        torch.testing.assert_close(p, r, rtol=1e-13, atol=1e-13)
        assert p.is_contiguous()
    torch.testing.assert_close(dx, dx_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-13, atol=1e-13)
    if bias:
        torch.testing.assert_close(db, db_ref, rtol=1e-13, atol=1e-13)
    if 1 not in used:
        assert torch.all(dw[8:12] == 0) and (not bias or torch.all(db[8:12] == 0))


def test_parts_with_strided_gradients():
    """Gradients that arrive as views with other strides (as attention's may) give the same result."""
    ours, plain = _pair(True)
    x = torch.randn(3, 6, dtype=torch.float64)
    grads = [torch.randn(n, 3, dtype=torch.float64).t() for n in SIZES]  # [3, n], column-major
    xi, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.autograd.backward(ours(xi), grads)
    plain(xr).backward(torch.cat(grads, dim=-1))
    torch.testing.assert_close(xi.grad, xr.grad, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ours.weight.grad, plain.weight.grad, rtol=1e-13, atol=1e-13)
