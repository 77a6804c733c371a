"""LyCORIS Info inside ComfyUI: trigger words as a STRING a text encoder takes, and the report."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from host.helpers import pack_module

pytestmark = pytest.mark.usefixtures("quiet_warnings")
TAGS = {"5_kgirl": {"kgirl": 20, "hat": 3, "blue sky": 7}, "2_extra": {"hat": 6, "kgirl": 1}}


def _write(loras_dir, name, metadata) -> str:
    g = torch.Generator().manual_seed(1)
    module = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{module}.lora_down.weight": torch.randn(2, 320, generator=g),
               f"{module}.lora_up.weight": torch.randn(320, 2, generator=g)},
              os.path.join(loras_dir, name), metadata=metadata)
    return name


def _node():
    return pack_module("nodes.inspect").LycorisInfo()


def test_registered_with_tooltips(lycoris_pack):
    cls = lycoris_pack.NODE_CLASS_MAPPINGS["LycorisInfo"]
    assert cls.RETURN_TYPES == ("STRING", "STRING") and cls.RETURN_NAMES[0] == "trigger_words"
    for name, (_, options) in cls.INPUT_TYPES()["required"].items():
        assert options.get("tooltip"), name


def test_trigger_words_in_count_order_and_into_a_text_encoder(sd15, loras_dir):
    name = _write(loras_dir, "info_tags.safetensors", {"ss_tag_frequency": json.dumps(TAGS),
                                                      "modelspec.trigger_phrase": "kstyle"})
    out = _node().info(name, max_words=3)
    words, report = out["result"]
    # summed over folders: kgirl 21, hat 9, blue sky 7; the declared phrase comes first
    assert words == "kstyle, kgirl, hat"
    data = open(os.path.join(loras_dir, name), "rb").read()
    assert hashlib.sha256(data).hexdigest()[:10].upper() in report
    assert out["ui"]["text"] == [report]
    import nodes

    (cond,) = nodes.CLIPTextEncode().encode(sd15[1], words + ", a photo")
    assert cond[0][0].shape[-1] == 768


def test_no_metadata_gives_an_empty_string(loras_dir):
    name = _write(loras_dir, "info_plain.safetensors", None)
    words, report = _node().info(name, max_words=5)["result"]
    assert words == "" and "Trigger words: none" in report


def test_changed_file_is_read_again(loras_dir):
    node = _node()
    name = _write(loras_dir, "info_changing.safetensors", {"modelspec.trigger_phrase": "one"})
    assert node.info(name)["result"][0] == "one"
    _write(loras_dir, name, {"modelspec.trigger_phrase": "two, three"})
    os.utime(os.path.join(loras_dir, name), ns=(1, 1))  # mtime surely differs from the first file
    assert node.info(name)["result"][0] == "two, three"
