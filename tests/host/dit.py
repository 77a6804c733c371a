"""Tiny random-weight DiTs built from the host's own model classes and loaded by its own detector.

Each builder makes the host's diffusion-model class with small widths, fills it with seeded
weights and returns the state dict in the host's native layout; `load` hands that to
`comfy.sd.load_diffusion_model_state_dict`, so the model config comes from the host's detection,
as it does for a downloaded file. Nothing is cached on disk: the models are small.
"""
from __future__ import annotations

import torch

from .checkpoint import _fill_

WAN_DIM = 128  # the host's Wan detector sets num_heads = dim // 128


def wan21(seed: int = 0, num_layers: int = 2) -> dict[str, torch.Tensor]:
    """Wan 2.1 t2v: RMSNorm q/k norms, self/cross attention, ffn, text embedding."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    model = WanModel(model_type="t2v", dim=WAN_DIM, ffn_dim=256, num_heads=1, num_layers=num_layers,
                     in_dim=16, out_dim=16, operations=comfy.ops.manual_cast)
    _fill_(model, torch.Generator().manual_seed(seed))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


BUILDERS = {"wan21": wan21}


def load(family: str, seed: int = 0):
    """A ModelPatcher for a tiny `family` model, as the host's UNET loader would give it."""
    import comfy.sd

    sd = BUILDERS[family](seed)
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model_state_dict(sd)
    if model is None:
        raise RuntimeError(f"the host did not detect the tiny {family} model")
    return model


def wan_inputs(seed: int = 0):
    """(x, timestep, context) for a tiny Wan: one latent frame of 8x8, 6 text tokens."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 1, 8, 8, generator=g), torch.tensor([0.5]),
            torch.randn(1, 6, 4096, generator=g))
