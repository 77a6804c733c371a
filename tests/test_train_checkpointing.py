"""Gradient checkpointing of training blocks (`checkpointed`): the same gradients as plain autograd,
dropouts and DyLoRA-style draws replayed, far fewer saved activations, and a block that updates
activations in place (`x += f(norm(x))`, as DiT residuals do) is caught, never silently wrong.

Oracle: plain autograd on the same block, with `activations_copied` where the block needs it.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from lycoris_core.train import Dropout, Root, activations_copied, attached, checkpointed, create_adapters, select_targets


class InPlaceResidual(nn.Module):
    """A DiT-like block: the residual stream is updated in place after `norm(x)` saved it."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Linear(width, width)

    def forward(self, x, scale=None):
        x = x * 1.0
        x += self.attn(self.norm(x))
        x += self.mlp(self.norm(x)) * (1.0 if scale is None else scale)
        return x, x.mean()


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([InPlaceResidual(), InPlaceResidual()])

    def forward(self, x, scale):
        for block in self.blocks:
            x, _ = block(x, scale=scale)
        return x


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = Model().requires_grad_(False)
    targets = select_targets(Root(model), "full", include=r"attn|mlp", kinds=("linear",))
    assert len(targets) == 4
    built = create_adapters(targets, "lora", 4, 4.0)
    with torch.no_grad():
        for a in built.adapters.values():
            for p in a.parameters():
                p.copy_(0.3 * torch.randn(p.shape))
    return model, built


def _grads(model, built, checkpoint: bool, copies: bool, regularizer=None, seed: int = 7):
    for a in built.adapters.values():
        for p in a.parameters():
            p.grad = None
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    scale = torch.tensor(0.5, requires_grad=True)
    torch.manual_seed(seed)
    blocks = list(model.blocks) if checkpoint else []
    with attached(built.pairs(), regularizer=regularizer), checkpointed(blocks), \
            (activations_copied() if copies else contextlib.nullcontext()):
        loss = model(x, scale).square().mean()
        loss.backward()
    grads = {f"{n}.{k}": p.grad.clone() for n, a in built.adapters.items() for k, p in a.named_parameters()}
    return float(loss.detach()), grads, scale.grad


@pytest.mark.parametrize("regularizer", [None, Dropout(0.2, 0.2, 0.0)], ids=["plain", "dropouts"])
def test_checkpointed_gradients_equal_plain_autograd_for_in_place_blocks(regularizer):
    model, built = _setup()
    loss, plain, scale_grad = _grads(model, built, checkpoint=False, copies=True, regularizer=regularizer)
    ck_loss, ck, ck_scale_grad = _grads(model, built, checkpoint=True, copies=True, regularizer=regularizer)
    assert ck_loss == pytest.approx(loss, rel=1e-6)
    assert set(ck) == set(plain)
    for k, g in plain.items():
        assert torch.allclose(ck[k], g, rtol=1e-5, atol=1e-7), k
    assert torch.allclose(ck_scale_grad, scale_grad, rtol=1e-5)  # a keyword input gets its gradient


def test_an_in_place_update_is_reported_not_silently_wrong():
    """Without copies, plain autograd refuses this block; checkpointed, it must refuse alike (the
    trainer then switches copies on and retries the step) rather than give other gradients."""
    model, built = _setup()
    for checkpoint in (False, True):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            _grads(model, built, checkpoint=checkpoint, copies=False)


def test_checkpointed_blocks_save_only_their_inputs():
    model, built = _setup()
    x = torch.randn(64, 16)

    def saved_bytes(checkpoint: bool) -> int:
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        blocks = list(model.blocks) if checkpoint else []
        with attached(built.pairs()), checkpointed(blocks), activations_copied(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, None).sum().backward()
        return total[0]

    plain, ck = saved_bytes(False), saved_bytes(True)
    assert ck <= 2 * x.numel() * x.element_size() + 64  # each block's input, and nothing else
    assert plain > 4 * ck
