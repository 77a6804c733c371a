"""LyCORIS Block Weights / Block Info nodes and the /lycoris/blocks route, in-process in a real host."""
from __future__ import annotations

import asyncio
import importlib
import json
import os

import pytest

from block_files import BLOCKS, FILE_NAME, write_sd15_file


@pytest.fixture(scope="module")
def bw(lycoris_pack):
    return importlib.import_module(f"{lycoris_pack.__name__}.nodes.block_weights")


@pytest.fixture(scope="module")
def sd15_file(loras_dir):
    path = write_sd15_file(loras_dir)
    import folder_paths

    assert FILE_NAME in folder_paths.get_filename_list("loras")
    return path


@pytest.fixture
def temp_dir(comfy_host, tmp_path):
    import folder_paths

    old = folder_paths.get_temp_directory()
    folder_paths.set_temp_directory(str(tmp_path))
    yield tmp_path
    folder_paths.set_temp_directory(old)


# ----- Block Weights ---------------------------------------------------------------------------

def test_nodes_registered_with_tooltips(lycoris_pack, bw):
    assert lycoris_pack.NODE_CLASS_MAPPINGS["LycorisBlockWeights"] is bw.LycorisBlockWeights
    assert lycoris_pack.NODE_CLASS_MAPPINGS["LycorisBlockInfo"] is bw.LycorisBlockInfo
    assert lycoris_pack.NODE_DISPLAY_NAME_MAPPINGS["LycorisBlockWeights"] == "LyCORIS Block Weights"
    for cls in (bw.LycorisBlockWeights, bw.LycorisBlockInfo):
        assert cls.CATEGORY == "loaders/lycoris"
        types = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, (_, options) in types.get(section, {}).items():
                assert options.get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
    weights = bw.LycorisBlockWeights.INPUT_TYPES()["required"]
    assert weights["lora_name"][0][0] == "(none)"
    assert weights["preset"][0][0] == "custom" and "MIDD" in weights["preset"][0]
    assert bw.LycorisBlockWeights.RETURN_TYPES == ("LYCORIS_BLOCK_WEIGHTS",)


@pytest.mark.parametrize("spec, token", [
    ("IN04=0.5, IN4x=1", "IN4x"),
    ("OUT=abc", "OUT=abc"),
    ("IN04=R", "IN04=R"),
    ("1,1,1", "1,1,1"),
    ("IN08-IN04=0", "IN08-IN04=0"),
])
def test_bad_spec_names_the_token(bw, spec, token):
    message = bw.LycorisBlockWeights.VALIDATE_INPUTS(spec)
    assert isinstance(message, str) and token in message, message


def test_good_and_linked_specs_validate(bw):
    for spec in ("", "MIDD, IN05=0.3", "ALL=0\nTE=1; re:attn2=0.5", '{"IN04": 0.5}', None):
        assert bw.LycorisBlockWeights.VALIDATE_INPUTS(spec) is True


def test_host_validation_rejects_bad_spec_before_running(comfy_host, bw, sd15_file, monkeypatch):
    """The host's own prompt validation (what POST /prompt runs) fails naming the token."""
    import execution
    import nodes

    class Sink:  # an output node taking the block weights (core's PreviewAny is not loaded here)
        RETURN_TYPES = ()
        FUNCTION = "run"
        OUTPUT_NODE = True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"source": ("LYCORIS_BLOCK_WEIGHTS", {})}}

    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "LycorisBlockWeights", bw.LycorisBlockWeights)
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "LycorisTestSink", Sink)
    prompt = {
        "1": {"class_type": "LycorisBlockWeights",
              "inputs": {"lora_name": FILE_NAME, "preset": "custom", "spec": "IN04=0.5, OUTT3=1",
                         "lbw_compat": False}},
        "2": {"class_type": "LycorisTestSink", "inputs": {"source": ["1", 0]}},
    }
    valid, error, _, node_errors = asyncio.run(execution.validate_prompt("t", prompt, None))
    assert not valid, error
    details = " ".join(e["details"] for e in node_errors["1"]["errors"])
    assert "OUTT3" in details
    prompt["1"]["inputs"]["spec"] = "IN04=0.5, OUT03=1"
    valid, error, _, node_errors = asyncio.run(execution.validate_prompt("t", prompt, None))
    assert valid, (error, node_errors)


