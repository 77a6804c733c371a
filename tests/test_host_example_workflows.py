"""The example workflows in examples/workflows/ (one per model family) against a live ComfyUI.

Every example is checked against the server's own node definitions (`/object_info`: classes,
input names, link types, required inputs, widget values, every node reachable from an output) and
posted to `/prompt`, whose validation must report no `node_errors`. The model files the examples
name are created empty, so each queued example then stops at its first model loader: nothing
before that may fail. A node the host lacks skips that example with the reason. The SD1.5
example runs end to end on a small random checkpoint the host detects as SD1.5 (a one-level
UNet of the real width, the test checkpoint's CLIP and VAE; 64x64 images, 2 training steps, 1
sampling step): the saved adapter is read back, and the host's key map places every module of
it on the checkpoint's UNet (LyCORIS Block Info with the model connected).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from types import SimpleNamespace

import pytest

from host.host import ROOT
from test_host_http import PACK_FOLDER, Server

EXAMPLES_DIR = os.path.join(ROOT, "examples", "workflows")
EXAMPLES = {
    "sd15": "sd15_lycoris_train.json",
    "sdxl": "sdxl_lycoris_train.json",
    "sd3": "sd3_lycoris_train.json",
    "flux-dev": "flux_dev_lycoris_train.json",
    "wan21-t2v": "wan21_t2v_lycoris_train.json",
    "qwen-image": "qwen_image_lycoris_train.json",
}
# (node class, input) naming a model file -> the models folder its loader lists
MODEL_FILE_INPUTS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("TripleCLIPLoader", "clip_name1"): "text_encoders",
    ("TripleCLIPLoader", "clip_name2"): "text_encoders",
    ("TripleCLIPLoader", "clip_name3"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
}
IMAGE_INPUTS = {("LoadImage", "image")}
VIEW_NODES = {"SaveImage", "SaveVideo", "SaveAnimatedWEBP"}
PROMPT_TIMEOUT = 240
TINY_SD15 = "sd15_tiny_random.safetensors"
# the host's CPU default, fp16 text encoders, made the SD1.5 run ~40x slower (a125cd8, 80 s vs 2 s)
SERVER_ARGS = ["--fp32-text-enc"]
# small tensors: one thread is several times faster than two on a shared machine
SERVER_ENV = {"OMP_NUM_THREADS": "1"}
# the test checkpoint's UNet cut to one level: the host still detects SD1.5 (width 320, context 768)
TINY_SD15_LEVELS = {"num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1],
                    "transformer_depth_output": [1, 1], "transformer_depth_middle": 1}


def load_example(family: str) -> dict:
    with open(os.path.join(EXAMPLES_DIR, EXAMPLES[family]), encoding="utf-8") as f:
        return json.load(f)


def links(node: dict):
    """(input name, source node id, output index) of every linked input."""
    for name, value in node["inputs"].items():
        if isinstance(value, list):
            yield name, value[0], value[1]


def file_values(graph: dict, inputs) -> set[tuple[str, str]]:
    """(input key, value) of every input in `inputs` ({(class, input)}) used by the graph."""
    return {((node["class_type"], name), value) for node in graph.values()
            for name, value in node["inputs"].items() if (node["class_type"], name) in inputs}


def downstream(graph: dict, start: str, output: int) -> set[str]:
    """Nodes fed, directly or not, by output `output` of node `start`."""
    frontier = {nid for nid, node in graph.items() for _, src, index in links(node)
                if (src, index) == (start, output)}
    found = set(frontier)
    while frontier:
        frontier = {nid for nid, node in graph.items() for _, src, _ in links(node) if src in frontier} - found
        found |= frontier
    return found


# ----- checks against the host's node definitions --------------------------------------------------
def _types_match(output: str, wanted) -> bool:
    if not isinstance(wanted, str):
        return False  # a combo takes no link
    if "*" in (output, wanted):
        return True
    return bool(set(output.split(",")) & set(wanted.split(",")))


def _value_problem(cls: str, name: str, value, kind, options: dict) -> str | None:
    if (cls, name) in MODEL_FILE_INPUTS or (cls, name) in IMAGE_INPUTS:
        return None  # file names: the test creates the files, /prompt checks them
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options", [])
        return None if value in choices else f"{value!r} is not one of {choices[:12]}"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number"
        if kind == "INT" and not isinstance(value, int):
            return f"{value!r} is not an integer"
        if value < options.get("min", value) or value > options.get("max", value):
            return f"{value} is outside [{options.get('min')}, {options.get('max')}]"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{value!r} is not a boolean"
    if kind == "STRING" and not isinstance(value, str):
        return f"{value!r} is not a string"
    return None


def graph_problems(graph: dict, info: dict) -> list[str]:
    """Everything in an API-format graph that the host's node definitions do not allow."""
    problems = []
    for nid, node in graph.items():
        cls = node["class_type"]
        spec = info[cls]["input"]
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        where = f"node {nid} ({cls})"
        problems += [f"{where}: required input {name!r} missing"
                     for name in spec.get("required", {}) if name not in node["inputs"]]
        for name, value in node["inputs"].items():
            if name not in declared:
                problems.append(f"{where}: {cls} has no input {name!r}")
                continue
            kind, options = declared[name][0], (declared[name][1] if len(declared[name]) > 1 else {})
            if not isinstance(value, list):
                problem = _value_problem(cls, name, value, kind, options)
                if problem:
                    problems.append(f"{where}: {name}: {problem}")
                continue
            src, index = value
            if src not in graph:
                problems.append(f"{where}: {name} links to missing node {src!r}")
                continue
            outputs = info[graph[src]["class_type"]]["output"]
            if not 0 <= index < len(outputs):
                problems.append(f"{where}: {name} links to output {index} of node {src}, "
                                f"which has {len(outputs)}")
            elif not _types_match(outputs[index], kind):
                problems.append(f"{where}: {name} wants {kind}, node {src} output {index} is "
                                f"{outputs[index]}")
    reached = {nid for nid, node in graph.items() if info[node["class_type"]].get("output_node")}
    frontier = set(reached)
    while frontier:
        frontier = {src for nid in frontier for _, src, _ in links(graph[nid]) if src in graph} - reached
        reached |= frontier
    problems += [f"node {nid} ({graph[nid]['class_type']}) feeds no output node: the host never "
                 "validates or runs it" for nid in sorted(set(graph) - reached)]
    return problems


