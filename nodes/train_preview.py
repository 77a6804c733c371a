"""Sample previews for LyCORIS Train: every N steps, a few Euler steps from the same seeded noise
with the adapters as trained so far, shown on the node through the host's latent previewer and,
given a VAE, decoded after the run into PNGs and the node's `samples` output.

A preview runs inside the training loop (an `on_step` hook of run_training) through the host's
own guider, so the model gets what sampling would give it (model options, wrappers, extra conds),
with grad off and every module in eval mode: the adapters' dropouts are inactive. It draws nothing
from the RNG that training uses (its noise has its own generator, and the global RNG is put back
afterwards), so a run is bit-identical with and without previews. The VAE decodes after training
rather than between steps, because loading it mid-run could make the host evict the model being
trained.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import comfy.model_patcher
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview

from ..lycoris_core.io import write_new_file
from .host_compat import latent_rgb_previewer
from .train_loop import thawed
from .train_objective import with_guidance
from .train_state import next_run

log = logging.getLogger("comfyui-lycoris")

SAMPLER = "euler"
SCHEDULER = "simple"  # the host KSampler's default
# conditioning parts that need models the training guider did not load for the preview's own
# conditioning (ControlNets, GLIGEN) or hook scheduling it does not run
UNSUPPORTED_CONDS = ("control", "gligen", "hooks")
_UNSET = object()


def no_samples() -> torch.Tensor:
    """The `samples` output when nothing was decoded: one black 1x1 image."""
    return torch.zeros(1, 1, 1, 3)


@contextlib.contextmanager
def eval_mode(*roots: torch.nn.Module):
    """Within the block every module below `roots` is in eval mode; each flag is restored on exit."""
    modules = [m for root in roots for m in root.modules()]
    flags = [m.training for m in modules]
    try:
        for root in roots:
            root.eval()
        yield
    finally:
        for module, flag in zip(modules, flags):
            module.training = flag


def check_sample_conditioning(conditioning) -> None:
    """Refuse conditioning parts a preview cannot apply, naming the entry and the part."""
    for i, entry in enumerate(conditioning):
        found = [k for k in UNSUPPORTED_CONDS if entry[1].get(k) is not None]
        if found:
            raise ValueError(f"sample_conditioning entry {i} carries {', '.join(found)}: previews sample "
                             "with text conditioning only; encode the preview prompt without them")


class SamplePreviews:
    """`on_step` hook of run_training: every `every` steps, `steps` Euler steps (scheduler
    "simple", cfg 1) from noise seeded by `seed`, one image of the training latents' size.

    The conditioning is `sample_conditioning` when given (processed by the host like the training
    conds; Flux guidance set as for training when `guidance` >= 0), else the first caption's:
    `conditioning[:1]`, or with text-encoder training the first caption encoded through the text
    encoder as trained so far. The latents (LATENT space, CPU) are kept in `latents` as
    (step, latent); `images(vae)` decodes and saves them after the run."""

    def __init__(self, every: int, steps: int, conditioning, latent_shape, seed: int, *,
                 sample_conditioning=None, guidance: float = -1.0, start: int = 0, total: int = 1,
                 save_prefix: str | None = None):
        if steps < 1:
            raise ValueError(f"sample_steps must be at least 1, found {steps}")
        self.custom = sample_conditioning is not None
        if self.custom:
            check_sample_conditioning(sample_conditioning)
            conditioning = thawed(sample_conditioning)
            if guidance >= 0:
                conditioning = with_guidance(conditioning, guidance)
        else:
            conditioning = conditioning[:1]
        self.every, self.steps, self.seed, self.conditioning = every, steps, seed, conditioning
        self.shape = (1,) + tuple(latent_shape[1:])
        self.start = start
        self.pbar = comfy.utils.ProgressBar(max(1, total - start))
        self.latents: list[tuple[int, torch.Tensor]] = []
        self._processed = None
        self._previewer = _UNSET
        self.folder = self.stem = None
        if save_prefix is not None:
            from .save import split_prefix  # save.py imports the train node: not at import time

            self.folder, self.stem = split_prefix(save_prefix, folder_paths.get_output_directory(), "output")
            self.run = next_run(self.folder, self.stem)

    def __call__(self, done: int, objective, model_wrap) -> None:
        if done % self.every:
            return
        x = self.sample(model_wrap, objective)
        self.latents.append((done, model_wrap.inner_model.process_latent_out(x.float()).cpu()))
        previewer = self.previewer(model_wrap)
        if previewer is not None:
            image = previewer.decode_latent_to_preview_image("JPEG", x)
            self.pbar.update_absolute(done - self.start, None, image)

    def sample(self, model_wrap, objective) -> torch.Tensor:
        """One preview latent (the model's space) with the adapters as they are now; training's
        RNG, conds, model options and module modes are left as they were."""
        inner = model_wrap.inner_model
        device = model_wrap.model_patcher.load_device
        noise = torch.randn(self.shape, generator=torch.Generator().manual_seed(self.seed)).to(device)
        sigmas = comfy.samplers.calculate_sigmas(inner.model_sampling, SCHEDULER, self.steps).to(device)
        options = comfy.model_patcher.create_model_options_clone(model_wrap.model_options)
        options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        captions = getattr(objective, "captions", None)
        roots = [inner] + ([captions.root] if captions is not None else [])
        training_conds = model_wrap.conds
        try:
            with torch.random.fork_rng([device] if device.type == "cuda" else []), torch.no_grad(), \
                    eval_mode(*roots):
                model_wrap.conds = {"positive": self.conds(model_wrap, captions, noise, device)}
                return comfy.samplers.sampler_object(SAMPLER).sample(  # the host's own Euler sampler
                    model_wrap, sigmas, {"model_options": options, "seed": self.seed}, None, noise,
                    latent_image=torch.zeros_like(noise), disable_pbar=True)
        finally:
            model_wrap.conds = training_conds

    def conds(self, model_wrap, captions, noise: torch.Tensor, device) -> list[dict]:
        """The preview's processed conds: the host's own processing of the conditioning (once), or
        the first caption re-encoded through the text encoder being trained."""
        if captions is not None and not self.custom:
            return [captions.encoded({0})[0]]
        if self._processed is None:
            converted = comfy.sampler_helpers.convert_cond(self.conditioning)
            self._processed = comfy.samplers.process_conds(
                model_wrap.inner_model, noise, {"positive": converted}, device,
                latent_image=torch.zeros_like(noise), seed=self.seed)["positive"]
        return self._processed

    def previewer(self, model_wrap):
        """The host's previewer for the model's latents (its --preview-method), else its linear
        latent-to-RGB one; None for a latent format with neither."""
        if self._previewer is _UNSET:
            fmt = model_wrap.inner_model.latent_format
            self._previewer = latent_preview.get_previewer(model_wrap.model_patcher.load_device, fmt) \
                or latent_rgb_previewer(fmt)
        return self._previewer

    def images(self, vae) -> torch.Tensor:
        """The previews decoded by `vae` as one IMAGE batch, each saved as
        `<prefix>_<run>_sample_step<step>.png` in the output folder (never over an existing file);
        the 1x1 placeholder without a VAE or previews."""
        if vae is None or not self.latents:
            return no_samples()
        out = []
        for done, latent in self.latents:
            decoded = vae.decode(latent)
            if decoded.ndim == 5:  # video VAEs: [B, T, H, W, C]
                decoded = decoded.reshape(-1, *decoded.shape[-3:])
            decoded = decoded.float().cpu()
            for k, image in enumerate(decoded):
                self._save(image, done, None if len(decoded) == 1 else k)
            out.append(decoded)
        return torch.cat(out)

    def _save(self, image: torch.Tensor, done: int, frame: int | None) -> None:
        if self.folder is None:
            return
        os.makedirs(self.folder, exist_ok=True)
        pixels = np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)
        info = PngInfo()
        info.add_text("lycoris_sample", json.dumps({"step": done, "seed": self.seed, "sampler": SAMPLER,
                                                    "scheduler": SCHEDULER, "steps": self.steps}))
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info, compress_level=4)
        suffix = "" if frame is None else f"_{frame:03d}"
        while True:
            path = os.path.join(self.folder, f"{self.stem}_{self.run:05d}_sample_step{done:06d}{suffix}.png")
            try:
                write_new_file(path, buffer.getvalue())
                break
            except FileExistsError:  # another run took this run number meanwhile: move on
                self.run = next_run(self.folder, self.stem)
        log.info("LyCORIS Train: saved the step %d sample to %s", done, path)
