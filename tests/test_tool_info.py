"""`python -m lycoris_core info`: hashes against hashlib, trigger words from known counts, training
arguments, stale kohya hashes, JSON, errors; `inspect` unchanged beside it."""
import hashlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lycoris_core import file_hashes
from lycoris_core.file_hashes import hash_file
from lycoris_core.inspect import EXAMPLE_FILE, collected_trigger_words, info_file, run_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = "lora_unet_down_blocks_0_attentions_0_proj_in"
# two dataset folders; tags repeat across folders, so the expected order needs the sums
TAGS = {"10_zkchar": {"zkchar": 50, "1girl": 30, "smile": 5, "red hair": 12},
        "3_style": {"1girl": 25, "outdoors": 40, "smile": 4, " ": 99}}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lycoris_core", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def expected_tag_order() -> list[str]:
    """Tags by summed count over both folders, most frequent first, blank tags dropped."""
    sums: dict[str, int] = {}
    for tags in TAGS.values():
        for tag, n in tags.items():
            if tag.strip():
                sums[tag] = sums.get(tag, 0) + n
    return sorted(sums, key=lambda t: -sums[t])  # the counts written above have no ties


def write_adapter(path, metadata=None, rows=4, cols=8) -> str:
    g = torch.Generator().manual_seed(0)
    tensors = {f"{MODULE}.lora_down.weight": torch.randn(2, cols, generator=g),
               f"{MODULE}.lora_up.weight": torch.randn(rows, 2, generator=g),
               f"{MODULE}.alpha": torch.tensor(1.0)}
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


@pytest.fixture
def big_file(tmp_path):
    """A file past 1.1 MiB, so AutoV1's window (64 KiB at 1 MiB) lies inside it."""
    return write_adapter(tmp_path / "big.safetensors", {"ss_network_dim": "2"}, rows=640, cols=640)


def test_hashes_equal_hashlib_of_the_file_bytes(big_file):
    data = open(big_file, "rb").read()
    header_end = 8 + int.from_bytes(data[:8], "little")
    hashes = hash_file(big_file)
    assert hashes.sha256 == hashlib.sha256(data).hexdigest()
    assert hashes.autov2 == hashlib.sha256(data).hexdigest()[:10]
    assert hashes.autov1 == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert hashes.data_sha256 == hashlib.sha256(data[header_end:]).hexdigest()
    assert hashes.autov3 == hashes.data_sha256[:12]


def test_hashes_do_not_depend_on_chunk_boundaries(big_file, tmp_path, monkeypatch):
    small = write_adapter(tmp_path / "small.safetensors")
    reference = {small: hash_file(small), big_file: hash_file(big_file)}
    # tiny chunks split the length prefix and the header; 4097 misaligns the AutoV1 window
    for path, size in ((small, 3), (small, 7), (big_file, 4097)):
        monkeypatch.setattr(file_hashes, "CHUNK", size)
        assert hash_file(path) == reference[path], (path, size)


