"""Noise levels, loss weights and noise for diffusion training, as pure functions of tensors.

Noise levels are drawn as `t` in (0, 1), the fraction of noise (1 = pure noise), and mapped to a
model's sigma by the caller: through the model's own schedule, or for flow-matching models
(`x_t = (1 - t) x0 + t noise`, sigma = t) through a shift `t' = s t / (1 + (s - 1) t)` (SD3's
timestep shift; Flux's `exp(mu) / (exp(mu) + 1/t - 1)` is the same map with s = exp(mu)).
"""
from __future__ import annotations

import math

import torch

from ..errors import LycorisError

TIMESTEP_SAMPLING = ("uniform", "logit-normal")
EDGE = 1e-4  # keep t off 0 and 1, where some schedules have no finite sigma
# Flux's resolution-dependent shift: mu goes linearly from BASE at 256 tokens to MAX at 4096
FLUX_BASE_SHIFT, FLUX_MAX_SHIFT = 0.5, 1.15
FLUX_TOKENS = (256, 4096)


def sample_t(n: int, generator: torch.Generator, method: str = "uniform", mean: float = 0.0,
             std: float = 1.0) -> torch.Tensor:
    """`n` noise fractions t in (0, 1): uniform, or logit-normal (sigmoid of N(mean, std^2))."""
    if method == "uniform":
        t = 1.0 - torch.rand(n, generator=generator)
    elif method == "logit-normal":
        if not std > 0:
            raise LycorisError(f"logit-normal timestep sampling needs std > 0, found {std}")
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    else:
        raise LycorisError(f"unknown timestep sampling {method!r} (known: {', '.join(TIMESTEP_SAMPLING)})")
    return t.clamp(EDGE, 1.0 - EDGE)


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift: s t / (1 + (s - 1) t); s > 1 moves noise levels towards pure noise."""
    if not shift > 0:
        raise LycorisError(f"timestep shift must be > 0, found {shift}")
    return shift * t / (1.0 + (shift - 1.0) * t)


def flux_resolution_shift(tokens: int, base: float = FLUX_BASE_SHIFT, top: float = FLUX_MAX_SHIFT) -> float:
    """Flux's shift for an image of `tokens` 2x2 latent patches, as the SD3-style `s` (= exp(mu))."""
    lo, hi = FLUX_TOKENS
    mu = base + (top - base) * (tokens - lo) / (hi - lo)
    return math.exp(mu)


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight per sample (Hang et al. 2023) for an epsilon or v-prediction loss:
    min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v."""
    if not gamma > 0:
        raise LycorisError(f"min_snr_gamma must be > 0, found {gamma}")
    clipped = snr.clamp(max=gamma)
    if prediction == "epsilon":
        return clipped / snr
    if prediction == "v-prediction":
        return clipped / (snr + 1.0)
    raise LycorisError(f"min-SNR weighting is defined for epsilon and v-prediction models, not {prediction}")


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator) -> torch.Tensor:
    """`noise` plus `offset` times one normal draw per sample and channel, constant over the
    remaining (spatial/temporal) axes: lets the model learn overall brightness shifts."""
    if offset == 0:
        return noise
    shape = noise.shape[:2] + (1,) * (noise.ndim - 2)
    extra = torch.randn(shape, generator=generator).to(device=noise.device, dtype=noise.dtype)
    return noise + offset * extra
