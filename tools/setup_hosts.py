"""Install what the ComfyUI hosts present need to run the host tests (used by .ci/run).

Shared packages (the union of every host's requirements, less torch/torchvision/torchaudio and the
ones a host pins) go into this environment. The packages a host pins for itself (its front end,
workflow templates, docs, comfy-kitchen / comfy-aimdo) differ between hosts, so each host gets
them in its own site folder (`tests/host/host.py: site_dir`), first on the path of its tests.

    python tools/setup_hosts.py            # every host present ($COMFYUI_PATHS or the defaults)
    python tools/setup_hosts.py --list     # only print the hosts found
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from host.host import host_paths, label, listed_paths, site_dir  # noqa: E402

# we bring our own torch pair; spandrel pulls torchvision, so it goes in without dependencies
NOT_SHARED = {"torch", "torchvision", "torchaudio", "spandrel"}
# packages whose version belongs to one host, even when its requirements give only a lower bound
HOST_OWNED = {"comfy-kitchen": "<0.3", "comfy-aimdo": ""}
EXTRA_SHARED = ["requests"]


def _name(line: str) -> str:
    return re.split(r"[<>=~!;\[ ]", line, maxsplit=1)[0].strip().lower().replace("_", "-")


def requirements(path: str) -> list[str]:
    with open(os.path.join(path, "requirements.txt"), encoding="utf-8") as f:
        lines = [ln.split("#", 1)[0].strip() for ln in f]
    return [ln for ln in lines if ln]


def _bounded(line: str, bound: str) -> str:
    """`line` with an upper `bound` added ("comfy-kitchen>=0.2.3" + "<0.3")."""
    if not bound or "<" in line:
        return line
    return f"{line},{bound}" if re.search(r"[<>=~]", line) else f"{line}{bound}"


def split(lines: list[str]) -> tuple[list[str], list[str]]:
    """(shared, host-owned) requirement lines of one host."""
    shared, owned = [], []
    for line in lines:
        name = _name(line)
        if name in NOT_SHARED:
            continue
        if "==" in line or name in HOST_OWNED:
            owned.append(line if "==" in line else _bounded(line, HOST_OWNED.get(name, "")))
        else:
            shared.append(line)
    return shared, owned


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="only print the hosts found")
    args = parser.parse_args()
    hosts = host_paths()
    for path in listed_paths():
        print(f"{label(path)}: {'found' if path in hosts else 'absent'}", flush=True)
    if args.list or not hosts:
        return 0
    shared: list[str] = []
    owned: dict[str, list[str]] = {}
    for path in hosts:
        s, o = split(requirements(path))
        shared += [ln for ln in s if ln not in shared]
        owned[path] = o
    pip(*shared, *EXTRA_SHARED)
    pip("--no-deps", "spandrel")
    for path, lines in owned.items():
        if lines:
            pip("--upgrade", "--target", site_dir(path), *lines)
            print(f"{label(path)}: own packages in {site_dir(path)}: {', '.join(lines)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