def test_progress_sees_every_chunk(big_file):
    seen = []

    def bar(chunks, total):
        seen.append(total)
        for chunk in chunks:
            seen.append(len(chunk))
            yield chunk

    hash_file(big_file, bar)
    size = os.path.getsize(big_file)
    assert seen[0] == -(-size // file_hashes.CHUNK) == len(seen) - 1 and sum(seen[1:]) == size


def test_data_hash_matches_kohya_hash_of_a_saved_file():
    """Our own saver writes kohya's `sshs_model_hash`; the data section hashes to it."""
    report = info_file(EXAMPLE_FILE)
    assert report["hash_check"] == {"sshs_model_hash": report["hashes"]["data_sha256"],
                                    "matches": True}


def test_stale_kohya_hash_is_reported(tmp_path):
    path = write_adapter(tmp_path / "stale.safetensors", {"sshs_model_hash": "0" * 64})
    report = info_file(path)
    assert report["hash_check"]["matches"] is False
    out, err = io.StringIO(), io.StringIO()
    assert run_info(path, as_json=False, out=out, err=err) == 0
    assert "STALE" in out.getvalue()


def test_trigger_words_most_frequent_first(tmp_path):
    path = write_adapter(tmp_path / "tags.safetensors", {"ss_tag_frequency": json.dumps(TAGS)})
    assert info_file(path, triggers=50)["trigger_words"] == expected_tag_order()
    assert info_file(path, triggers=2)["trigger_words"] == expected_tag_order()[:2]
    counts = {w["word"]: w["count"] for w in collected_trigger_words(path, {"ss_tag_frequency":
                                                                            json.dumps(TAGS)}, 50)}
    assert counts["1girl"] == TAGS["10_zkchar"]["1girl"] + TAGS["3_style"]["1girl"]


def test_declared_trigger_phrases_come_first_without_duplicates(tmp_path):
    meta = {"ss_tag_frequency": json.dumps(TAGS), "modelspec.trigger_phrase": "zk style, ZKCHAR"}
    path = write_adapter(tmp_path / "declared.safetensors", meta)
    with open(tmp_path / "declared.civitai.info", "w", encoding="utf-8") as f:
        json.dump({"trainedWords": ["civi word, zk style"]}, f)
    words = info_file(path, triggers=50)["trigger_words"]
    tags = [t for t in expected_tag_order() if t != "zkchar"]  # declared as ZKCHAR already
    assert words == ["zk style", "ZKCHAR", "civi word"] + tags


def test_broken_tag_frequency_gives_no_words_and_a_problem(tmp_path):
    path = write_adapter(tmp_path / "bad.safetensors", {"ss_tag_frequency": "{not json"})
    report = info_file(path)
    assert report["trigger_words"] == []
    assert any(p["key"] == "ss_tag_frequency" for p in report["problems"])


def test_training_arguments_in_order_and_decoded(tmp_path):
    meta = {"ss_seed": "42", "ss_network_dim": "2", "ss_network_module": "lycoris.kohya",
            "ss_network_args": json.dumps({"algo": "lora", "conv_dim": "4"}),
            "ss_training_started_at": "1700000000.5", "ss_optimizer": "None"}
    path = write_adapter(tmp_path / "args.safetensors", meta)
    report = info_file(path)
    args = report["training_arguments"]
    assert list(args) == ["ss_network_module", "ss_network_dim", "ss_network_args", "ss_seed",
                          "ss_training_started_at"]  # TRAINING_ARGUMENTS order; "None" left out
    assert args["ss_network_args"] == {"algo": "lora", "conv_dim": "4"}
    out, err = io.StringIO(), io.StringIO()
    run_info(path, as_json=False, out=out, err=err)
    assert "2023-11-14 22:13:20 UTC" in out.getvalue() and "algo=lora, conv_dim=4" in out.getvalue()


def test_cli_text_and_json():
    res = cli("info", EXAMPLE_FILE, "--quiet")
    assert res.returncode == 0, res.stderr
    sha = hashlib.sha256(open(EXAMPLE_FILE, "rb").read()).hexdigest()
    for text in (f"AutoV2: {sha[:10].upper()}", f"sha256: {sha}", "Trigger words: lycoexample",
                 "network module  lycoris.kohya", "LoCon (Tucker):", "Problems: none"):
        assert text in res.stdout, text
    res = cli("info", EXAMPLE_FILE, "--json", "--triggers", "3")
    report = json.loads(res.stdout)
    assert report["hashes"]["sha256"] == sha and report["hashes"]["autov2"] == sha[:10]
    assert report["trigger_words"] == ["lycoexample", "1girl", "solo"]
    assert report["modules"] == 18 and report["algorithms"]


def test_cli_errors_are_one_line(tmp_path):
    res = cli("info", str(tmp_path / "gone.safetensors"))
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "gone.safetensors" in res.stderr


def test_inspect_output_is_unchanged_by_info():
    res = cli("inspect", EXAMPLE_FILE, "--json")
    report = json.loads(res.stdout)
    assert "hashes" not in report and "trigger_sources" not in report
    assert report["trigger_words"][:2] == ["lycoexample", "1girl"]
