"""Report what an adapter file holds: algorithms, ranks, alphas, dtypes, model parts, metadata, problems.

Model parts are block ids from `lycoris_core.blocks` (BASE, IN04, M00, D07, …), grouped as the
block-weight sliders group them, so what inspect lists is what a block-strength spec can address.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

import torch

from .adapter_file import AdapterFile, load_file
from .algos import Adapter
from .blocks import block_group, detect_arch, group_title, is_known_name, module_blocks
from .blocks.names import block_sort_key
from .errors import LycorisError, LycorisWarning, Problem, plural
from .file_hashes import hash_file
from .io import parse_json

EXAMPLE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples",
                            "example_sd15_mixed.safetensors")

ALGO_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "ia3": "(IA)^3", "glora": "GLoRA",
              "diag-oft": "Diag-OFT", "diag-oft-legacy": "Diag-OFT (legacy oft_diag)",
              "boft": "BOFT", "full": "Full", "norm": "Norm"}
TUCKER_SUFFIXES = ("lora_mid.weight", "hada_t1", "hada_t2", "lokr_t2")
# what `ss_network_args["algo"]` may say for each of our algorithm names
ALGO_ALIASES = {"locon": "lora", "lora": "lora", "dylora": "lora", "oft": "diag-oft",
                "diag-oft": "diag-oft", "lokr": "lokr", "loha": "loha", "ia3": "ia3",
                "glora": "glora", "boft": "boft", "full": "full"}

# kohya `ss_base_model_version` of the families `detect_arch` tells apart by module names
ARCH_BASE_MODELS = {"sdxl": "sdxl_base_v1-0", "flux": "flux1", "sd3": "sd3"}
# SD UNets by the width their cross-attention k/v read (the text context), or the width of the
# only CLIP of a kohya `lora_te_` file: what names alone cannot tell (SD1.x vs SD2.x)
CONTEXT_WIDTHS = {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}
_CONTEXT_READER = re.compile(r"attn2_to_[kv](?:_|$)|^lora_te_.*_q_proj$")


def _in_dim(adapter: Adapter) -> int | None:
    shape = adapter.target_shape
    return shape[1] if shape is not None and len(shape) >= 2 else None


def guess_base_model(adapters: Mapping[str, Adapter]) -> str | None:
    """kohya `ss_base_model_version` guessed from module names (`detect_arch`), else from the
    cross-attention width of an SD UNet; None when neither tells."""
    arch = detect_arch(adapters)
    if arch.name in ARCH_BASE_MODELS:
        return ARCH_BASE_MODELS[arch.name]
    for name, adapter in adapters.items():
        if _CONTEXT_READER.search(name.lower().replace(".", "_")) and isinstance(adapter, Adapter):
            width = _in_dim(adapter)
            if width in CONTEXT_WIDTHS:
                return CONTEXT_WIDTHS[width]
    return None


def block_counts(blocks: Iterable[str]) -> dict[str, int]:
    """{block id: modules} of the modules' block ids, in canonical block order."""
    counts = Counter(blocks)
    return {block: counts[block] for block in sorted(counts, key=block_sort_key)}


