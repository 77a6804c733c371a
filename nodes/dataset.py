"""LyCORIS Dataset: a folder of images with same-name caption files, bucketed by aspect ratio
(`lycoris_core.train.buckets`), VAE-encoded once with the latents cached on disk, and captions
text-encoded, in the form LyCORIS Train reads.

The bucketed LATENT: `{"samples": <first bucket>, "lycoris_buckets": [one tensor per bucket]}`
(a plain `{"samples": ...}` when every image has one size). Images are numbered bucket after
bucket: the CONDITIONING (one entry per image) and the caption lines follow that order. Buckets
come largest first (then larger area first), images inside a bucket by file name.

Latent cache: one safetensors file per image under `<ComfyUI user folder>/comfyui-lycoris/
latent-cache` (or the `cache_folder` given), never in the image folder. Its name is a hash of the
image file's bytes, the VAE's weights and dtype, and the bucket, resize and crop: a changed image,
another VAE or other bucket settings encode again; an unchanged one is read back without the VAE.

LyCORIS Train reads the bucketed LATENT and the host's dataset lists in `train_inputs`.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import safe_open

import comfy.model_management
import comfy.utils
import folder_paths
import node_helpers

from ..lycoris_core.io import data_sha256, file_signature, write_safetensors
from ..lycoris_core.train import Placement, bucket_sizes, place
from .host_compat import send_progress_text
from .train_inputs import bucketed_latent, one_line

log = logging.getLogger("comfyui-lycoris")

CATEGORY = "training/lycoris"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_FORMAT = "comfyui-lycoris latent cache 1"  # part of every cache key: change it when encoding changes
RESAMPLE = "lanczos"
EXIF_ORIENTATION = 0x0112  # values 5-8 turn the image a quarter: width and height swap


# ----- the folder -------------------------------------------------------------------------------
def dataset_folder(folder: str) -> str:
    """The folder as given if absolute, else inside ComfyUI's input folder; it must exist."""
    folder = folder.strip()
    if not folder:
        raise ValueError("folder: give a folder of images (inside ComfyUI's input folder, or an absolute path)")
    path = folder if os.path.isabs(folder) else os.path.join(folder_paths.get_input_directory(), folder)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder (folder {folder!r}: a path inside ComfyUI's input "
                                "folder, or an absolute path)")
    return path


def image_files(folder: str) -> list[str]:
    """The folder's images (not its subfolders), by name."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))


def read_caption(image: str, extension: str) -> str:
    """The caption in the image's same-name file, on one line ("" when there is none)."""
    path = os.path.splitext(image)[0] + extension
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return one_line(f.read())


