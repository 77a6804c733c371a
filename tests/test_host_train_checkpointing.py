"""Gradient checkpointing changes memory, never gradients: on every tiny family (DiT blocks that
update activations in place, `x += f(norm(x))`, included) the adapter gradients of one training
step with checkpointing equal those without.

Oracle: the same step without checkpointing (autograd's own gradients, with saved activations
copied where the model needs it). Torch's non-reentrant checkpoint, used before, gave the tiny
Flux on v0.8.0 gradients 8% off here, silently.
"""
from __future__ import annotations

import pytest
import torch

from host import dit, dit_inputs
from host.helpers import pack_module

pytestmark = pytest.mark.usefixtures("quiet_and_unloaded")


class GradientRecorder:
    """A stand-in trainer: one backward of the loss, gradients kept, nothing updated."""

    lr = 0.0

    def __init__(self, adapters):
        self.adapters = adapters
        self.grads: dict[str, torch.Tensor] = {}
        self.loss = None

    def step(self, loss_fn):
        for a in self.adapters.values():
            for p in a.parameters():
                p.grad = None
        loss = loss_fn()
        loss.backward()
        self.loss = float(loss)
        self.grads = {f"{n}.{k}": p.grad.detach().clone() for n, a in self.adapters.items()
                      for k, p in a.named_parameters() if p.grad is not None}
        return self.loss


def _adapters(model, seed: int):
    """LoRA adapters (rank 4, up nonzero so every factor gets a gradient) on the attention and MLP
    Linears of the tiny model."""
    from lycoris_core.train import Root, create_adapters, select_targets

    root = Root(model.model.diffusion_model, "lora_unet", "unet", lambda path: "lora_unet_" + path.replace(".", "_"))
    targets = select_targets(root, "attn-mlp", kinds=("linear",))
    built = create_adapters(targets, "lora", 4, 4.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in built.adapters.values():
            for p in a.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return built


def _one_step(family: str, checkpointing: bool):
    loop, compat = pack_module("nodes.train_loop"), pack_module("nodes.host_compat")
    from lycoris_core.train import wrapper_weights_kept

    model = dit.load(family)
    latent = dit_inputs.latents(family, model)
    cond = dit_inputs.conditioning(family)
    with compat.training_flag(), wrapper_weights_kept(model.model), torch.inference_mode(False), \
            torch.enable_grad():
        compat.differentiable_rope()
        mp = model.clone()
        built = _adapters(mp, seed=3)
        recorder = GradientRecorder(built.adapters)
        torch.manual_seed(0)
        loop.run_training(mp, loop.thawed(latent["samples"]).clone(), loop.thawed(cond), built.pairs(),
                          recorder, steps=1, batch_size=1, seed=0, regularizer=None,
                          gradient_checkpointing=checkpointing)
    return recorder


@pytest.mark.parametrize("family", dit.FAMILY_NAMES)
def test_checkpointing_leaves_every_adapter_gradient_unchanged(family):
    plain = _one_step(family, checkpointing=False)
    ckpt = _one_step(family, checkpointing=True)
    assert plain.grads and set(plain.grads) == set(ckpt.grads)
    assert ckpt.loss == pytest.approx(plain.loss, rel=1e-6)
    worst = max(float((ckpt.grads[k] - g).norm() / g.norm().clamp_min(1e-30)) for k, g in plain.grads.items())
    assert worst < 1e-4, f"{family}: worst relative gradient difference {worst:.3g}"
