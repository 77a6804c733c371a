"""Build the example adapter shipped in lycoris_core/examples/ (deterministic: same bytes every run).

Real SD1.5 kohya module names and layer shapes, one or two modules per algorithm that is registered
(LoRA, LoCon, LoCon Tucker, DoRA on both axes, LoHa, LoKr, Diag-OFT, BOFT, (IA)^3, GLoRA, full, norm),
built with each class's `create`, filled with seeded random values, saved with `save_file` in fp16.
The values are random: the file shows the format, it is not a trained model.

    python tools/make_example.py [--out PATH]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lycoris_core import REGISTRY, LayerSpec  # noqa: E402
from lycoris_core.inspect import EXAMPLE_FILE  # noqa: E402
from lycoris_core.save import save_file, standard_metadata  # noqa: E402

TE = "lora_te_text_model_encoder_layers_"
UNET = "lora_unet_"
TB = "_transformer_blocks_0_"
# (module name, algo, weight shape, create keyword arguments)
MODULES: list[tuple[str, str, tuple[int, ...], dict]] = [
    (TE + "0_self_attn_q_proj", "lora", (768, 768), dict(rank=4, alpha=2.0)),
    (TE + "0_self_attn_v_proj", "lora", (768, 768), dict(rank=4, alpha=2.0)),
    (TE + "11_self_attn_out_proj", "glora", (768, 768), dict(rank=4, alpha=2.0)),
    (TE + "11_mlp_fc2", "lokr", (768, 3072), dict(rank=4, alpha=4.0, factor=8)),
    (UNET + "down_blocks_0_attentions_0" + TB + "attn1_to_q", "lora", (320, 320), dict(rank=8, alpha=4.0)),
    (UNET + "down_blocks_0_attentions_0" + TB + "attn2_to_k", "lora", (320, 768), dict(rank=8, alpha=4.0)),
    (UNET + "down_blocks_0_resnets_0_conv1", "lora", (320, 320, 3, 3), dict(rank=4, alpha=1.0)),
    (UNET + "down_blocks_1_resnets_0_conv2", "lora", (640, 640, 3, 3),
     dict(rank=4, alpha=1.0, use_tucker=True)),
    (UNET + "mid_block_attentions_0" + TB + "attn1_to_out_0", "lora", (1280, 1280),
     dict(rank=4, alpha=4.0, dora="out")),
    (UNET + "mid_block_attentions_0" + TB + "attn2_to_v", "lora", (1280, 768),
     dict(rank=4, alpha=4.0, dora="in")),
    (UNET + "up_blocks_3_attentions_0" + TB + "attn1_to_v", "loha", (320, 320), dict(rank=4, alpha=2.0)),
    (UNET + "up_blocks_2_attentions_1" + TB + "ff_net_2", "lokr", (640, 2560),
     dict(rank=4, alpha=4.0, factor=8)),
    (UNET + "up_blocks_3_attentions_1" + TB + "attn2_to_out_0", "diag-oft", (320, 320),
     dict(rank=4, constraint=0.0)),
    (UNET + "up_blocks_3_attentions_2" + TB + "attn1_to_k", "boft", (320, 320), dict(rank=10)),
    (UNET + "up_blocks_3_attentions_2" + TB + "attn2_to_k", "ia3", (320, 768), dict()),
    (UNET + "up_blocks_3_attentions_2" + TB + "ff_net_2", "ia3", (320, 1280), dict(on_input=True)),
    (UNET + "conv_out", "full", (4, 320, 3, 3), dict()),
    (UNET + "up_blocks_3_resnets_2_norm2", "norm", (320,), dict()),
]
# random value scale per parameter name (default 0.05)
STD = {"oft_blocks": 0.02, "diff_w": 0.01, "diff_b": 0.01, "w_norm": 0.02, "b_norm": 0.02}
METADATA = dict(
    steps=1200, epochs=6, title="example_sd15_mixed", resolution=512,
    trigger_phrase="lycoexample", date="2025-01-01T00:00:00",
    tag_frequency={"6_lycoexample": {"lycoexample": 48, "1girl": 40, "solo": 37, "smile": 21,
                                     "outdoors": 12, "looking at viewer": 9}},
    extra={"ss_training_comment": "synthetic example from tools/make_example.py: random values, "
                                  "not a trained model",
           "modelspec.description": "Every LyCORIS algorithm on SD1.5 module names, for tests "
                                    "and `python -m lycoris_core inspect`."},
)


def layer_spec(shape: tuple[int, ...], g: torch.Generator) -> LayerSpec:
    """A layer of this weight shape with a random base weight (DoRA init reads its norms)."""
    weight = torch.randn(shape, generator=g) * 0.02
    if len(shape) == 1:
        return LayerSpec("norm", shape, weight=weight, bias=torch.zeros(shape), norm_type="group",
                         num_groups=32)
    bias = torch.zeros(shape[0])
    if len(shape) == 2:
        return LayerSpec("linear", shape, weight=weight, bias=bias)
    return LayerSpec("conv", shape, (1, 1), (1, 1), (1, 1), 1, weight, bias)


def randomize(adapter: torch.nn.Module, g: torch.Generator) -> None:
    """Seeded random values in every trainable tensor (create() starts at dW = 0)."""
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            if name == "dora_scale":
                p.mul_(1 + 0.05 * noise)
            elif name != "scalar":
                p.copy_(noise * STD.get(name, 0.05))
            p.requires_grad_(False)
    adapter.clear_cache()


def build() -> tuple[dict, list[str]]:
    """(module name -> Adapter, skipped lines) for every MODULES entry whose algo is registered."""
    torch.manual_seed(0)
    adapters, skipped = {}, []
    for i, (name, algo, shape, kwargs) in enumerate(MODULES):
        cls = REGISTRY.get(algo)
        if cls is None or not hasattr(cls, "create"):
            skipped.append(f"{name}: algorithm {algo!r} is not available")
            continue
        g = torch.Generator().manual_seed(1000 + i)
        adapter = cls.create(layer_spec(shape, g), **kwargs)
        adapter.name = name
        randomize(adapter, g)
        adapters[name] = adapter
    return adapters, skipped


def main(argv: list[str] | None = None) -> int:
    """Write the example file and print what it holds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=EXAMPLE_FILE, help="output path (default: %(default)s)")
    args = parser.parse_args(argv)
    adapters, skipped = build()
    for line in skipped:
        print("skipped:", line, file=sys.stderr)
    metadata = standard_metadata(adapters, **METADATA)
    path = save_file(adapters, args.out, metadata, dtype=torch.float16, overwrite=True)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    algos = sorted({a.algo for a in adapters.values()})
    print(f"{path}: {len(adapters)} modules ({', '.join(algos)}), {os.path.getsize(path)} bytes, "
          f"sha256 {digest[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
