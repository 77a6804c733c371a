"""The training loop inside the host's sampling call: a `CFGGuider` loads the model and processes
the conditioning, and our `Sampler` subclass runs the steps with the guider as the denoiser."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..lycoris_core.train import (Dropout, Trainer, activations_copied, attached, autograd_safe,
                                  checkpoint_blocks, checkpointed, frozen)
from .host_compat import dequantiser_for, send_progress_text
from .train_objective import Objective, ObjectiveOptions, objective_name
from .train_text_encoder import CaptionEncoder


def thawed(obj):
    """A copy of a conditioning structure whose inference-mode tensors are cloned (cond objects,
    dicts, lists and tuples are rebuilt; other values are shared)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.is_inference() else obj
    if isinstance(obj, dict):
        return {k: thawed(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [thawed(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(thawed(v) for v in obj)
    if hasattr(obj, "_copy_with") and hasattr(obj, "cond"):
        return obj._copy_with(thawed(obj.cond))
    return obj


class TrainSampler(comfy.samplers.Sampler):
    """A host sampler whose `sample` runs `body(model_wrap, extra_args, x0)` (the training loop)."""

    def __init__(self, body):
        self.body = body

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
               denoise_mask=None, disable_pbar=False):
        self.body(model_wrap, extra_args, latent_image)
        return latent_image


@dataclass
class Progress:
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False
    objective: str = ""


# what autograd says when code updated a tensor saved for backward in place
_IN_PLACE_ERRORS = ("modified by an inplace operation", "Recomputed values for the following tensors")


class _ActivationCopies:
    """Saved activations copied on demand. A model that updates activations in place after saving
    them (a DiT's residual `x += f(norm(x))`) fails its first backward; from then on its saved
    activations are copied and the step is retried (the trainer zeroes gradients first). Models
    that need no copies never pay for them."""

    def __init__(self, stack: contextlib.ExitStack):
        self.stack, self.on = stack, False

    def step(self, trainer: Trainer, loss_fn, rewind=None) -> float:
        """One training step, switching copies on once if its backward asks for them; `rewind()`
        makes the retried step draw the same samples (and the dropouts the same draws)."""
        rng = None if self.on else _rng_state()
        try:
            return trainer.step(loss_fn)
        except RuntimeError as exc:
            if self.on or not any(m in str(exc) for m in _IN_PLACE_ERRORS):
                raise
        self.stack.enter_context(activations_copied())
        self.on = True
        _set_rng_state(rng)
        if rewind is not None:
            rewind()
        return trainer.step(loss_fn)


def _rng_state() -> tuple:
    """The global CPU (and, once used, CUDA) RNG states: what dropouts draw from."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _latent_in(model_wrap, latent: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A bucket's latents as the host's sampler prepares the latent it is given: on the model's
    device, through the model's `process_latent_in` (an all-zero latent is left as it is)."""
    latent = latent.to(like)
    if torch.count_nonzero(latent) > 0:
        latent = model_wrap.inner_model.process_latent_in(latent)
    return latent.clone() if latent.is_inference() else latent


def run_training(model, latents: torch.Tensor | list[torch.Tensor], conditioning, pairs, trainer: Trainer, *,
                 steps: int, batch_size: int, seed: int, regularizer: Dropout | None,
                 gradient_checkpointing: bool, unique_id=None, options: ObjectiveOptions | None = None,
                 dropped_conditioning=None, objective_state: dict | None = None,
                 on_step=(), captions: CaptionEncoder | None = None) -> Progress:
    """Train through the host's guider from `trainer.step_count` to `steps`; returns the loss
    history. `latents` is one tensor, or a list of one tensor per size bucket (images numbered
    bucket after bucket, as the conditioning is; every batch comes from one bucket).
    `dropped_conditioning` (one entry) replaces a caption dropped by caption dropout;
    `objective_state` continues the batch/noise draws of a saved run; each hook of `on_step`,
    `hook(done, objective, model_wrap)`, runs after every step with the adapters attached;
    `captions` (text-encoder training) encodes the batch's captions through the CLIP every step
    instead of using `conditioning` as it is. Interruption is kept in `Progress.interrupted` (with
    the losses so far) instead of raised. Call outside inference mode."""
    buckets = latents if isinstance(latents, list) else [latents]
    progress = Progress()
    objective = Objective([b.shape[0] for b in buckets], batch_size, seed, options)
    if objective_state is not None:
        objective.load_state(objective_state)
    start = getattr(trainer, "step_count", 0)
    pbar = comfy.utils.ProgressBar(max(1, steps - start))
    n_captions = len(conditioning)

    def body(model_wrap, extra_args, x0_first):
        diffusion = model_wrap.inner_model.diffusion_model
        progress.objective = objective_name(model_wrap.inner_model.model_sampling)
        autograd_safe(diffusion)
        x0_first = x0_first.clone() if x0_first.is_inference() else x0_first
        x0_all = [x0_first] + [_latent_in(model_wrap, b, x0_first) for b in buckets[1:]]
        processed = [thawed(c) for c in model_wrap.conds["positive"]]
        conds, dropped = processed[:n_captions], (processed[n_captions] if dropped_conditioning else None)
        model_wrap.conds["positive"] = conds
        encoder_roots = []
        if captions is not None:
            captions.bind(model_wrap, conds, x0_first)
            objective.captions = captions
            encoder_roots.append(captions.root)
        blocks = checkpoint_blocks(diffusion) if gradient_checkpointing else []
        adapters_on = attached(pairs, regularizer=regularizer, dequantiser_for=dequantiser_for)
        with frozen(diffusion, *encoder_roots), adapters_on, checkpointed(blocks), contextlib.ExitStack() as stack:
            copies = _ActivationCopies(stack)
            for step in range(start, steps):
                comfy.model_management.throw_exception_if_processing_interrupted()
                loss = copies.step(trainer, lambda: objective.loss(model_wrap, extra_args, x0_all, conds, dropped),
                                   objective.rewind)
                progress.losses.append(loss)
                send_progress_text(f"step {step + 1}/{steps}  loss {loss:.5f}  lr {trainer.lr:.3g}", unique_id)
                pbar.update(1)
                for hook in on_step:
                    hook(step + 1, objective, model_wrap)

    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": list(conditioning) + list(dropped_conditioning or [])})
    guider.set_cfg(1.0)
    first = buckets[0]
    noise = torch.zeros((objective.batch_size,) + tuple(first.shape[1:]), dtype=first.dtype)
    try:
        guider.sample(noise, first, TrainSampler(body), torch.ones(1), seed=seed)
    except comfy.model_management.InterruptProcessingException:
        progress.interrupted = True
    return progress
