"""Training speed and memory: our LyCORIS Train vs ComfyUI core's Train LoRA, in the same run.

Both train a rank-16 LoRA from 64x64 latents, batch 1, AdamW, same dtype and gradient-checkpointing
setting, on the random SD1.5 UNet (`--model sd15`: the tests' cached checkpoint, loaded by the
host's own checkpoint loader under inference mode, as in a prompt) or on a tiny random DiT of
tests/host/dit.py (`--model flux`, `sdxl`, `wan`, ...: the host's own model class with small widths,
its latents and conditioning shaped by tests/host/dit_inputs.py). Each trainer runs in its own subprocess so
its peak memory is its own: CUDA peak allocated memory on a GPU, peak resident memory (sampled every
5 ms) above the level before training on a CPU. Steps/s is over the steps after the warm-up ones;
"best step" uses the fastest step instead and "per CPU second" the process CPU time (steadier
figures on a shared machine, where other processes stretch wall time).

Layers: core adapts every Linear/Conv (and adds dense diffs for every norm weight and bias); ours
uses the "full" preset with conv rank 16 (every Linear/Conv of the transformer and resnet blocks,
conv_in/out, time embedding), i.e. the same LoRA layers without the norm/bias diffs.

    python bench/bench_train.py [--model sd15|flux|...] [--steps 4] [--warmup 1] [--latent 64] [--rank 16]
                                [--dtype auto|fp32|bf16] [--checkpointing on|off|both] [--json FILE]
Needs ComfyUI at $COMFYUI_PATH or /opt/comfyui.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


class PeakRSS:
    """Peak resident set size of this process while running, sampled on a thread."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def load_inputs(latent: int, family: str = "sd15"):
    """(MODEL, CONDITIONING, LATENT) from the host's nodes under inference mode, or for a tiny DiT
    family from its loader and input helpers."""
    import torch

    if family != "sd15":
        from host import dit, dit_inputs

        model = dit.load(family)
        g = torch.Generator().manual_seed(0)
        samples = torch.randn(dit_inputs.latent_shape(family, model, size=latent), generator=g)
        return model, dit_inputs.conditioning(family), {"samples": samples}
    import nodes

    import folder_paths
    from host.checkpoint import cache_dir, ensure_checkpoint

    folder_paths.add_model_folder_path("checkpoints", cache_dir())
    with torch.inference_mode():
        model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(ensure_checkpoint()))
        cond = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0]
    del clip
    samples = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    return model, cond, {"samples": samples}


def run_ours(model, cond, latents, args, dtype, checkpointing, stamps):
    from comfyui_lycoris_under_test.lycoris_core.train import Trainer
    from comfyui_lycoris_under_test.nodes.train import LycorisTrain

    step = Trainer.step

    def timed(self, loss_fn):
        value = step(self, loss_fn)
        stamps.append((time.perf_counter(), time.process_time()))
        return value

    Trainer.step = timed
    LycorisTrain().train(model=model, latents=latents, conditioning=cond, algorithm="lora", preset="full",
                         rank=args.rank, alpha=float(args.rank), conv_rank=args.rank,
                         conv_alpha=float(args.rank), steps=args.warmup + args.steps, batch_size=1,
                         learning_rate=1e-4, optimizer="AdamW", lr_schedule="constant", warmup_steps=0,
                         seed=0, gradient_checkpointing=checkpointing, training_dtype=dtype)


def run_core(model, cond, latents, args, dtype, checkpointing, stamps):
    import torch

    import comfy_extras.nodes_train as core

    init = core.TrainSampler.__init__

    def patched_init(self, loss_fn, optimizer, loss_callback=None, **kw):
        def callback(loss):
            stamps.append((time.perf_counter(), time.process_time()))
            if loss_callback:
                loss_callback(loss)

        init(self, loss_fn, optimizer, loss_callback=callback, **kw)

    core.TrainSampler.__init__ = patched_init
    if args.model != "sd15":
        # the tiny DiTs are built under inference mode, whose tensors core's trainer cannot save
        # for backward (ours converts them itself): give core the same autograd-ready weights
        from comfyui_lycoris_under_test.lycoris_core.train import autograd_safe

        with torch.inference_mode(False):
            autograd_safe(model.model.diffusion_model)
    core_dtype = "fp32" if dtype == "fp32" else "bf16"
    settings = dict(batch_size=1, steps=args.warmup + args.steps, grad_accumulation_steps=1,
                    learning_rate=1e-4, rank=args.rank, optimizer="AdamW", loss_function="MSE", seed=0,
                    training_dtype=core_dtype, lora_dtype=core_dtype, algorithm="LoRA",
                    gradient_checkpointing=checkpointing, existing_lora="[None]")
    if hasattr(core.TrainLoraNode, "train"):  # hosts before the v3 node API
        core.TrainLoraNode().train(model, latents, cond, **settings)
    else:  # v3 node: every input is a list (is_input_list), plus bucket_mode
        core.TrainLoraNode.execute(model=[model], latents=[latents], positive=[cond],
                                   bucket_mode=[False], **{k: [v] for k, v in settings.items()})