# ----- the server --------------------------------------------------------------------------------------
def _write_image(path: str, seed: int) -> None:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_tiny_sd15(path: str, full_checkpoint: str) -> None:
    """A random one-level SD1.5 UNet (25.8 M parameters) with the CLIP and VAE of `full_checkpoint`."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from host.checkpoint import SD15_UNET, _fill_

    unet = openaimodel.UNetModel(**{**SD15_UNET, **TINY_SD15_LEVELS}, dtype=torch.float16, device="cpu",
                                 operations=comfy.ops.disable_weight_init)
    _fill_(unet, torch.Generator().manual_seed(0))
    sd = {f"model.diffusion_model.{k}": v.to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    with safe_open(full_checkpoint, "pt") as f:
        sd.update({k: f.get_tensor(k) for k in f.keys() if not k.startswith("model.diffusion_model.")})
    save_file(sd, path)


@pytest.fixture(scope="module")
def server(sd15_checkpoint, lycoris_pack, tmp_path_factory):
    """A headless server whose models folders hold an empty file for every model an example
    names and the tiny SD1.5 checkpoint, and whose input folder holds the examples' images."""
    requests = pytest.importorskip("requests")
    pytest.importorskip("PIL")

    base = tmp_path_factory.mktemp("examples_base")
    (base / "custom_nodes").mkdir()
    os.symlink(ROOT, base / "custom_nodes" / PACK_FOLDER)
    graphs = [load_example(family) for family in EXAMPLES]
    for graph in graphs:
        for key, name in file_values(graph, MODEL_FILE_INPUTS):
            folder = base / "models" / MODEL_FILE_INPUTS[key]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).touch()
    (base / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_tiny_sd15(str(base / "models" / "checkpoints" / TINY_SD15), sd15_checkpoint)
    (base / "input").mkdir()
    images = sorted({name for graph in graphs for _, name in file_values(graph, IMAGE_INPUTS)})
    for seed, name in enumerate(images):
        _write_image(str(base / "input" / name), seed)
    yaml_path = base / "extra_model_paths.yaml"
    yaml_path.write_text(f"lycoris_tests:\n    base_path: {base}\n")
    with pytest.MonkeyPatch.context() as patch:  # Server takes no extra arguments: append ours
        popen = subprocess.Popen
        patch.setattr(subprocess, "Popen", lambda cmd, env, **kw: popen(cmd + SERVER_ARGS,
                                                                         env={**env, **SERVER_ENV}, **kw))
        srv = Server(base, base / "server.log", yaml_path)
    try:
        srv.wait_ready(requests)
        srv.base = base
        srv.info = requests.get(f"{srv.url}/object_info", timeout=60).json()
        srv.pack_classes = set(lycoris_pack.NODE_CLASS_MAPPINGS)
        yield srv
    finally:
        srv.stop()


def _post(server, graph: dict):
    import requests

    return requests.post(f"{server.url}/prompt", json={"prompt": graph, "client_id": uuid.uuid4().hex},
                         timeout=30)


def _finished(server, prompt_id: str) -> dict:
    """The history entry of a prompt once it has run (successfully or not)."""
    import requests

    deadline = time.monotonic() + PROMPT_TIMEOUT
    while time.monotonic() < deadline:
        history = requests.get(f"{server.url}/history/{prompt_id}", timeout=10).json()
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.25)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {PROMPT_TIMEOUT} s:\n{server.log_tail()}")


