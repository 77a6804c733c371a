"""Peak RAM of loading adapters onto a DiT inside a real ComfyUI (CPU): ours vs core's LoRA loader.

Two widths of one DiT family, the host's own Flux (`comfy.ldm.flux.model.Flux`, built through
tests/host/dit.py with its seeded weights and loaded by the host's UNET loader from a bf16 file,
as users load theirs): hidden 512 and 1024, 4 double and 8 single blocks, head width 128. For each
size and algorithm one adapter file covers every Linear of the blocks (kohya names from the host's
key map, factors from each class's `create`, see tests/host/adapters.py, stored in bf16).

Every measurement runs in a fresh child process, so peaks never mix. The child reads its RSS after
importing the host, after loading the model ("loaded"), after the loader node's work (ours:
`read_adapters` + `apply_lycoris(..., mode)`; core: `load_torch_file` + `comfy.sd.load_lora_for_models`,
what `LoraLoader` runs) and takes the peak from "loaded" through the host's `load_models_gpu`
patch pass and one forward (kernel high-water mark reset through /proc/self/clear_refs, else a 1 ms
sampling thread). Two references, same pass, same model: "none" (no adapter: the forward's own
workspace) and "host-only" (a patch that changes nothing on every key the adapters patch: what the
host's merge pass itself keeps, on CPU a new weight per patched key beside the backup of the old).
The adapter's own rows are compared with host-only when merged and with none when bypassed.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), after
which freed layer-sized temporaries stay in its heap: RSS then holds memory no tensor holds, by an
amount that differs from run to run (the same child measured 411 and 717 MiB). The children
therefore run with a fixed threshold (MALLOC_MMAP_THRESHOLD_=1 MiB), so the figures are what
tensors hold; `--glibc-default` measures with glibc's default instead.

    python bench/bench_memory.py [--host PATH] [--sizes h512 h1024] [--algos ...] [--quick]
                                 [--glibc-default] [--json PATH]
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import threading
import time
import warnings

import torch
from tqdm import tqdm

from bench_comfy import NullPatch, machine_state, setup_host  # sets sys.path to tests/ and the repo

MB = 2 ** 20
DTYPE = torch.bfloat16
HEAD = 128  # Flux's head width; the rope axes below must add up to it
# label -> (hidden size, double blocks, single blocks)
SIZES = {"h512": (512, 4, 8), "h1024": (1024, 4, 8)}
QUICK_SIZES = {"h128": (128, 1, 1), "h256": (256, 1, 1)}
# label -> (algorithm, create() options), as in bench_comfy.ALGOS
ALGOS = {
    "LoRA r16": ("lora", (("rank", 16), ("alpha", 8.0))),
    "LoKr f8 full": ("lokr", (("rank", 16), ("factor", 8), ("full_matrix", True))),
    "LoHa r16": ("loha", (("rank", 16), ("alpha", 8.0))),
}
MODES = ("merge", "bypass")
LATENT = {False: 32, True: 8}  # latent side (quick or not): 256 or 16 image tokens, 32 text tokens
ATTACHMENT_KEY = "lycoris_bypass"  # nodes.bypass: where our bypass registry lives on a patcher
MMAP_THRESHOLD = str(2 ** 20)  # children's fixed glibc mmap threshold (see the docstring)


# ----- RSS -----------------------------------------------------------------------------------------
def _status(field: str) -> int:
    """A /proc/self/status size in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss() -> int:
    return _status("VmRSS")


class PeakMeter:
    """Peak RSS from `start()` on: the kernel's VmHWM after resetting it (clear_refs 5, Linux 4.0+),
    else the highest VmRSS a 1 ms sampling thread saw (may miss a spike shorter than that)."""

    def __init__(self):
        self.method = "VmHWM"
        self._peak = 0
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
        except OSError:
            self.method = "1 ms sampling"
            self._peak = rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, rss())

    def peak(self) -> int:
        if self._thread is None:
            return _status("VmHWM")
        self._stop.set()
        self._thread.join()
        return max(self._peak, rss())


