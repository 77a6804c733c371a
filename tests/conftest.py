import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from host import host as _host  # noqa: E402

# the packages this process's host pins for itself (front end, kitchen) win over any others
_site = _host.site_dir(_host.comfyui_path())
if os.path.isdir(_site) and _site not in sys.path:
    sys.path.insert(0, _site)

# fixtures for tests inside a real ComfyUI (they skip cleanly when it is absent)
from host.fixtures import (T, comfy_host, fixed_batches, gguf_unet, loras_dir, loras_first,  # noqa: E402,F401
                           lycoris_pack, originals, quiet_and_unloaded, quiet_warnings, sd15,
                           sd15_checkpoint)


def pytest_report_header(config):
    hosts = _host.host_paths()
    if not hosts:
        return f"ComfyUI hosts: none found ({_host.missing_reason()})"
    lines = [f"ComfyUI host in this process: {_host.label(_host.comfyui_path())}"]
    others = [p for p in hosts if p != _host.comfyui_path()]
    if others and not os.environ.get("COMFYUI_PATH"):
        lines.append("other hosts (tests/test_hosts.py runs the host suite there): "
                     + "; ".join(_host.label(p) for p in others))
    return lines


def pytest_terminal_summary(terminalreporter):
    used = _host.comfyui_path()
    ran = _host.is_host(used) and "comfy.lora" in sys.modules
    terminalreporter.write_sep("-", "ComfyUI hosts")
    terminalreporter.write_line(f"{_host.label(used)}: host suite ran in this process" if ran
                                else f"no host suite in this process: {_host.missing_reason() or 'not selected'}")
    for line in _host.CHILD_RESULTS:
        terminalreporter.write_line(line)


def pytest_collection_modifyitems(config, items):
    # the other hosts' suites run first, in child processes, while this process is still small:
    # run at the end, beside this process's own host suite, both together exceed 24 GB
    items.sort(key=lambda item: item.path.name != "test_hosts.py")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is several times faster than two on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
