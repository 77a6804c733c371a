"""Per-block strengths: block maps, spec parsing, exact per-block merging, the block analyser."""
import json
import math

import pytest
import torch

from lycoris_core import REGISTRY, load_file
from lycoris_core.blocks import (LAYOUTS, PRESETS, BlockSpecError, BlockStrengths, analyse,
                                 block_of, blocks_present, detect_arch, format_analysis,
                                 parse_presets, parse_spec, preset_vector, scaled_strengths)
from lycoris_core.blocks.names import block_group, group_title, is_known_name

SD26 = (["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)])
SD17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)]
XL12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)]
XL20 = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
FLUX61 = (["BASE", "T5", "IN"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)]
          + ["OUT"])  # CLIP slot = the BASE block

# kohya SD1.5 names (diffusers paths) and the block each belongs to (LDM index from the §3.2 table)
SD15 = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "BASE",
    "lora_unet_conv_in": "IN00",
    "lora_unet_down_blocks_0_attentions_0_proj_in": "IN01",
    "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q": "IN02",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "IN03",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": "IN04",
    "lora_unet_down_blocks_1_resnets_1_conv1": "IN05",
    "lora_unet_down_blocks_2_attentions_0_proj_out": "IN07",
    "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_ff_net_2": "IN08",
    "lora_unet_down_blocks_3_resnets_0_conv1": "IN10",
    "lora_unet_mid_block_attentions_0_proj_out": "M00",
    "lora_unet_mid_block_resnets_1_conv2": "M00",
    "lora_unet_up_blocks_0_resnets_2_conv1": "OUT02",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "OUT02",
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v": "OUT03",
    "lora_unet_up_blocks_1_attentions_2_proj_in": "OUT05",
    "lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_attn2_to_out_0": "OUT07",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2": "OUT11",
    "lora_unet_time_embedding_linear_1": "OTHER",
}
# kohya SDXL names (LDM paths)
SDXL = {
    "lora_te1_text_model_encoder_layers_3_mlp_fc1": "BASE",
    "lora_te2_text_model_encoder_layers_30_self_attn_out_proj": "BASE",
    "lora_unet_input_blocks_0_0": "IN00",
    "lora_unet_input_blocks_1_0_in_layers_2": "IN01",
    "lora_unet_input_blocks_3_0_op": "IN03",
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": "IN04",
    "lora_unet_input_blocks_5_1_proj_in": "IN05",
    "lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k": "IN07",
    "lora_unet_input_blocks_8_1_transformer_blocks_0_ff_net_0_proj": "IN08",
    "lora_unet_middle_block_1_transformer_blocks_4_attn1_to_out_0": "M00",
    "lora_unet_middle_block_2_in_layers_2": "M00",
    "lora_unet_output_blocks_0_1_transformer_blocks_3_attn1_to_q": "OUT00",
    "lora_unet_output_blocks_2_2_conv": "OUT02",
    "lora_unet_output_blocks_5_1_proj_out": "OUT05",
    "lora_unet_output_blocks_8_0_skip_connection": "OUT08",
    "lora_unet_label_emb_0_0": "OTHER",
}
# a Wan-like DiT in peft dotted names: blocks derived from `blocks.N`
WAN = {
    **{f"diffusion_model.blocks.{i}.self_attn.q": f"B{i:02d}" for i in range(6)},
    **{f"diffusion_model.blocks.{i}.cross_attn.k": f"B{i:02d}" for i in (1, 4)},
    "diffusion_model.text_embedding.0": "OTHER",
    "diffusion_model.head.head": "OTHER",
}
CONV = {"lora_unet_conv_in", "lora_unet_input_blocks_0_0"}


def _factors(name, seed, rank=2, out_dim=6, in_dim=5):
    g = torch.Generator().manual_seed(seed)
    if name in CONV:
        down = torch.randn(rank, 4, 3, 3, generator=g)
        up = torch.randn(out_dim, rank, 1, 1, generator=g)
    else:
        down = torch.randn(rank, in_dim, generator=g)
        up = torch.randn(out_dim, rank, generator=g)
    return up, down


