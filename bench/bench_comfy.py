"""Whole-UNet patch time inside a real ComfyUI: our merge patches vs core's LoRA loader, same run.

The random-weight SD1.5 checkpoint of the host tests is loaded with the host's own loader (fp32
and/or fp16 UNet). For each algorithm one adapter file covers every UNet Linear/Conv it can target
(kohya names from the host's key map, factors built by each class's `create`, see
tests/host/adapters.py). The timed region is the host's own patch pass only,
`ModelPatcher.patch_model(cpu)` (what `load_models_gpu` runs on a fresh uuid), for a clone made by
our `apply_lycoris(..., "merge")` and for one made by core's `comfy.sd.load_lora_for_models`, with
`unpatch_model` in between (untimed; it only restores references). Reading files and building
patches are outside the timed region. The copy floor is `clone()` of every weight the pass
patches, in the same dtype: the bytes the host must at least touch. Two more passes bound what any
merge patch can reach on this host: one with a patch that does nothing (the host's own work) and
one with a patch that reads and writes each working copy once in place.

A second part times one UNet step at 512x512 (64x64 latent, batch 1) with a rank-16 LoRA in
bypass against the same LoRA merged (best of a few runs each).

    python bench/bench_comfy.py [--dtypes fp32 fp16] [--algos ...] [--repeat 3] [--no-step]
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
import warnings

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the host fixtures: host/, adapters, checkpoint
sys.path.insert(0, ROOT)

CPU = torch.device("cpu")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

# name -> (algorithm, create() options, which layers: "lora" = Linear + 1x1 conv, "all" = + kxk conv)
ALGOS = {
    "LoRA r8": ("lora", (("rank", 8), ("alpha", 4.0)), "lora"),
    "LoRA r32": ("lora", (("rank", 32), ("alpha", 16.0)), "lora"),
    "LoCon r8": ("lora", (("rank", 8), ("alpha", 4.0)), "all"),
    "LoHa r8": ("loha", (("rank", 8), ("alpha", 4.0)), "all"),
    "LoKr r8": ("lokr", (("rank", 8), ("alpha", 4.0)), "all"),
    "Diag-OFT b8": ("diag-oft", (("rank", 8),), "all"),
    "BOFT b10": ("boft", (("rank", 16),), "all"),  # largest even block <= 16 with O/b a power of 2
    "DoRA r8": ("lora", (("rank", 8), ("alpha", 4.0), ("dora", "out")), "all"),
}
# core (Oct 2025) merges these differently from LyCORIS at strength 1 (tests/test_host_merge.py)
CORE_KNOWN = {
    "DoRA r8": "core normalises output-axis DoRA by ||W|| instead of ||W + dW||",
}
CORE_TOL = {torch.float32: 5e-5, torch.float16: 3e-3}
STEP_RANK = 16


def setup_host():
    from host import host

    reason = host.missing_reason()
    if reason:
        sys.exit(f"cannot run: {reason}")
    host.import_host()
    host.import_pack()
    logging.getLogger().setLevel(logging.ERROR)  # the host logs every (un)load


def load_unet(dtype: torch.dtype):
    """The host's checkpoint loader, UNet only, weights stored in `dtype` on the CPU."""
    import comfy.sd

    from host.checkpoint import ensure_checkpoint

    model = comfy.sd.load_checkpoint_guess_config(
        ensure_checkpoint(), output_vae=False, output_clip=False,
        model_options={"dtype": dtype})[0]
    return model


def unet_layers(model, which: str) -> list[tuple[str, torch.nn.Module]]:
    """(model key, module) of every UNet Linear / Conv2d (1x1 only for `which == "lora"`)."""
    out = []
    for name, module in model.model.diffusion_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            pass
        elif isinstance(module, torch.nn.Conv2d):
            if which == "lora" and tuple(module.kernel_size) != (1, 1):
                continue
        else:
            continue
        out.append((f"diffusion_model.{name}.weight", module))
    return out


def build_file(label: str, model, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, kohya name -> model key) covering every layer the algorithm can target."""
    import comfy.lora

    from host.adapters import AdapterSet, Case, kohya_name, module_tensors

    algo, options, which = ALGOS[label]
    case = Case(algo, options)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    files = AdapterSet()
    for i, (key, module) in enumerate(unet_layers(model, which)):
        sd = module_tensors(case, module, seed * 1000 + i)
        if sd is not None:
            files.add(kohya_name(key_map, key), key, sd)
    return files.tensors, files.targets


def copy_floor(model, keys, repeat: int) -> float:
    """Seconds to clone every patched weight, keeping the copies (as a patched model keeps its
    new weights): fresh memory each time, like the host's patch pass."""
    import comfy.utils

    ws = [comfy.utils.get_attr(model.model, k) for k in keys]
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        kept = [w.clone() for w in ws]
        best = min(best, time.perf_counter() - t0)
        del kept
    return best


