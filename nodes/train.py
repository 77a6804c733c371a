"""LyCORIS Train: train any LyCORIS algorithm on a MODEL from encoded images and their captions.

The loss goes through the host's own sampling objects: a `CFGGuider` (cfg 1, positive only) loads
the model, processes the conditioning and applies every model option/wrapper, and hands control to
our `Sampler` subclass, which runs the training loop calling the guider as the denoiser. Each step
draws images, noise and a noise level (uniform in the model's "percent" scale), noises the images
with the host's `noise_scaling`, and the loss is the mean squared error in the space of the
model's own output, `((x0_pred - x0) / c_out)^2`, where `c_out` is how far the host's
`calculate_denoised` moves the estimate per unit of model output: the epsilon MSE for eps models,
the v MSE for v models, the velocity MSE for flow models (SD3, Flux, Wan, ...), Karras' weighting
for EDM ones. Latents of any dimensionality (video: [B, C, T, H, W]) and the family's extra
conditioning (pooled text, guidance, masks) pass through the host's own `extra_conds`.

The base model is never written to: adapters run in bypass around each layer (`lycoris_core.train.
attached`), so fp16/bf16, fp8 and other quantised bases train alike. Weights the host created under
inference mode are converted to normal tensors in place (same values) so autograd can use them: no
second copy of the model, unlike reloading it from its file. Newer hosts' training flag is set for
the run (it switches their inference-only kernels back to differentiable code). Dynamic VRAM stays
on, as in the host's own trainer: the adapters read weights through the host's cast like the layer.
Host code that updates activations in place (DiT residuals) trains because saved activations are
copied (`activations_copied`, switched on at the first backward that finds an activation changed
in place, so models that need no copies pay nothing), and fused RoPE kernels without a backward
get one (`host_compat`).

Interruption (the queue's cancel button): training stops at the next step and the node returns
what was trained so far (MODEL, LYCORIS, loss) instead of failing, so a Save LyCORIS node
downstream still writes it; the log and the node text say that it was interrupted and after how
many steps, and the file's `ss_steps` holds the steps actually done. The next run of the same
prompt trains again instead of reusing the partial result from the cache.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

import comfy.lora
import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths

from ..lycoris_core import AdapterFile
from ..lycoris_core.io import parse_json
from ..lycoris_core.save import standard_metadata
from ..lycoris_core.train import (OPTIMIZERS, PRESETS, SCHEDULES, Dropout, Root, Trainer,
                                  activations_copied, attached, autograd_safe, checkpoint_blocks,
                                  checkpointed, create_adapters, default_kinds, freeze, frozen,
                                  kohya_name, resume_adapters, select_targets, trainable_algorithms,
                                  wrapper_weights_kept)
from .apply import apply_lycoris
from .host_compat import (dequantiser_for, differentiable_rope, read_adapters, send_progress_text,
                          training_flag)
from .keymap import MODEL, KeyMap, _split_value
from .loss_plot import draw_loss

log = logging.getLogger("comfyui-lycoris")

LYCORIS_TYPE = "LYCORIS"
CATEGORY = "training/lycoris"
NO_FILE = "[none]"
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DORA = {"off": None, "output axis": "out", "input axis": "in"}
# host model config class -> kohya `ss_base_model_version`
BASE_MODELS = {"SD15": "sd_v1", "SD20": "sd_v2", "SD21UnclipL": "sd_v2", "SD21UnclipH": "sd_v2",
               "SDXL": "sdxl_base_v1-0", "SDXLRefiner": "sdxl_refiner_v1-0", "SSD1B": "sdxl_base_v1-0",
               "SD3": "sd3", "Flux": "flux1", "FluxSchnell": "flux1"}
# kohya names SD1.x/2.x files by the diffusers module paths; every other model by its own paths
DIFFUSERS_NAMED = ("sd_v1", "sd_v2", "sd_v2_v")
# the host's prediction classes (comfy.model_sampling) -> what the loss regresses, most derived first
OBJECTIVES = {"EDM": "edm", "V_PREDICTION": "v-prediction", "IMG_TO_IMG": "x0", "X0": "x0",
              "EPS": "epsilon", "CONST": "flow matching", "COSMOS_RFLOW": "flow matching (cosmos)"}

_interruptions = 0  # bumped on every interrupted run, so IS_CHANGED re-runs partial results


# ----- host facts --------------------------------------------------------------------------------
def base_model_hint(model) -> str | None:
    """kohya's `ss_base_model_version` for the host model (None when unknown)."""
    for cls in type(model.model.model_config).__mro__:
        hint = BASE_MODELS.get(cls.__name__)
        if hint is not None:
            if hint == "sd_v2" and model.model.model_type.name.startswith("V_PREDICTION"):
                return "sd_v2_v"
            return hint
    return None