def _state_dict(names, rank=2, alpha=1.0, peft=False, dora=()):
    sd = {}
    for seed, name in enumerate(names):
        up, down = _factors(name, seed, rank)
        sd[f"{name}.{'lora_B.weight' if peft else 'lora_up.weight'}"] = up
        sd[f"{name}.{'lora_A.weight' if peft else 'lora_down.weight'}"] = down
        sd[f"{name}.alpha"] = torch.tensor(alpha)
        if name in dora:
            g = torch.Generator().manual_seed(seed)
            sd[f"{name}.dora_scale"] = torch.rand(up.shape[0], 1, generator=g) + 0.5
    return sd


def _delta(name, seed, rank=2, alpha=1.0):
    """ΔW computed here from the factors (γ·up@down), independent of the library."""
    up, down = _factors(name, seed, rank)
    d = (alpha / rank) * (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1))
    return d.reshape((up.shape[0],) + tuple(down.shape[1:]))


def _base(delta, seed):
    return torch.randn(delta.shape, generator=torch.Generator().manual_seed(100 + seed))


# ----- block maps ------------------------------------------------------------------------------

@pytest.mark.parametrize("table", [SD15, SDXL, WAN], ids=["sd15", "sdxl", "wan"])
def test_block_of_file_names(table):
    arch = detect_arch(table)
    assert {n: block_of(n, arch=arch) for n in table} == table