def _run_ok(server, graph: dict) -> dict:
    reply = _post(server, graph)
    assert reply.status_code == 200, reply.text
    entry = _finished(server, reply.json()["prompt_id"])
    assert entry["status"]["status_str"] == "success", (json.dumps(entry["status"], indent=1)[-3000:]
                                                        + server.log_tail())
    return entry


def _skip_if_host_lacks_nodes(server, graph: dict) -> None:
    missing = sorted({node["class_type"] for node in graph.values()} - set(server.info))
    ours = [cls for cls in missing if cls in server.pack_classes]
    assert not ours, f"the server did not register this pack's node(s) {ours}:\n{server.log_tail()}"
    if missing:
        pytest.skip(f"this host has no {', '.join(missing)} node (core): the example needs it")


def _execution_error(entry: dict) -> dict:
    return next((data for event, data in entry["status"].get("messages", [])
                 if event == "execution_error"), {})


# ----- tests -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(EXAMPLES))
def test_example_trains_saves_and_samples_the_trained_model(family):
    graph = load_example(family)
    for nid, node in graph.items():
        for name, src, _ in links(node):
            assert src in graph, f"{EXAMPLES[family]} node {nid} input {name}: no node {src!r}"
    trains = [nid for nid, node in graph.items() if node["class_type"] == "LycorisTrain"]
    assert len(trains) == 1, f"{EXAMPLES[family]}: one LyCORIS Train node expected, found {len(trains)}"
    saves = [nid for nid in downstream(graph, trains[0], 1) if graph[nid]["class_type"] == "SaveLycoris"]
    assert saves, f"{EXAMPLES[family]}: the trained adapter is not saved"
    views = [nid for nid in downstream(graph, trains[0], 0) if graph[nid]["class_type"] in VIEW_NODES]
    assert views, f"{EXAMPLES[family]}: nothing shows what the trained model generates"