def module_names(model, hint: str | None) -> dict[str, str]:
    """Diffusion-model module path -> kohya name, chosen from the host's key map.

    SD1.x/2.x layers get kohya's diffusers-path names (`lora_unet_down_blocks_0_...`), other models
    the host's native-path names, which is what kohya and LyCORIS write for them.
    """
    candidates: dict[str, list[str]] = {}
    for name, value in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        if not (isinstance(value, str) and name.startswith("lora_unet_")
                and value.startswith("diffusion_model.") and value.endswith(".weight")):
            continue
        candidates.setdefault(value[len("diffusion_model."):-len(".weight")], []).append(name)
    out = {}
    for path, names in candidates.items():
        native = kohya_name("lora_unet", path)
        others = [n for n in names if n != native]
        out[path] = others[0] if hint in DIFFUSERS_NAMED and others else native
    return out


def resume_lookup(model, names) -> dict[str, torch.nn.Module]:
    """Module for every saved name the host's key map (plus our normalisation) resolves to a
    whole diffusion-model weight."""
    keymap = KeyMap(model)
    root = model.model
    out = {}
    for name in names:
        hit = keymap.lookup(name)
        if hit is None or hit[0] != MODEL:
            continue
        key, offset, function = _split_value(hit[1])
        if offset is not None or function is not None or not key.endswith(".weight"):
            continue
        try:
            out[name] = root.get_submodule(key[: -len(".weight")])
        except AttributeError:
            continue
    return out


