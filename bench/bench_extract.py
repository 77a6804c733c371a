"""Extracting a LoCon from a whole SD1.5-architecture UNet: lycoris-lora's `extract_diff` against
our `extract` (exact and randomized SVD), measured in the same run, with the error each reaches.

The UNet is diffusers' UNet2DConditionModel with SD1.5's layout (4 levels, 2 res blocks each,
cross-attention to 768-d text). `--width` is its base channel count: 320 is the real SD1.5 UNet
(860M parameters); the default 128 (~140M) keeps a run to minutes on a small CPU. The tuned copy
is base + a change of rank 64 per layer with a decaying spectrum plus dense noise 1e-3 of its
size, so rank 32 leaves a tail to approximate.

    python bench/bench_extract.py [--width 128] [--rank 32] [--device cpu]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lycoris_core.tools.extract import extract  # noqa: E402
from lycoris_core.tools.lowrank import RankRule, Solver  # noqa: E402


def build_unet(width: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width), cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def tuned_state(base: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """base + a rank-64 change with singular values decaying 0.93^i, plus 1e-3 dense noise."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, w in base.items():
        if w.ndim < 2 or not key.endswith(".weight"):
            out[key] = w.clone()
            continue
        rows, cols = w.shape[0], math.prod(w.shape[1:])
        k = min(64, rows, cols)
        a = torch.randn(rows, k, generator=g) / math.sqrt(rows)
        b = torch.randn(k, cols, generator=g) / math.sqrt(cols)
        change = (a * 0.93 ** torch.arange(k, dtype=torch.float32)) @ b
        change += 1e-3 * change.norm() / math.sqrt(rows * cols) * torch.randn(rows, cols, generator=g)
        out[key] = w + 0.05 * w.norm() / change.norm() * change.reshape(w.shape)
    return out


def rel_errors(diffs: dict[str, torch.Tensor], products: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: float((diffs[n] - products[n]).norm() / diffs[n].norm()) for n in diffs if n in products}


def lycoris_products(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, down in state.items():
        if key.endswith(".lora_down.weight"):
            name = key[:-len(".lora_down.weight")]
            up = state[f"{name}.lora_up.weight"].float()
            out[name] = up.reshape(up.shape[0], -1) @ down.float().reshape(down.shape[0], -1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=128, help="UNet base channels (SD1.5: 320)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--skip-reference", action="store_true", help="skip lycoris-lora's run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lycoris.utils import extract_diff

    torch.manual_seed(0)
    base_model = build_unet(args.width).eval()
    base = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    tuned = tuned_state(base)
    params = sum(v.numel() for v in base.values())
    print(f"SD1.5-architecture UNet, width {args.width}{' (full size)' if args.width == 320 else ' (reduced)'}: "
          f"{params / 1e6:.0f}M parameters; rank {args.rank}; device {args.device}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    diffs = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_file, tuned_file = os.path.join(tmp, "base.safetensors"), os.path.join(tmp, "tuned.safetensors")
        save_file(base, base_file)
        save_file(tuned, tuned_file)
        rule = RankRule("fixed", args.rank)
        for label, solver in (("ours, exact SVD", Solver()), ("ours, randomized SVD", Solver(randomized=True))):
            start = time.perf_counter()
            result = extract(base_file, tuned_file, rule=rule, algo="locon", solver=solver,
                             device=args.device)
            seconds = time.perf_counter() - start
            products = {}
            for name, adapter in result.adapters.items():
                up = adapter.up.float().reshape(adapter.up.shape[0], -1)
                products[name] = up @ adapter.down.float().reshape(adapter.rank, -1)
            if not diffs:
                for key in tuned:
                    name = "lora_unet_" + key[:-len(".weight")].replace(".", "_")
                    if name in products:
                        diffs[name] = (tuned[key] - base[key]).reshape(tuned[key].shape[0], -1)
            rows.append((label, seconds, rel_errors(diffs, products)))
            print(f"  {label}: {seconds:.1f} s", flush=True)
        del base_model
        if not args.skip_reference:
            tuned_model = build_unet(args.width).eval()
            tuned_model.load_state_dict(tuned)
            base_model = build_unet(args.width).eval()
            base_model.load_state_dict(base)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                start = time.perf_counter()
                ref = extract_diff([], [], base_model, tuned_model, mode="fixed",
                                   linear_mode_param=args.rank, conv_mode_param=args.rank,
                                   extract_device=args.device, small_conv=False)
                seconds = time.perf_counter() - start
            full = [k for k in ref if k.endswith(".diff")]
            rows.insert(0, (f"lycoris-lora extract_diff (fp16 factors; {len(full)} layers stored "
                            "as full diff)", seconds, rel_errors(diffs, lycoris_products(ref))))
            print(f"  lycoris-lora: {seconds:.1f} s", flush=True)
    ref_seconds = rows[0][1]
    common = set.intersection(*(set(errors) for _, _, errors in rows))  # low-rank in every run
    exact = next(errors for label, _, errors in rows if label == "ours, exact SVD")
    print()
    print(f"errors: ||dW - up @ down||_F / ||dW||_F per module, over the {len(common)} modules every "
          "run factored; last column: the largest excess over our exact SVD's error on the same module")
    print()
    print("| extraction | seconds | × first row | modules factored | mean rel. error | "
          "max rel. error | max excess over exact SVD |")
    print("|---|---|---|---|---|---|---|")
    for label, seconds, errors in rows:
        shared = [errors[n] for n in common]
        worst = max(errors[n] - exact[n] for n in common)
        print(f"| {label} | {seconds:.1f} | {ref_seconds / seconds:.2f}x | {len(errors)} | "
              f"{sum(shared) / len(shared):.4e} | {max(shared):.4e} | {worst:.1e} |")


if __name__ == "__main__":
    main()
