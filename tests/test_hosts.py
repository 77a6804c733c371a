"""The host suite on every other ComfyUI host present, each in a fresh process.

One process can import only one ComfyUI, so the host tests of this run use the first host found
and this test runs them again under `COMFYUI_PATH=<host>` for every other host (see
tests/host/host.py). A failure lists the failing tests of that host.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from host.host import CHILD_RESULTS, comfyui_path, host_paths, label, subprocess_env

TESTS = os.path.dirname(os.path.abspath(__file__))
CHILD_TIMEOUT_S = 3600


def _other_hosts() -> list[str]:
    if os.environ.get("COMFYUI_PATH"):
        return []  # this run is pinned to one host
    return [p for p in host_paths() if p != comfyui_path()]


def _summary(junit: str) -> tuple[dict, list[str]]:
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return counts, failed


@pytest.mark.skipif(not _other_hosts(), reason="no other ComfyUI host present (or COMFYUI_PATH "
                    "pins this run to one)")
@pytest.mark.parametrize("path", _other_hosts() or ["<none>"])
def test_host_suite_passes_on(path, tmp_path):
    junit = str(tmp_path / "junit.xml")
    files = sorted(glob.glob(os.path.join(TESTS, "test_host_*.py")))
    env = dict(subprocess_env(path), COMFYUI_PATH=path)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
           f"--junitxml={junit}", *files]
    proc = subprocess.run(cmd, cwd=os.path.dirname(TESTS), env=env, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert os.path.isfile(junit), f"{label(path)}: the host suite did not run:\n{tail}"
    counts, failed = _summary(junit)
    ran = counts["tests"] - counts["skipped"]
    CHILD_RESULTS.append(f"{label(path)}: {ran - len(failed)} passed, {len(failed)} failed, "
                         f"{counts['skipped']} skipped (host suite in its own process)")
    assert not failed and proc.returncode == 0, (
        f"{label(path)}: {len(failed)} host tests failed:\n  " + "\n  ".join(failed) + f"\n{tail}")
    assert ran > 0, f"{label(path)}: every host test skipped:\n{tail}"
