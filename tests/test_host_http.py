"""End to end: a headless ComfyUI server on CPU with this pack in custom_nodes, driven over HTTP.

checkpoint -> Load LyCORIS -> text encode -> KSampler (2 steps, 64x64) -> decode -> save; the image
differs from the one without the adapter and equals it at strength 0.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from host.adapters import Case, build_case
from host.host import ROOT, comfyui_path, subprocess_env

PACK_FOLDER = "comfyui-lycoris"
START_TIMEOUT = 180
PROMPT_TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ComfyUI process on a free port; stopped (by its own pid) when the fixture ends."""

    def __init__(self, base, log_path, yaml_path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        front = base / "frontend"
        front.mkdir()
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--front-end-root", str(front), "--base-directory", str(base),
               "--disable-auto-launch", "--disable-api-nodes", "--extra-model-paths-config",
               str(yaml_path), "--database-url", f"sqlite:///{base / 'comfy.db'}",
               "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_FOLDER]
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(cmd, cwd=comfyui_path(), stdout=self.log, stderr=subprocess.STDOUT,
                                        env=subprocess_env())

    def log_tail(self, n: int = 4000) -> str:
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")[-n:]

    def wait_ready(self, requests) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/object_info/LycorisLoader", timeout=5).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(1)
        raise TimeoutError(f"ComfyUI did not start in {START_TIMEOUT} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        self.log.close()


@pytest.fixture(scope="module")
def server(sd15, sd15_checkpoint, tmp_path_factory):
    requests = pytest.importorskip("requests")
    from safetensors.torch import save_file

    from host.checkpoint import cache_dir

    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    os.symlink(ROOT, base / "custom_nodes" / PACK_FOLDER)
    loras = base / "test_loras"
    loras.mkdir()
    model, clip, _ = sd15
    files = build_case(Case("lora"), model, clip)
    files.extend(build_case(Case("lokr", (("dora", "out"),)), model, clip, seed=7,
                            sites={"linear": "diffusion_model.middle_block.1.transformer_blocks.0."
                                                     "attn1.to_out.0.weight"}))
    save_file(files.tensors, str(loras / "e2e.safetensors"))
    yaml_path = base / "extra_model_paths.yaml"
    yaml_path.write_text(f"lycoris_tests:\n    base_path: {base}\n    checkpoints: {cache_dir()}\n"
                         f"    loras: {loras}\n")
    srv = Server(base, base / "server.log", yaml_path)
    try:
        srv.wait_ready(requests)
        yield srv
    finally:
        srv.stop()


def _workflow(ckpt: str, lycoris: dict | None, prefix: str) -> dict:
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lycoris flower", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0],
            "seed": 1234, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }
    if lycoris is not None:
        graph["lyco"] = {"class_type": "LycorisLoader", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "lycoris_name": "e2e.safetensors", **lycoris}}
        graph["sample"]["inputs"]["model"] = ["lyco", 0]
        graph["pos"]["inputs"]["clip"] = ["lyco", 1]
        graph["neg"]["inputs"]["clip"] = ["lyco", 1]
    return graph


def _run(server, graph) -> dict:
    import requests

    reply = requests.post(f"{server.url}/prompt", json={"prompt": graph, "client_id": uuid.uuid4().hex},
                          timeout=30)
    assert reply.status_code == 200, reply.text
    prompt_id = reply.json()["prompt_id"]
    deadline = time.monotonic() + PROMPT_TIMEOUT
    while time.monotonic() < deadline:
        history = requests.get(f"{server.url}/history/{prompt_id}", timeout=10).json()
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            entry = history[prompt_id]
            if entry["status"]["status_str"] != "success":
                raise AssertionError(json.dumps(entry["status"], indent=1)[-3000:] + server.log_tail())
            return entry
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {PROMPT_TIMEOUT} s:\n{server.log_tail()}")


def _image(server, entry):
    import io

    import numpy as np
    import requests
    from PIL import Image

    info = entry["outputs"]["save"]["images"][0]
    reply = requests.get(f"{server.url}/view", params={"filename": info["filename"],
                         "subfolder": info["subfolder"], "type": info["type"]}, timeout=30)
    assert reply.status_code == 200
    return np.asarray(Image.open(io.BytesIO(reply.content)).convert("RGB")).astype(np.int16)


def test_nodes_are_listed_by_the_server(server):
    import requests

    info = requests.get(f"{server.url}/object_info/LycorisLoader", timeout=10).json()["LycorisLoader"]
    assert info["category"] == "loaders/lycoris" and info["display_name"] == "Load LyCORIS"
    assert "e2e.safetensors" in info["input"]["required"]["lycoris_name"][0]
    assert info["output"] == ["MODEL", "CLIP", "STRING"]
    assert "LycorisLoaderModelOnly" in requests.get(f"{server.url}/object_info", timeout=30).json()


def test_workflow_image_changes_with_the_adapter_and_not_at_strength_zero(server, sd15_checkpoint):
    ckpt = os.path.basename(sd15_checkpoint)
    base = _image(server, _run(server, _workflow(ckpt, None, "base")))
    settings = {"strength_model": 1.0, "strength_clip": 1.0, "mode": "auto"}
    merged_entry = _run(server, _workflow(ckpt, settings, "merged"))
    merged = _image(server, merged_entry)
    zero = _image(server, _run(server, _workflow(ckpt, {**settings, "strength_model": 0.0,
                                                        "strength_clip": 0.0}, "zero")))
    bypassed = _image(server, _run(server, _workflow(ckpt, {**settings, "mode": "bypass"}, "bypassed")))
    assert base.shape == (64, 64, 3)
    effect = abs(merged - base).mean()
    assert effect > 0.5, "the adapter did not change the image"
    assert (zero == base).all(), "strength 0 must give the untouched image"
    assert abs(bypassed - merged).mean() < 0.05 * effect and abs(bypassed - merged).max() <= 2
    report = merged_entry["outputs"]["lyco"]["text"][0]
    assert "model (strength 1)" in report and "merged" in report and "UNMATCHED" not in report