def test_build_gives_block_strengths(bw, sd15_file):
    out = bw.LycorisBlockWeights().build(FILE_NAME, "MIDD", "IN05=0.25, OUT09=2", False)
    strengths = out["result"][0]
    assert strengths.arch == "sd1"
    # what the loaders call, with host model keys and with file names
    assert strengths.strength("x", "diffusion_model.input_blocks.5.1.proj_in.weight") == 0.25
    assert strengths.strength("lora_unet_down_blocks_0_attentions_0_proj_in") == 0.0  # IN01 (MIDD)
    assert strengths.strength("lora_unet_mid_block_attentions_0_proj_in") == 1.0
    assert strengths.strength("lora_unet_up_blocks_3_attentions_0_proj_in") == 2.0  # OUT09
    assert strengths.strength("lora_te_text_model_encoder_layers_0_mlp_fc1") == 1.0
    summary = out["ui"]["text"][0]
    assert "IN05=0.25" in summary and "OUT09=2" in summary


def test_build_reports_selectors_the_file_lacks(bw, sd15_file):
    summary = bw.LycorisBlockWeights().build(FILE_NAME, "custom", "IN04=0, OUT05=0.5", False)["ui"]["text"][0]
    assert "matches: IN04" in summary
    clean = bw.LycorisBlockWeights().build(FILE_NAME, "INS", "OUT05=0.5", False)["ui"]["text"][0]
    assert "matches" not in clean  # a preset's blocks are not typos


def test_lbw_compat_zero_fills(bw):
    plain = bw.combine("custom", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", False)
    compat = bw.combine("custom", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", True)
    assert plain.block_value("IN03") == 1.0 and compat.block_value("IN03") == 0.0


# ----- route -----------------------------------------------------------------------------------

def test_route_lists_present_blocks(bw, sd15_file):
    status, body = bw.blocks_request({"file": FILE_NAME})
    assert status == 200, body
    assert [b["id"] for b in body["blocks"]] == BLOCKS
    assert [g["id"] for g in body["groups"]] == ["te", "in", "mid", "out"]
    assert {b["id"]: b["group"] for b in body["blocks"]} == {
        "BASE": "te", "IN01": "in", "IN03": "in", "IN05": "in", "M00": "mid", "OUT05": "out",
        "OUT09": "out"}
    assert body["arch"] == "sd1" and body["values"] == {b: 1.0 for b in BLOCKS}
    assert {p["name"] for p in body["presets"]} >= {"custom", "MIDD", "OUTALL"}
    json.dumps(body)  # plain JSON


def test_route_resolves_specs(bw, sd15_file):
    status, body = bw.blocks_request({"file": FILE_NAME, "preset": "MIDD", "spec": "IN05=0.3, OUT=0.5",
                                      "lbw_compat": "false"})
    assert status == 200 and body["error"] is None
    assert body["values"] == {"BASE": 1.0, "IN01": 0.0, "IN03": 0.0, "IN05": 0.3, "M00": 1.0,
                              "OUT05": 0.5, "OUT09": 0.5}
    status, body = bw.blocks_request({"file": FILE_NAME, "spec": "IN05=0.3, IN5x=2"})
    assert status == 200 and body["values"] is None and "IN5x" in body["error"]
    assert [b["id"] for b in body["blocks"]] == BLOCKS  # the sliders stay


def test_route_without_file(bw):
    status, body = bw.blocks_request({"file": "(none)", "spec": "OUT=0"})
    assert status == 200 and body["blocks"] == [] and body["file"] is None


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "missing.safetensors",
                                  "sd15_blocks_test.safetensors/../x"])
def test_route_refuses_names_outside_the_loras_list(bw, sd15_file, name):
    status, body = bw.blocks_request({"file": name})
    assert status == 404 and "loras" in body["error"]


