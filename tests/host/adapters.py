"""Adapter files on real SD1.5 module names, for every registered algorithm and its main options.

Adapters are built with each class's own `create` on the host model's actual layers (so DoRA
magnitudes come from the real weights), filled with seeded random values, exported in the standard
LyCORIS layout and named with kohya names taken from the host's own key maps.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from .helpers import pack_module

# (algorithm, extra create() keywords) tried in this order; the first that builds is used
CREATE_TRIES = ({"rank": 4, "alpha": 2.0}, {"rank": 10}, {"rank": 6}, {"rank": 8}, {"rank": 2}, {})
# option keywords that change a file's layout or math: each gets its own case when create() has it
OPTION_CASES = (("dora", "out"), ("dora", "in"), ("use_tucker", True), ("on_input", True),
                ("decompose_both", True), ("rescaled", True), ("constraint", 1e-3))
STD = {"oft_blocks": 0.02, "oft_diag": 0.02, "diff_w": 0.01, "diff_b": 0.01, "set_weight": 0.01,
       "w_norm": 0.05, "b_norm": 0.05}

# read-only layouts have no create(): build their tensors directly (suffix -> tensor) per weight shape
READ_ONLY_BUILDERS = {
    # legacy Diag-OFT: (n, b, b) blocks; near-zero values are read as the raw "I + D" form
    "diag-oft-legacy": lambda shape, g: {
        "oft_diag": 0.02 * torch.randn(shape[0] // _block(shape[0]), _block(shape[0]),
                                       _block(shape[0]), generator=g)},
}

# SD1.5 layers a case is tried on (model key), by kind
SITES = {
    "linear": "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight",
    "linear_cross": "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "conv3x3": "diffusion_model.input_blocks.1.0.in_layers.2.weight",
    "conv1x1": "diffusion_model.input_blocks.1.1.proj_in.weight",
    "norm": "diffusion_model.input_blocks.1.0.in_layers.0.weight",
    "te_linear": "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "te_mlp": "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
}


def _block(out_dim: int) -> int:
    return next(b for b in (8, 4, 2, 1) if out_dim % b == 0)


@dataclass(frozen=True)
class Case:
    """One algorithm with one option set."""

    algo: str
    options: tuple = ()

    @property
    def id(self) -> str:
        return self.algo + "".join(f"-{k}={v}" for k, v in self.options)

    @property
    def kwargs(self) -> dict:
        return dict(self.options)


def all_cases() -> list[Case]:
    """Every registered algorithm, plus a case per option its create() supports."""
    from lycoris_core import REGISTRY

    cases = []
    for algo, cls in REGISTRY.items():
        cases.append(Case(algo))
        if algo in READ_ONLY_BUILDERS:
            continue
        params = inspect.signature(cls.create).parameters
        for key, value in OPTION_CASES:
            if key == "dora" and not cls.supports_dora:
                continue
            if key in params:
                cases.append(Case(algo, ((key, value),)))
    return cases


def buildable(algo: str) -> bool:
    """Whether the tests know how to make a file for this algorithm."""
    from lycoris_core import REGISTRY

    if algo in READ_ONLY_BUILDERS:
        return True
    try:
        inspect.signature(REGISTRY[algo].create).bind(None)
    except TypeError:
        return False
    return True


def _randomize(adapter: torch.nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            if name == "dora_scale":
                p.mul_(1 + 0.1 * noise)  # a magnitude that differs from the weight's norm
            elif name != "scalar":
                p.copy_(noise * STD.get(name, 0.05))
            p.requires_grad_(False)
    adapter.clear_cache()


def module_tensors(case: Case, module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor] | None:
    """suffix -> tensor for this case on this layer, or None when the algorithm does not fit it."""
    from lycoris_core import REGISTRY, LayerSpec, LycorisError

    g = torch.Generator().manual_seed(seed)
    if case.algo in READ_ONLY_BUILDERS:
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            return None
        return READ_ONLY_BUILDERS[case.algo](tuple(module.weight.shape), g)
    cls = REGISTRY[case.algo]
    spec = LayerSpec.from_module(module)
    dense = pack_module("nodes.bypass").dequantiser_for(module)  # quantised storage: dequantise
    spec.weight = dense(torch.device("cpu")) if dense else module.weight.detach().float()
    spec.bias = None if module.bias is None else module.bias.detach().float()
    params = inspect.signature(cls.create).parameters
    for extra in CREATE_TRIES:
        kwargs = {k: v for k, v in {**extra, **case.kwargs}.items() if k in params}
        try:
            adapter = cls.create(spec, **kwargs)
        except (LycorisError, ValueError, TypeError, RuntimeError, IndexError, ZeroDivisionError,
                StopIteration):
            continue
        _randomize(adapter, g)
        return {k: v.float() for k, v in adapter.export().items()}
    return None


def kohya_name(key_map: dict, key: str) -> str:
    """The kohya-style file name the host maps to `key` (diffusers UNet path, `lora_te_` for CLIP)."""
    names = [n for n, v in key_map.items() if v == key and n.startswith(("lora_unet_", "lora_te_"))]
    preferred = [n for n in names if n.startswith("lora_te_") or
                 any(w in n for w in ("down_blocks", "mid_block", "up_blocks"))]
    if not (preferred or names):
        raise KeyError(f"the host maps no kohya name to {key}")
    return (preferred or names)[0]


@dataclass
class AdapterSet:
    """A state dict for a file, and where each module went (name -> model key)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)

    def renamed(self, old_prefix: str, new_prefix: str) -> "AdapterSet":
        """The modules whose names start with `old_prefix`, renamed (another spelling, same key)."""
        out = AdapterSet()
        for name, key in self.targets.items():
            if name.startswith(old_prefix):
                new = new_prefix + name[len(old_prefix):]
                out.targets[new] = key
                out.tensors.update({new + k[len(name):]: v for k, v in self.tensors.items()
                                    if k.startswith(name + ".")})
        return out

    def extend(self, other: "AdapterSet") -> None:
        clash = set(self.targets) & set(other.targets)
        if clash:
            raise ValueError(f"module names used twice: {sorted(clash)[:3]}")
        self.targets.update(other.targets)
        self.tensors.update(other.tensors)

    def add(self, name: str, key: str, module_sd: dict[str, torch.Tensor]) -> None:
        self.targets[name] = key
        self.tensors.update({f"{name}.{suffix}": t.contiguous() for suffix, t in module_sd.items()})