def _thaw(obj):
    """A copy of a conditioning structure whose inference-mode tensors are cloned (cond objects,
    dicts, lists and tuples are rebuilt; other values are shared)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.is_inference() else obj
    if isinstance(obj, dict):
        return {k: _thaw(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_thaw(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_thaw(v) for v in obj)
    if hasattr(obj, "_copy_with") and hasattr(obj, "cond"):
        return obj._copy_with(_thaw(obj.cond))
    return obj


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


def tag_frequency(captions: list[str], n_images: int) -> dict[str, int]:
    """kohya-style tag counts: comma-separated tags, counted once per image."""
    if len(captions) == 1 and n_images > 1:
        captions = captions * n_images
    counts: Counter = Counter()
    for caption in captions:
        counts.update({t.strip() for t in caption.split(",") if t.strip()})
    return dict(counts)


# ----- the loss through the host's sampling objects ------------------------------------------------
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


class Objective:
    """Batches, noise and noise levels for each step (seeded), and the MSE in model-output space."""

    def __init__(self, n_images: int, batch_size: int, seed: int):
        self.n = n_images
        self.batch_size = min(batch_size, n_images)
        self.g = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def indices(self) -> list[int]:
        """The next batch of a reshuffled-every-epoch order of the images."""
        out = []
        while len(out) < self.batch_size:
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.g).tolist()
            out.append(self.order.pop())
        return out

    def loss(self, model_wrap, extra_args: dict, x0_all: torch.Tensor, conds: list[dict]) -> torch.Tensor:
        idx = self.indices()
        x0 = x0_all[idx]
        ms = model_wrap.inner_model.model_sampling
        noise = torch.randn(x0.shape, generator=self.g).to(device=x0.device, dtype=x0.dtype)
        u = torch.rand(len(idx), generator=self.g).clamp(1e-4, 1 - 1e-4)
        sigma = torch.tensor([ms.percent_to_sigma(float(v)) for v in u])
        sigma = sigma.clamp(float(ms.sigma_min), float(ms.sigma_max)).to(x0.device)
        xt = ms.noise_scaling(sigma, noise, x0)
        if len(conds) > 1:
            model_wrap.conds["positive"] = [_batched_cond(conds, idx)]
        denoised = model_wrap(xt, sigma, **extra_args)
        err = (denoised.float() - x0.float()) / output_scale(ms, sigma, x0.ndim)
        return err.square().mean()


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

    def step(self, trainer: Trainer, loss_fn) -> float:
        """One training step, switching copies on once if its backward asks for them."""
        try:
            return trainer.step(loss_fn)
        except RuntimeError as exc:
            if self.on or not any(m in str(exc) for m in _IN_PLACE_ERRORS):
                raise
        self.stack.enter_context(activations_copied())
        self.on = True
        return trainer.step(loss_fn)


def run_training(model, latents: torch.Tensor, conditioning, pairs, trainer: Trainer, *,
                 steps: int, batch_size: int, seed: int, regularizer: Dropout | None,
                 gradient_checkpointing: bool, unique_id=None) -> Progress:
    """Train through the host's guider; returns the loss history. Interruption is kept in
    `Progress.interrupted` (with the losses so far) instead of raised. Call outside inference mode."""
    progress = Progress()
    objective = Objective(latents.shape[0], batch_size, seed)
    pbar = comfy.utils.ProgressBar(steps)

    def body(model_wrap, extra_args, x0_all):
        diffusion = model_wrap.inner_model.diffusion_model
        progress.objective = objective_name(model_wrap.inner_model.model_sampling)
        autograd_safe(diffusion)
        x0_all = x0_all.clone() if x0_all.is_inference() else x0_all
        conds = [_thaw(c) for c in model_wrap.conds["positive"]]
        model_wrap.conds["positive"] = conds
        blocks = checkpoint_blocks(diffusion) if gradient_checkpointing else []
        adapters_on = attached(pairs, regularizer=regularizer, dequantiser_for=dequantiser_for)
        with frozen(diffusion), adapters_on, checkpointed(blocks), contextlib.ExitStack() as stack:
            copies = _ActivationCopies(stack)
            for step in range(steps):
                comfy.model_management.throw_exception_if_processing_interrupted()
                loss = copies.step(trainer, lambda: objective.loss(model_wrap, extra_args, x0_all, conds))
                progress.losses.append(loss)
                send_progress_text(f"step {step + 1}/{steps}  loss {loss:.5f}  lr {trainer.lr:.3g}", unique_id)
                pbar.update(1)

    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": conditioning})
    guider.set_cfg(1.0)
    noise = torch.zeros((objective.batch_size,) + tuple(latents.shape[1:]), dtype=latents.dtype)
    try:
        guider.sample(noise, latents, TrainSampler(body), torch.ones(1), seed=seed)
    except comfy.model_management.InterruptProcessingException:
        progress.interrupted = True
    return progress


# ----- the node --------------------------------------------------------------------------------------
def _float(**kw):
    return ("FLOAT", kw)


def _int(**kw):
    return ("INT", kw)


class LycorisTrain:
    """Train a LyCORIS adapter on a MODEL (any algorithm of the core)."""

    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = ("MODEL", LYCORIS_TYPE, "LOSS_MAP", "IMAGE")
    RETURN_NAMES = ("model", "lycoris", "loss", "loss_plot")
    OUTPUT_TOOLTIPS = ("The input model with the trained adapter applied.",
                       "The trained adapter (connect to Save LyCORIS, a LyCORIS apply node, or "
                       "another train node's resume input).",
                       "Loss per step ({\"loss\": [...]}, as core's Plot Loss Graph reads it) and "
                       "the objective trained (\"objective\": epsilon, v-prediction, flow matching...).",
                       "The loss history drawn as an image.")
    DESCRIPTION = ("Train a LyCORIS adapter (LoRA/LoCon, LoHa, LoKr, (IA)^3, GLoRA, Diag-OFT, BOFT, full, "
                   "norms; DoRA, Tucker, scalar) on the diffusion model from encoded images and "
                   "captions. The base weights are never changed (the adapter runs beside each layer), "
                   "so quantised and half-precision bases train too. Cancelling keeps what was "
                   "trained so far.")

    @classmethod
    def INPUT_TYPES(cls):
        algos = trainable_algorithms()
        loras = [NO_FILE] + folder_paths.get_filename_list("loras")
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to train on (left unchanged)."}),
                "latents": ("LATENT", {"tooltip": "The training images, VAE-encoded (a batch)."}),
                "conditioning": ("CONDITIONING", {"tooltip": "One caption for all images, or one per "
                                                  "image in the order of the latent batch."}),
                "algorithm": (algos, {"default": "lora" if "lora" in algos else algos[0]}),
                "preset": (list(PRESETS), {"default": "attn-mlp", "tooltip": "Which layers to train. "
                           + " ".join(f"{p.name}: {p.description}." for p in PRESETS.values())}),
                "rank": _int(default=16, min=1, max=4096, tooltip="Rank (LoRA/LoHa/LoKr/GLoRA); block "
                             "size for Diag-OFT/BOFT."),
                "alpha": _float(default=8.0, min=0.0, max=4096.0, step=0.01,
                                tooltip="Scale is alpha / rank; 0 means alpha = rank."),
                "conv_rank": _int(default=8, min=0, max=4096, tooltip="Rank for convolutions with a "
                                  "kernel larger than 1x1; 0 leaves those convolutions out."),
                "conv_alpha": _float(default=4.0, min=0.0, max=4096.0, step=0.01),
                "steps": _int(default=200, min=1, max=1_000_000),
                "batch_size": _int(default=1, min=1, max=4096),
                "learning_rate": _float(default=1e-4, min=1e-8, max=10.0, step=1e-6, round=False),
                "optimizer": (list(OPTIMIZERS), {"default": "AdamW"}),
                "lr_schedule": (list(SCHEDULES), {"default": "constant", "tooltip": "constant or cosine "
                                "decay to 0; both after the linear warm-up."}),
                "warmup_steps": _int(default=0, min=0, max=1_000_000),
                "seed": _int(default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Initialisation, image "
                             "order, noise and noise levels."),
                "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": "Recompute block "
                                           "activations in backward: much less memory, ~30% slower."}),
                "training_dtype": (list(DTYPES), {"default": "auto", "tooltip": "Compute dtype of the "
                                   "model while training (auto: the model's own). Adapter weights are "
                                   "kept in fp32; fp16 uses loss scaling."}),
            },
            "optional": {
                "include_regex": ("STRING", {"default": "", "multiline": True, "tooltip": "Also train "
                                  "layers whose saved name or module path matches (one regex per line)."}),
                "exclude_regex": ("STRING", {"default": "", "multiline": True,
                                  "tooltip": "Never train layers that match (one regex per line)."}),
                "factor": _int(default=-1, min=-1, max=4096, tooltip="LoKr Kronecker factor (-1: "
                               "as square as possible)."),
                "decompose_both": ("BOOLEAN", {"default": False, "tooltip": "LoKr: split both factors."}),
                "use_tucker": ("BOOLEAN", {"default": False, "tooltip": "Tucker core for k>1 convs."}),
                "use_scalar": ("BOOLEAN", {"default": False, "tooltip": "Trainable scalar (baked in on save)."}),
                "dora": (list(DORA), {"default": "off", "tooltip": "DoRA weight decomposition and the "
                         "axis of its magnitude (LoRA/LoHa/LoKr)."}),
                "constraint": _float(default=0.0, min=0.0, max=100.0, step=1e-4, round=False,
                                     tooltip="Diag-OFT/BOFT norm constraint (0: none)."),
                "rescaled": ("BOOLEAN", {"default": False, "tooltip": "Diag-OFT/BOFT output rescale."}),
                "train_on_input": ("BOOLEAN", {"default": False, "tooltip": "(IA)^3: scale inputs "
                                   "instead of outputs."}),
                "dropout": _float(default=0.0, min=0.0, max=0.99, step=0.01),
                "rank_dropout": _float(default=0.0, min=0.0, max=0.99, step=0.01),
                "module_dropout": _float(default=0.0, min=0.0, max=0.99, step=0.01),
                "weight_decay": _float(default=0.0, min=0.0, max=10.0, step=1e-4, round=False),
                "max_grad_norm": _float(default=1.0, min=0.0, max=1000.0, step=0.01,
                                        tooltip="Gradient clipping (0: off)."),
                "resume_lycoris": (LYCORIS_TYPE, {"tooltip": "Continue training this adapter (its "
                                   "modules, algorithm and ranks; the widgets above that shape "
                                   "adapters are then ignored)."}),
                "resume_file": (loras, {"default": NO_FILE, "tooltip": "Continue training this file."}),
                "captions": ("STRING", {"default": "", "multiline": True, "tooltip": "The captions as "
                             "text, one per line (only for the saved file's tag frequency metadata)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, resume_file=NO_FILE, **kwargs):
        """Re-run after an interrupted run (its partial result must not be reused) and when the
        resumed file changes on disk."""
        path = None if resume_file in (None, "", NO_FILE) else folder_paths.get_full_path("loras", resume_file)
        if path is None:
            return _interruptions
        st = os.stat(path)
        return (_interruptions, path, st.st_mtime_ns, st.st_size)

    def train(self, model, latents, conditioning, algorithm, preset, rank, alpha, conv_rank,
              conv_alpha, steps, batch_size, learning_rate, optimizer, lr_schedule, warmup_steps,
              seed, gradient_checkpointing, training_dtype, include_regex="", exclude_regex="",
              factor=-1, decompose_both=False, use_tucker=False, use_scalar=False, dora="off",
              constraint=0.0, rescaled=False, train_on_input=False, dropout=0.0, rank_dropout=0.0,
              module_dropout=0.0, weight_decay=0.0, max_grad_norm=1.0, resume_lycoris=None,
              resume_file=NO_FILE, captions="", unique_id=None):
        global _interruptions
        samples = latents["samples"]
        n_images = samples.shape[0]
        if len(conditioning) not in (1, n_images):
            raise ValueError(f"conditioning has {len(conditioning)} entries but there are {n_images} "
                             "images: give one caption for all or one per image")
        resume = self._resume_source(resume_lycoris, resume_file)
        hint = base_model_hint(model)
        mp = model.clone()
        if DTYPES[training_dtype] is not None:
            mp.set_model_compute_dtype(DTYPES[training_dtype])
        compute = DTYPES[training_dtype] or mp.model.manual_cast_dtype or mp.model.get_dtype()
        device = mp.load_device
        rng_devices = [device] if device.type == "cuda" else []
        with training_flag(), wrapper_weights_kept(mp.model), torch.inference_mode(False), \
                torch.enable_grad(), torch.random.fork_rng(rng_devices):
            torch.manual_seed(seed)  # adapter init and dropout draws, without touching the caller's RNG
            differentiable_rope()
            if resume is not None:
                built, kept = self._resumed(mp, resume, device)
                options = {}
            else:
                options = dict(factor=factor, decompose_both=decompose_both, use_tucker=use_tucker,
                               use_scalar=use_scalar, dora=DORA[dora], constraint=constraint,
                               rescaled=rescaled, on_input=train_on_input)
                built = self._fresh(mp, hint, algorithm, preset, include_regex, exclude_regex, rank,
                                    alpha, conv_rank, conv_alpha, options, device, unique_id)
                kept = {}
                options = {k: v for k, v in options.items() if k not in built.ignored["options"]}
            trainer = Trainer(built.adapters, steps=steps, lr=learning_rate, optimizer=optimizer,
                              weight_decay=weight_decay, schedule=lr_schedule,
                              warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
                              loss_scaling=compute == torch.float16 and device.type == "cuda")
            regularizer = Dropout(dropout, rank_dropout, module_dropout)
            comfy.model_management.load_models_gpu([mp], memory_required=1e20, force_full_load=True)
            progress = run_training(mp, samples.clone(), _thaw(conditioning), built.pairs(), trainer,
                                    steps=steps, batch_size=batch_size, seed=seed,
                                    regularizer=regularizer,
                                    gradient_checkpointing=gradient_checkpointing, unique_id=unique_id)
        freeze(built.adapters)
        for a in built.adapters.values():
            a.to("cpu")
        done = len(progress.losses)
        if progress.interrupted:
            _interruptions += 1
            log.warning("LyCORIS Train interrupted after %d of %d steps: returning what was trained",
                        done, steps)
            send_progress_text(f"interrupted after {done}/{steps} steps (kept)", unique_id)
        adapters = {**kept, **built.adapters}
        settings = dict(dropout=dropout or None, rank_dropout=rank_dropout or None,
                        module_dropout=module_dropout or None)
        if resume is None:
            settings.update(preset=preset, include=include_regex.strip() or None,
                            exclude=exclude_regex.strip() or None,
                            **{k: v for k, v in options.items() if v not in (None, False)})
        meta = self._metadata(adapters, resume, settings, hint, done, samples, captions,
                              dict(learning_rate=learning_rate, optimizer=optimizer,
                                   lr_schedule=lr_schedule, warmup_steps=warmup_steps, seed=seed,
                                   batch_size=batch_size, training_dtype=training_dtype,
                                   gradient_checkpointing=gradient_checkpointing,
                                   max_grad_norm=max_grad_norm, weight_decay=weight_decay,
                                   interrupted=progress.interrupted))
        result = AdapterFile("", adapters, meta, [], sum(t.numel() * t.element_size()
                             for a in built.adapters.values() for t in a.export().values()), {})
        trained_model = apply_lycoris(model, None, result, 1.0, 0.0)[0]
        image = np.asarray(draw_loss(progress.losses), dtype=np.float32) / 255.0
        return (trained_model, result, {"loss": list(progress.losses), "objective": progress.objective},
                torch.from_numpy(image)[None])

    @staticmethod
    def _resume_source(resume_lycoris, resume_file):
        if resume_lycoris is not None and resume_file not in (None, "", NO_FILE):
            raise ValueError("resume from either a LYCORIS input or a file, not both")
        if resume_lycoris is not None:
            return resume_lycoris
        if resume_file in (None, "", NO_FILE):
            return None
        return read_adapters(folder_paths.get_full_path_or_raise("loras", resume_file))

    @staticmethod
    def _fresh(mp, hint, algorithm, preset, include, exclude, rank, alpha, conv_rank, conv_alpha,
               options, device, unique_id):
        """New adapters on the selected layers of the diffusion model, named by the host's key map."""
        root = Root(mp.model.diffusion_model, "lora_unet", "unet", module_names(mp, hint))
        targets = select_targets(root, preset, include=include, exclude=exclude,
                                 kinds=default_kinds(algorithm), conv=conv_rank > 0)
        built = create_adapters(targets, algorithm, rank, alpha, conv_rank=conv_rank,
                                conv_alpha=conv_alpha, device=device, dequantiser_for=dequantiser_for,
                                **options)
        unfit = built.ignored.get("cannot create", [])
        if unfit:
            log.warning("LyCORIS Train: %s cannot adapt %d of the selected layers with these settings, "
                        "they are left out (first: %s)", algorithm, len(unfit), unfit[0])
            send_progress_text(f"{len(unfit)} layers left out: {unfit[0]}", unique_id)
        return built

    @staticmethod
    def _resumed(mp, saved, device):
        """Trainable copies of the saved modules this model has; the others are kept unchanged."""
        lookup = resume_lookup(mp, list(saved))
        built, missing = resume_adapters(saved, lookup, device=device)
        kept = {name: saved[name] for name in missing}
        if missing:
            log.warning("LyCORIS Train: %d saved modules are not layers of this diffusion model and are "
                        "kept unchanged (first: %s)", len(missing), missing[0])
        return built, kept

    @staticmethod
    def _metadata(adapters, resume, settings, hint, done, samples, captions, run) -> dict[str, str]:
        previous = dict(getattr(resume, "metadata", None) or {})
        try:
            prev_steps = int(previous.get("ss_steps", 0))
        except ValueError:
            prev_steps = 0
        try:
            args = {k: v for k, v in parse_json(previous.get("ss_network_args", "{}")).items()
                    if k != "algo"}
        except (ValueError, AttributeError):
            args = {}
        args.update({k: v for k, v in settings.items() if v is not None})
        lines = [c for c in captions.splitlines() if c.strip()]
        tags = tag_frequency(lines, samples.shape[0]) if lines else None
        spatial = tuple(samples.shape[-2:]) if hint is not None and samples.ndim == 4 else None
        extra = {"ss_learning_rate": run["learning_rate"], "ss_unet_lr": run["learning_rate"],
                 "ss_optimizer": f"torch.optim.{run['optimizer']}",
                 "ss_lr_scheduler": run["lr_schedule"], "ss_lr_warmup_steps": run["warmup_steps"],
                 "ss_seed": run["seed"], "ss_batch_size_per_device": run["batch_size"],
                 "ss_num_train_images": samples.shape[0],
                 "ss_gradient_checkpointing": run["gradient_checkpointing"],
                 "ss_mixed_precision": run["training_dtype"], "ss_max_grad_norm": run["max_grad_norm"],
                 "ss_weight_decay": run["weight_decay"], "ss_network_train_text_encoder_only": False,
                 "ss_training_comment": "trained in ComfyUI with comfyui-lycoris"
                 + (f" (interrupted after {done} steps)" if run["interrupted"] else "")}
        meta = dict(previous)
        meta.update(standard_metadata(
            adapters, network_args=args, base_model=hint, steps=prev_steps + done,
            tag_frequency=tags, resolution=None if spatial is None else (spatial[1] * 8, spatial[0] * 8),
            extra=extra))
        if tags is None and "ss_tag_frequency" in previous:
            meta["ss_tag_frequency"] = previous["ss_tag_frequency"]
        return meta


NODE_CLASS_MAPPINGS = {"LycorisTrain": LycorisTrain}
NODE_DISPLAY_NAME_MAPPINGS = {"LycorisTrain": "LyCORIS Train"}
