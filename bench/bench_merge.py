"""Merge throughput of every algorithm on real SD1.5 UNet layer shapes.

For each algorithm and rank it merges one layer of every distinct SD1.5 UNet weight shape in the
set below and reports seconds, GB of weight touched (read + write), GB/s, and two ratios measured
in the same run: against a plain copy of the same weight bytes (the bandwidth floor) and against
the reference library's own merge path (`get_merged_weight`).

    python bench/bench_merge.py [--ranks 8 32] [--dtype fp32|fp16] [--repeat 3] [--markdown]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lycoris_core import load_file  # noqa: E402

# (out, in, kernel) of distinct SD1.5 UNet weights: attention, feed-forward, proj 1x1, resnet 3x3
SD15_SHAPES = [
    (320, 320, 0), (320, 768, 0), (2560, 320, 0), (320, 1280, 0),
    (640, 640, 0), (640, 768, 0), (5120, 640, 0), (640, 2560, 0),
    (1280, 1280, 0), (1280, 768, 0), (10240, 1280, 0), (1280, 5120, 0),
    (320, 320, 1), (640, 640, 1), (1280, 1280, 1),
    (320, 320, 3), (640, 640, 3), (1280, 1280, 3), (1280, 2560, 3), (640, 1280, 3),
]


def reference_builders():
    """algo -> (reference module class, kwargs for a rank); built lazily so a missing one is skipped."""
    from lycoris.modules.boft import ButterflyOFTModule
    from lycoris.modules.diag_oft import DiagOFTModule
    from lycoris.modules.full import FullModule
    from lycoris.modules.glora import GLoRAModule
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule
    return {
        "lora": (LoConModule, lambda r: dict(lora_dim=r, alpha=r / 2)),
        "lora+dora": (LoConModule, lambda r: dict(lora_dim=r, alpha=r / 2, weight_decompose=True)),
        "loha": (LohaModule, lambda r: dict(lora_dim=r, alpha=r / 2)),
        "lokr": (LokrModule, lambda r: dict(lora_dim=r, alpha=r / 2, factor=8)),
        "diag-oft": (DiagOFTModule, lambda r: dict(lora_dim=r, alpha=1e-3, rescaled=True, constraint=1e-3)),
        "boft": (ButterflyOFTModule, lambda r: dict(lora_dim=r, alpha=1e-3)),
        "glora": (GLoRAModule, lambda r: dict(lora_dim=r, alpha=r / 2)),
        "full": (FullModule, lambda r: dict()),
    }


def make_layer(out_dim: int, in_dim: int, kernel: int, dtype: torch.dtype) -> nn.Module:
    layer = nn.Linear(in_dim, out_dim, bias=False) if kernel == 0 else \
        nn.Conv2d(in_dim, out_dim, kernel, padding=kernel // 2, bias=False)
    return layer.to(dtype)


def randomize(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.01)


def best_time(fn, repeat: int) -> float:
    fn()  # warm-up (allocator, caches of prepared factors)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_algo(name, cls, kwargs, rank, dtype, repeat):
    ours = ref = copy = 0.0
    nbytes = 0
    skipped = 0
    for out_dim, in_dim, kernel in SD15_SHAPES:
        layer = make_layer(out_dim, in_dim, kernel, torch.float32)
        try:
            module = cls("lora_unet_bench", layer, **kwargs(rank))
        except Exception:  # the reference cannot build this shape (e.g. BOFT block rules)
            skipped += 1
            continue
        randomize(module)
        adapter = load_file({f"lora_unet_bench.{k}": v for k, v in module.state_dict().items()},
                            strict=True)["lora_unet_bench"]
        weight = layer.weight.detach().to(dtype)
        if dtype != torch.float32:
            module = module.to(dtype)
        with torch.no_grad():
            ours += best_time(lambda: adapter.merge(weight, 1.0), repeat)
            ref += best_time(lambda: module.get_merged_weight(multiplier=1.0, shape=weight.shape), repeat)
            copy += best_time(lambda: weight.clone(), repeat)
        nbytes += 2 * weight.numel() * weight.element_size()
    return dict(algo=name, rank=rank, seconds=ours, gb=nbytes / 1e9, gbps=nbytes / 1e9 / max(ours, 1e-12),
                vs_copy=ours / max(copy, 1e-12), vs_reference=ours / max(ref, 1e-12), skipped=skipped)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--algos", nargs="*", default=None)
    ap.add_argument("--markdown", action="store_true", help="print a README table")
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    builders = reference_builders()
    jobs = [(a, r) for a in (args.algos or builders) for r in args.ranks]
    rows = []
    for algo, rank in tqdm(jobs, desc="merge bench", unit="case"):
        cls, kwargs = builders[algo]
        rows.append(bench_algo(algo, cls, kwargs, rank, dtype, args.repeat))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, weights {args.dtype}, "
          f"{len(SD15_SHAPES)} SD1.5 UNet layer shapes, best of {args.repeat}")
    head = "| algo | rank | seconds | GB touched | GB/s | × copy floor | × reference merge |"
    print(head)
    print("|" + "---|" * 7)
    for r in rows:
        skip = f" ({r['skipped']} shapes n/a)" if r["skipped"] else ""
        print(f"| {r['algo']}{skip} | {r['rank']} | {r['seconds']:.3f} | {r['gb']:.2f} | {r['gbps']:.1f} "
              f"| {r['vs_copy']:.2f} | {r['vs_reference']:.2f} |")


if __name__ == "__main__":
    main()