@pytest.mark.parametrize("name, model_key, block", [
    # host model keys (ComfyUI): authoritative, whatever the file name is
    ("lora_unet_down_blocks_1_attentions_0_proj_in", "diffusion_model.input_blocks.4.1.proj_in.weight",
     "IN04"),
    ("x", "diffusion_model.middle_block.1.proj_in.weight", "M00"),
    ("x", "diffusion_model.output_blocks.11.1.proj_out.weight", "OUT11"),
    ("x", ("diffusion_model.double_blocks.3.img_attn.qkv.weight", (0, 0, 3072)), "D03"),
    ("x", "diffusion_model.single_blocks.37.linear1.weight", "S37"),
    ("x", "diffusion_model.img_in.weight", "IN"),
    ("x", "diffusion_model.final_layer.linear.weight", "OUT"),
    ("x", "diffusion_model.joint_blocks.12.x_block.attn.qkv.weight", "J12"),
    ("x", "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "BASE"),
    ("x", "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight", "T5"),
    # other file-name families
    ("lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", None, "IN04"),
    ("unet.up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q", None, "OUT05"),
    ("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj", None, "BASE"),
    ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", None, "T5"),
    ("lora_unet_double_blocks_0_img_attn_qkv", None, "D00"),
    ("lora_unet_single_blocks_7_linear1", None, "S07"),
    ("lora_unet_txt_in_individual_token_refiner_blocks_0_mlp_fc1", None, "IN"),
    ("lora_unet_joint_blocks_4_context_block_attn_qkv", None, "J04"),
    ("transformer.double_stream_blocks.2.block.attn1.to_q", None, "DS02"),
    ("lycoris_transformer_blocks_12_attn_to_q", None, "T12"),  # no family known: generic code
    ("lora_unet_layers_5_attention_qkv", None, "L05"),
    ("lora_unet_noise_refiner_1_attention_out", None, "NR01"),
    ("lora_unet_time_embed_0", None, "OTHER"),
    # host-style text-encoder prefixes in files, kohya OFT's prefix
    ("clip_g.transformer.text_model.encoder.layers.3.mlp.fc1", None, "BASE"),
    ("t5xxl.transformer.encoder.block.2.layer.1.DenseReluDense.wo", None, "T5"),
    ("oft_unet_up_blocks_3_attentions_1_transformer_blocks_0_attn2_to_out_0", None, "OUT10"),
])
def test_block_of_names_and_model_keys(name, model_key, block):
    assert block_of(name, model_key) == block


@pytest.mark.parametrize("name, known", [
    ("lora_unet_some_new_thing", True), ("oft_unet_anything", True), ("transformer.foo", True),
    ("time_embed_0", True), ("blocks.3.attn.q", True), ("clip_l.transformer.x", True),
    ("text_encoder.text_model.x", True), ("my_custom_layer", False), ("foo", False),
])
def test_known_names_are_model_parts(name, known):
    assert is_known_name(name) is known


def test_block_groups_and_titles():
    groups = {"BASE": "te", "T5": "te", "IN": "in", "IN04": "in", "M00": "mid", "OUT11": "out",
              "OUT": "out", "D03": "double", "S37": "single", "J12": "joint", "B07": "b",
              "DS02": "ds", "OTHER": "other"}
    assert {b: block_group(b) for b in groups} == groups
    assert group_title("in") == "Input blocks (IN)" and group_title("ds") == "DS blocks"


def test_diffusers_flux_names_follow_the_detected_family():
    names = ["lycoris_transformer_blocks_3_attn_to_q", "lycoris_single_transformer_blocks_20_proj_mlp",
             "lycoris_x_embedder", "lycoris_proj_out"]
    arch = detect_arch(names)
    assert arch.name == "flux"
    assert [block_of(n, arch=arch) for n in names] == ["D03", "S20", "IN", "OUT"]
    assert blocks_present(names) == ["IN", "D03", "S20", "OUT"]


@pytest.mark.parametrize("names, arch", [
    (SD15, "sd1"), (SDXL, "sdxl"), (WAN, "auto"),
    (["lora_unet_double_blocks_0_img_attn_qkv", "lora_te1_text_model_encoder_layers_0_mlp_fc1"], "flux"),
    (["lora_unet_joint_blocks_0_x_block_attn_qkv"], "sd3"),
    (["lora_unet_down_blocks_1_attentions_0_proj_in"], "sd1"),  # unmarked SD names
    (["diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q"], "sdxl"),
])
def test_detect_arch(names, arch):
    assert detect_arch(names).name == arch


def test_blocks_present_is_canonical_and_lists_only_what_the_file_has():
    assert blocks_present(SDXL) == ["BASE", "IN00", "IN01", "IN03", "IN04", "IN05", "IN07", "IN08",
                                    "M00", "OUT00", "OUT02", "OUT05", "OUT08", "OTHER"]
    assert blocks_present(WAN) == [f"B{i:02d}" for i in range(6)] + ["OTHER"]


# ----- spec parsing ------------------------------------------------------------------------------

def _values(spec, blocks):
    return [spec.block_value(b) for b in blocks]


LBW_PRESETS = {  # LBW's own 17-value definitions
    "NONE": [0] * 17, "ALL": [1] * 17, "ALL0.5": [0.5] * 17,
    "INS": [1, 1, 1, 1] + [0] * 13,
    "IND": [1, 0, 0, 0, 1, 1, 1] + [0] * 10,
    "INALL": [1] * 7 + [0] * 10,
    "MIDD": [1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "OUTD": [1] + [0] * 7 + [1, 1, 1, 1] + [0] * 5,
    "OUTS": [1] + [0] * 11 + [1] * 5,
    "OUTALL": [1] + [0] * 7 + [1] * 9,
    "FLUXALL": [1] * 61,
}


def _zero_filled(vector):
    listed = dict(zip(SD17, vector))
    return [listed.get(b, 0) for b in SD26]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_lbw_and_fill_by_meaning(name):
    assert sorted(PRESETS) == sorted(LBW_PRESETS)
    assert preset_vector(name) == LBW_PRESETS[name]
    if name == "FLUXALL":
        assert _values(parse_spec("fluxall"), FLUX61) == [1] * 61
        assert _values(parse_spec("FLUXALL", lbw_compat=True), FLUX61) == [1] * 61
        return
    # the 17 LBW blocks always carry LBW's values; lbw_compat zero-fills the other 9 like LBW
    assert _values(parse_spec(name.lower()), SD17) == LBW_PRESETS[name]
    assert _values(parse_spec(name, lbw_compat=True), SD26) == _zero_filled(LBW_PRESETS[name])
    by_meaning = {"ALL": [1] * 26, "NONE": [0] * 26, "ALL0.5": [0.5] * 26,
                  "INALL": [1] * 13 + [0] * 13, "OUTALL": [1] + [0] * 13 + [1] * 12}
    expected = by_meaning.get(name, _zero_filled(LBW_PRESETS[name]))
    assert _values(parse_spec(name), SD26) == expected
    assert parse_spec(name).block_value("OTHER") == 1


@pytest.mark.parametrize("n, slots", [(17, SD17), (26, SD26), (12, XL12), (20, XL20), (61, FLUX61)])
def test_vectors_expand_by_block_name(n, slots):
    values = [round(0.01 * (i + 1), 2) for i in range(n)]
    text = ",".join(map(str, values))
    spec = parse_spec(text)
    assert _values(spec, slots) == values
    assert set(LAYOUTS) == {17, 26, 12, 20, 61}
    full = {17: SD26, 26: SD26, 12: XL20, 20: XL20, 61: FLUX61}[n]
    missing = [b for b in full if b not in slots]
    assert _values(spec, missing) == [1.0] * len(missing)  # no zero-fill by default
    compat = parse_spec(text, lbw_compat=True)
    assert _values(compat, missing) == [0.0] * len(missing)
    assert _values(compat, slots) == values
    assert spec.block_value("OTHER") == compat.block_value("OTHER") == 1


def test_flux_vector_clip_and_t5_slots():
    values = [0.5, 0.25] + [1] * 59
    spec = parse_spec(json.dumps(values))
    assert spec.block_value("BASE") == 0.5 and spec.block_value("T5") == 0.25
    assert spec.strength("lora_te1_text_model_encoder_layers_0_mlp_fc1") == 0.5


@pytest.mark.parametrize("text, expected", [
    ("IN04=0.5, OUT=0", {"IN04": 0.5, "IN05": 1, "OUT00": 0, "OUT11": 0, "M00": 1, "BASE": 1}),
    ("in4=0.5; mid=0", {"IN04": 0.5, "M00": 0}),
    ("IN04-IN08=0.5", {"IN03": 1, "IN04": 0.5, "IN06": 0.5, "IN08": 0.5, "IN09": 1}),
    ("IN04-08=0.5", {"IN04": 0.5, "IN08": 0.5, "IN09": 1}),
    ("D00-D09=0", {"D00": 0, "D09": 0, "D10": 1, "S00": 1}),
    ("IN10-OUT01=0", {"IN09": 1, "IN10": 0, "IN11": 0, "M00": 0, "OUT00": 0, "OUT01": 0, "OUT02": 1}),
    ("D17-S01=0", {"D16": 1, "D17": 0, "D18": 0, "S00": 0, "S01": 0, "S02": 1}),
    ("double=0.5, SINGLE=2", {"D03": 0.5, "S07": 2, "IN": 1}),
    ("TE=0", {"BASE": 0, "T5": 0, "IN00": 1}),
    ("BASE=0", {"BASE": 0, "T5": 0}),
    ("CLIP=0", {"BASE": 0, "T5": 1}),
    ("T5=0.5, T05=2", {"T5": 0.5, "T05": 2}),
    ("B=0, B03=1", {"B00": 0, "B03": 1, "DS00": 1}),
    ("default=0, IN04=1", {"IN04": 1, "IN05": 0, "OTHER": 0, "BASE": 0}),
    ("ALL=0", {"IN04": 0, "D03": 0, "B07": 0, "BASE": 0, "OTHER": 1}),
    ("OTHER=0", {"OTHER": 0, "IN00": 1}),
    ("IN=0, IN04=0.5, IN=2", {"IN04": 2}),  # later items win
    ("INALL, OUT05=0.3", {"IN04": 1, "OUT04": 0, "OUT05": 0.3, "BASE": 1}),
    ("MYLORA:" + ",".join(["0"] * 17), {"IN04": 0, "IN00": 1}),  # preset-file line form
    ("", {"IN04": 1, "OTHER": 1}),
    ('{"IN04": 0.5, "default": 0, "OUT": "2"}', {"IN04": 0.5, "IN05": 0, "OUT03": 2}),
    ("[" + ",".join(["0.5"] * 12) + "]", {"IN04": 0.5, "OUT05": 0.5, "IN00": 1}),
])
def test_spec_forms(text, expected):
    spec = parse_spec(text)
    assert {b: spec.block_value(b) for b in expected} == expected
    again = parse_spec(spec.to_spec())
    assert {b: again.block_value(b) for b in expected} == expected
    from_json = parse_spec(json.loads(json.dumps(spec.to_json())))
    assert {b: from_json.block_value(b) for b in expected} == expected


def test_regex_rules_on_module_names_later_wins():
    spec = parse_spec(r"IN04=0.5, re:attn2=0, re:to_(?:q|k)=3, re:a{1,3}ttn2_to_k=7")
    base = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_"
    assert spec.strength(base + "attn1_to_v") == 0.5
    assert spec.strength(base + "attn2_to_v") == 0
    assert spec.strength(base + "attn2_to_q") == 3
    assert spec.strength(base + "attn2_to_k") == 7
    assert spec.block_value("IN04") == 0.5  # regex rules look at names, not blocks
    assert spec.strength("x", "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_q") == 3
    assert parse_spec(spec.to_spec()).strength(base + "attn2_to_k") == 7
    assert parse_spec(r"re:a\,b=0").strength("a,b") == 0


def test_mapping_then_bind_and_unmatched():
    text = parse_spec("INALL")
    sliders = parse_spec({"IN04": 0.25, "OUT05": 0.5})
    both = text.then(sliders)
    assert both.block_value("IN04") == 0.25 and both.block_value("OUT05") == 0.5
    assert both.block_value("OUT04") == 0 and both.block_value("IN05") == 1
    assert parse_spec(both) is both and parse_spec(None).is_identity
    flux_names = ["lycoris_transformer_blocks_3_attn_to_q", "lycoris_single_transformer_blocks_2_proj_mlp"]
    spec = parse_spec("D03=0.5, S=0")
    assert spec.strength(flux_names[0]) == 1  # T03 without the file's family
    assert spec.bind(flux_names).strength(flux_names[0]) == 0.5
    assert spec.bind(flux_names).strength(flux_names[1]) == 0
    assert parse_spec("IN04=0, IM=0, D07=1, re:nothing=0").unmatched(SD15) == ["IM", "D07", "re:nothing"]


def test_describe_shows_the_populated_vector():
    spec = parse_spec("IN04=0.5, OUT=0")
    text = spec.describe(SDXL)
    assert text.splitlines()[0].startswith("SDXL UNet: BASE=1, IN00=1")
    assert "IN04=0.5" in text and "OUT08=0" in text and "IN09" not in text
    assert text.splitlines()[-1] == "LBW 20: " + ",".join(
        "0.5" if b == "IN04" else "0" if b.startswith("OUT") else "1" for b in XL20)
    assert parse_spec().describe() == "ALL=1 (no change)"


def test_parse_preset_file():
    text = "\n".join(["# comment", "MYIN:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0", "@XY:17,0,1",
                      "BAD:1,2,3", "noseparator", "SD-LyC-OUT:" + ",".join(["0"] * 14 + ["1"] * 12)])
    presets = parse_presets(text)
    assert sorted(presets) == ["MYIN", "SD-LYC-OUT"]
    spec = parse_spec("myin", presets=presets)
    assert spec.block_value("IN04") == 1 and spec.block_value("OUT03") == 0
    assert spec.block_value("IN00") == 1  # vector rule: unlisted blocks keep 1
    assert parse_spec("myin", presets=presets, lbw_compat=True).block_value("IN00") == 0
    assert parse_spec("SD-LyC-OUT", presets=presets).block_value("OUT00") == 1


@pytest.mark.parametrize("text, token", [
    ("IM04x=1", "IM04x=1"),
    ("IN04=abc", "IN04=abc"),
    ("IN04=", "IN04="),
    ("=1", "=1"),
    ("1,2,3", "1,2,3"),
    (",".join(["1"] * 18), "1,1,1,1,…"),
    ("INALL, FOO", "FOO"),
    ("re:[a=1", "re:[a=1"),
    ("re:x", "re:x"),
    ("IN08-IN04=1", "IN08-IN04=1"),
    ("IN04-D07=1", "IN04-D07=1"),
    ("OUT02-IN05=1", "OUT02-IN05=1"),
    ("IN04=R", "IN04=R"),
    ("1,1,U,1", "U"),
    ("IN04=nan", "IN04=nan"),
    ("IN04=inf", "IN04=inf"),
    ("IN 04=1", "IN 04=1"),
    ("INALL=1", "INALL=1"),
    ("OUTT=0", "OUTT=0"),
    ("OUTT04-OUTT05=0", "OUTT04-OUTT05=0"),
    ('{"IN04": true}', "IN04=True"),
    ('{"IN04": [1]}', "IN04=[1]"),
    ('{"IN04": 0.5', '{"IN04": 0.5'),
])
def test_bad_specs_name_the_token(text, token):
    with pytest.raises(BlockSpecError) as err:
        parse_spec(text)
    assert isinstance(err.value, ValueError)
    assert err.value.token == token
    assert repr(token) in str(err.value)


# ----- per-block merging is exact ------------------------------------------------------------------

SD15_SPEC = ",".join(str(0.1 * i)[:4] for i in range(17))  # BASE=0, IN01=0.1, …, OUT11=1.6
SD15_VALUES = dict(zip(SD17, [float(str(0.1 * i)[:4]) for i in range(17)]))
SDXL_SPEC = "0.9,0,0.2,0.3,-1,1.5,0.6,0.7,0.8,0.9,1.1,1.2"
SDXL_VALUES = dict(zip(XL12, map(float, SDXL_SPEC.split(","))))
WAN_SPEC = "B00-B02=0.25, B04=0, re:cross_attn=2"


def _wan_expected(name, block):
    if "cross_attn" in name:
        return 2.0
    return {"B00": 0.25, "B01": 0.25, "B02": 0.25, "B04": 0.0}.get(block, 1.0)


@pytest.mark.parametrize("case", ["sd15", "sd15-lbw", "sdxl", "wan"])
def test_per_block_merge_is_exact(case):
    table, spec, peft, lbw = {
        "sd15": (SD15, SD15_SPEC, False, False), "sd15-lbw": (SD15, SD15_SPEC, False, True),
        "sdxl": (SDXL, SDXL_SPEC, False, False), "wan": (WAN, WAN_SPEC, True, False)}[case]
    names = list(table)
    adapters = load_file(_state_dict(names, peft=peft), strict=True)
    strength = 0.8
    scaled = scaled_strengths(adapters, parse_spec(spec, lbw_compat=lbw), strength)
    for seed, name in enumerate(names):
        block = table[name]
        if case == "wan":
            s_k = _wan_expected(name, block)
        else:
            values = SD15_VALUES if case.startswith("sd15") else SDXL_VALUES
            s_k = values.get(block, 0.0 if lbw and block != "OTHER" else 1.0)
        assert scaled[name] == pytest.approx(strength * s_k)
        delta = _delta(name, seed)
        w = _base(delta, seed)
        merged = adapters[name].merge(w, scaled[name])
        torch.testing.assert_close(merged, w + strength * s_k * delta, rtol=1e-5, atol=1e-6)


def test_per_block_dora_follows_its_merge_definition():
    names = ["lora_unet_input_blocks_4_1_proj_in", "lora_unet_output_blocks_3_1_proj_out"]
    adapters = load_file(_state_dict(names, dora=names), strict=True)
    sd = _state_dict(names, dora=names)
    scaled = scaled_strengths(adapters, "IN04=0.5, OUT03=-0.5")
    for seed, (name, s_k) in enumerate(zip(names, (0.5, -0.5))):
        assert scaled[name] == s_k
        delta = _delta(name, seed)
        w = _base(delta, seed)
        merged_full = w + delta
        d = sd[f"{name}.dora_scale"]
        eps = torch.finfo(torch.float32).eps
        normalised = d * merged_full / (merged_full.norm(dim=1, keepdim=True) + eps)
        expected = w + s_k * (normalised - w)
        torch.testing.assert_close(adapters[name].merge(w, scaled[name]), expected, rtol=1e-5, atol=1e-6)


ROTATIONS = {  # algo -> (oft_blocks shape, rows of W): Diag-OFT n x b x b, BOFT M x n x b x b
    "diag-oft": ((3, 4, 4), 12),
    "boft": ((3, 4, 2, 2), 8),
}


@pytest.mark.parametrize("algo", sorted(ROTATIONS))
def test_per_block_rotation_is_interpolated(algo):
    if algo not in REGISTRY:
        pytest.skip(f"{algo} is not registered yet")
    shape, rows = ROTATIONS[algo]
    name = "lora_unet_double_blocks_2_img_attn_proj"
    g = torch.Generator().manual_seed(7)
    adapters = load_file({f"{name}.oft_blocks": torch.randn(shape, generator=g) * 0.1,
                          f"{name}.alpha": torch.tensor(0.0)}, strict=True)
    assert adapters[name].algo == algo
    scaled = scaled_strengths(adapters, "D02=0.3", strength=0.5)
    assert scaled[name] == pytest.approx(0.15)
    w = torch.randn(rows, 5, generator=torch.Generator().manual_seed(3))
    rotated = adapters[name].merge(w, 1.0)
    assert float(rotated.norm()) == pytest.approx(float(w.norm()), rel=1e-5)  # a rotation at 1
    assert not torch.allclose(rotated, w)
    torch.testing.assert_close(adapters[name].merge(w, scaled[name]), w + 0.15 * (rotated - w),
                               rtol=1e-5, atol=1e-6)


# ----- analyser ------------------------------------------------------------------------------------------

def test_analyse_with_and_without_base_weights():
    names = list(SD15)
    adapters = load_file(_state_dict(names), strict=True)
    deltas = {n: _delta(n, i) for i, n in enumerate(names)}
    bases = {n: _base(d, i) for i, (n, d) in enumerate(deltas.items())}
    rows = {r.block: r for r in analyse(adapters, bases)}
    assert list(rows) == blocks_present(adapters)
    for block in rows:
        members = [n for n in names if SD15[n] == block]
        norm = math.sqrt(sum(float(deltas[n].square().sum()) for n in members))
        base = math.sqrt(sum(float(bases[n].square().sum()) for n in members))
        assert rows[block].n_modules == len(members)
        assert rows[block].norm_delta == pytest.approx(norm, rel=1e-5)
        assert rows[block].rel_change == pytest.approx(norm / base, rel=1e-5)
    without = {r.block: r for r in analyse(adapters)}
    assert without["M00"].norm_delta == pytest.approx(rows["M00"].norm_delta, rel=1e-5)
    assert without["M00"].rel_change is None
    assert "M00" in format_analysis(without.values())


def test_analyse_reports_weight_dependent_modules_as_needing_base():
    names = ["lora_unet_input_blocks_4_1_proj_in", "lora_unet_input_blocks_5_1_proj_in"]
    adapters = load_file(_state_dict(names, dora=names[:1]), strict=True)
    rows = {r.block: r for r in analyse(adapters)}
    assert rows["IN04"].norm_delta is None and "needs base weights" in rows["IN04"].note
    assert "lora+dora" in rows["IN04"].note
    assert rows["IN05"].norm_delta is not None and rows["IN05"].note == ""
    w = _base(_delta(names[0], 0), 0)
    rows = {r.block: r for r in analyse(adapters, {names[0]: w})}
    assert rows["IN04"].norm_delta == pytest.approx(float((adapters[names[0]].merge(w) - w).norm()), rel=1e-5)


def test_strength_accepts_model_keys_and_is_cached():
    spec = parse_spec("IN04=0.5")
    key = ("diffusion_model.input_blocks.4.1.proj_in.weight", (0, 0, 8))
    assert spec.strength("anything", key) == 0.5
    assert spec.strength("anything", key) == 0.5
    assert isinstance(spec, BlockStrengths)


# algo -> (module tensors, base weight shape); ΔW of the first group does not depend on W
WEIGHT_FREE = {
    "lora": ({"lora_up.weight": (6, 2), "lora_down.weight": (2, 5)}, (6, 5)),
    "loha": ({"hada_w1_a": (6, 2), "hada_w1_b": (2, 5), "hada_w2_a": (6, 2), "hada_w2_b": (2, 5)}, (6, 5)),
    "lokr": ({"lokr_w1": (2, 1), "lokr_w2": (3, 5)}, (6, 5)),
    "full": ({"diff": (6, 5)}, (6, 5)),
    "norm": ({"w_norm": (6,)}, (6,)),
}
WEIGHT_DEPENDENT = {
    "glora": ({"a1.weight": (5, 2), "a2.weight": (2, 5), "b1.weight": (6, 2), "b2.weight": (2, 5)}, (6, 5)),
    "ia3": ({"weight": (6,)}, (6, 5)),
    "diag-oft": ({"oft_blocks": (3, 2, 2)}, (6, 5)),
    "boft": ({"oft_blocks": (3, 4, 2, 2)}, (8, 5)),
    "full+set_weight": ({"set_weight": (6, 5)}, (6, 5)),
    "diag-oft-legacy": ({"oft_diag": (3, 2, 2)}, (6, 5)),
    "lora+dora": ({"lora_up.weight": (6, 2), "lora_down.weight": (2, 5), "dora_scale": (6, 1)}, (6, 5)),
}


def _module(algo, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {f"m.{k}": torch.randn(shape, generator=g) * 0.3 for k, shape in layout.items()}
    if algo == "ia3":
        sd["m.on_input"] = torch.tensor(0.0)
    elif algo == "diag-oft-legacy":
        sd["m.oft_diag"] += torch.eye(2)  # the rotation form: rows of norm ~1
    elif algo not in ("full", "norm", "full+set_weight"):
        sd["m.alpha"] = torch.tensor(1.0)
    return sd


@pytest.mark.parametrize("algo", sorted(WEIGHT_FREE) + sorted(WEIGHT_DEPENDENT))
def test_analyser_uses_a_zero_base_only_where_the_change_ignores_w(algo):
    if algo.split("+")[0] not in REGISTRY:
        pytest.skip(f"{algo} is not registered yet")
    layout, shape = {**WEIGHT_FREE, **WEIGHT_DEPENDENT}[algo]
    adapters = load_file(_module(algo, layout), strict=True)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    true_norm = float((adapters["m"].merge(w, 1.0) - w).norm())
    other = 3 * torch.randn(shape, generator=torch.Generator().manual_seed(6))
    reads_w = not torch.allclose(adapters["m"].merge(other, 1.0) - other, adapters["m"].merge(w, 1.0) - w,
                                 atol=1e-5)
    assert adapters["m"].depends_on_weight == reads_w == (algo in WEIGHT_DEPENDENT)
    [row] = analyse(adapters)
    if algo in WEIGHT_FREE:
        assert row.norm_delta == pytest.approx(true_norm, rel=1e-5) and row.note == ""
    else:
        assert row.norm_delta is None and row.note.startswith("needs base weights")
    [row] = analyse(adapters, {"m": w})
    assert row.norm_delta == pytest.approx(true_norm, rel=1e-5)
    assert row.rel_change == pytest.approx(true_norm / float(w.norm()), rel=1e-5)


def test_str_is_the_spec_text_that_parses_back():
    spec = parse_spec("OUTALL, IN05=0.5")
    assert parse_spec(str(spec)).to_spec() == spec.to_spec()
    assert "IN05" in str(spec)