def build_case(case: Case, model, clip, sites=SITES, seed: int = 0) -> AdapterSet:
    """One case on every site it fits (UNet and CLIP), kohya names from the host's key maps."""
    import comfy.lora
    import comfy.utils

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map.update(comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}))
    out = AdapterSet()
    for i, (kind, key) in enumerate(sites.items()):
        if key.startswith("clip_") and clip is None:
            continue
        root = clip.cond_stage_model if key.startswith("clip_") else model.model
        module = comfy.utils.get_attr(root, key[: -len(".weight")])
        sd = module_tensors(case, module, seed * 100 + i)
        if sd is not None:
            out.add(kohya_name(key_map, key), key, sd)
    return out


def distinct_unet_sites(model, count: int) -> list[dict[str, str]]:
    """`count` site sets (linear, conv 3x3, norm) on the SD1.5 UNet, no layer used twice."""
    keys = list(model.model.state_dict())
    blocks = [k[: -len(".attn1.to_out.0.weight")] for k in keys if k.endswith(".attn1.to_out.0.weight")]
    resnets = [k[: -len(".in_layers.2.weight")] for k in keys if k.endswith(".in_layers.2.weight")]
    linears = [f"{b}.{sub}.weight" for sub in ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")
               for b in blocks]
    convs = [f"{r}.{sub}.weight" for sub in ("in_layers.2", "out_layers.3") for r in resnets]
    norms = [f"{r}.{sub}.weight" for sub in ("in_layers.0", "out_layers.0") for r in resnets]
    if count > min(len(linears), len(convs), len(norms)):
        raise ValueError(f"only {min(len(linears), len(convs), len(norms))} distinct site sets")
    return [{"linear": linears[i], "conv3x3": convs[i], "norm": norms[i]} for i in range(count)]