# ----- models and files (parent) -------------------------------------------------------------------
def family(label: str, sizes: dict):
    """The dit.py Flux family at this size, registered under its own name (no file is edited)."""
    from host import dit

    hidden, double, single = sizes[label]
    base = dit.FAMILIES["flux"]
    config = {**base.config, "hidden_size": hidden, "num_heads": max(1, hidden // HEAD),
              "depth": double, "depth_single_blocks": single, "axes_dim": [16, 56, 56],
              "context_in_dim": 256, "vec_in_dim": 256}
    fam = dataclasses.replace(base, name=f"flux-{label}", config=config)
    dit.FAMILIES[fam.name] = fam
    return fam


def load_model(fam, path: str):
    """The host's UNET loader on a file (`comfy.sd.load_diffusion_model`), as dit.load does it."""
    import comfy.sd

    from host import dit

    with torch.inference_mode(), dit._detection_overlaid(fam.host_config(), fam.config_class):
        model = comfy.sd.load_diffusion_model(path, model_options={"dtype": DTYPE})
    if model is None or not type(model.model.model_config).__name__.startswith(fam.detects_as):
        raise RuntimeError(f"the host did not load {path} as {fam.detects_as}")
    return model


def block_linears(model) -> list[tuple[str, torch.nn.Module]]:
    """(model key, module) of every Linear in the double and single blocks."""
    return [(f"diffusion_model.{name}.weight", m)
            for name, m in model.model.diffusion_model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith(("double_blocks.", "single_blocks."))]


def prepare(labels, sizes, algos, folder: str) -> dict:
    """Write the model and adapter files (reused when present); returns the paths and sizes."""
    import comfy.lora
    from safetensors.torch import save_file

    from host import dit
    from host.adapters import AdapterSet, Case, kohya_name, module_tensors

    os.makedirs(folder, exist_ok=True)
    out = {}
    for label in labels:
        fam = family(label, sizes)
        model_path = os.path.join(folder, f"{fam.name}.safetensors")
        if not os.path.exists(model_path):
            sd = {k: v.to(DTYPE) for k, v in dit.state_dict(fam.name).items()}
            save_file(sd, model_path + ".tmp")
            os.replace(model_path + ".tmp", model_path)
            del sd
        model = load_model(fam, model_path)
        layers = block_linears(model)
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        files = {}
        for algo in algos:
            path = os.path.join(folder, f"{fam.name}-{algo.replace(' ', '_')}.safetensors")
            if not os.path.exists(path):
                case = Case(*ALGOS[algo])
                adapters = AdapterSet()
                for i, (key, module) in enumerate(layers):
                    sd = module_tensors(case, module, i)
                    if sd is None:
                        raise RuntimeError(f"{algo} cannot be built for {key}")
                    adapters.add(kohya_name(key_map, key), key, {k: v.to(DTYPE) for k, v in sd.items()})
                save_file(adapters.tensors, path + ".tmp")
                os.replace(path + ".tmp", path)
            files[algo] = dict(path=path, bytes=os.path.getsize(path))
        out[label] = dict(model=model_path, params=sum(p.numel() for p in model.model.diffusion_model.parameters()),
                          bytes=sum(p.nbytes for p in model.model.diffusion_model.parameters()),
                          layers=len(layers), patched_params=sum(m.weight.numel() for _, m in layers),
                          files=files)
        del model
        gc.collect()
    return out


# ----- one measurement (child) ---------------------------------------------------------------------
def forward_inputs(fam, quick: bool) -> dict:
    side = LATENT[quick]
    g = torch.Generator().manual_seed(0)
    cfg = fam.config
    return dict(x=torch.randn(1, cfg["in_channels"], side, side, generator=g), t=torch.tensor([0.7]),
                c_crossattn=torch.randn(1, 32, cfg["context_in_dim"], generator=g),
                y=torch.randn(1, cfg["vec_in_dim"], generator=g), guidance=torch.tensor([3.5]))


def patched_keys(patcher) -> int:
    """Weights patched (merge) or modules wrapped (bypass) on this patcher."""
    registry = patcher.get_attachment(ATTACHMENT_KEY)
    return len(patcher.patches) + (len(registry) if registry else 0)


def measure(job: dict) -> dict:
    """Load the model, run one loader, patch and run one forward; RSS at each stage."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    from host.helpers import pack_module

    sizes = QUICK_SIZES if job["quick"] else SIZES
    fam = family(job["size"], sizes)
    inputs = forward_inputs(fam, job["quick"])
    meter = PeakMeter()
    gc.collect()
    r_start = rss()
    model = load_model(fam, job["model"])
    gc.collect()
    r_loaded = rss()
    meter.start()
    t0 = time.perf_counter()
    loader = job["loader"]
    if loader == "ours":
        adapters = pack_module("nodes.host_compat").read_adapters(job["file"])
        patched = pack_module("nodes.apply").apply_lycoris(model, None, adapters, 1.0, 0.0, job["mode"])[0]
    elif loader == "core":
        lora = comfy.utils.load_torch_file(job["file"], safe_load=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            patched = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)[0]
    elif loader == "host-only":
        patched = model.clone()
        patched.add_patches({k: NullPatch() for k, _ in block_linears(model)}, 1.0)
    else:
        patched = model
    r_applied = rss()
    with torch.inference_mode():
        mm.load_models_gpu([patched])
        r_patched = rss()
        out = patched.model.apply_model(inputs.pop("x"), inputs.pop("t"), **inputs).float()
    seconds = time.perf_counter() - t0
    return dict(start=r_start, loaded=r_loaded, applied=r_applied, patched=r_patched, after=rss(),
                peak=meter.peak(), method=meter.method, keys=patched_keys(patched), seconds=seconds,
                out=out.flatten()[:: max(1, out.numel() // 256)].tolist())


def run_child(job: dict, host_path: str, glibc_default: bool) -> dict:
    from host import host

    env = host.subprocess_env(host_path)
    env["COMFYUI_PATH"] = host_path
    if not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)],
                          env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {job} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ----- report --------------------------------------------------------------------------------------
def rel_diff(a: list, b: list) -> float:
    ta, tb = torch.tensor(a), torch.tensor(b)
    return float((ta - tb).norm() / tb.norm().clamp_min(1e-30))


def jobs_for(labels, algos, modes, info, quick: bool) -> list[dict]:
    jobs = []
    for label in labels:
        common = dict(size=label, model=info[label]["model"], quick=quick)
        jobs.append(dict(common, loader="none", algo="-", mode="-", file=None))
        jobs.append(dict(common, loader="host-only", algo="-", mode="merge", file=None))
        for algo in algos:
            file = info[label]["files"][algo]["path"]
            jobs += [dict(common, loader="ours", algo=algo, mode=m, file=file) for m in modes]
            jobs.append(dict(common, loader="core", algo=algo, mode="merge", file=file))
    return jobs


def print_tables(rows: list, info: dict, labels, host_label: str, allocator: str) -> None:
    ref = {(r["size"], r["loader"]): r for r in rows if r["loader"] in ("none", "host-only")}
    core_out = {(r["size"], r["algo"]): r["out"] for r in rows if r["loader"] == "core"}
    print(f"\n{host_label}; {allocator}; RSS in MiB; peak = highest RSS from 'loaded' through the loader, the "
          f"host's load_models_gpu patch pass and one forward ({rows[0]['method']})\n")
    print("| model | loader | algo | mode | keys | adapter MiB | before model | loaded | after loader + | after patch + "
          "| peak + | peak + / model bytes | B / patched param | above ref MiB | above ref B / param "
          "| out vs core |")
    print("|" + "---|" * 16)
    for r in rows:
        size = info[r["size"]]
        extra = r["peak"] - r["loaded"]
        above = per_param = diff = ""
        if r["loader"] not in ("none", "host-only"):
            reference = ref[(r["size"], "host-only" if r["mode"] == "merge" else "none")]
            over = extra - (reference["peak"] - reference["loaded"])
            above, per_param = f"{over / MB:.0f}", f"{over / size['patched_params']:.3f}"
        if r["loader"] == "ours" and (r["size"], r["algo"]) in core_out:
            diff = f"{rel_diff(r['out'], core_out[(r['size'], r['algo'])]):.1e}"
        adapter = size["files"][r["algo"]]["bytes"] / MB if r["algo"] in size["files"] else 0
        print(f"| {r['size']} | {r['loader']} | {r['algo']} | {r['mode']} | {r['keys']} | {adapter:.1f} "
              f"| {r['start'] / MB:.0f} | {r['loaded'] / MB:.0f} | {(r['applied'] - r['loaded']) / MB:.0f} "
              f"| {(r['patched'] - r['loaded']) / MB:.0f} | {extra / MB:.0f} | {extra / size['bytes']:.2f} "
              f"| {extra / size['patched_params']:.2f} | {above} | {per_param} | {diff} |")
    if len(labels) < 2:
        return
    small, large = labels[0], labels[-1]
    growth = info[large]["patched_params"] / info[small]["patched_params"]
    print(f"\nGrowth {small} -> {large} (patched parameters x{growth:.2f}, model bytes "
          f"x{info[large]['bytes'] / info[small]['bytes']:.2f})\n")
    print(f"| loader | algo | mode | peak + {small} MiB | peak + {large} MiB | x | B / param {small} "
          f"| B / param {large} |")
    print("|" + "---|" * 8)
    by = {(r["size"], r["loader"], r["algo"], r["mode"]): r for r in rows}
    for (size, loader, algo, mode), r in by.items():
        if size != small or (large, loader, algo, mode) not in by:
            continue
        big = by[(large, loader, algo, mode)]
        e_small, e_large = r["peak"] - r["loaded"], big["peak"] - big["loaded"]
        print(f"| {loader} | {algo} | {mode} | {e_small / MB:.0f} | {e_large / MB:.0f} "
              f"| {e_large / max(e_small, 1):.2f} | {e_small / info[small]['patched_params']:.2f} "
              f"| {e_large / info[large]['patched_params']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", help="ComfyUI folder (default: $COMFYUI_PATH, else the first host found)")
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES))
    ap.add_argument("--algos", nargs="+", choices=list(ALGOS), default=list(ALGOS))
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--quick", action="store_true", help="smoke run: two tiny widths, LoRA only")
    ap.add_argument("--glibc-default", action="store_true",
                    help="children keep glibc's dynamic mmap threshold (RSS then includes freed heap)")
    ap.add_argument("--json", help="also write the raw rows and sizes to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.host:
        os.environ["COMFYUI_PATH"] = args.host
    from host import host

    reason = host.missing_reason()
    if reason:
        print(f"skipped: {reason}")
        return
    setup_host()
    if args.child:
        print("RESULT " + json.dumps(measure(json.loads(args.child))), flush=True)
        return
    sizes = QUICK_SIZES if args.quick else SIZES
    labels = list(sizes) if args.quick or not args.sizes else args.sizes
    algos = ["LoRA r16"] if args.quick else args.algos
    host_path = host.comfyui_path()
    before = machine_state()
    info = prepare(labels, sizes, algos, os.path.join(host.cache_root(), "bench-memory"))
    jobs = jobs_for(labels, algos, args.modes, info, args.quick)
    rows = []
    for job in (bar := tqdm(jobs, desc="child processes", unit="run")):
        bar.set_postfix_str(f"{job['size']} {job['loader']} {job['algo']} {job['mode']}")
        rows.append({**job, **run_child(job, host_path, args.glibc_default)})
    print(f"\nmachine before: {before}\nmachine after:  {machine_state()}")
    for label in labels:
        size = info[label]
        print(f"{label}: Flux {sizes[label]} (hidden, double, single blocks), {size['params'] / 1e6:.1f} M "
              f"params, {size['bytes'] / MB:.0f} MiB in {str(DTYPE).split('.')[-1]}; adapters on "
              f"{size['layers']} block Linears, {size['patched_params'] / 1e6:.1f} M patched params; "
              + ", ".join(f"{a} {f['bytes'] / MB:.1f} MiB" for a, f in size["files"].items()))
    allocator = ("glibc default malloc" if args.glibc_default
                 else f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(host=host_path, allocator=allocator, sizes=info, rows=rows), f, indent=1)
    print_tables(rows, info, labels, host.label(host_path), allocator)


if __name__ == "__main__":
    main()
