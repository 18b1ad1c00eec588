"""The one-pass AdamW kernel (megatron_sp/kernels/adamw.py) against torch.optim.AdamW: under Triton's interpreter in
CI, on the GPU where there is one (TRITON_INTERPRET unset)."""
import os

import pytest
import torch

from megatron_sp.kernels import adamw

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def _steps(n, lrs, clips, skips, weight_decay=0.1, seed=0):
    """Run the kernel and torch's AdamW side by side over len(lrs) steps of bf16 gradients -> (kernel's master,
    moments, bf16 copy, step count), (torch's master, moments, step count)."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(n, generator=gen, dtype=torch.float32)
    grads = [torch.randn(n, generator=gen).mul_(3.0).to(torch.bfloat16) for _ in lrs]
    master, out = start.clone().to(DEVICE), torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    reference = torch.nn.Parameter(start.clone().to(DEVICE))
    kw = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    ours = torch.optim.AdamW([torch.nn.Parameter(master)], lr=lrs[0], fused=True, **kw)
    torch_adamw = torch.optim.AdamW([reference], lr=lrs[0], foreach=False, **kw)
    group = ours.param_groups[0]
    state = adamw.adamw_state(ours, master)
    for lr, clip, skip, grad in zip(lrs, clips, skips, grads):
        group["lr"] = torch_adamw.param_groups[0]["lr"] = lr
        grad = grad.to(DEVICE)
        adamw.adamw_step(master, grad, state, group, out, torch.tensor(float(skip), device=DEVICE),
                         None if clip is None else torch.tensor(clip, device=DEVICE))
        if not skip:
            reference.grad = grad.float() / (1.0 if clip is None else clip)
            torch_adamw.step()
    expected = torch_adamw.state[reference]  # empty if every update was skipped
    return ((master, state["exp_avg"], state["exp_avg_sq"], out, state["step"].item()),
            (reference.detach(), expected.get("exp_avg"), expected.get("exp_avg_sq"), int(expected.get("step", 0))))


@pytest.mark.parametrize("n", [1, 4096, 5003])
def test_adamw_kernel_equals_torch_adamw_with_clipping_and_a_skipped_step(n):
    """Four updates, the second skipped (as for an inf/NaN norm: nothing moves, the step count stays), the
    third and fourth clipped, lr changing each step: master weights and moments equal torch's AdamW within fp32
    rounding, and the bf16 copy is the master weights rounded."""
    (master, exp_avg, exp_avg_sq, out, step), (ref, ref_avg, ref_avg_sq, ref_step) = _steps(
        n, lrs=[1e-3, 2e-3, 3e-3, 5e-4], clips=[None, 7.0, 2.5, 1.25], skips=[0, 1, 0, 0])
    assert step == ref_step == 3
    torch.testing.assert_close(master, ref, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(exp_avg, ref_avg, rtol=2e-6, atol=3e-7)  # lerp vs two products: an ulp of ~1
    torch.testing.assert_close(exp_avg_sq, ref_avg_sq, rtol=2e-6, atol=1e-8)
    assert torch.equal(out, master.to(torch.bfloat16))
    start = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    assert (master - start).abs().max() > 1e-4  # the updates moved the weights


def test_a_skipped_first_update_leaves_everything_as_it_was():
    (master, exp_avg, exp_avg_sq, out, step), _ = _steps(257, lrs=[1e-3], clips=[None], skips=[1])
    start = torch.randn(257, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    assert step == 0 and torch.equal(master, start)
    assert not exp_avg.any() and not exp_avg_sq.any()


def test_a_step_count_kept_elsewhere_moves_beside_the_weights():
    master = torch.zeros(4, device=DEVICE)
    opt = torch.optim.AdamW([torch.nn.Parameter(master)], fused=True)
    opt.state[master].update(step=torch.tensor(7.0, dtype=torch.float64), exp_avg=torch.zeros_like(master),
                             exp_avg_sq=torch.zeros_like(master))
    step = adamw.adamw_state(opt, master)["step"]
    assert (step.device, step.dtype, step.item()) == (master.device, torch.float32, 7.0)


def test_adamw_step_refuses_mismatched_vectors():
    master, grad = torch.zeros(8, device=DEVICE), torch.zeros(7, dtype=torch.bfloat16, device=DEVICE)
    opt = torch.optim.AdamW([torch.nn.Parameter(master)], fused=True)
    with pytest.raises(ValueError, match="8 weights, 7 gradients"):
        adamw.adamw_step(master, grad, adamw.adamw_state(opt, master), opt.param_groups[0],
                         torch.empty(8, dtype=torch.bfloat16, device=DEVICE), torch.zeros((), device=DEVICE), None)


def test_supports_only_torchs_fused_adamw_without_amsgrad():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert adamw.supports(torch.optim.AdamW(p, fused=True))
    assert not adamw.supports(torch.optim.AdamW(p, fused=True, amsgrad=True))
    assert not adamw.supports(torch.optim.AdamW(p))
    assert not adamw.supports(torch.optim.Adam(p, fused=True))
