"""What LyCORIS Train reads as its images and captions: the bucketed LATENT (one tensor per image
size, as LyCORIS Dataset makes it) and the lists the host passes to a node with INPUT_IS_LIST (the
v0.8+ host's own dataset nodes output lists of LATENTs and CONDITIONINGs), turned into one run's
inputs.

The bucketed LATENT: `{"samples": <first bucket>, "lycoris_buckets": [one tensor per bucket]}`
(a plain `{"samples": ...}` when every image has one size). Images are numbered bucket after
bucket: the CONDITIONING (one entry per image) and the caption lines follow that order.
"""
from __future__ import annotations

import torch

BUCKETS_KEY = "lycoris_buckets"


# ----- the bucketed LATENT ------------------------------------------------------------------------
def bucketed_latent(buckets: list[torch.Tensor]) -> dict:
    """The LATENT for images in buckets (a plain LATENT for one bucket)."""
    if len(buckets) == 1:
        return {"samples": buckets[0]}
    return {"samples": buckets[0], BUCKETS_KEY: list(buckets)}


def latent_buckets(latent: dict) -> list[torch.Tensor]:
    """One tensor per bucket of a LATENT (its `samples` alone when it has no buckets)."""
    buckets = latent.get(BUCKETS_KEY)
    if buckets is None:
        return [latent["samples"]]
    if not isinstance(buckets, (list, tuple)) or not buckets or not all(isinstance(b, torch.Tensor) for b in buckets):
        raise ValueError(f"LATENT: {BUCKETS_KEY} must be a non-empty list of tensors (one per image size bucket)")
    kinds = {(b.ndim, b.shape[1]) for b in buckets}
    if len(kinds) > 1:
        raise ValueError(f"LATENT: {BUCKETS_KEY} mixes latents of different channels or dimensions "
                         f"({sorted(kinds)}): one VAE encodes them all")
    return list(buckets)


def bucket_metadata(buckets: list[torch.Tensor], cell: int | None) -> dict[str, object]:
    """kohya's entries for a dataset in several size buckets: `ss_enable_bucket`, and when the
    latent cell is known (`cell` pixels), `ss_bucket_info` with each bucket's size and images."""
    if len(buckets) < 2:
        return {}
    out: dict[str, object] = {"ss_enable_bucket": True}
    if cell:
        out["ss_bucket_info"] = {"buckets": {str(k): {"resolution": [b.shape[-1] * cell, b.shape[-2] * cell],
                                                      "count": b.shape[0]} for k, b in enumerate(buckets)}}
    return out


# ----- the host's lists (INPUT_IS_LIST) -----------------------------------------------------------
def merge_latents(latents: list[dict]) -> tuple[dict, list[int]]:
    """Several LATENTs as one bucketed LATENT (images grouped by size, first size seen first),
    and for every image of the result its number in the LATENTs as given."""
    groups: dict[tuple, list[tuple[torch.Tensor, int]]] = {}
    start = 0
    for latent in latents:
        for t in latent_buckets(latent):
            groups.setdefault(tuple(t.shape[1:]), []).append((t, start))
            start += t.shape[0]
    buckets = [torch.cat([t for t, _ in group]) if len(group) > 1 else group[0][0] for group in groups.values()]
    order = [s + i for group in groups.values() for t, s in group for i in range(t.shape[0])]
    return bucketed_latent(buckets), order


def _flat_conditioning(conditionings: list, latents: list[dict], n: int) -> list:
    """One entry per image (or one for all) from a list of CONDITIONINGs: one per image, one per
    LATENT (each LATENT's images share it), or per bucket lists as the host's Resolution Bucket gives."""
    entries = [e for c in conditionings for e in c]
    if len(entries) in (1, n):
        return entries
    counts = [sum(t.shape[0] for t in latent_buckets(x)) for x in latents]
    if len(conditionings) == len(latents) and all(len(c) == 1 for c in conditionings):
        return [c[0] for c, k in zip(conditionings, counts) for _ in range(k)]
    raise ValueError(f"conditioning: {len(entries)} entries in {len(conditionings)} lists for {n} images in "
                     f"{len(latents)} latents: give one per image, one per latent, or one for all")


def one_line(text: str) -> str:
    """A caption on one line (line breaks and runs of spaces become one space)."""
    return " ".join(text.split())


def _caption_lines(captions: list[str], n: int) -> list[str]:
    """Caption lines from a list of STRINGs: one string per image, else the lines of all strings."""
    if len(captions) == n:
        return [one_line(c) for c in captions]
    return [line for c in captions for line in c.splitlines() if line.strip()]


def from_host_lists(inputs: dict) -> dict:
    """The inputs of a call the host made with every input in a list (INPUT_IS_LIST) as a direct
    call gives them: one value each, the LATENTs merged into buckets by size, and the conditioning
    and caption lines put in the merged images' order. A direct call is returned as it is."""
    if not isinstance(inputs.get("model"), list):
        return inputs
    out = {k: v[0] for k, v in inputs.items()}
    latent, order = merge_latents(inputs["latents"])
    n = len(order)
    out["latents"] = latent
    entries = _flat_conditioning(inputs["conditioning"], inputs["latents"], n)
    out["conditioning"] = [entries[i] for i in order] if len(entries) == n else entries
    if "captions" in inputs:
        lines = _caption_lines(inputs["captions"], n)
        out["captions"] = "\n".join([lines[i] for i in order] if len(lines) == n else lines)
    return out
