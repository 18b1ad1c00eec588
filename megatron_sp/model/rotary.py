"""Rotary position embeddings computed from explicit global positions (so any sequence split works)."""
import math

import torch

# Llama 3.1's frequency scaling constants (Megatron's --use-rope-scaling fixes them too; only the factor varies).
LLAMA3_LOW_FREQ_FACTOR, LLAMA3_HIGH_FREQ_FACTOR, LLAMA3_ORIGINAL_CONTEXT = 1.0, 4.0, 8192


def rotary_dim(head_dim: int, percent: float) -> int:
    """Channels of each head that rotate: head_dim * percent, rounded down to even."""
    return int(head_dim * percent) // 2 * 2


def llama3_scaled(inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    """Llama 3.1's rotary frequencies for a longer context: a channel whose wavelength is longer than the
    original context / low factor turns `factor` times slower, one shorter than context / high factor is
    kept, and those between blend the two linearly in original-context / wavelength."""
    wavelength = 2 * math.pi / inv_freq
    long_wave = LLAMA3_ORIGINAL_CONTEXT / LLAMA3_LOW_FREQ_FACTOR
    short_wave = LLAMA3_ORIGINAL_CONTEXT / LLAMA3_HIGH_FREQ_FACTOR
    blend = ((LLAMA3_ORIGINAL_CONTEXT / wavelength - LLAMA3_LOW_FREQ_FACTOR)
             / (LLAMA3_HIGH_FREQ_FACTOR - LLAMA3_LOW_FREQ_FACTOR))  # 0 at long_wave, 1 at short_wave
    between = (1 - blend) * inv_freq / factor + blend * inv_freq
    return torch.where(wavelength > long_wave, inv_freq / factor,
                       torch.where(wavelength < short_wave, inv_freq, between))


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, percent: float, theta: float,
                   dtype: torch.dtype, llama3_factor: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [b, s] -> (cos, sin), each [b, s, 1, rot_dim] in ``dtype``.

    rot_dim = head_dim * percent (rounded down to even); the first rot_dim channels of each head
    rotate, the rest pass through. Angles are computed in fp32 (fp64 for fp64 models): in bf16 the
    angle pos * freq loses whole radians at long positions. llama3_factor: Llama 3.1's frequency
    scaling (llama3_scaled) with this factor; None = plain rotary.
    """
    rot_dim = rotary_dim(head_dim, percent)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / theta ** (torch.arange(0, rot_dim, 2, device=position_ids.device, dtype=compute) / rot_dim)
    if llama3_factor is not None:
        inv_freq = llama3_scaled(inv_freq, llama3_factor)
    angles = position_ids.to(compute).unsqueeze(-1) * inv_freq  # [b, s, rot_dim/2]
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)  # [b, s, 1, rot_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)
