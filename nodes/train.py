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

Objective options (`ObjectiveOptions`): noise levels t drawn uniform or logit-normal, mapped to
sigma by the model's own schedule or, for flow models, a fixed or Flux-resolution shift; Flux
guidance set on the conditioning; min-SNR-gamma weights for epsilon/v models (SNR = 1/sigma^2);
offset noise; caption dropout to an empty-caption (or zero) conditioning; gradient accumulation
(all micro-batches of a step drawn at once, so N x b equals one batch of N*b).

Save every N steps writes the adapter and, beside it, `<name>.optim.pt` (optimizer per parameter
name, schedule, loss scaler, the objective's generator and image order, the global RNG, and the
scalar and unscaled factors of `use_scalar` adapters, whose file holds only their product); resuming
from that file with `resume_state` continues exactly, with `steps` counting the whole run, text-
encoder modules included when train_text_encoder is on again.

Sample every N steps (`train_preview`): a preview sampled with the adapter as trained so far (fixed
seed, Euler, cfg 1) shows on the node; with a VAE the previews are decoded after the run into
`<prefix>_<run>_sample_step<step>.png` and the `samples` output. Training is bit-identical with
and without them.

Interruption (the queue's cancel button): training stops at the next step and the node returns
what was trained so far (MODEL, LYCORIS, loss) instead of failing, so a Save LyCORIS node
downstream still writes it; the log and the node text say that it was interrupted and after how
many steps, and the file's `ss_steps` holds the steps actually done. The next run of the same
prompt trains again instead of reusing the partial result from the cache.
"""
from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np
import torch

import comfy.lora
import comfy.model_management
import folder_paths

from ..lycoris_core import AdapterFile
from ..lycoris_core.io import parse_json
from ..lycoris_core.save import standard_metadata
from ..lycoris_core.train.dylora import as_dylora
from ..lycoris_core.train import (OPTIMIZERS, PRESETS, SCHEDULES, TIMESTEP_SAMPLING, Dropout, Root, Trainer,
                                  create_adapters, default_kinds, freeze, kohya_name, resume_adapters,
                                  select_targets, trainable_algorithms, wrapper_weights_kept)
from .apply import apply_lycoris
from .train_inputs import bucket_metadata, from_host_lists, latent_buckets
from .host_compat import dequantiser_for, differentiable_rope, read_adapters, send_progress_text, training_flag
from .keymap import CLIP, MODEL, KeyMap, _split_value
from .loss_plot import draw_loss
from .train_loop import thawed, run_training
from .train_objective import (SHIFTS, ObjectiveOptions, objective_metadata, objective_name, with_guidance,
                              zero_conditioning)
from .train_preview import SamplePreviews, no_samples
from .train_state import NO_FILE, Checkpoints, load_train_state, restore_scalars, restore_train_state
from .train_text_encoder import (CaptionEncoder, check_text_encoder_inputs, resumed_text_encoder,
                                 text_encoder_adapters)

log = logging.getLogger("comfyui-lycoris")

LYCORIS_TYPE = "LYCORIS"
CATEGORY = "training/lycoris"
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DORA = {"off": None, "output axis": "out", "input axis": "in"}
# host model config class -> kohya `ss_base_model_version`
BASE_MODELS = {"SD15": "sd_v1", "SD20": "sd_v2", "SD21UnclipL": "sd_v2", "SD21UnclipH": "sd_v2",
               "SDXL": "sdxl_base_v1-0", "SDXLRefiner": "sdxl_refiner_v1-0", "SSD1B": "sdxl_base_v1-0",
               "SD3": "sd3", "Flux": "flux1", "FluxSchnell": "flux1"}
# kohya names SD1.x/2.x files by the diffusers module paths; every other model by its own paths
DIFFUSERS_NAMED = ("sd_v1", "sd_v2", "sd_v2_v")

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


def resume_lookup(model, names, clip=None) -> dict[str, torch.nn.Module]:
    """Module for every saved name the host's key map (plus our normalisation) resolves to a
    whole diffusion-model weight, or, with `clip`, a whole text-encoder weight."""
    keymap = KeyMap(model, clip)
    roots = {MODEL: model.model, CLIP: None if clip is None else clip.cond_stage_model}
    out = {}
    for name in names:
        hit = keymap.lookup(name)
        root = None if hit is None else roots.get(hit[0])
        if root is None:
            continue
        key, offset, function = _split_value(hit[1])
        if offset is not None or function is not None or not key.endswith(".weight"):
            continue
        try:
            out[name] = root.get_submodule(key[: -len(".weight")])
        except AttributeError:
            continue
    return out


def tag_frequency(captions: list[str], n_images: int) -> dict[str, int]:
    """kohya-style tag counts: comma-separated tags, counted once per image."""
    if len(captions) == 1 and n_images > 1:
        captions = captions * n_images
    counts: Counter = Counter()
    for caption in captions:
        counts.update({t.strip() for t in caption.split(",") if t.strip()})
    return dict(counts)


# ----- the node --------------------------------------------------------------------------------------
def _float(**kw):
    return ("FLOAT", kw)


def _int(**kw):
    return ("INT", kw)


class LycorisTrain:
    """Train a LyCORIS adapter on a MODEL (any algorithm of the core)."""

    CATEGORY = CATEGORY
    FUNCTION = "run"
    INPUT_IS_LIST = True  # the host's dataset nodes give lists of LATENTs/CONDITIONINGs: one run for all
    RETURN_TYPES = ("MODEL", LYCORIS_TYPE, "LOSS_MAP", "IMAGE", "CLIP", "IMAGE")
    RETURN_NAMES = ("model", "lycoris", "loss", "loss_plot", "clip", "samples")
    OUTPUT_TOOLTIPS = ("The input model with the trained adapter applied.",
                       "The trained adapter (connect to Save LyCORIS, a LyCORIS apply node, or "
                       "another train node's resume input).",
                       "Loss per step ({\"loss\": [...]}, as core's Plot Loss Graph reads it) and "
                       "the objective trained (\"objective\": epsilon, v-prediction, flow matching...).",
                       "The loss history drawn as an image.",
                       "The input CLIP with the trained text-encoder adapters applied (as given when "
                       "train_text_encoder is off; empty without a clip input).",
                       "The sample previews (sample_every) decoded by the vae input, one per preview; "
                       "a 1x1 black image without a vae or previews.")
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
                "use_scalar": ("BOOLEAN", {"default": False, "tooltip": "Trainable scalar (baked in on save; "
                               "the save_every state keeps it apart, so resumes stay exact)."}),
                "dora": (list(DORA), {"default": "off", "tooltip": "DoRA weight decomposition and the "
                         "axis of its magnitude (LoRA/LoHa/LoKr)."}),
                "constraint": _float(default=0.0, min=0.0, max=100.0, step=1e-4, round=False,
                                     tooltip="Diag-OFT/BOFT norm constraint (0: none)."),
                "rescaled": ("BOOLEAN", {"default": False, "tooltip": "Diag-OFT/BOFT output rescale."}),
                "dylora_block_size": _int(default=4, min=1, max=4096, tooltip="DyLoRA: ranks train in "
                                          "nested blocks of this size, so the saved LoRA can be cut to "
                                          "any multiple of it (rank and conv_rank must be multiples)."),
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
                             "text, one per line (one per image, or one for all): the saved file's tag "
                             "frequency metadata, and what the text encoder encodes when it is trained."}),
                "clip": ("CLIP", {"tooltip": "The text encoder(s) for train_text_encoder (CLIP/T5 of "
                         "SD1.x/2.x, SDXL, SD3, Flux; left unchanged)."}),
                "train_text_encoder": ("BOOLEAN", {"default": False, "tooltip": "Also train adapters on "
                                       "the text encoder's attention and MLP layers (needs clip and "
                                       "captions; each step re-encodes the batch's captions, replacing "
                                       "the conditioning's text). Not offered for LLM text encoders. "
                                       "Resuming, the adapter's own text-encoder modules continue (off: "
                                       "they are kept unchanged)."}),
                "text_encoder_lr": _float(default=5e-5, min=0.0, max=10.0, step=1e-6, round=False,
                                          tooltip="Learning rate of the text-encoder adapters (its own "
                                          "optimizer group, same schedule; 0 keeps them at their start)."),
                "timestep_sampling": (list(TIMESTEP_SAMPLING), {"default": "uniform", "tooltip":
                                      "How noise levels t are drawn: uniform, or logit-normal (sigmoid of "
                                      "a normal draw; SD3/Flux trainers' choice) with the mean/std below."}),
                "logit_mean": _float(default=0.0, min=-10.0, max=10.0, step=0.01,
                                     tooltip="Logit-normal mean (0: centred on t = 0.5)."),
                "logit_std": _float(default=1.0, min=0.01, max=10.0, step=0.01, tooltip="Logit-normal std."),
                "timestep_shift": (list(SHIFTS), {"default": "model", "tooltip": "model: the model's own "
                                   "noise schedule and shift (set it with ModelSamplingSD3/Flux before "
                                   "this node). Flow models only: fixed: t' = s t / (1 + (s - 1) t) with "
                                   "s = shift; flux resolution: Flux's shift for the latent size."}),
                "shift": _float(default=3.0, min=0.01, max=100.0, step=0.01,
                                tooltip="The fixed timestep shift s (SD3: 3.0)."),
                "flux_guidance": _float(default=-1.0, min=-1.0, max=100.0, step=0.1, tooltip="Guidance "
                                        "value fed to guidance-distilled models (Flux dev) while training; "
                                        "-1 keeps the conditioning's (FluxGuidance node, else the model's "
                                        "default)."),
                "min_snr_gamma": _float(default=0.0, min=0.0, max=100.0, step=0.1, tooltip="Min-SNR-gamma "
                                        "loss weighting for epsilon and v-prediction models (5 is usual; "
                                        "0: off)."),
                "noise_offset": _float(default=0.0, min=0.0, max=1.0, step=0.005, tooltip="Adds this times "
                                       "a per-channel constant to the noise (0.05-0.1 helps very dark/bright "
                                       "images; 0: off)."),
                "caption_dropout": _float(default=0.0, min=0.0, max=1.0, step=0.01, tooltip="Probability "
                                          "that an image is trained with the empty caption instead of its "
                                          "own (the empty_conditioning input, else zeros shaped like the "
                                          "conditioning)."),
                "empty_conditioning": ("CONDITIONING", {"tooltip": "The empty caption (a text encoder fed "
                                       "\"\") for caption dropout; without it a dropped caption is zeros."}),
                "gradient_accumulation": _int(default=1, min=1, max=1024, tooltip="Micro-batches per "
                                              "optimizer step: N x batch_size images per update at the "
                                              "memory of one batch."),
                "oft_blocks": _int(default=0, min=0, max=4096, tooltip="Diag-OFT: a fixed number of blocks "
                                   "per layer instead of a fixed block size (rank); 0: off."),
                "train_norm": ("BOOLEAN", {"default": False, "tooltip": "Also train the norm layers of the "
                               "selected blocks (additive scale/shift deltas, LyCORIS's train_norm)."}),
                "save_every": _int(default=0, min=0, max=1_000_000, tooltip="Save the adapter every N steps "
                                   "into the output folder (with its optimizer state beside it, "
                                   "<name>.optim.pt); 0: off."),
                "save_prefix": ("STRING", {"default": "lycoris/checkpoint", "tooltip": "Path inside the "
                                "output folder for save_every: <prefix>_<run>_step<step>.safetensors."}),
                "resume_state": ("BOOLEAN", {"default": True, "tooltip": "When resume_file has a "
                                 "<name>.optim.pt beside it: continue its optimizer, schedule and data "
                                 "order exactly; steps then counts the whole run (the saved steps "
                                 "included)."}),
                "sample_every": _int(default=0, min=0, max=1_000_000, tooltip="Every N steps, sample a "
                                     "preview with the adapter as trained so far (fixed seed, Euler, cfg "
                                     "1), shown on the node; with a vae also saved as "
                                     "<save_prefix>_<run>_sample_step<step>.png; 0: off."),
                "sample_steps": _int(default=20, min=1, max=1000, tooltip="Sampling steps of each preview."),
                "sample_conditioning": ("CONDITIONING", {"tooltip": "The prompt of the previews (default: "
                                        "the first caption's conditioning)."}),
                "vae": ("VAE", {"tooltip": "Decodes the previews after training into PNGs and the "
                        "samples output."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, resume_file=NO_FILE, **kwargs):
        """Re-run after an interrupted run (its partial result must not be reused) and when the
        resumed file changes on disk."""
        resume_file = resume_file[0] if isinstance(resume_file, list) else resume_file  # INPUT_IS_LIST
        path = None if resume_file in (None, "", NO_FILE) else folder_paths.get_full_path("loras", resume_file)
        if path is None:
            return _interruptions
        st = os.stat(path)
        return (_interruptions, path, st.st_mtime_ns, st.st_size)

    def run(self, **inputs):
        """The node: trained model, adapter, loss, loss plot, the CLIP with its trained adapters and
        the decoded sample previews."""
        return self._train(**from_host_lists(inputs))

    def train(self, **inputs):
        """The first four outputs (model, lycoris, loss, loss_plot), as before the CLIP output."""
        return self._train(**from_host_lists(inputs))[:4]

    def _train(self, model, latents, conditioning, algorithm, preset, rank, alpha, conv_rank,
              conv_alpha, steps, batch_size, learning_rate, optimizer, lr_schedule, warmup_steps,
              seed, gradient_checkpointing, training_dtype, include_regex="", exclude_regex="",
              factor=-1, decompose_both=False, use_tucker=False, use_scalar=False, dora="off",
              constraint=0.0, rescaled=False, train_on_input=False, dropout=0.0, rank_dropout=0.0,
              module_dropout=0.0, weight_decay=0.0, max_grad_norm=1.0, resume_lycoris=None,
              resume_file=NO_FILE, captions="", timestep_sampling="uniform", logit_mean=0.0,
              logit_std=1.0, timestep_shift="model", shift=3.0, flux_guidance=-1.0, min_snr_gamma=0.0,
              noise_offset=0.0, caption_dropout=0.0, empty_conditioning=None, gradient_accumulation=1,
              oft_blocks=0, train_norm=False, save_every=0, save_prefix="lycoris/checkpoint",
              resume_state=True, clip=None, train_text_encoder=False, text_encoder_lr=5e-5,
              sample_every=0, sample_steps=20, sample_conditioning=None, vae=None, dylora_block_size=4,
              unique_id=None):
        global _interruptions
        buckets = latent_buckets(latents)  # one tensor per image size (LyCORIS Dataset), images in order
        samples, n_images = buckets[0], sum(b.shape[0] for b in buckets)
        if len(conditioning) not in (1, n_images):
            raise ValueError(f"conditioning has {len(conditioning)} entries but there are {n_images} "
                             "images: give one caption for all or one per image")
        resume = self._resume_source(resume_lycoris, resume_file)
        lines = [c.strip() for c in captions.splitlines() if c.strip()]
        if train_text_encoder:
            check_text_encoder_inputs(clip, lines, n_images)
        objective = ObjectiveOptions(timestep_sampling, logit_mean, logit_std, timestep_shift, shift,
                                     min_snr_gamma, noise_offset, caption_dropout, gradient_accumulation)
        conditioning = thawed(conditioning)
        dropped = None
        if caption_dropout > 0:
            dropped = thawed(empty_conditioning[:1]) if empty_conditioning else zero_conditioning(conditioning)
            if "guidance" in conditioning[0][1] and "guidance" not in dropped[0][1]:
                dropped = with_guidance(dropped, conditioning[0][1]["guidance"])
        if flux_guidance >= 0:
            conditioning = with_guidance(conditioning, flux_guidance)
            dropped = None if dropped is None else with_guidance(dropped, flux_guidance)
        objective.check(objective_name(model.get_model_object("model_sampling")))
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
            saved_state = load_train_state(resume_file) if resume_state and resume_lycoris is None else None
            te_lrs, encoder = {}, None
            if resume is not None:
                built, kept = self._resumed(mp, resume, device, clip if train_text_encoder else None)
                options = {}
            else:
                options = dict(factor=factor, decompose_both=decompose_both, use_tucker=use_tucker,
                               use_scalar=use_scalar, dora=DORA[dora], constraint=constraint,
                               rescaled=rescaled, on_input=train_on_input, block_size=dylora_block_size)
                built = self._fresh(mp, hint, algorithm, preset, include_regex, exclude_regex, rank,
                                    alpha, conv_rank, conv_alpha, options, device, unique_id,
                                    oft_blocks=oft_blocks, train_norm=train_norm)
                kept = {}
                options = {k: v for k, v in options.items() if k not in built.ignored["options"]}
                options.update(oft_blocks=oft_blocks or None, train_norm=train_norm)
            if train_text_encoder and resume is not None:
                te_lrs = dict.fromkeys(resumed_text_encoder(clip, built), text_encoder_lr)
            elif train_text_encoder:
                te = text_encoder_adapters(clip, algorithm, rank, alpha, {k: v for k, v in options.items()
                                           if k not in ("oft_blocks", "train_norm")},
                                           exclude_regex, oft_blocks)
                built.adapters.update(te.adapters)
                built.modules.update(te.modules)
                te_lrs = dict.fromkeys(te.adapters, text_encoder_lr)
            if train_text_encoder:
                encoder = CaptionEncoder(clip, lines, checkpointing=gradient_checkpointing)
            if saved_state is not None:
                restore_scalars(saved_state, built.adapters)
            trainer = Trainer(built.adapters, steps=steps, lr=learning_rate, optimizer=optimizer,
                              weight_decay=weight_decay, schedule=lr_schedule,
                              warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
                              loss_scaling=compute == torch.float16 and device.type == "cuda",
                              accumulation=gradient_accumulation, lrs=te_lrs)
            if saved_state is not None:
                restore_train_state(saved_state, trainer, device, steps)
            start = trainer.step_count
            regularizer = Dropout(dropout, rank_dropout, module_dropout)
            settings = dict(dropout=dropout or None, rank_dropout=rank_dropout or None,
                            module_dropout=module_dropout or None)
            if resume is None:
                settings.update(preset=preset, include=include_regex.strip() or None,
                                exclude=exclude_regex.strip() or None,
                                **{k: v for k, v in options.items() if v not in (None, False)})
            run = dict(learning_rate=learning_rate, optimizer=optimizer, lr_schedule=lr_schedule,
                       warmup_steps=warmup_steps, seed=seed, batch_size=batch_size,
                       training_dtype=training_dtype, gradient_checkpointing=gradient_checkpointing,
                       max_grad_norm=max_grad_norm, weight_decay=weight_decay, interrupted=False,
                       objective=objective, flux_guidance=flux_guidance,
                       text_encoder_lr=text_encoder_lr if train_text_encoder else None)

            def metadata(done: int, interrupted: bool = False) -> dict[str, str]:
                return self._metadata({**kept, **built.adapters}, resume, settings, hint, done, buckets,
                                      captions, {**run, "interrupted": interrupted})

            on_step = []
            if save_every > 0:
                on_step.append(Checkpoints(save_every, save_prefix, {**kept, **built.adapters}, trainer,
                                           lambda done: metadata(done - start), device))
            previews = None
            if sample_every > 0:
                previews = SamplePreviews(sample_every, sample_steps, conditioning, samples.shape, seed,
                                          sample_conditioning=sample_conditioning, guidance=flux_guidance,
                                          start=start, total=steps,
                                          save_prefix=save_prefix if vae is not None else None)
                on_step.append(previews)
            loaded = [mp] + ([clip.patcher] if encoder is not None else [])
            comfy.model_management.load_models_gpu(loaded, memory_required=1e20, force_full_load=True)
            progress = run_training(mp, [b.clone() for b in buckets], conditioning, built.pairs(), trainer,
                                    steps=steps, batch_size=batch_size, seed=seed,
                                    regularizer=regularizer,
                                    gradient_checkpointing=gradient_checkpointing, unique_id=unique_id,
                                    options=objective, dropped_conditioning=dropped,
                                    objective_state=None if saved_state is None else saved_state["objective"],
                                    on_step=on_step, captions=encoder)
        freeze(built.adapters)
        for a in built.adapters.values():
            a.to("cpu")
        done = len(progress.losses)
        if progress.interrupted:
            _interruptions += 1
            log.warning("LyCORIS Train interrupted after %d of %d steps: returning what was trained",
                        start + done, steps)
            send_progress_text(f"interrupted after {start + done}/{steps} steps (kept)", unique_id)
        adapters = {**kept, **built.adapters}
        meta = metadata(done, progress.interrupted)
        result = AdapterFile("", adapters, meta, [], sum(t.numel() * t.element_size()
                             for a in built.adapters.values() for t in a.export().values()), {})
        if encoder is not None:
            trained_model, clip = apply_lycoris(model, clip, result, 1.0, 1.0)[:2]
        else:
            trained_model = apply_lycoris(model, None, result, 1.0, 0.0)[0]
        image = np.asarray(draw_loss(progress.losses), dtype=np.float32) / 255.0
        return (trained_model, result, {"loss": list(progress.losses), "objective": progress.objective},
                torch.from_numpy(image)[None], clip, no_samples() if previews is None else previews.images(vae))

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
               options, device, unique_id, oft_blocks=0, train_norm=False):
        """New adapters on the selected layers of the diffusion model, named by the host's key map;
        with `train_norm`, `norm` adapters on the norm layers of the same selection too."""
        root = Root(mp.model.diffusion_model, "lora_unet", "unet", module_names(mp, hint))
        targets = select_targets(root, preset, include=include, exclude=exclude,
                                 kinds=default_kinds(algorithm), conv=conv_rank > 0)
        built = create_adapters(targets, algorithm, rank, alpha, conv_rank=conv_rank,
                                conv_alpha=conv_alpha, device=device, dequantiser_for=dequantiser_for,
                                oft_blocks=oft_blocks, **options)
        if train_norm and "norm" not in default_kinds(algorithm):
            norms = select_targets(root, preset, include=include, exclude=exclude, kinds=("norm",))
            extra = create_adapters(norms, "norm", device=device)
            built.adapters.update(extra.adapters)
            built.modules.update(extra.modules)
        unfit = built.ignored.get("cannot create", [])
        if unfit:
            log.warning("LyCORIS Train: %s cannot adapt %d of the selected layers with these settings, "
                        "they are left out (first: %s)", algorithm, len(unfit), unfit[0])
            send_progress_text(f"{len(unfit)} layers left out: {unfit[0]}", unique_id)
        return built

    @staticmethod
    def _resumed(mp, saved, device, clip=None):
        """Trainable copies of the saved modules this model has, and the text encoders' of `clip`
        (given when they train); the others are kept unchanged."""
        lookup = resume_lookup(mp, list(saved), clip)
        built, missing = resume_adapters(saved, lookup, device=device)
        built.adapters = as_dylora(built.adapters, getattr(saved, "metadata", None))  # nested blocks go on
        kept = {name: saved[name] for name in missing}
        if missing:
            log.warning("LyCORIS Train: %d saved modules are not layers of this diffusion model%s and are "
                        "kept unchanged (first: %s)", len(missing),
                        " or CLIP" if clip is not None else " (text-encoder ones train with train_text_encoder)",
                        missing[0])
        return built, kept

    @staticmethod
    def _metadata(adapters, resume, settings, hint, done, buckets, captions, run) -> dict[str, str]:
        samples, n_images = buckets[0], sum(b.shape[0] for b in buckets)
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
        tags = tag_frequency(lines, n_images) if lines else None
        spatial = tuple(samples.shape[-2:]) if hint is not None and samples.ndim == 4 else None
        extra = {"ss_learning_rate": run["learning_rate"], "ss_unet_lr": run["learning_rate"],
                 "ss_optimizer": "{0.module}.{0.attr}".format(OPTIMIZERS[run["optimizer"]]),
                 "ss_lr_scheduler": run["lr_schedule"], "ss_lr_warmup_steps": run["warmup_steps"],
                 "ss_seed": run["seed"], "ss_batch_size_per_device": run["batch_size"],
                 "ss_num_train_images": n_images,
                 "ss_gradient_checkpointing": run["gradient_checkpointing"],
                 "ss_mixed_precision": run["training_dtype"], "ss_max_grad_norm": run["max_grad_norm"],
                 "ss_weight_decay": run["weight_decay"], "ss_network_train_text_encoder_only": False,
                 "ss_network_train_unet_only": run["text_encoder_lr"] is None,
                 "ss_training_comment": "trained in ComfyUI with comfyui-lycoris"
                 + (f" (interrupted after {done} steps)" if run["interrupted"] else "")}
        if run["text_encoder_lr"] is not None:
            extra["ss_text_encoder_lr"] = run["text_encoder_lr"]
        extra.update(objective_metadata(run["objective"]))
        extra.update(bucket_metadata(buckets, 8 if spatial else None))
        if run["flux_guidance"] >= 0:
            extra["ss_guidance_scale"] = run["flux_guidance"]
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
