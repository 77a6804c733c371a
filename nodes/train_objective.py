"""The training objective through the host's sampling objects: what the loss regresses for a model,
how noise levels are drawn and weighted, and the per-step batches (images, noise, sigma, dropped
captions) with the loss in the space of the model's own output."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from ..lycoris_core.train import (BucketSampler, flux_resolution_shift, min_snr_weight, offset_noise, sample_t,
                                  shift_t)

if TYPE_CHECKING:
    from .train_text_encoder import CaptionEncoder

# the host's prediction classes (comfy.model_sampling) -> what the loss regresses, most derived first
OBJECTIVES = {"EDM": "edm", "V_PREDICTION": "v-prediction", "IMG_TO_IMG": "x0", "X0": "x0",
              "EPS": "epsilon", "CONST": "flow matching", "COSMOS_RFLOW": "flow matching (cosmos)"}


def _batched_cond(conds: list[dict], idx: list[int]) -> dict:
    """One processed cond whose tensors stack the conds of images `idx` (cross-attention of
    different lengths is repeated to a common length by the host's cond objects)."""
    first = conds[idx[0]]
    if len(idx) == 1:
        return first
    out = dict(first)
    out["model_conds"] = {k: c._copy_with(c.concat([conds[i]["model_conds"][k] for i in idx[1:]]))
                          for k, c in first["model_conds"].items()}
    return out


def objective_name(model_sampling) -> str:
    """What the loss regresses for this host model: its prediction class, as named in OBJECTIVES
    (the class name itself for one not listed)."""
    for cls in type(model_sampling).__mro__:
        if cls.__name__ in OBJECTIVES:
            return OBJECTIVES[cls.__name__]
    return type(model_sampling).__name__


def output_scale(model_sampling, sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    """`c_out` per sample, shaped to broadcast over `ndim`-D latents: how far the host's denoised
    estimate moves per unit of model output at `sigma` (sigma for eps and flow models,
    sigma / sqrt(sigma^2 + 1) for v models). Taken at input 0, so it is exact at small sigma."""
    shape = (sigma.shape[0],) + (1,) * (ndim - 1)
    zero = torch.zeros(shape, device=sigma.device, dtype=torch.float32)
    with torch.no_grad():
        return (model_sampling.calculate_denoised(sigma.float(), zero, zero)
                - model_sampling.calculate_denoised(sigma.float(), zero + 1, zero))


SHIFTS = ("model", "fixed", "flux resolution")


@dataclass
class ObjectiveOptions:
    """How noise levels are drawn and the loss weighted (defaults: the model's own schedule,
    uniform, unweighted, as before these options existed)."""

    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: str = "model"
    shift_value: float = 3.0
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    caption_dropout: float = 0.0
    accumulation: int = 1

    def __post_init__(self):
        if self.shift not in SHIFTS:
            raise ValueError(f"unknown timestep shift {self.shift!r} (known: {', '.join(SHIFTS)})")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], found {self.caption_dropout}")

    def check(self, objective: str) -> None:
        """Refuse options the model's objective has no meaning for, before any work."""
        if self.shift != "model" and not objective.startswith("flow matching"):
            raise ValueError(f"timestep shift {self.shift!r} applies to flow-matching models; this model "
                             f"trains {objective}: use the shift \"model\"")
        if self.min_snr_gamma and objective not in ("epsilon", "v-prediction"):
            raise ValueError(f"min_snr_gamma weights epsilon and v-prediction models; this model trains "
                             f"{objective}: set it to 0")


class Objective:
    """Batches, noise and noise levels for each step (seeded), and the MSE in model-output space.

    The images may come in buckets of different sizes (`n_images` a list of bucket sizes, the
    latents a list of tensors, images numbered bucket after bucket): each optimiser step draws
    one bucket, in proportion to its size, and all its micro-batches from it. With one bucket
    nothing extra is drawn, so single-size runs draw what they drew before buckets existed.
    With gradient accumulation N, the samples of one optimiser step (N micro-batches) are drawn at
    once, so N x batch b draws exactly what one batch of N*b would."""

    def __init__(self, n_images: int | Sequence[int], batch_size: int, seed: int,
                 options: ObjectiveOptions | None = None):
        sizes = [n_images] if isinstance(n_images, int) else list(n_images)
        self.n = sum(sizes)
        self.batch_size = min(batch_size, self.n)
        self.options = options or ObjectiveOptions()
        self.g = torch.Generator().manual_seed(seed)
        self.sampler = BucketSampler(sizes, batch_size, self.g)
        self.batches: list[tuple] = []  # the micro-batches of the current optimiser step
        self.cursor = 0
        self.captions: CaptionEncoder | None = None  # text-encoder training: conds encoded per step

    @property
    def order(self) -> list[int]:
        """What is left of the first bucket's reshuffled order (the whole dataset's without buckets;
        tests reset it to repeat a batch)."""
        return self.sampler.orders[0]

    @order.setter
    def order(self, value: list[int]) -> None:
        self.sampler.orders[0] = list(value)

    def state(self) -> dict:
        """What a resumed run needs to draw the same batches next (taken between steps)."""
        state = {"generator": self.g.get_state(), "order": list(self.order)}
        if len(self.sampler.sizes) > 1:
            state["bucket_orders"] = [list(o) for o in self.sampler.orders]
        return state

    def load_state(self, state: dict) -> None:
        buckets = len(self.sampler.sizes)
        saved = state.get("bucket_orders", [state["order"]])
        if len(saved) != buckets:
            raise ValueError(f"the saved run drew from {len(saved)} image size bucket(s), this dataset has "
                             f"{buckets}: resume with the same dataset (or switch resume_state off)")
        self.g.set_state(state["generator"])
        self.sampler.orders = [list(o) for o in saved]
        self.batches, self.cursor = [], 0

    def rewind(self) -> None:
        """Replay the current step's micro-batches (a step retried after switching on copies)."""
        self.cursor = 0

    def sigmas(self, t: torch.Tensor, ms, objective: str, latent_shape) -> torch.Tensor:
        """The model's sigma for noise fractions `t`: through its own schedule (shift "model"), or
        for flow models sigma = shifted t."""
        o = self.options
        o.check(objective)
        if o.shift == "model":
            sigma = torch.tensor([float(ms.percent_to_sigma(1.0 - float(v))) for v in t])
        elif o.shift == "fixed":
            sigma = shift_t(t, o.shift_value)
        else:
            sigma = shift_t(t, flux_resolution_shift((latent_shape[-2] // 2) * (latent_shape[-1] // 2)))
        return sigma.clamp(float(ms.sigma_min), float(ms.sigma_max))

    def _draw(self, parts: list[torch.Tensor], ms, objective: str) -> None:
        """Samples for one optimiser step, from one bucket, split into its micro-batches."""
        o = self.options
        bucket, idx = self.sampler.draw(o.accumulation)
        b, count = self.sampler.batch_size(bucket), len(idx)
        shape = tuple(parts[bucket].shape[1:])
        noise = torch.randn((count,) + shape, generator=self.g)
        t = sample_t(count, self.g, o.timestep_sampling, o.logit_mean, o.logit_std)
        noise = offset_noise(noise, o.noise_offset, self.g)
        dropped = (torch.rand(count, generator=self.g) < o.caption_dropout).tolist() \
            if o.caption_dropout > 0 else [False] * count
        sigma = self.sigmas(t, ms, objective, (count,) + shape)
        local = [i - self.sampler.offsets[bucket] for i in idx]  # rows of the bucket's tensor
        self.batches = [(idx[k:k + b], bucket, local[k:k + b], noise[k:k + b], sigma[k:k + b], dropped[k:k + b])
                        for k in range(0, count, b)]
        self.cursor = 0

    def loss(self, model_wrap, extra_args: dict, x0_all: torch.Tensor | list[torch.Tensor], conds: list[dict],
             dropped_cond: dict | None = None) -> torch.Tensor:
        """The loss of the step's next micro-batch; `x0_all` is the latents, or one tensor per bucket."""
        ms = model_wrap.inner_model.model_sampling
        objective = objective_name(ms)
        parts = x0_all if isinstance(x0_all, list) else [x0_all]
        if self.cursor >= len(self.batches):
            self._draw(parts, ms, objective)
        idx, bucket, local, noise, sigma, dropped = self.batches[self.cursor]
        self.cursor += 1
        x0 = parts[bucket][local]
        noise = noise.to(device=x0.device, dtype=x0.dtype)
        sigma = sigma.to(x0.device)
        xt = ms.noise_scaling(sigma, noise, x0)
        if self.captions is not None:
            which = [self.captions.index(i) for i in idx]
            fresh = self.captions.encoded({w for w, d in zip(which, dropped) if not d})
            pool = fresh + [dropped_cond]
            which = [len(fresh) if d else w for w, d in zip(which, dropped)]
            model_wrap.conds["positive"] = [_batched_cond(pool, which)]
        elif len(conds) > 1 or any(dropped):
            pool = conds + [dropped_cond]
            which = [len(conds) if d else (i if len(conds) > 1 else 0) for i, d in zip(idx, dropped)]
            model_wrap.conds["positive"] = [_batched_cond(pool, which)]
        denoised = model_wrap(xt, sigma, **extra_args)
        err = (denoised.float() - x0.float()) / output_scale(ms, sigma, x0.ndim)
        if not self.options.min_snr_gamma:
            return err.square().mean()
        snr = 1.0 / sigma.float().square()  # VP models: sigma^2 = (1 - alpha_bar) / alpha_bar
        weight = min_snr_weight(snr, self.options.min_snr_gamma, objective)
        return (err.square().flatten(1).mean(1) * weight).mean()


def with_guidance(conditioning, guidance: float):
    """The conditioning with every entry's Flux guidance set (as core's FluxGuidance node does)."""
    return [[c[0], {**c[1], "guidance": guidance}] for c in conditioning]


def zero_conditioning(conditioning):
    """One conditioning entry shaped like the first, with every tensor zeroed: the "empty
    caption" when no empty-caption conditioning is given."""
    cross, extra = conditioning[0]
    zero = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in extra.items()}
    return [[torch.zeros_like(cross), zero]]


def objective_metadata(o: ObjectiveOptions) -> dict[str, object]:
    """kohya-style `ss_*` entries for the objective options that differ from the defaults."""
    out: dict[str, object] = {"ss_gradient_accumulation_steps": o.accumulation}
    if o.timestep_sampling != "uniform":
        out.update(ss_timestep_sampling="logit_normal", ss_logit_mean=o.logit_mean, ss_logit_std=o.logit_std)
    if o.shift == "fixed":
        out["ss_discrete_flow_shift"] = o.shift_value
    elif o.shift != "model":
        out["ss_timestep_shift"] = o.shift
    for key, value in (("ss_min_snr_gamma", o.min_snr_gamma), ("ss_noise_offset", o.noise_offset),
                       ("ss_caption_dropout_rate", o.caption_dropout)):
        if value:
            out[key] = value
    return out