class NullPatch:
    """A host weight adapter that changes nothing (`touch=False`): times the host's own part of a
    patch pass (fp32 working copy, cast back, parameter swap). With `touch=True` it reads and
    writes the working copy once in place, the least work any merge patch must do: that pass is
    the floor of every merge patch on this host, core's and ours alike."""

    def __new__(cls, touch: bool = False):
        from comfy.weight_adapter import WeightAdapterBase

        class _Null(WeightAdapterBase):
            name = "null"

            def __init__(self):
                self.loaded_keys = set()
                self.weights = ()

            def calculate_weight(self, weight, *args, **kwargs):
                if touch:
                    weight.add_(1e-30)  # one in-place pass; no value an fp32 weight holds changes
                return weight

        return _Null()


def timed_patch(patcher, keys, sample) -> tuple[float, dict[str, torch.Tensor]]:
    """Seconds of one host patch pass, and clones of a few patched weights; unpatches after."""
    import comfy.model_management as mm
    import comfy.utils

    mm.unload_all_models()
    gc.collect()
    with torch.inference_mode():
        t0 = time.perf_counter()
        patcher.patch_model(device_to=CPU, lowvram_model_memory=0, load_weights=True)
        seconds = time.perf_counter() - t0
        got = {k: comfy.utils.get_attr(patcher.model, k).detach().clone() for k in sample}
        patcher.unpatch_model(device_to=CPU, unpatch_weights=True)
    return seconds, got