def part_summary(blocks: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{group: {title, modules, blocks: {block id: modules}}} of the modules' block ids, grouped
    as the block-weight sliders group them, in canonical block order."""
    parts: dict[str, dict[str, Any]] = {}
    for block, n in block_counts(blocks).items():
        group = block_group(block)
        entry = parts.setdefault(group, {"title": group_title(group), "modules": 0, "blocks": {}})
        entry["blocks"][block] = n
        entry["modules"] += n
    return parts


def uses_tucker(adapter: Adapter) -> bool:
    """Whether the module carries a Tucker core (`lora_mid`, `hada_t1/t2`, `lokr_t2`)."""
    return any(getattr(adapter, adapter.keys[s], None) is not None
               for s in TUCKER_SUFFIXES if s in adapter.keys)


def _label(adapter: Adapter) -> str:
    """Display name of a module's algorithm: LoRA on a conv is LoCon; DoRA is a suffix."""
    label = ALGO_NAMES.get(adapter.algo, adapter.algo)
    shape = adapter.target_shape
    if adapter.algo == "lora" and shape is not None and len(shape) > 2:
        label = "LoCon"
    if uses_tucker(adapter):
        label += " (Tucker)"
    if adapter.dora_scale is not None:
        label += f" + DoRA ({adapter.dora_axis} axis)"
    return label


def _number(x: float | None) -> str:
    return "none (= rank)" if x is None else f"{x:g}"


def _no_effect(adapter: Adapter) -> bool:
    """A module whose update is exactly zero: an all-zero factor of a product, or all zeros."""
    if adapter.dora_scale is not None:
        return False
    factors = [t for attr in adapter.keys.values()
               if isinstance(t := getattr(adapter, attr, None), torch.Tensor) and t.is_floating_point()]
    if not factors:
        return False
    zero = [not bool(t.detach().any()) for t in factors]
    return any(zero) if adapter.algo in ("lora", "loha", "lokr") else all(zero)


def trigger_words(metadata: Mapping[str, str], limit: int = 10) -> list[str]:
    """The most frequent tags of kohya's `ss_tag_frequency` over all dataset folders."""
    return [tag for tag, _ in tag_frequency(metadata)[:limit]]


def _family(base: str | None) -> str | None:
    if not base:
        return None
    for family in ("sdxl", "sd_v1", "sd_v2", "sd3", "flux"):
        if base.lower().startswith(family):
            return family
    return base


def _own_problems(af: AdapterFile, guess: str | None) -> list[Problem]:
    """What inspect notices beyond the loader: no modules, unknown parts, zero modules, metadata."""
    out: list[Problem] = []
    path, meta = af.path, af.metadata

    def note(reason: str, key: str | None = None, level: str = "warning") -> None:
        out.append(Problem(level, path, key, reason))

    if not af.adapters:
        note("no usable adapter module in this file", level="error")
    unknown = [n for n in af.adapters if not is_known_name(n)]
    if unknown:
        note(f"{plural(len(unknown), 'module')} named after no known model part (kohya "
             "lora_unet_/lora_te*_, lycoris_, diffusers or peft paths)", unknown[0])
    zero = [n for n, a in af.adapters.items() if _no_effect(a)]
    if zero:
        note(f"{plural(len(zero), 'module')} with an all-zero update (untrained or zeroed): no effect",
             zero[0])
    try:
        args = parse_json(meta.get("ss_network_args") or "{}")
    except ValueError as exc:
        note(f"ss_network_args is not valid JSON ({exc})", "ss_network_args")
        args = {}
    said = str(args.get("algo", "")).lower() if isinstance(args, dict) else ""
    found = {a.algo.replace("-legacy", "") for a in af.adapters.values()}
    if said and found and ALGO_ALIASES.get(said, said) not in found:
        note(f"metadata says algo {said!r} but the tensors are {', '.join(sorted(found))}",
             "ss_network_args")
    dim = meta.get("ss_network_dim")
    ranks = {a.rank for a in af.adapters.values() if a.rank is not None}
    if dim and ranks and dim.isdecimal() and len(dim) < 20 and int(dim) not in ranks:
        note(f"metadata ss_network_dim is {dim} but no module has that rank "
             f"(ranks: {', '.join(map(str, sorted(ranks)))})", "ss_network_dim")
    said_base = meta.get("ss_base_model_version")
    if said_base and guess and _family(said_base) != _family(guess):
        note(f"metadata says base model {said_base!r} but module names/shapes look like {guess!r}",
             "ss_base_model_version")
    if meta.get("ss_tag_frequency"):
        try:
            trigger_words(meta)
        except (ValueError, TypeError, AttributeError, ArithmeticError) as exc:
            note(f"ss_tag_frequency is not the expected JSON {{folder: {{tag: count}}}} ({exc})",
                 "ss_tag_frequency")
    return out


def inspect_file(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-ready report of one adapter file; raises LycorisFormatError when it is unreadable."""
    path = os.fspath(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        af = load_file(path)
    problems = list(af.problems)
    known = {p.message for p in problems}
    for w in caught:  # warnings raised inside algorithm code that the loader did not keep
        msg = str(w.message)
        if issubclass(w.category, LycorisWarning) and msg not in known:
            known.add(msg)
            problems.append(Problem("warning", None, None, msg))
    groups: dict[str, list[str]] = {}
    for name, adapter in af.adapters.items():
        groups.setdefault(_label(adapter), []).append(name)
    guess = guess_base_model(af.adapters)
    problems += _own_problems(af, guess)
    arch = detect_arch(af.adapters)
    blocks = module_blocks(af.adapters, arch=arch)

    algorithms = []
    for label, names in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        adapters = [af.adapters[n] for n in names]
        keys = [k for n in names for k in af.module_keys.get(n, {}).values()]
        algorithms.append({
            "algorithm": label,
            "algo": adapters[0].algo,
            "modules": len(names),
            "ranks": _counts(a.rank for a in adapters),
            "alphas": _counts(_number(a.alpha) if a.uses_alpha else "n/a" for a in adapters),
            "dtypes": _counts(af.dtypes[k] for k in keys),
            "bytes": sum(af.key_bytes.get(k, 0) for k in keys),
            "blocks": block_counts(blocks[n] for n in names),
        })
    meta = af.metadata
    try:
        triggers = trigger_words(meta)
    except (ValueError, TypeError, AttributeError, ArithmeticError):
        triggers = []
    return {
        "file": path,
        "file_bytes": os.path.getsize(path),
        "tensor_bytes": af.nbytes,
        "tensors": len(af.dtypes),
        "modules": len(af.adapters),
        "algorithms": algorithms,
        "arch": {"name": arch.name, "title": arch.title},
        "parts": part_summary(blocks.values()),
        "base_model": {"metadata": meta.get("ss_base_model_version"), "guess": guess},
        "training_metadata": {k: v for k, v in sorted(meta.items())
                              if k.startswith(("ss_", "sshs_", "modelspec."))},
        "other_metadata": {k: v for k, v in sorted(meta.items())
                           if not k.startswith(("ss_", "sshs_", "modelspec."))},
        "trigger_words": triggers,
        "problems": [{"level": p.level, "key": p.key, "reason": p.reason} for p in problems],
    }


def _counts(values) -> dict[str, int]:
    counts = Counter("n/a" if v is None else str(v) for v in values)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _counted(counts: Mapping[str, int]) -> str:
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{v} (x{n})" for v, n in counts.items())


def _blocks_line(blocks: Mapping[str, int]) -> str:
    """{"BASE": 2, "IN01": 1} -> 'BASE x2, IN01'."""
    return ", ".join(block if n == 1 else f"{block} x{n}" for block, n in blocks.items())


def _short(value: str, width: int = 100) -> str:
    value = " ".join(value.split())
    return value if len(value) <= width else value[: width - 1] + "…"


def format_report(report: Mapping[str, Any]) -> str:
    """The report as aligned plain text for a terminal."""
    lines = [f"File: {report['file']}",
             f"Size: {human_bytes(report['file_bytes'])} on disk, {human_bytes(report['tensor_bytes'])} "
             f"of tensors; {plural(report['modules'], 'module')}, {plural(report['tensors'], 'tensor')}"]
    base = report["base_model"]
    lines.append(f"Base model: {base['metadata'] or 'not in metadata'}"
                 f" (from names: {base['guess'] or 'unknown'})")
    lines.append(f"Block map: {report['arch']['title']}")
    lines += ["", "Algorithms:"]
    for algo in report["algorithms"]:
        lines.append(f"  {algo['algorithm']}: {plural(algo['modules'], 'module')}, "
                     f"{human_bytes(algo['bytes'])}")
        lines.append(f"    rank {_counted(algo['ranks'])}; alpha {_counted(algo['alphas'])}; "
                     f"dtype {_counted(algo['dtypes'])}")
        lines.append(f"    blocks: {_blocks_line(algo['blocks'])}")
    if not report["algorithms"]:
        lines.append("  (none)")
    lines += ["", "Model parts touched (block ids):"]
    for entry in report["parts"].values():
        lines.append(f"  {entry['title']}: {', '.join(entry['blocks'])} "
                     f"({plural(entry['modules'], 'module')})")
    if not report["parts"]:
        lines.append("  (none)")
    meta = report["training_metadata"]
    lines += ["", "Training metadata:" if meta else "Training metadata: none"]
    width = max((len(k) for k in meta), default=0)
    for key, value in meta.items():
        lines.append(f"  {key.ljust(width)}  {_short(value)}")
    if report["other_metadata"]:
        lines.append("Other metadata: " + ", ".join(report["other_metadata"]))
    triggers = report["trigger_words"]
    lines += ["", f"Trigger words (most frequent tags): {', '.join(triggers) if triggers else 'none'}"]
    problems = report["problems"]
    lines += ["", f"Problems: {len(problems) or 'none'}"]
    for p in problems:
        lines.append(f"  {p['level']}: {(p['key'] + ': ') if p['key'] else ''}{p['reason']}")
    return "\n".join(lines)


def run(path: str | None, *, as_json: bool, out: TextIO, err: TextIO) -> int:
    """The `inspect` command: print a report; 0 on success, 1 when the file cannot be read."""
    path = path or EXAMPLE_FILE
    try:
        report = inspect_file(path)
    except LycorisError as exc:
        message = " ".join(str(exc).split())
        if not exc.file:
            message = f"{path}: {message}"
        print(f"lycoris_core inspect: error: {message}", file=err)
        return 1
    except OSError as exc:
        print(f"lycoris_core inspect: error: {path}: {exc.strerror or exc}", file=err)
        return 1
    print(json.dumps(report, indent=2, ensure_ascii=False) if as_json else format_report(report),
          file=out)
    return 0


# ----- info: the full report (inspect + hashes, training arguments, trigger words) ------------------
# kohya training arguments shown by `info`, in this order, with their labels
TRAINING_ARGUMENTS = (
    ("ss_network_module", "network module"), ("ss_network_dim", "network dim"),
    ("ss_network_alpha", "network alpha"), ("ss_network_args", "network args"),
    ("ss_base_model_version", "base model"), ("ss_sd_model_name", "trained on"),
    ("ss_resolution", "resolution"), ("ss_num_train_images", "train images"),
    ("ss_num_epochs", "epochs"), ("ss_epoch", "epoch saved"), ("ss_steps", "steps"),
    ("ss_max_train_steps", "max steps"), ("ss_learning_rate", "learning rate"),
    ("ss_unet_lr", "unet lr"), ("ss_text_encoder_lr", "text encoder lr"),
    ("ss_optimizer", "optimizer"), ("ss_lr_scheduler", "lr scheduler"),
    ("ss_lr_warmup_steps", "warmup steps"), ("ss_batch_size_per_device", "batch size"),
    ("ss_gradient_accumulation_steps", "grad accumulation"), ("ss_mixed_precision", "precision"),
    ("ss_seed", "seed"), ("ss_clip_skip", "clip skip"), ("ss_noise_offset", "noise offset"),
    ("ss_min_snr_gamma", "min SNR gamma"), ("ss_training_started_at", "started"),
    ("ss_training_finished_at", "finished"), ("ss_training_comment", "comment"),
)
TIMESTAMP_KEYS = ("ss_training_started_at", "ss_training_finished_at")
SIDECAR_LIMIT = 1 << 20  # sidecar JSON files larger than this are not read
# sidecar files other tools write beside a LoRA: (suffix replacing ".safetensors", JSON field)
TRIGGER_SIDECARS = ((".civitai.info", "trainedWords"),  # Civitai Helper: the model page's words
                    (".json", "activation text"))       # A1111's per-LoRA user metadata


def tag_frequency(metadata: Mapping[str, str]) -> list[tuple[str, int]]:
    """(tag, count) of kohya's `ss_tag_frequency`, summed over dataset folders, most frequent
    first (ties by name)."""
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return []
    counts: Counter = Counter()
    for tags in parse_json(raw).values():
        for tag, n in tags.items():
            if tag.strip():
                counts[tag.strip()] += int(n)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _phrases(value: Any) -> list[str]:
    """A comma-separated string or a list of them, as stripped non-empty phrases."""
    items = value if isinstance(value, list) else [value]
    return [p.strip() for item in items if isinstance(item, str) for p in item.split(",") if p.strip()]


def sidecar_triggers(path: str) -> list[str]:
    """Trigger words from files beside the adapter (Civitai Helper `.civitai.info`, A1111 `.json`)."""
    stem = path[: -len(".safetensors")] if path.endswith(".safetensors") else os.path.splitext(path)[0]
    words: list[str] = []
    for suffix, field in TRIGGER_SIDECARS:
        side = stem + suffix
        try:
            if not os.path.isfile(side) or os.path.getsize(side) > SIDECAR_LIMIT:
                continue
            with open(side, encoding="utf-8") as f:
                data = parse_json(f.read())
        except (OSError, ValueError):
            continue  # a broken sidecar is someone else's file: not a problem of the adapter
        if isinstance(data, dict):
            words += _phrases(data.get(field))
    return words


def collected_trigger_words(path: str, metadata: Mapping[str, str], limit: int = 10
                            ) -> list[dict[str, Any]]:
    """Trigger words with their source, declared ones first (`modelspec.trigger_phrase`,
    sidecar files), then the most frequent training tags; duplicates dropped, at most `limit`."""
    found = [{"word": w, "source": "modelspec.trigger_phrase"}
             for w in _phrases(metadata.get("modelspec.trigger_phrase"))]
    found += [{"word": w, "source": "sidecar"} for w in sidecar_triggers(path)]
    try:
        found += [{"word": t, "source": "ss_tag_frequency", "count": n}
                  for t, n in tag_frequency(metadata)]
    except (ValueError, TypeError, AttributeError, ArithmeticError):
        pass  # reported by inspect's own problems
    seen: set[str] = set()
    out = []
    for item in found:
        if item["word"].lower() not in seen:
            seen.add(item["word"].lower())
            out.append(item)
    return out[:limit]


def _argument_value(key: str, value: str) -> Any:
    if key == "ss_network_args":
        try:
            return parse_json(value)
        except ValueError:
            return value
    return value


def training_arguments(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The kohya training arguments of TRAINING_ARGUMENTS present in the metadata (network args
    decoded from JSON), in that order."""
    return {key: _argument_value(key, metadata[key]) for key, _ in TRAINING_ARGUMENTS
            if metadata.get(key) not in (None, "", "None")}


def info_file(path: str | os.PathLike, *, triggers: int = 10, hash_progress=None) -> dict[str, Any]:
    """The `inspect` report plus hashes, training arguments and trigger words with sources."""
    path = os.fspath(path)
    report = inspect_file(path)
    metadata = {**report["training_metadata"], **report["other_metadata"]}
    hashes = hash_file(path, hash_progress).as_dict()
    said = metadata.get("sshs_model_hash")
    report["hashes"] = hashes
    report["hash_check"] = None if not said else {
        "sshs_model_hash": said, "matches": said.lower() == (hashes["data_sha256"] or "")}
    report["training_arguments"] = training_arguments(metadata)
    words = collected_trigger_words(path, metadata, triggers)
    report["trigger_words"] = [w["word"] for w in words]
    report["trigger_sources"] = words
    return report


def _argument_text(key: str, value: Any) -> str:
    if key in TIMESTAMP_KEYS:
        try:
            stamp = datetime.datetime.fromtimestamp(float(value), datetime.timezone.utc)
            return stamp.strftime("%Y-%m-%d %H:%M:%S UTC")
        except (ValueError, OverflowError, OSError):
            return str(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def format_info(report: Mapping[str, Any]) -> str:
    """The info report as text: hashes and trigger words first (what users copy), then inspect's
    report with the training arguments in place of the raw metadata."""
    hashes = report["hashes"]
    lines = [f"File: {report['file']}",
             f"AutoV2: {hashes['autov2'].upper()}    sha256: {hashes['sha256']}",
             f"AutoV1: {hashes['autov1']}"
             + (" (file under 1 MiB: the hash of nothing)" if report["file_bytes"] <= 0x100000 else "")
             + "    AutoV3 / A1111 LoRA hash: "
             f"{(hashes['autov3'] or 'n/a')}    data sha256: {hashes['data_sha256'] or 'n/a'}"]
    check = report["hash_check"]
    if check:
        lines.append("sshs_model_hash in metadata: " + ("matches the data" if check["matches"] else
                     "STALE (does not match the data; A1111-style UIs will show a wrong hash)"))
    words = report["trigger_sources"]
    lines.append("Trigger words: " + (", ".join(w["word"] for w in words) if words else "none"))
    for w in words:
        lines.append(f"  {w['word']}  ({w['source']}" + (f", {w['count']}x" if "count" in w else "") + ")")
    args = report["training_arguments"]
    labels = dict(TRAINING_ARGUMENTS)
    lines += ["", "Training arguments:" if args else "Training arguments: none"]
    width = max((len(labels[k]) for k in args), default=0)
    for key, value in args.items():
        lines.append(f"  {labels[key].ljust(width)}  {_short(_argument_text(key, value))}")
    lines.append("")
    body = format_report({**report, "training_metadata": {}, "other_metadata": {}})
    for line in body.splitlines()[1:]:
        if line.startswith(("Training metadata", "Trigger words")) or (not line and not lines[-1]):
            continue
        lines.append(line)
    return "\n".join(lines)


def run_info(path: str | None, *, as_json: bool, out: TextIO, err: TextIO, triggers: int = 10,
             hash_progress=None) -> int:
    """The `info` command: print the full report; 0 on success, 1 when the file cannot be read."""
    path = path or EXAMPLE_FILE
    try:
        report = info_file(path, triggers=triggers, hash_progress=hash_progress)
    except LycorisError as exc:
        message = " ".join(str(exc).split())
        print(f"lycoris_core info: error: {message if exc.file else f'{path}: {message}'}", file=err)
        return 1
    except OSError as exc:
        print(f"lycoris_core info: error: {path}: {exc.strerror or exc}", file=err)
        return 1
    print(json.dumps(report, indent=2, ensure_ascii=False) if as_json else format_info(report), file=out)
    return 0