def _open(data: bytes, path: str) -> Image.Image:
    try:
        return node_helpers.pillow(Image.open, io.BytesIO(data))
    except Exception as exc:
        raise ValueError(f"{path}: not an image PIL can read ({exc})") from None


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as shown, after the EXIF orientation (read from the header only)."""
    w, h = image.size
    return (h, w) if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (w, h)


def bucket_pixels(image: Image.Image, placement: Placement) -> torch.Tensor:
    """The image upright, resized to cover its bucket and centre-cropped to it: [1, H, W, 3] in 0..1
    (ComfyUI's IMAGE, converted as its image loader converts)."""
    image = node_helpers.pillow(ImageOps.exif_transpose, image)
    if image.mode == "I":
        image = image.point(lambda i: i * (1 / 255))
    image = image.convert("RGB").resize(placement.resized, Image.Resampling.LANCZOS).crop(placement.crop_box)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


# ----- the latent cache -------------------------------------------------------------------------
_VAE_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vae_identity(vae) -> str:
    """A hash of the VAE's weights (names, shapes, bytes) and dtype; computed once per VAE object."""
    known = _VAE_IDS.get(vae)
    if known is None:
        weights = vae.first_stage_model.state_dict()
        layout = json.dumps([(k, list(t.shape), str(t.dtype)) for k, t in weights.items()])
        known = hashlib.sha256((layout + data_sha256(weights)).encode()).hexdigest()
        _VAE_IDS[vae] = known
    return f"{known}:{vae.vae_dtype}"


class LatentCache:
    """Latents by key, one safetensors file each (two-level folders keep listings short)."""

    def __init__(self, folder: str | None):
        self.folder = folder

    @staticmethod
    def key(image_sha: str, vae_id: str, placement: Placement) -> str:
        parts = [CACHE_FORMAT, image_sha, vae_id, RESAMPLE, placement.bucket, placement.resized, placement.crop]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def path(self, key: str) -> str:
        return os.path.join(self.folder, key[:2], key + ".safetensors")

    def get(self, key: str) -> torch.Tensor | None:
        """The cached latent, or None (no cache, not there, or unreadable: then it is encoded again)."""
        if self.folder is None or not os.path.isfile(self.path(key)):
            return None
        try:
            with safe_open(self.path(key), framework="pt") as f:
                return f.get_tensor("latent")
        except Exception as exc:  # a damaged entry is replaced by a fresh encode, never used
            log.warning("LyCORIS Dataset: cache entry %s unreadable (%s), encoding again", self.path(key), exc)
            return None

    def put(self, key: str, latent: torch.Tensor, source: str) -> None:
        if self.folder is not None:
            write_safetensors({"latent": latent}, self.path(key), {"format": CACHE_FORMAT, "source": source},
                              overwrite=True)


def default_cache_folder() -> str:
    """Beside ComfyUI's user settings: kept across restarts (unlike temp), not an output."""
    return os.path.join(folder_paths.get_user_directory(), "comfyui-lycoris", "latent-cache")


# ----- the node ---------------------------------------------------------------------------------
@dataclass
class Encoded:
    """The dataset as encoded: latents per bucket, and per image (in bucket order) its file and caption."""

    buckets: list[torch.Tensor]
    sizes: list[tuple[int, int]]
    files: list[str]
    captions: list[str]
    from_cache: int


def encode_folder(folder: str, vae, *, resolution: int, step: int, min_side: int, max_side: int,
                  caption_extension: str = ".txt", cache: LatentCache | None = None) -> Encoded:
    """Every image of the folder bucketed, resized and cropped, and VAE-encoded (or read back from
    the cache), grouped by bucket: largest bucket first, files by name inside one."""
    compression = vae.spacial_compression_encode()
    if step % compression:
        raise ValueError(f"bucket_step {step} is not a multiple of this VAE's {compression}-pixel latent cell: "
                         f"use a multiple of {compression} (64 suits every image model)")
    files = image_files(folder)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    sizes = bucket_sizes(resolution, step, min_side, max_side)
    cache = cache or LatentCache(None)
    vae_id = vae_identity(vae) if cache.folder is not None else ""
    pbar = comfy.utils.ProgressBar(len(files))
    latents, placements, hits = {}, {}, 0
    for path in files:
        comfy.model_management.throw_exception_if_processing_interrupted()
        with open(path, "rb") as f:
            data = f.read()
        image = _open(data, path)
        placement = place(upright_size(image), sizes)
        key = LatentCache.key(hashlib.sha256(data).hexdigest(), vae_id, placement)
        latent = cache.get(key)
        if latent is None:
            latent = vae.encode(bucket_pixels(image, placement)).cpu()
            cache.put(key, latent, path)
        else:
            hits += 1
        latents[path], placements[path] = latent, placement
        pbar.update(1)
    groups: dict[tuple[int, int], list[str]] = {}
    for path in files:
        groups.setdefault(placements[path].bucket, []).append(path)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), -kv[0][0] * kv[0][1], kv[0]))
    order = [p for _, paths in ordered for p in paths]
    return Encoded(buckets=[torch.cat([latents[p] for p in paths]) for _, paths in ordered],
                   sizes=[b for b, _ in ordered], files=order,
                   captions=[read_caption(p, caption_extension) for p in order], from_cache=hits)


def encode_captions(clip, captions: list[str]) -> list:
    """One conditioning entry per caption, each distinct caption encoded once (as CLIPTextEncode)."""
    done: dict[str, list] = {}
    for text in dict.fromkeys(captions):
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        if len(cond) != 1:
            raise ValueError(f"the text encoder gave {len(cond)} conditioning entries for the caption {text!r}; "
                             "one per image is needed (hooks or schedules on this CLIP?)")
        done[text] = cond[0]
    return [done[t] for t in captions]