def test_a_node_the_host_lacks_skips_the_example_and_a_missing_pack_node_fails():
    host = SimpleNamespace(info={"KSampler": {}}, pack_classes={"LycorisTrain"}, log_tail=lambda: "")
    with pytest.raises(pytest.skip.Exception, match="no NewCoreNode node"):
        _skip_if_host_lacks_nodes(host, {"1": {"class_type": "KSampler"}, "2": {"class_type": "NewCoreNode"}})
    with pytest.raises(AssertionError, match="LycorisTrain"):
        _skip_if_host_lacks_nodes(host, {"1": {"class_type": "LycorisTrain"}})


@pytest.mark.parametrize("family", list(EXAMPLES))
def test_example_is_valid_on_the_host(server, family):
    graph = load_example(family)
    _skip_if_host_lacks_nodes(server, graph)
    assert graph_problems(graph, server.info) == [], EXAMPLES[family]
    reply = _post(server, graph)
    assert reply.status_code == 200 and not reply.json().get("node_errors"), reply.text
    # the model files are empty: the run must get as far as a model loader and stop there
    entry = _finished(server, reply.json()["prompt_id"])
    failed = _execution_error(entry).get("node_type")
    assert failed in {cls for cls, _ in MODEL_FILE_INPUTS}, (failed, server.log_tail())


def test_a_broken_example_is_rejected_by_both_checks(server):
    graph = load_example("sd15")
    train = next(nid for nid, node in graph.items() if node["class_type"] == "LycorisTrain")
    graph[train]["inputs"]["rank"] = 0
    graph[train]["inputs"]["latents"] = graph[train]["inputs"]["conditioning"]
    graph[train]["inputs"]["timestep_sampling"] = "gaussian"
    graph[train]["inputs"]["no_such_input"] = 1
    problems = "\n".join(graph_problems(graph, server.info))
    for expected in ("rank: 0 is outside", "latents wants LATENT", "'gaussian' is not one of",
                     "has no input 'no_such_input'"):
        assert expected in problems, problems
    reply = _post(server, graph)
    assert reply.status_code == 400 and train in reply.json()["node_errors"], reply.text


def test_sd15_example_runs_end_to_end(server):
    import lycoris_core

    graph = load_example("sd15")
    settings = {"CheckpointLoaderSimple": {"ckpt_name": TINY_SD15},
                "ImageScale": {"width": 64, "height": 64},
                "EmptyLatentImage": {"width": 64, "height": 64},
                "LycorisTrain": {"steps": 2},
                "KSampler": {"steps": 1},
                "SaveLycoris": {"filename_prefix": "lycoris/e2e"},
                "SaveImage": {"filename_prefix": "lycoris/e2e"}}
    for node in graph.values():
        node["inputs"].update(settings.get(node["class_type"], {}))
    train = next(node["inputs"] for node in graph.values() if node["class_type"] == "LycorisTrain")
    entry = _run_ok(server, graph)

    by_class = {node["class_type"]: nid for nid, node in graph.items()}
    saved = entry["outputs"][by_class["SaveLycoris"]]["text"][0]
    path = server.base / "models" / "loras" / saved
    assert path.is_file(), f"Save LyCORIS reported {saved}, not found under {path.parent}"
    adapters = lycoris_core.load_file(str(path), strict=True)
    assert len(adapters) > 0 and not adapters.problems
    assert {a.algo for a in adapters.values()} == {train["algorithm"]}
    assert {a.rank for a in adapters.values()} == {train["rank"]}
    assert adapters.metadata.get("ss_steps") == str(train["steps"])
    image = entry["outputs"][by_class["SaveImage"]]["images"][0]
    assert (server.base / "output" / image["subfolder"] / image["filename"]).is_file()
    assert entry["outputs"][by_class["PreviewImage"]]["images"], "no loss plot"

    info = _run_ok(server, {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD15}},
        "info": {"class_type": "LycorisBlockInfo", "inputs": {"lora_name": saved, "model": ["ckpt", 0]}}})
    table = info["outputs"]["info"]["text"][0]
    assert f"{len(adapters)} module(s) found in the connected model(s)" in table, table
    assert "match nothing" not in table, table
