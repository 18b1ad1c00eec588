"""Rotary position embeddings computed from explicit global positions (so any sequence split works)."""
import torch


def rotary_dim(head_dim: int, percent: float) -> int:
    """Channels of each head that rotate: head_dim * percent, rounded down to even."""
    return int(head_dim * percent) // 2 * 2


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, percent: float, theta: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [b, s] -> (cos, sin), each [b, s, 1, rot_dim] in ``dtype``.

    rot_dim = head_dim * percent (rounded down to even); the first rot_dim channels of each head
    rotate, the rest pass through. Angles are computed in fp32 (fp64 for fp64 models): in bf16 the
    angle pos * freq loses whole radians at long positions.
    """
    rot_dim = rotary_dim(head_dim, percent)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / theta ** (torch.arange(0, rot_dim, 2, device=position_ids.device, dtype=compute) / rot_dim)
    angles = position_ids.to(compute).unsqueeze(-1) * inv_freq  # [b, s, rot_dim/2]
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)  # [b, s, 1, rot_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)
