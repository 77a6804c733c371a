"""Real browser test of the block-weights UI: headless ComfyUI + headless Chromium (selenium).

Starts ComfyUI (at $COMFYUI_PATH or /opt/comfyui) on a free loopback port with only this pack,
an SD1.5-named adapter file in a temporary `loras` folder, opens the page in headless Chromium,
and drives the real frontend through its `app` object: add the node, pick the file, check one
slider per block present, pick a preset, move a slider, type into the spec, check the text spec,
the prompt and the queued prompt, save / reload, and keep a screenshot in test-artifacts/.

Skips (with the reason) when the host, chromium, chromedriver or selenium is missing. Needs:
  apt-get install -y chromium chromium-driver     pip install selenium
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from block_files import BLOCKS, FILE_NAME, write_sd15_file
from host.host import ROOT, comfyui_path, missing_reason, subprocess_env

PACK_FOLDER = "comfyui-lycoris"
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
SERVER_START_S = 180
UI_WAIT_S = 30


# ----- skips -------------------------------------------------------------------------------------

def _chromium() -> str | None:
    env = os.environ.get("CHROMIUM_BIN")
    if env and os.path.isfile(env):
        return env
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _chromedriver() -> str | None:
    env = os.environ.get("CHROMEDRIVER")
    if env and os.path.isfile(env):
        return env
    return shutil.which("chromedriver")


def _skip_reason() -> str | None:
    reason = missing_reason()
    if reason:
        return reason
    if not os.path.isfile(os.path.join(comfyui_path(), "main.py")):
        return f"no ComfyUI main.py at {comfyui_path()}"
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:
        return "comfyui-frontend-package is not installed (the page needs it)"
    if _chromium() is None:
        return "chromium not found (apt-get install -y chromium chromium-driver)"
    if _chromedriver() is None:
        return "chromedriver not found (apt-get install -y chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


# ----- server ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, data: dict | None = None, timeout: float = 10) -> tuple[int, object]:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


class Server:
    """A ComfyUI subprocess on 127.0.0.1 with only this pack and a temporary loras folder."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.base = os.path.join(workdir, "base")
        self.loras = os.path.join(workdir, "loras")
        self.log_path = os.path.join(workdir, "server.log")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def prepare(self) -> None:
        os.makedirs(os.path.join(self.base, "custom_nodes"))
        os.symlink(ROOT, os.path.join(self.base, "custom_nodes", PACK_FOLDER))
        os.makedirs(self.loras)
        write_sd15_file(self.loras)
        with open(os.path.join(self.workdir, "extra_model_paths.yaml"), "w") as f:
            f.write(f"lycoris_browser_test:\n    base_path: {self.workdir}\n    loras: loras\n")
        # a fresh user would get the template browser over the canvas
        settings = os.path.join(self.base, "user", "default")
        os.makedirs(settings)
        with open(os.path.join(settings, "comfy.settings.json"), "w") as f:
            json.dump({"Comfy.TutorialCompleted": True}, f)

    def start(self) -> None:
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.base,
               "--extra-model-paths-config", os.path.join(self.workdir, "extra_model_paths.yaml"),
               "--disable-auto-launch", "--disable-api-nodes", "--disable-all-custom-nodes",
               "--whitelist-custom-nodes", PACK_FOLDER, "--database-url", "sqlite:///:memory:"]
        self._log = open(self.log_path, "wb")
        env = dict(subprocess_env(), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=comfyui_path(), stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = _http(f"{self.url}/object_info/LycorisBlockWeights", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"ComfyUI did not answer within {SERVER_START_S}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()


@pytest.fixture(scope="module")
def server():
    workdir = tempfile.mkdtemp(prefix="lycoris-browser-")
    srv = Server(workdir)
    try:
        srv.prepare()
        srv.start()
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# ----- browser -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="lycoris-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 f"--user-data-dir={profile}",
                 # loopback only: every other host fails to resolve or hits a closed local port
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                 "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(_chromedriver()), options=options)
    driver.set_script_timeout(UI_WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, script: str, *args, timeout: float = UI_WAIT_S, what: str = ""):
    """Poll a JS expression (a function body returning a value) until it is truthy."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = driver.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or script}: last {value!r}")


JS_HELPERS = """
window.__lyc = {
  node(id) { return app.graph.getNodeById(id); },
  widget(id, name) { return this.node(id).widgets.find((w) => w.name === name); },
  sliders(id) {
    return this.node(id).widgets.filter((w) => w.lycorisBlock)
      .map((w) => [w.lycorisBlock, Math.round(w.value * 1000) / 1000]);
  },
  headers(id) {
    return this.node(id).widgets.filter((w) => w.type === 'lycoris_text' && w.name.startsWith('lycoris_group_'))
      .map((w) => w.name.slice('lycoris_group_'.length));
  },
  idle(id) { const s = this.node(id).__lycoris; return !!s && s.inflight === 0 && !s.pending; },
};
"""


def sliders(driver, node_id) -> dict[str, float]:
    return dict(driver.execute_script("return __lyc.sliders(arguments[0])", node_id))


def wait_sliders(driver, node_id, expected: dict[str, float], what: str) -> None:
    """Wait until the node is idle and its sliders are exactly `expected` (ids, order, values)."""
    deadline = time.monotonic() + UI_WAIT_S
    got = None
    while time.monotonic() < deadline:
        if driver.execute_script("return __lyc.idle(arguments[0])", node_id):
            got = driver.execute_script("return __lyc.sliders(arguments[0])", node_id)
            if [(k, float(v)) for k, v in got] == list(expected.items()):
                return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: sliders {got!r}, expected {expected!r}")


def spec_text(driver, node_id) -> str:
    return driver.execute_script("return __lyc.widget(arguments[0], 'spec').value", node_id)


def test_block_weights_ui_in_browser(server, browser):
    driver = browser
    driver.get(server.url + "/")
    wait_for(driver, """return !!(window.app && app.graph && window.LiteGraph
        && LiteGraph.registered_node_types['LycorisBlockWeights']
        && (app.extensions ?? []).some((e) => e.name === 'comfyui-lycoris.blocks'))""",
             timeout=60, what="the frontend with the LyCORIS extension")
    driver.execute_script(JS_HELPERS)

    # a clean graph: Block Weights -> Preview Any (so it runs when queued), and Block Info
    ids = driver.execute_script("""
        app.graph.clear();
        const add = (type, pos, size) => {
          const node = LiteGraph.createNode(type);
          node.pos = pos;
          app.graph.add(node);
          if (size) node.setSize(size);
          return node;
        };
        const weights = add('LycorisBlockWeights', [20, 20]);
        const preview = add('PreviewAny', [440, 20], [380, 110]);
        const info = add('LycorisBlockInfo', [440, 170]);
        weights.connect(0, preview, 0);
        app.canvas.ds.offset = [0, 0];
        app.canvas.ds.scale = 1;
        app.graph.setDirtyCanvas(true, true);
        return [weights.id, preview.id, info.id];
    """)
    weights, preview, info = ids
    # no file yet: a status line and no slider
    wait_for(driver, "return __lyc.idle(arguments[0])", weights, what="the first block request")
    assert sliders(driver, weights) == {}

    # pick the file: one slider per block present, grouped, all at 1
    driver.execute_script("""
        for (const id of [arguments[0], arguments[1]]) {
          const w = __lyc.widget(id, 'lora_name');
          w.value = arguments[2];
          w.callback?.(w.value);
        }
    """, weights, info, FILE_NAME)
    wait_for(driver, "return __lyc.sliders(arguments[0]).length === arguments[1]", weights, len(BLOCKS),
             what=f"{len(BLOCKS)} sliders")
    wait_sliders(driver, weights, {b: 1.0 for b in BLOCKS}, "one slider per block, all at 1")
    assert driver.execute_script("return __lyc.headers(arguments[0])", weights) == ["te", "in", "mid", "out"]

    # a preset moves the sliders (and clears the spec: the preset is the base)
    driver.execute_script("""
        const w = __lyc.widget(arguments[0], 'preset');
        w.value = 'MIDD';
        w.callback?.(w.value);
    """, weights)
    midd = {"BASE": 1.0, "IN01": 0.0, "IN03": 0.0, "IN05": 1.0, "M00": 1.0, "OUT05": 1.0, "OUT09": 0.0}
    wait_sliders(driver, weights, midd, "the MIDD preset on the sliders")
    assert spec_text(driver, weights) == ""

    # move a slider the way the canvas does (setValue -> callback): the spec gets the value
    driver.execute_script("""
        const node = __lyc.node(arguments[0]);
        const slider = node.widgets.find((w) => w.lycorisBlock === 'IN05');
        slider.setValue(0.5512, { e: undefined, node, canvas: app.canvas });
    """, weights)
    assert spec_text(driver, weights) == "IN05=0.55"
    assert sliders(driver, weights)["IN05"] == 0.55

    # type into the spec textarea like a user: the sliders follow (resolved by the server)
    from selenium.webdriver.common.keys import Keys

    textarea = driver.execute_script("return __lyc.widget(arguments[0], 'spec').inputEl", weights)
    textarea.click()
    textarea.send_keys(Keys.END, ", OUT=0.25")
    expected = dict(midd, IN05=0.55, OUT05=0.25, OUT09=0.25)
    wait_sliders(driver, weights, expected, "the sliders to follow the typed spec")
    expected_spec = "IN05=0.55, OUT=0.25"
    assert spec_text(driver, weights) == expected_spec

    # a bad token: the status line names it, the sliders stay; fixing the text clears it
    driver.execute_script("__lyc.widget(arguments[0], 'spec').value = arguments[1] + ', IN5x=1'",
                          weights, expected_spec)
    status = wait_for(driver, """const s = __lyc.node(arguments[0]).__lycoris;
        return __lyc.idle(arguments[0]) && s.statusKind === 'error' && s.status""", weights,
                      what="the spec error on the node")
    assert "IN5x" in status
    assert sliders(driver, weights) == expected
    driver.execute_script("__lyc.widget(arguments[0], 'spec').value = arguments[1]", weights, expected_spec)
    wait_for(driver, """const s = __lyc.node(arguments[0]).__lycoris;
        return __lyc.idle(arguments[0]) && s.statusKind === 'info'""", weights, what="the error to clear")

    # the prompt carries the spec; the sliders are not inputs of their own
    prompt = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        app.graphToPrompt().then((p) => done(p.output[String(arguments[0])].inputs));
    """, weights)
    assert prompt == {"lora_name": FILE_NAME, "preset": "MIDD", "spec": expected_spec,
                      "lbw_compat": False}

    # save -> JSON -> reload: valid JSON, widget order intact, sliders rebuilt with the same values
    saved = driver.execute_script("return JSON.stringify(app.graph.serialize())")
    graph = json.loads(saved)
    node = next(n for n in graph["nodes"] if n["id"] == weights)
    assert node["widgets_values"] == [FILE_NAME, "MIDD", expected_spec, False]
    driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        app.loadGraphData(JSON.parse(arguments[0])).then(() => done(true), (e) => done(String(e)));
    """, saved)
    driver.execute_script(JS_HELPERS)
    wait_for(driver, "return __lyc.sliders(arguments[0]).length === arguments[1] && __lyc.idle(arguments[0])",
             weights, len(BLOCKS), what="sliders rebuilt after reload")
    wait_sliders(driver, weights, expected, "slider values restored after reload")
    assert spec_text(driver, weights) == expected_spec
    assert driver.execute_script("return __lyc.widget(arguments[0], 'preset').value", weights) == "MIDD"

    # queue it: the queued prompt carries the value and the node's Python side parsed it
    before = set((_http(f"{server.url}/history")[1] or {}).keys())
    driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        app.queuePrompt(0, 1).then(() => done(true), (e) => done(String(e)));
    """)
    deadline = time.monotonic() + 120
    entry = None
    while time.monotonic() < deadline and entry is None:
        history = _http(f"{server.url}/history")[1] or {}
        for prompt_id, item in history.items():
            if prompt_id not in before and item.get("status", {}).get("completed"):
                entry = item
        time.sleep(0.5)
    assert entry is not None, f"the queued prompt did not finish:\n{server.log_tail()}"
    assert entry["status"]["status_str"] == "success", entry["status"]
    queued = entry["prompt"][2]
    assert queued[str(weights)]["inputs"]["spec"] == expected_spec
    summary = entry["outputs"][str(weights)]["text"][0]
    assert "IN05=0.55" in summary and "OUT09=0.25" in summary and "IN01=0" in summary, summary
    table = entry["outputs"][str(info)]["text"][0]
    assert all(b in table for b in BLOCKS), table
    assert entry["outputs"][str(info)]["images"], entry["outputs"][str(info)]

    # Block Info shows its table on the node
    wait_for(driver, "const w = __lyc.widget(arguments[0], 'lycoris_info'); return !!w && w.value.includes('M00')",
             info, what="the Block Info table on the node")

    driver.execute_script("""
        const info = __lyc.node(arguments[0]);
        info.setSize([520, Math.max(info.size[1], 600)]);
        app.canvas.ds.offset = [10, 60];
        app.canvas.ds.scale = 1;
        app.graph.setDirtyCanvas(true, true);
    """, info)
    time.sleep(1.0)  # let the canvas and the image preview paint
    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "block_weights_ui.png")
    assert driver.save_screenshot(shot)
    print(f"\nscreenshot: {shot}")
    logged = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    for entry in logged:
        print(f"browser console {entry['level']}: {entry['message']}")
    # errors, and deprecation notices newer frontends print for internal modules, naming our files
    ours = [e["message"] for e in logged if "lycoris" in e["message"].lower()]
    assert not ours, ours


def test_bad_spec_is_rejected_by_the_server(server):
    """POST /prompt with a bad spec: 400 before anything runs, naming the token."""
    prompt = {
        "1": {"class_type": "LycorisBlockWeights",
              "inputs": {"lora_name": FILE_NAME, "preset": "custom", "spec": "IN04=0.5, IN4x=1",
                         "lbw_compat": False}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    status, body = _http(f"{server.url}/prompt", {"prompt": prompt, "client_id": "lycoris-test"})
    assert status == 400, body
    errors = body["node_errors"]["1"]["errors"]
    assert any("IN4x" in e["details"] for e in errors), errors


def test_route_over_http(server):
    status, body = _http(f"{server.url}/api/lycoris/blocks?file={FILE_NAME}&spec=OUT%3D0")
    assert status == 200, body
    assert [b["id"] for b in body["blocks"]] == BLOCKS
    assert body["values"]["OUT05"] == 0 and body["values"]["IN01"] == 1
    status, body = _http(f"{server.url}/lycoris/blocks?file=..%2F..%2Fetc%2Fpasswd")
    assert status == 404 and "loras" in body["error"]