def worker(args) -> dict:
    """One trainer in this process; returns its measurements."""
    sys.path[:0] = [TESTS, ROOT]
    from host import host

    host.import_host()
    host.import_pack()
    import torch

    import comfy.model_management as mm

    device = mm.get_torch_device()
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    model, cond, latents = load_inputs(args.latent, args.model)
    checkpointing = args.worker_checkpointing == "on"
    stamps: list[float] = []
    run = run_ours if args.worker == "ours" else run_core
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = (time.perf_counter(), time.process_time())
    with PeakRSS() as rss, torch.inference_mode():
        run(model, cond, latents, args, dtype, checkpointing, stamps)
    total = time.perf_counter() - start[0]
    pairs = list(zip([start] + stamps, stamps))[args.warmup:]
    times = [b[0] - a[0] for a, b in pairs]
    cpu = [b[1] - a[1] for a, b in pairs]
    out = {"trainer": args.worker, "model": args.model, "device": str(device), "dtype": dtype,
           "checkpointing": checkpointing,
           "latent": args.latent, "rank": args.rank, "steps_timed": len(times),
           "step_seconds": [round(t, 3) for t in times], "steps_per_s": len(times) / sum(times),
           "best_steps_per_s": 1.0 / min(times), "step_cpu_seconds": [round(t, 3) for t in cpu],
           "total_s": round(total, 1)}
    if device.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
        out["memory"] = "CUDA peak allocated above the loaded inputs"
    else:
        out["peak_mem_bytes"] = rss.peak - rss.start
        out["memory"] = "peak RSS above the loaded inputs"
    return out


def spawn(name: str, checkpointing: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--worker-checkpointing", checkpointing,
           "--model", args.model,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--latent", str(args.latent),
           "--rank", str(args.rank), "--dtype", args.dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{name} worker failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15", help="sd15, or a tiny DiT family of tests/host/dit.py "
                        "(flux, sdxl, sd3, wan, ...)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--latent", type=int, default=64, help="latent height = width")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--checkpointing", default="on", choices=["on", "off", "both"])
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--worker", choices=["ours", "core"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-checkpointing", default="on", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    settings = ["on", "off"] if args.checkpointing == "both" else [args.checkpointing]
    results = []
    for ckpt in settings:
        ours, core = spawn("ours", ckpt, args), spawn("core", ckpt, args)
        results += [ours, core]
        speed = ours["steps_per_s"] / core["steps_per_s"]
        best = ours["best_steps_per_s"] / core["best_steps_per_s"]
        cpu = sum(core["step_cpu_seconds"]) / sum(ours["step_cpu_seconds"])
        memory = ours["peak_mem_bytes"] / max(core["peak_mem_bytes"], 1)
        print(f"{args.model} {ours['device']} {ours['dtype']} latent {args.latent}x{args.latent} rank {args.rank} "
              f"checkpointing {ckpt}: {ours['memory']}")
        for r in (ours, core):
            print(f"  {r['trainer']:5s} {r['steps_per_s']:.4f} steps/s (best step {r['best_steps_per_s']:.4f})  "
                  f"{r['peak_mem_bytes'] / 2**30:.2f} GiB  step s {r['step_seconds']}  "
                  f"cpu s {r['step_cpu_seconds']}")
        print(f"  ours/core: {speed:.2f}x steps/s (best step {best:.2f}x, per CPU second {cpu:.2f}x), "
              f"{memory:.2f}x memory "
              f"(target >= 1.25x at <= 1.00x: {'met' if speed >= 1.25 and memory <= 1.0 else 'NOT met'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