class LycorisDataset:
    """Folder of images + captions -> bucketed LATENT, CONDITIONING and caption lines."""

    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("LATENT", "CONDITIONING", "STRING")
    RETURN_NAMES = ("latents", "conditioning", "captions")
    OUTPUT_TOOLTIPS = ("Every image's latent, grouped by size bucket (LyCORIS Train draws each batch "
                       "from one bucket; other nodes see the first bucket).",
                       "One entry per image, in the order of the latents.",
                       "The captions, one line per image in the order of the latents (LyCORIS Train's "
                       "captions input: tag frequency metadata, text-encoder training).")
    DESCRIPTION = ("A folder of images with same-name .txt captions as a training set: each image is "
                   "resized and centre-cropped to the aspect-ratio bucket nearest its own, VAE-encoded once "
                   "(latents cached on disk, re-encoded when the image or the VAE changes) and its caption "
                   "text-encoded.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": ("STRING", {"default": "", "tooltip": "Folder of images (png, jpg, webp, bmp) with "
                           "same-name caption files: a path inside ComfyUI's input folder, or absolute."}),
                "vae": ("VAE", {"tooltip": "Encodes the images (its weights are part of the cache key)."}),
                "clip": ("CLIP", {"tooltip": "Encodes the captions, as CLIP Text Encode does."}),
                "resolution": ("INT", {"default": 1024, "min": 64, "max": 8192, "step": 8, "tooltip":
                               "Buckets hold at most resolution x resolution pixels."}),
                "bucket_step": ("INT", {"default": 64, "min": 8, "max": 1024, "step": 8, "tooltip": "Bucket "
                                "sides are multiples of this (a multiple of the VAE's 8 or 16 pixels)."}),
                "min_side": ("INT", {"default": 256, "min": 8, "max": 8192, "step": 8, "tooltip":
                             "Shortest bucket side. min_side = max_side = resolution: one square size."}),
                "max_side": ("INT", {"default": 2048, "min": 8, "max": 16384, "step": 8,
                             "tooltip": "Longest bucket side."}),
            },
            "optional": {
                "caption_extension": ("STRING", {"default": ".txt", "tooltip": "Caption file of an image: its "
                                      "name with this extension (no file: an empty caption)."}),
                "cache_latents": ("BOOLEAN", {"default": True, "tooltip": "Keep encoded latents on disk and "
                                  "reuse them while the image, VAE and bucket are unchanged."}),
                "cache_folder": ("STRING", {"default": "", "tooltip": "Where cached latents go (empty: "
                                 "comfyui-lycoris/latent-cache in ComfyUI's user folder)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, folder, caption_extension=".txt", **kwargs):
        """Re-run when an image or caption file of the folder is added, removed or rewritten."""
        try:
            path = dataset_folder(folder)
        except (ValueError, OSError):
            return folder
        listing = []
        for image in image_files(path):
            for p in (image, os.path.splitext(image)[0] + caption_extension):
                listing.append((p, file_signature(os.stat(p)) if os.path.isfile(p) else None))
        return json.dumps(listing)

    def load(self, folder, vae, clip, resolution, bucket_step, min_side, max_side, caption_extension=".txt",
             cache_latents=True, cache_folder="", unique_id=None):
        path = dataset_folder(folder)
        cache = LatentCache((cache_folder.strip() or default_cache_folder()) if cache_latents else None)
        data = encode_folder(path, vae, resolution=resolution, step=bucket_step, min_side=min_side,
                             max_side=max_side, caption_extension=caption_extension, cache=cache)
        conditioning = encode_captions(clip, data.captions)
        summary = ", ".join(f"{w}x{h}: {b.shape[0]}" for (w, h), b in zip(data.sizes, data.buckets))
        text = (f"{len(data.files)} images in {len(data.buckets)} bucket(s) ({summary}); "
                f"{data.from_cache} latents from the cache")
        log.info("LyCORIS Dataset: %s: %s", path, text)
        send_progress_text(text, unique_id)
        return bucketed_latent(data.buckets), conditioning, "\n".join(data.captions)


NODE_CLASS_MAPPINGS = {"LycorisDataset": LycorisDataset}
NODE_DISPLAY_NAME_MAPPINGS = {"LycorisDataset": "LyCORIS Dataset"}
