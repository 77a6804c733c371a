"""A tiny diffusers-shaped denoiser for training tests: conv_in, a resnet block, a transformer
block (attention + MLP) and conv_out, with the class names LyCORIS presets look for."""
from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.to_out[0](a @ v)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn1(self.norm1(x))
        return x + self.ff(self.norm2(x))


class Transformer2DModel(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(4, ch)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch)])
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            t = block(t)
        return x + self.proj_out(t).transpose(1, 2).reshape(b, c, h, w)


class ResnetBlock2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(4, ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(4, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        h = self.conv1(torch.nn.functional.silu(self.norm1(x)))
        return x + self.conv2(torch.nn.functional.silu(self.norm2(h)))


class TinyUNet(nn.Module):
    def __init__(self, ch: int = 16, latent: int = 4):
        super().__init__()
        self.conv_in = nn.Conv2d(latent, ch, 3, padding=1)
        self.down_blocks = nn.ModuleList([nn.ModuleDict({"resnets": nn.ModuleList([ResnetBlock2D(ch)]),
                                                         "attentions": nn.ModuleList([Transformer2DModel(ch)])})])
        self.conv_out = nn.Conv2d(ch, latent, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block["attentions"][0](block["resnets"][0](h))
        return self.conv_out(h)


def tiny_unet(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyUNet:
    torch.manual_seed(seed)
    return TinyUNet().to(dtype).requires_grad_(False)