def test_route_unreadable_file(bw, loras_dir):
    (loras_dir / "broken_blocks.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    status, body = bw.blocks_request({"file": "broken_blocks.safetensors"})
    assert status == 422 and "broken_blocks.safetensors" in body["error"]


def test_route_handler_and_registration(bw, sd15_file):
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    request = make_mocked_request("GET", f"/lycoris/blocks?file={FILE_NAME}&spec=M00%3D0.5")
    response = asyncio.run(bw.handle_blocks(request))
    body = json.loads(response.body)
    assert response.status == 200 and body["values"]["M00"] == 0.5
    response = asyncio.run(bw.handle_blocks(make_mocked_request("GET", "/lycoris/blocks?file=nope")))
    assert response.status == 404 and "error" in json.loads(response.body)

    class FakeServer:
        routes = web.RouteTableDef()

    server = FakeServer()
    assert bw.register_routes(server) is True
    assert bw.register_routes(server) is False  # once only
    assert sorted((r.method, r.path) for r in server.routes) == [
        ("GET", "/lycoris/blocks"), ("POST", "/lycoris/blocks")]


# ----- Block Info ------------------------------------------------------------------------------

def test_block_info_without_model(bw, sd15_file, temp_dir):
    out = bw.LycorisBlockInfo().info(FILE_NAME)
    table, image = out["result"]
    lines = table.splitlines()
    assert any(line.startswith("block") and "|dW|" in line for line in lines)
    for block in BLOCKS:
        row = next(line for line in lines if line.split()[:1] == [block])
        assert float(row.split()[2]) > 0  # |dW| known for LoRA without a base
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[3] == 3
    assert image.dtype.is_floating_point and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert image.shape[1] >= 200 and image.shape[2] >= 400
    assert out["ui"]["text"] == [table]
    preview = out["ui"]["images"][0]
    assert preview["type"] == "temp" and os.path.isfile(temp_dir / preview["filename"])


def test_block_info_with_model_gives_relative_change(bw, sd15, sd15_file, temp_dir):
    model, clip, _ = sd15
    table, image = bw.LycorisBlockInfo().info(FILE_NAME, model=model, clip=clip)["result"]
    lines = table.splitlines()
    assert "7 module(s) found" in table
    for block in BLOCKS:
        row = next(line for line in lines if line.split()[:1] == [block]).split()
        assert float(row[2]) > 0 and 0 < float(row[3]) < 10, row  # |dW| and |dW|/|W|
    assert image.shape[0] == 1 and image.shape[3] == 3


def test_chart_marks_unknown_values(comfy_host, lycoris_pack):
    chart = importlib.import_module(f"{lycoris_pack.__name__}.nodes.block_chart")
    from lycoris_core.blocks import BlockChange

    rows = [BlockChange("IN01", 2, 1.5, None), BlockChange("M00", 1, None, None, "needs base")]
    img = chart.draw_blocks(rows, ["in", "mid"], title="t")
    tensor = chart.to_image_tensor(img)
    assert tuple(tensor.shape) == (1, img.height, img.width, 3)
    assert chart.draw_blocks([], [], title="empty").width >= 400


# ----- with the loaders ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["merge", "bypass"])
def test_block_weights_drive_both_loader_modes(lycoris_pack, bw, sd15, sd15_file, mode):
    """The node's output, handed to `apply_lycoris`, sets each block's strength (merge and bypass)."""
    from lycoris_core import load_file
    from lycoris_core.blocks import block_of

    apply = importlib.import_module(f"{lycoris_pack.__name__}.nodes.apply")
    weights = bw.LycorisBlockWeights().build(
        FILE_NAME, "custom", "IN05=0.25, M00=0, OUT=2, TE=0.5", False)["result"][0]
    model, clip, _ = sd15
    new_model, new_clip, _ = apply.apply_lycoris(model, clip, load_file(sd15_file), 0.8, 1.0, mode,
                                                 weights)
    got: dict[str, set] = {}
    for patcher in (new_model, new_clip.patcher):
        if mode == "merge":
            items = [(k, v[-1][0]) for k, v in patcher.patches.items() if k.endswith(".weight")]
        else:
            registry = patcher.get_attachment("lycoris_bypass")
            items = [(path + ".weight", e.strength) for path, entries in
                     (registry.entries.items() if registry else ()) for e in entries]
        for key, strength in items:
            got.setdefault(block_of("", key), set()).add(round(float(strength), 6))
    assert got == {"BASE": {0.5}, "IN01": {0.8}, "IN03": {0.8}, "IN05": {0.2}, "OUT05": {1.6},
                   "OUT09": {1.6}}  # M00 = 0: not patched at all
