"""LLM text encoders of the newer families: Qwen2.5-VL (Qwen-Image), Gemma 2 (Lumina 2), Qwen3
(Z-Image, hosts that have it) and Llama (HunyuanVideo, HiDream), each a tiny model inside the
family's own host text-encoder class (tests/host/text_encoders.py), with the files their tools write:

- PEFT adapters (`base_model.model.<path>.lora_A.weight`), written by PEFT's own `save_pretrained`
  on the transformers class the family's diffusers pipeline holds (diffusers itself saves no
  text-encoder LoRA for these families);
- kohya sd-scripts names (`lora_te_layers_0_self_attn_q_proj`: what sd-scripts' Lumina network
  writes for Gemma 2; the same spelling on the other encoders), LyCORIS networks by lycoris-lora;
- ComfyUI's generic `text_encoders.<host key>` names (the only spelling core maps for these).
Oracles: PEFT's `get_delta_weight`, lycoris-lora's `merge_to`, and core's loader on the same file
wherever core patches.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file as read_safetensors
from safetensors.torch import save_file

from host import text_encoders
from host.te_checks import assert_bypass_equals_merge, assert_merges_like

ENCODERS = tuple(text_encoders.LLM_ENCODERS)

pytestmark = pytest.mark.usefixtures("quiet_and_unloaded")

_CLIPS: dict = {}


def encoder_clip(name: str):
    """The tiny host CLIP object holding LLM encoder `name`, built once per process."""
    if name not in _CLIPS:
        _CLIPS[name] = text_encoders.llm_clip(name)
    return _CLIPS[name]


def decoder_linears(twin: torch.nn.Module) -> list[str]:
    """The twin's Linear layers of the decoder stack (no vision tower, no lm_head)."""
    return [n for n, m in twin.named_modules()
            if isinstance(m, torch.nn.Linear) and text_encoders.llm_twin_path(n) is not None]


def host_weight(name: str, twin_path: str) -> str:
    return f"{name}.transformer.model.{text_encoders.llm_twin_path(twin_path)}.weight"


@pytest.mark.parametrize("name", ENCODERS)
def test_the_tiny_encoder_has_its_twins_layout(lycoris_pack, name):
    """Every decoder Linear of the transformers twin is a host weight of the same shape, so files
    written on the twin fit the host's encoder."""
    weights = encoder_clip(name).cond_stage_model.state_dict()
    twin = text_encoders.llm_twin(name)
    paths = decoder_linears(twin)
    assert len(paths) == 7 * text_encoders.LLM_CONFIG["num_hidden_layers"]
    for path in paths:
        assert weights[host_weight(name, path)].shape == twin.get_submodule(path).weight.shape, path


def randomize_lora(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", ENCODERS)
def test_peft_adapter_files_merge_with_pefts_deltas(lycoris_pack, name, tmp_path):
    """A LoRA on every decoder Linear, saved by PEFT (`base_model.model.model.language_model.layers.0
    .self_attn.q_proj.lora_A.weight` for Qwen2.5-VL): each host weight changes by PEFT's own delta
    at strengths 1 and -0.5, bypass equals merge. Core maps none of these names."""
    peft = pytest.importorskip("peft")
    clip = encoder_clip(name)
    twin = text_encoders.llm_twin(name)
    wrapped = peft.get_peft_model(twin, peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                                        target_modules=decoder_linears(twin)))
    randomize_lora(wrapped, seed=3)
    wrapped.save_pretrained(str(tmp_path))
    path = str(tmp_path / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") for k in read_safetensors(path))
    layers = {n: m for n, m in wrapped.base_model.model.named_modules() if hasattr(m, "get_delta_weight")}

    def expected(strength):
        return {host_weight(name, n): strength * m.get_delta_weight("default").float() for n, m in layers.items()}

    report = assert_merges_like(clip, path, expected)
    assert "UNMATCHED" not in report, report
    assert_bypass_equals_merge(clip, path)


# (encoder, algorithm, spelling): ComfyUI's names on every encoder (compared with core), kohya's
# on Gemma 2 (sd-scripts' Lumina network) and on Qwen2.5-VL (the deepest module paths), LoKr on one
NETWORK_CASES = [(n, "lora", "comfy") for n in ENCODERS] + [
    ("gemma2_2b", "lora", "kohya"), ("qwen25_7b", "lora", "kohya"), ("gemma2_2b", "lokr", "kohya")]


# alpha != rank where lycoris-lora's merge_to applies alpha/rank once (LoRA); its LoKr merge_to
# applies it twice (docs/compatibility.md), so LoKr keeps alpha = rank to stay an oracle
ALPHA = {"lora": 2, "lokr": 4}


@pytest.mark.parametrize(("name", "algo", "spelling"), NETWORK_CASES)
def test_lycoris_networks_on_llm_encoders_merge_like_lycoris(lycoris_pack, name, algo, spelling, tmp_path):
    """A LyCORIS network over the twin's decoder Linears, saved by lycoris-lora with sd-scripts'
    `lora_te_` names, or the same modules in ComfyUI's `text_encoders.<host key>` spelling: our
    merge equals lycoris-lora's `merge_to`, equals core wherever core patches (the ComfyUI spelling),
    and bypass equals merge."""
    from lycoris import LycorisNetwork, create_lycoris

    from oracle import randomize

    clip = encoder_clip(name)
    twin = text_encoders.llm_twin(name)
    saved = {"target_module": LycorisNetwork.TARGET_REPLACE_MODULE, "lora_prefix": LycorisNetwork.LORA_PREFIX,
             "exclude_name": LycorisNetwork.TARGET_EXCLUDE_NAME}
    try:
        LycorisNetwork.apply_preset({"target_module": ["Linear"], "lora_prefix": "lora_te",
                                     "exclude_name": [r"model\.visual", r"lm_head"]})
        network = create_lycoris(twin, 1.0, linear_dim=4, linear_alpha=ALPHA[algo], algo=algo)
    finally:
        LycorisNetwork.apply_preset(saved)
    network.apply_to()
    randomize(network, scale=0.2, seed=7)
    tensors = {k: v.detach().clone() for k, v in network.state_dict().items()}
    paths = decoder_linears(twin)
    assert {k.split(".")[0] for k in tensors} == {"lora_te_" + p.replace(".", "_") for p in paths}
    if spelling == "comfy":
        host = {"lora_te_" + p.replace(".", "_"): host_weight(name, p)[: -len(".weight")] for p in paths}
        tensors = {f"text_encoders.{host[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in tensors.items()}
    path = str(tmp_path / f"{name}_{algo}_{spelling}.safetensors")
    save_file(tensors, path)

    before = {k: v.detach().clone() for k, v in twin.state_dict().items()}
    network.merge_to(1.0)  # lycoris-lora's own merge; LoRA and LoKr changes are linear in strength
    change = {host_weight(name, k[: -len(".weight")]): (v - before[k]).float()
              for k, v in twin.state_dict().items() if not torch.equal(v, before[k])}

    def expected(strength):
        return {k: strength * d for k, d in change.items()}

    report = assert_merges_like(clip, path, expected, core_patches_all=spelling == "comfy")
    assert "UNMATCHED" not in report, report
    assert_bypass_equals_merge(clip, path)
