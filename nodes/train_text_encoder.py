"""Text-encoder training for LyCORIS Train: which encoders can be trained, their kohya names, fresh
adapters on their attention/MLP Linears (or a resumed file's text-encoder modules), and the captions
re-encoded through them every step (attention and MLP checkpointed when asked)."""
from __future__ import annotations

import re

import torch
from torch import nn

import comfy.lora
import comfy.samplers

from ..lycoris_core.train import Built, Root, autograd_safe, checkpointed, create_adapters, select_targets
from .host_compat import dequantiser_for

# SDXL, SD3, Flux). LLM encoders (Qwen2.5-VL, Gemma, Llama, Qwen3) are refused: billions of
# parameters, and their trainers leave them frozen.
TRAINABLE_TEXT_ENCODERS = frozenset({"CLIPTextModel", "T5"})
TE_PRESET = "attn-mlp"  # the text encoders' attention and MLP Linears (kohya's text-encoder LoRA)
TE_NAME = re.compile(r"lora_te(\d*)_")
# what gradient checkpointing recomputes: the attention and the MLP inside each CLIP layer and T5
# block (attribute names fixed by the checkpoint formats). The residual adds around them update the
# activations in place, which a recomputed region must not do: torch's non-reentrant checkpoint keeps
# the recomputed tensors by reference, so an in-place update after one is saved silently changes
# the gradients (checkpointing whole layers does).
CHECKPOINTED = frozenset({"self_attn", "mlp", "SelfAttention", "DenseReluDense"})


def text_encoder_classes(clip) -> list[str]:
    """The transformer class of every text encoder inside a CLIP object (one per encoder)."""
    import comfy.sd1_clip

    return [type(m.transformer).__name__ for m in clip.cond_stage_model.modules()
            if isinstance(m, comfy.sd1_clip.SDClipModel) and hasattr(m, "transformer")]


def check_trainable_text_encoder(clip) -> None:
    """Refuse, naming them, text encoders that are not CLIP/T5 (LLM encoders) or none at all."""
    found = text_encoder_classes(clip)
    unfit = sorted({c for c in found if c not in TRAINABLE_TEXT_ENCODERS})
    if not found or unfit:
        what = ", ".join(unfit) if unfit else "no CLIP/T5 text encoder"
        raise ValueError(f"train_text_encoder: this CLIP holds {what}; text-encoder training is offered "
                         f"for CLIP and T5 encoders only (SD1.x/2.x, SDXL, SD3, Flux), not for LLM "
                         "encoders: switch train_text_encoder off")


def text_encoder_names(clip) -> dict[str, str]:
    """Text-encoder module path (inside `cond_stage_model`) -> kohya name, one of the names the
    host's key map gives it: `lora_te_` for a lone CLIP (SD1.x/2.x), `lora_te1_`/`lora_te2_` for
    CLIP-L/CLIP-G beside others (SDXL, SD3, Flux), and the highest, `lora_te3_`, for T5 (kohya's)."""
    lone = len(text_encoder_classes(clip)) == 1
    candidates: dict[str, list[tuple[int, str]]] = {}
    for name, value in comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}).items():
        match = TE_NAME.match(name)
        if match and isinstance(value, str) and value.endswith(".weight"):
            candidates.setdefault(value[:-len(".weight")], []).append((int(match.group(1) or 0), name))
    out = {}
    for path, names in candidates.items():
        encoder = getattr(clip.cond_stage_model, path.split(".", 1)[0], None)
        if type(getattr(encoder, "transformer", None)).__name__ == "T5":
            out[path] = max(names)[1]
        else:
            numbered = [n for n in names if n[0] > 0]
            out[path] = min(names if lone or not numbered else numbered)[1]
    return out


def text_encoder_adapters(clip, algorithm, rank, alpha, options, exclude, oft_blocks):
    """Fresh adapters on the CLIP/T5 attention and MLP Linears the host's loaders can name."""
    names = text_encoder_names(clip)
    root = Root(clip.cond_stage_model, "lora_te", "te", names)
    targets = [t for t in select_targets(root, TE_PRESET, exclude=exclude, kinds=("linear",))
               if t.path in names]
    if not targets:
        raise ValueError("train_text_encoder: no attention/MLP layer of this CLIP has a name the "
                         "LoRA loaders know")
    return create_adapters(targets, algorithm, rank, alpha, device=clip.patcher.load_device,
                           dequantiser_for=dequantiser_for, oft_blocks=oft_blocks, **options)


