"""The text a loader shows (and logs once): what was applied where, what was skipped and why."""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from .host_compat import send_progress_text

MAX_GROUPS = 8
MAX_PROBLEMS = 5


def show_on_node(text: str, unique_id) -> None:
    """Text under the node while the server runs; a no-op in scripts."""
    send_progress_text(text, unique_id)


def name_groups(names: Iterable[str]) -> list[tuple[str, int, str]]:
    """(pattern with numbers as #, count, first example), most frequent first."""
    counts: Counter = Counter()
    example: dict[str, str] = {}
    for name in names:
        pattern = re.sub(r"\d+", "#", name)
        counts[pattern] += 1
        example.setdefault(pattern, name)
    return [(p, n, example[p]) for p, n in counts.most_common()]


def grouped(names: list[str], indent: str = "  ") -> list[str]:
    """Lines listing names grouped by pattern, with counts, at most MAX_GROUPS groups."""
    groups = name_groups(names)
    lines = [f"{indent}{n} x {p}" + (f"  (e.g. {ex})" if n > 1 else "") for p, n, ex in groups[:MAX_GROUPS]]
    if len(groups) > MAX_GROUPS:
        rest = sum(n for _, n, _ in groups[MAX_GROUPS:])
        lines.append(f"{indent}... and {rest} more in {len(groups) - MAX_GROUPS} other groups")
    return lines


def _counted(counter: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common())


def part_line(part: str, strength: float, methods: Counter, reasons: Counter) -> str:
    """`model (strength 0.8): 12 merged, 2 bypassed  [float8_e4m3fn storage: 2]`."""
    done = [f"{methods[m]} {m}" for m in ("merged", "bypassed") if methods[m]]
    line = f"{part} (strength {strength:g}): " + (", ".join(done) or "nothing applied")
    if reasons:
        line += "  [" + "; ".join(f"{r}: {n}" for r, n in reasons.most_common()) + "]"
    return line


def build_report(label: str, algos: Counter, part_lines: list[str], *, unmatched: list[str],
                 text_encoder_skipped: list[str], zero_strength: int, problems: list,
                 converted_keys: int = 0) -> str:
    """The whole report as text."""
    total = sum(algos.values())
    lines = [f"LyCORIS {label}: {total} modules ({_counted(algos)})" if total
             else f"LyCORIS {label}: no modules"]
    if converted_keys:
        lines.append(f"keys: {converted_keys} converted by ComfyUI's LoRA key conversion first")
    lines += part_lines
    if zero_strength:
        lines.append(f"skipped: {zero_strength} modules at strength 0")
    if text_encoder_skipped:
        lines.append(f"skipped: {len(text_encoder_skipped)} text-encoder modules (no CLIP input)")
    if unmatched:
        lines.append(f"UNMATCHED: {len(unmatched)} modules match no key of this model "
                     "(file made for another model?):")
        lines += grouped(unmatched)
    if problems:
        lines.append(f"file: {len(problems)} problem{'s' if len(problems) != 1 else ''} while reading:")
        lines += [f"  {p}" for p in problems[:MAX_PROBLEMS]]
        if len(problems) > MAX_PROBLEMS:
            lines.append(f"  ... and {len(problems) - MAX_PROBLEMS} more")
    return "\n".join(lines)
