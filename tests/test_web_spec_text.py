"""The block-weights UI's pure JS helpers (web/lycoris_spec_text.js), run with node; and the spec
text a slider writes must mean, for our parser, exactly the slider's value on that block."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from lycoris_core.blocks import parse_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = os.path.join(ROOT, "web", "lycoris_spec_text.js")

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node (nodejs) is not installed")

# (spec before, selector the slider writes, value) -> spec after
CASES = [
    ("", "IN05", 0.55, "IN05=0.55"),
    ("MIDD, IN05=0.3", "IN05", 0.5, "MIDD, IN05=0.5"),
    ("IN5=0.3, OUT=0", "IN05", 1, "OUT=0, IN05=1"),
    ("IN05=0.3, MIDD", "IN05", 0.1, "MIDD, IN05=0.1"),
    ("re:a{1,3}=0, IN04=1", "IN04", 0.2, "re:a{1,3}=0, IN04=0.2"),
    ("ALL=0\nIN04=1", "IN04", 0.5, "ALL=0\nIN04=0.5"),
    ("default=0.5", "BASE", 0, "default=0.5, BASE=0"),
    ("mid0=2; TE=0", "M00", -0.25, "TE=0, M00=-0.25"),
    ("1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0", "OUT09", 1.5, "1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0, OUT09=1.5"),
]


def run_node(script: str):
    out = subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True,
                         text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_set_block_in_spec():
    cases = json.dumps([c[:3] for c in CASES])
    got = run_node(f"""
        import {{ setBlockInSpec }} from {json.dumps("file://" + MODULE)};
        console.log(JSON.stringify({cases}.map(([t, s, v]) => setBlockInSpec(t, s, v))));
    """)
    assert got == [c[3] for c in CASES]
    for (before, selector, value, after) in CASES:
        block = {"BASE": "BASE"}.get(selector, selector)
        parsed = parse_spec(after)
        assert parsed.block_value(block) == value, after
        # every other block keeps the value it had
        for other in ("BASE", "IN01", "IN04", "IN05", "M00", "OUT03", "OUT09", "OUT11"):
            if other != block:
                assert parsed.block_value(other) == parse_spec(before).block_value(other), (after, other)


def test_rounding_and_selectors():
    got = run_node(f"""
        import {{ roundToStep, canonicalSelector, formatValue }} from {json.dumps("file://" + MODULE)};
        console.log(JSON.stringify([
          [0.5512, -0.026, 1.975, 0.3000000004, 2].map(roundToStep),
          ["mid0", "in 4", "IN004", "out11", "double3", "base", "te"].map(canonicalSelector),
          [0.1 + 0.2, 1, -0.5].map(formatValue),
        ]));
    """)
    assert got == [[0.55, -0.05, 2, 0.3, 2],
                   ["M00", "IN04", "IN04", "OUT11", "D03", "BASE", "TE"],
                   ["0.3", "1", "-0.5"]]