def resumed_text_encoder(clip, built: Built) -> list[str]:
    """The names of the resumed adapters that sit on `clip`'s text encoders, moved to its device;
    refuses a resumed adapter without any (there is nothing of the text encoder to continue)."""
    inside = {id(m) for m in clip.cond_stage_model.modules()}
    names = [n for n, m in built.modules.items() if id(m) in inside]
    if not names:
        raise ValueError("train_text_encoder: the resumed adapter has no text-encoder module that is a "
                         "layer of this CLIP (lora_te*_ names), so there is no text-encoder training to "
                         "continue: switch train_text_encoder off, or start a fresh run")
    for name in names:
        built.adapters[name].to(clip.patcher.load_device)
    return names


def encoder_layers(root: nn.Module) -> list[nn.Module]:
    """The layers of every text encoder below `root`: the entries of the outermost ModuleLists
    (CLIP's `encoder.layers`, T5's `encoder.block`)."""
    layers: list[nn.Module] = []
    for child in root.children():
        if isinstance(child, nn.ModuleList):
            layers.extend(child)
        else:
            layers.extend(encoder_layers(child))
    return layers


def checkpoint_units(root: nn.Module) -> list[nn.Module]:
    """The attention and MLP modules of every encoder layer below `root` (see CHECKPOINTED)."""
    return [m for layer in encoder_layers(root) for name, m in layer.named_modules()
            if name.rsplit(".", 1)[-1] in CHECKPOINTED]


def check_text_encoder_inputs(clip, captions: list[str], n_images: int) -> None:
    """Refuse text-encoder training without what it needs, before any work."""
    if clip is None:
        raise ValueError("train_text_encoder needs the clip input (the text encoder to train)")
    if not captions:
        raise ValueError("train_text_encoder needs the captions input (one line per image, or one for "
                         "all): the text encoder encodes them every step")
    if len(captions) not in (1, n_images):
        raise ValueError(f"captions has {len(captions)} lines but there are {n_images} images: give one "
                         "caption for all or one per image")
    check_trainable_text_encoder(clip)


class CaptionEncoder:
    """The captions encoded through the CLIP with grad, for every step of text-encoder training.

    Tokenised once; each step the batch's captions go through `clip.encode_from_tokens` (the host's
    own path: clip skip, weights, pooled output) while the adapters sit on the encoder, and the
    result replaces the cross-attention and pooled output of the image's processed cond, whose
    model conds are rebuilt by the model's own `extra_conds` (so SDXL's size/pooled vector too).
    With `checkpointing`, the attention and MLP of each encoder layer recompute their activations
    in backward."""

    def __init__(self, clip, captions: list[str], checkpointing: bool = False):
        self.clip = clip
        self.root = clip.cond_stage_model
        self.checkpointed = checkpoint_units(self.root) if checkpointing else []
        self.tokens = [clip.tokenize(c) for c in captions]
        self.count = len(captions)
        self.extra_conds = self.templates = self.latent = None

    def index(self, image: int) -> int:
        return image if self.count > 1 else 0

    def bind(self, model_wrap, templates: list[dict], x0_all: torch.Tensor) -> None:
        """Called inside the guider: the processed conds to rebuild and the model that builds them."""
        autograd_safe(self.root)
        self.extra_conds = model_wrap.inner_model.extra_conds
        self.templates, self.latent = templates, x0_all[:1]
        self.device = x0_all.device

    def encode(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cross-attention, pooled output) of caption `i` through the host's encode path."""
        with checkpointed(self.checkpointed):
            return self.clip.encode_from_tokens(self.tokens[i], return_pooled=True)

    def encoded(self, wanted) -> list[dict | None]:
        """Processed conds for caption indices `wanted` (others None), with grad to the encoder."""
        out: list[dict | None] = [None] * self.count
        for i in wanted:
            cond, pooled = self.encode(i)
            base = self.templates[i if len(self.templates) > 1 else 0]
            fresh = {**base, "cross_attn": cond, "model_conds": dict(base["model_conds"])}
            if pooled is not None:
                fresh["pooled_output"] = pooled
            out[i] = comfy.samplers.encode_model_conds(self.extra_conds, [fresh], torch.zeros_like(self.latent),
                                                       self.device, "positive", latent_image=self.latent)[0]
        return out
