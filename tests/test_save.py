"""save_file: round trips exactly, writes atomically, never over its source; standard metadata."""
import json
import os
import stat
import sys

import pytest
import torch

from lycoris_core import (REGISTRY, LayerSpec, LycorisError, LycorisWarning, load_file, save_file,
                          standard_metadata, training_metadata)
from lycoris_core.inspect import EXAMPLE_FILE
from lycoris_core.io import read_header

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import make_example  # noqa: E402

LORA = REGISTRY["lora"]
NAME = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def randomized(adapter, seed: int = 3):
    """Non-zero values in every parameter (create() starts at dW = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(p * (1 + 0.1 * noise) if name == "dora_scale" else noise * 0.1)
    adapter.clear_cache()
    return adapter


def layer(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return {"linear": lambda: torch.nn.Linear(32, 32), "conv": lambda: torch.nn.Conv2d(16, 24, 3),
            "norm": lambda: torch.nn.LayerNorm(24)}[kind]()


LORA_CASES = {
    "lora": ("linear", {}), "locon": ("conv", {}), "locon-tucker": ("conv", {"use_tucker": True}),
    "dora-out": ("linear", {"dora": "out"}), "dora-in": ("conv", {"dora": "in"}),
    "scalar": ("linear", {"use_scalar": True}),
}
OTHER_ALGOS = sorted(a for a, c in REGISTRY.items() if a != "lora" and hasattr(c, "create"))


def build(case: str):
    if case in LORA_CASES:
        kind, opts = LORA_CASES[case]
        mod = layer(kind)
        return mod, randomized(LORA.create(LayerSpec.from_module(mod), rank=4, alpha=2.0, **opts))
    mod = layer("norm" if case == "norm" else "linear")
    try:
        return mod, randomized(REGISTRY[case].create(LayerSpec.from_module(mod)))
    except (LycorisError, NotImplementedError) as exc:
        pytest.skip(f"{case} cannot be created here: {exc}")


@pytest.mark.parametrize("case", list(LORA_CASES) + OTHER_ALGOS)
def test_save_load_merge_round_trip_is_identical(tmp_path, case):
    mod, adapter = build(case)
    path = save_file({NAME: adapter}, tmp_path / "rt.safetensors")
    loaded = load_file(path, strict=True)[NAME]
    w = mod.weight.detach()
    with torch.no_grad():  # the same (chunked) merge path for the trainable original and the copy
        for m in (1.0, 0.6):
            assert torch.equal(loaded.merge(w, m), adapter.merge(w, m)), case
    bias = None if getattr(mod, "bias", None) is None else mod.bias.detach()
    if bias is not None:
        assert torch.equal(loaded.merge_bias(bias, 0.6), adapter.merge_bias(bias, 0.6))


def test_half_precision_save_keeps_alpha_exact(tmp_path):
    mod, adapter = build("dora-out")
    adapter.alpha = 0.3  # not representable in fp16/bf16
    path = save_file({NAME: adapter}, tmp_path / "half.safetensors", dtype=torch.bfloat16)
    header, _ = read_header(path)
    assert header[f"{NAME}.alpha"]["dtype"] == "F32"
    assert {header[f"{NAME}.{s}"]["dtype"] for s in ("lora_up.weight", "lora_down.weight",
                                                      "dora_scale")} == {"BF16"}
    loaded = load_file(path, strict=True)[NAME]
    assert loaded.alpha == pytest.approx(0.3, abs=1e-7)
    w = mod.weight.detach()
    with torch.no_grad():
        rel = (loaded.merge(w) - adapter.merge(w)).norm() / (adapter.merge(w) - w).norm()
    assert rel < 2e-2


def test_plain_tensors_and_adapters_mix(tmp_path):
    _, adapter = build("lora")
    extra = {"lora_unet_other.lora_up.weight": torch.randn(24, 2),
             "lora_unet_other.lora_down.weight": torch.randn(2, 32),
             "lora_unet_other.alpha": torch.tensor(1.0)}
    path = save_file({NAME: adapter, **extra}, tmp_path / "mix.safetensors")
    af = load_file(path)
    assert set(af) == {NAME, "lora_unet_other"}
    with pytest.raises(LycorisError, match="two entries produce the file key"):
        save_file({NAME: adapter, f"{NAME}.alpha": torch.tensor(1.0)}, tmp_path / "dup.safetensors")
    with pytest.raises(TypeError, match="expected an Adapter or a torch.Tensor, found list"):
        save_file({NAME: [1, 2]}, tmp_path / "bad.safetensors")
    assert not os.path.exists(tmp_path / "dup.safetensors")


def test_refuses_to_overwrite_unless_asked(tmp_path):
    _, adapter = build("lora")
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="out.safetensors"):
        save_file({NAME: adapter}, path)
    assert path.read_bytes() == b"precious"
    save_file({NAME: adapter}, path, overwrite=True)
    assert NAME in load_file(path)


def test_refuses_to_overwrite_the_source_file(tmp_path):
    _, adapter = build("lora")
    source = save_file({NAME: adapter}, tmp_path / "source.safetensors")
    before = open(source, "rb").read()
    af = load_file(source)
    os.mkdir(tmp_path / "sub")
    os.symlink(source, tmp_path / "link.safetensors")
    spellings = [source, str(tmp_path / "sub" / ".." / "source.safetensors"),
                 str(tmp_path / "link.safetensors")]
    for target in spellings:
        for adapters in (af, {NAME: af[NAME]}):  # the file object, or its adapters picked out
            with pytest.raises(LycorisError) as e:
                save_file(adapters, target, overwrite=True)
            assert target in str(e.value) and "read from" in str(e.value)
    assert open(source, "rb").read() == before
    save_file(af, tmp_path / "copy.safetensors")  # a new path is fine


def test_atomic_write_leaves_no_temp_and_keeps_old_file(tmp_path, monkeypatch):
    _, adapter = build("lora")
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_file({NAME: adapter}, path, overwrite=True)
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


def test_written_file_is_reproducible_and_has_normal_permissions(tmp_path):
    _, adapter = build("dora-out")
    meta = {"ss_b": "2", "ss_a": "1", "ss_c": "3"}
    a = save_file({NAME: adapter}, tmp_path / "a.safetensors", meta)
    b = save_file({NAME: adapter}, tmp_path / "b.safetensors", dict(reversed(meta.items())))
    assert open(a, "rb").read() == open(b, "rb").read()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o666 & ~umask


def test_nan_is_saved_with_a_warning(tmp_path):
    _, adapter = build("lora")
    with torch.no_grad():
        adapter.up[0, 0] = float("nan")
    with pytest.warns(LycorisWarning, match=f"{NAME}.lora_up.weight.*NaN or Inf"):
        save_file({NAME: adapter}, tmp_path / "nan.safetensors")


def test_training_metadata_fields_are_strings():
    meta = training_metadata(algo="lokr", dim=8, alpha=4, network_args={"factor": 8, "use_tucker": True},
                             base_model="sdxl_base_v1-0", steps=500, epochs=2,
                             tag_frequency={"a": 3, "b": 1}, title="my lokr", resolution=(1024, 768),
                             trigger_phrase="mytoken", date="2025-01-02T03:04:05",
                             extra={"ss_seed": 42, "modelspec.author": "me"})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"
    assert json.loads(meta["ss_network_args"]) == {"algo": "lokr", "factor": "8", "use_tucker": "True"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_steps"] == "500" and meta["ss_epoch"] == "2"
    assert json.loads(meta["ss_tag_frequency"]) == {"dataset": {"a": 3, "b": 1}}
    assert meta["ss_resolution"] == "(1024, 768)" and meta["modelspec.resolution"] == "1024x768"
    assert meta["modelspec.title"] == meta["ss_output_name"] == "my lokr"
    assert meta["modelspec.trigger_phrase"] == "mytoken"
    assert meta["modelspec.date"] == "2025-01-02T03:04:05"
    assert meta["ss_seed"] == "42" and meta["modelspec.author"] == "me"


def test_standard_metadata_reads_the_adapters():
    adapters, _ = make_example.build()
    meta = standard_metadata(adapters, steps=10, tag_frequency={"d": {"x": 1}},
                             network_args={"preset": "full"})
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == "lora"  # the most common algorithm
    assert args["preset"] == "full" and args["dora_wd"] == "True" and args["use_tucker"] == "True"
    assert args["conv_dim"] == "4"
    assert set(args["mixed_algos"].split(",")) == {a.algo for a in adapters.values()}
    assert meta["ss_network_dim"] == "4"  # most common linear rank
    assert meta["ss_base_model_version"] == "sd_v1"  # cross-attention reads 768-wide context
    assert meta["ss_steps"] == "10" and json.loads(meta["ss_tag_frequency"]) == {"d": {"x": 1}}
    assert standard_metadata(adapters, base_model="sd_v2")["ss_v2"] == "True"


def test_metadata_survives_the_file(tmp_path):
    _, adapter = build("lora")
    meta = standard_metadata({NAME: adapter}, steps=7, title="t", date="2025-01-01T00:00:00")
    path = save_file({NAME: adapter}, tmp_path / "m.safetensors", meta | {"ss_extra": 5})
    got = load_file(path).metadata
    assert got["ss_steps"] == "7" and got["ss_extra"] == "5" and got["modelspec.title"] == "t"


def test_example_is_shipped_small_and_clean():
    assert os.path.getsize(EXAMPLE_FILE) < 400_000
    af = load_file(EXAMPLE_FILE, strict=True)
    assert af.problems == []
    algos = {a.algo for a in af.values()}
    assert {"lora", "loha", "lokr", "diag-oft"} & set(REGISTRY) <= algos
    convs = [a for a in af.values() if a.algo == "lora" and len(a.target_shape or ()) == 4]
    doras = [a for a in af.values() if a.dora_scale is not None]
    assert convs and doras
    assert all(n.startswith(("lora_unet_", "lora_te_")) for n in af)


def test_example_builder_is_deterministic(tmp_path):
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    make_example.main(["--out", str(a)])
    make_example.main(["--out", str(b)])
    assert a.read_bytes() == b.read_bytes()


def test_model_hash_is_the_sha256_of_the_data_section_and_never_stale(tmp_path):
    """`sshs_model_hash` as kohya/A1111 define it: sha256 of every byte after the header; a hash
    carried over in the given metadata (a resumed file) is replaced, a legacy hash dropped."""
    import hashlib
    import struct

    tensors = {"m.lora_down.weight": torch.randn(4, 16), "m.lora_up.weight": torch.randn(8, 4).half(),
               "m.alpha": torch.tensor(2.0)}
    path = save_file(tensors, tmp_path / "h.safetensors",
                     {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "deadbeef", "ss_network_dim": 4})
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert "sshs_legacy_hash" not in meta and meta["ss_network_dim"] == "4"
    other = save_file({**tensors, "m.alpha": torch.tensor(3.0)}, tmp_path / "h2.safetensors")
    assert read_header(other)[1]["sshs_model_hash"] != meta["sshs_model_hash"]


def test_a_file_created_while_saving_is_never_replaced(tmp_path, monkeypatch):
    """Another program takes the name after the existence check: the save refuses, no clobber."""
    import lycoris_core.io as sio

    _, adapter = build("lora")
    path = tmp_path / "out.safetensors"
    make_temp = sio._temp_beside

    def racing_temp(target):
        path.write_bytes(b"theirs")
        return make_temp(target)

    monkeypatch.setattr(sio, "_temp_beside", racing_temp)
    with pytest.raises(FileExistsError, match="out.safetensors"):
        save_file({NAME: adapter}, path)
    assert path.read_bytes() == b"theirs"
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]