def bench_patch(labels, dtype_names, repeat: int, rows: list) -> None:
    import comfy.sd
    import comfy.utils

    from lycoris_core import load_file
    from host.helpers import pack_module, rel_err

    apply_lycoris = pack_module("nodes.apply").apply_lycoris
    jobs = [(d, a) for d in dtype_names for a in labels]
    bar = tqdm(total=len(jobs), desc="patch passes", unit="case")
    files = {}
    for dname in dtype_names:
        dtype = DTYPES[dname]
        model = load_unet(dtype)
        for label in labels:
            bar.set_postfix_str(f"{dname} {label}")
            if label not in files:
                files[label] = build_file(label, model)
            tensors, targets = files[label]
            keys = sorted(set(targets.values()))
            sample = keys[:: max(1, len(keys) // 24)]
            originals = {k: comfy.utils.get_attr(model.model, k).detach().clone() for k in sample}
            ours_model = apply_lycoris(model, None, load_file(tensors), 1.0, 0.0, "merge")[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                core_model = comfy.sd.load_lora_for_models(model, None, tensors, 1.0, 0.0)[0]
            core_keys = sum(1 for k in core_model.patches if k in set(keys))
            null_model, touch_model = model.clone(), model.clone()
            null_model.add_patches({k: NullPatch() for k in keys}, 1.0)
            touch_model.add_patches({k: NullPatch(touch=True) for k in keys}, 1.0)
            ours_t, core_t, null_t, touch_t = [], [], [], []
            ours_w = core_w = None
            for _ in range(repeat):  # interleaved, so a load spike hits all sides alike
                t, ours_w = timed_patch(ours_model, keys, sample)
                ours_t.append(t)
                t, core_w = timed_patch(core_model, keys, sample)
                core_t.append(t)
                null_t.append(timed_patch(null_model, keys, ())[0])
                touch_t.append(timed_patch(touch_model, keys, ())[0])
            floor = copy_floor(model, keys, repeat)
            errs = [rel_err(core_w[k].float() - originals[k].float(), ours_w[k].float() - originals[k].float())
                    for k in sample]
            note = ""
            if core_keys < len(keys):
                note = f"core patched {core_keys} of {len(keys)} weights"
            elif max(errs) > CORE_TOL[dtype]:
                note = CORE_KNOWN.get(label, "core differs") + f" (rel. diff {max(errs):.1e})"
            rows.append(dict(algo=label, dtype=dname, layers=len(keys), ours=min(ours_t),
                             core=min(core_t), host=min(null_t), touch=min(touch_t), floor=floor,
                             gb=sum(comfy.utils.get_attr(model.model, k).nbytes for k in keys) / 1e9,
                             note=note))
            del ours_model, core_model, null_model, touch_model
            bar.update(1)
        del model
        gc.collect()
    bar.close()


def bench_step(repeat: int) -> dict:
    """One UNet forward (64x64 latent) with a rank-16 LoRA bypassed vs merged, fp32 UNet."""
    import comfy.model_management as mm

    from lycoris_core import load_file
    from host.helpers import pack_module

    apply_lycoris = pack_module("nodes.apply").apply_lycoris
    model = load_unet(torch.float32)
    ALGOS[f"LoRA r{STEP_RANK}"] = ("lora", (("rank", STEP_RANK), ("alpha", STEP_RANK / 2)), "lora")
    tensors, targets = build_file(f"LoRA r{STEP_RANK}", model)
    adapters = load_file(tensors)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 64, 64, generator=g)
    sigma = torch.tensor([5.0])
    context = torch.randn(1, 77, 768, generator=g)
    times = {}
    outs = {}
    patched = {m: apply_lycoris(model, None, adapters, 1.0, 0.0, m)[0] for m in ("merge", "bypass")}
    bar = tqdm(total=2 * (repeat + 1), desc="sampling steps", unit="step")
    for _ in range(repeat + 1):  # first round warms up (allocator, prepared factors)
        for mode in ("merge", "bypass"):
            mm.unload_all_models()
            with torch.inference_mode():
                mm.load_models_gpu([patched[mode]])
                t0 = time.perf_counter()
                outs[mode] = patched[mode].model.apply_model(x, sigma, c_crossattn=context).float()
                times.setdefault(mode, []).append(time.perf_counter() - t0)
            bar.update(1)
    bar.close()
    mm.unload_all_models()
    diff = float((outs["bypass"] - outs["merge"]).norm() / outs["merge"].norm())
    return dict(layers=len(targets), merged=min(times["merge"][1:]), bypass=min(times["bypass"][1:]),
                rel_diff=diff)


def machine_state() -> str:
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "fp16"])
    ap.add_argument("--algos", nargs="+", choices=list(ALGOS), default=list(ALGOS))
    ap.add_argument("--repeat", type=int, default=3, help="patch passes per loader (best is kept)")
    ap.add_argument("--step-repeat", type=int, default=3)
    ap.add_argument("--no-step", action="store_true", help="skip the sampling-step comparison")
    ap.add_argument("--no-patch", action="store_true", help="skip the patch-pass table")
    args = ap.parse_args()
    setup_host()
    torch.manual_seed(0)
    before = machine_state()
    rows: list = []
    if not args.no_patch:
        bench_patch(args.algos, args.dtypes, args.repeat, rows)
    step = None if args.no_step else bench_step(args.step_repeat)
    print(f"\nmachine before: {before}\nmachine after:  {machine_state()}")
    if rows:
        print(f"\nWhole SD1.5 UNet patch pass (ModelPatcher.patch_model on CPU), best of {args.repeat}, "
              "strength 1\n")
        print("| algo | UNet dtype | layers | GB | copy floor s | host-only s | least patch s | ours s "
              "| core s | ours/core | least patch/core | ours/copy floor | core/copy floor "
              "| ours/core above host-only | core note |")
        print("|" + "---|" * 15)
        for r in rows:
            above = (r["ours"] - r["host"]) / max(r["core"] - r["host"], 1e-9)
            print(f"| {r['algo']} | {r['dtype']} | {r['layers']} | {r['gb']:.2f} | {r['floor']:.2f} "
                  f"| {r['host']:.2f} | {r['touch']:.2f} | {r['ours']:.2f} | {r['core']:.2f} "
                  f"| {r['ours'] / r['core']:.2f} | {r['touch'] / r['core']:.2f} "
                  f"| {r['ours'] / r['floor']:.2f} | {r['core'] / r['floor']:.2f} | {above:.2f} "
                  f"| {r['note']} |")
        print("\ncopy floor: clone() of the same weights (copies kept: fresh memory, as a patched model "
              "keeps its new weights). host-only: the same patch pass with a patch that changes nothing "
              "(the host's fp32 working copy, cast back and parameter swap). least patch: the same pass "
              "with a patch that reads and writes the working copy once in place, the least any merge "
              "patch costs on this host (a target below least patch/core cannot be met by any patch). "
              "ours/core above host-only: (ours - host-only) / (core - host-only), the patches' own work.")
    if step:
        print(f"\nOne UNet step, 64x64 latent, fp32, rank-{STEP_RANK} LoRA on {step['layers']} layers, "
              f"best of {args.step_repeat}: merged {step['merged']:.2f} s, bypass {step['bypass']:.2f} s, "
              f"bypass/merged = {step['bypass'] / step['merged']:.3f} "
              f"(outputs differ by {step['rel_diff']:.1e} relative)")


if __name__ == "__main__":
    main()
