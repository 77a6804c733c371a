// comfyui-lycoris web extension: per-block sliders on "LyCORIS Block Weights", text panel on
// "LyCORIS Block Info".
//
// Block Weights: the text spec (Python input `spec`) is the single source of truth. The sliders
// are view widgets added after the node's own widgets and never serialised (neither into
// widgets_values nor into the prompt), so the saved graph keeps exactly the Python inputs and a
// reload rebuilds the sliders from (file, preset, spec). The server resolves specs (route
// /lycoris/blocks of this pack), so the grammar lives in Python only:
//   - file changes           -> fetch the file's block list, rebuild one slider per block present
//   - spec typed / lbw_compat -> (debounced) fetch the values, move the sliders
//   - preset picked           -> clear the spec (the preset is the base, the spec goes on top)
//   - slider moved            -> rewrite that block's item in the spec (`IN04=0.55`, appended last
//                                so it wins), no round trip needed
//
// Only `app` and `api` are imported: the two modules every frontend keeps public (newer ones warn
// about the other `scripts/*` modules), and hooks go on node instances from `nodeCreated`, not on
// node prototypes from `beforeRegisterNodeDef` (discouraged by newer frontends).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { SLIDER, roundToStep, setBlockInSpec } from "./lycoris_spec_text.js";

const WEIGHTS_NODE = "LycorisBlockWeights";
const INFO_NODE = "LycorisBlockInfo";
const ROUTE = "/lycoris/blocks";
const NO_FILE = "(none)";
const DEBOUNCE_MS = 300;
const SPEC_EXTRA_HEIGHT = 80;
const DYNAMIC = "__lycorisDynamic";

// ----- Block Weights node --------------------------------------------------------------------------

function widgetNamed(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function chainCallback(widget, after) {
  if (!widget) return;
  const original = widget.callback;
  widget.callback = function (...args) {
    const result = original?.apply(this, args);
    after(...args);
    return result;
  };
}

function state(node) {
  node.__lycoris ??= {
    seq: 0, // id of the latest request; older answers are dropped
    specVersion: 0, // bumped when a slider rewrites the spec
    timer: null,
    writing: false, // we are writing the spec ourselves: ignore its callback
    configuring: false,
    layoutKey: null, // file + block ids of the sliders shown
    inflight: 0, // requests not answered yet
    pending: false, // a debounced refresh is scheduled
    status: "",
    statusKind: "info",
    data: null,
  };
  return node.__lycoris;
}

function dynamicWidgets(node) {
  return (node.widgets ?? []).filter((w) => w[DYNAMIC]);
}

function sliders(node) {
  return dynamicWidgets(node).filter((w) => w.lycorisBlock);
}

function setSpec(node, text) {
  const st = state(node);
  const spec = widgetNamed(node, "spec");
  if (!spec) return;
  st.writing = true;
  try {
    spec.value = text;
  } finally {
    st.writing = false;
  }
}

function truncate(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let lo = 0;
  let hi = text.length;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (ctx.measureText(text.slice(0, mid) + "…").width <= width) lo = mid;
    else hi = mid - 1;
  }
  return text.slice(0, lo) + "…";
}

function addTextRow(node, name, getText, style) {
  // a canvas-drawn, non-serialised row: a group header or the status line
  const widget = {
    type: "lycoris_text",
    name,
    value: "",
    serialize: false,
    options: { serialize: false },
    [DYNAMIC]: true,
    draw(ctx, drawNode, width, y, height) {
      const text = getText();
      if (!text) return;
      const { kind, bold } = style();
      ctx.save();
      ctx.font = `${bold ? "bold " : ""}12px sans-serif`;
      ctx.textAlign = "left";
      ctx.fillStyle = kind === "error" ? "#ff7b72" : bold ? "#c9d1d9" : "#8b949e";
      ctx.fillText(truncate(ctx, text, width - 30), 15, y + height * 0.7);
      if (bold) {
        const textWidth = Math.min(ctx.measureText(text).width, width - 30);
        ctx.strokeStyle = "#555";
        ctx.beginPath();
        ctx.moveTo(24 + textWidth, y + height * 0.5);
        ctx.lineTo(width - 15, y + height * 0.5);
        ctx.stroke();
      }
      ctx.restore();
    },
    computeSize(width) {
      return [width ?? 0, 18];
    },
  };
  return node.addCustomWidget(widget);
}

function onSliderMoved(node, widget, value) {
  const st = state(node);
  const rounded = roundToStep(value);
  widget.value = rounded;
  st.specVersion++; // an answer still in flight describes an older spec
  clearTimeout(st.timer);
  st.pending = false;
  const spec = widgetNamed(node, "spec");
  setSpec(node, setBlockInSpec(spec?.value ?? "", widget.lycorisSelector, rounded));
  if (st.statusKind === "error") setStatus(node, summary(st.data), "info");
  node.setDirtyCanvas?.(true, true);
}

function summary(data) {
  if (!data?.file) return "Pick a file to get one slider per block.";
  const n = data.blocks.length;
  return `${data.title}: ${n} block${n === 1 ? "" : "s"}, ${data.modules} modules`;
}

function setStatus(node, text, kind = "info") {
  const st = state(node);
  st.status = text;
  st.statusKind = kind;
}

function rebuildSliders(node, data) {
  const st = state(node);
  for (const widget of dynamicWidgets(node)) node.removeWidget(widget);
  addTextRow(node, "lycoris_status", () => st.status, () => ({ kind: st.statusKind, bold: false }));
  const blocks = data?.blocks ?? [];
  for (const group of data?.groups ?? []) {
    addTextRow(node, `lycoris_group_${group.id}`, () => group.title, () => ({ bold: true }));
    for (const block of blocks.filter((b) => b.group === group.id)) {
      const slider = node.addWidget(
        "slider",
        `block ${block.id}`,
        1,
        (value) => onSliderMoved(node, slider, value),
        { min: SLIDER.min, max: SLIDER.max, step: SLIDER.step, precision: 2, serialize: false }
      );
      slider.label = block.label;
      slider.serialize = false; // not in widgets_values (it is rebuilt from the spec on load)
      slider.lycorisBlock = block.id;
      slider.lycorisSelector = block.selector;
      slider[DYNAMIC] = true;
    }
  }
  st.layoutKey = layoutKey(data);
  const size = node.computeSize();
  // the spec textarea takes the height left over: leave it a few lines
  node.setSize([Math.max(node.size[0], size[0], 360), size[1] + SPEC_EXTRA_HEIGHT]);
}

function layoutKey(data) {
  return JSON.stringify([data?.file ?? null, (data?.blocks ?? []).map((b) => b.id)]);
}

function applyValues(node, values) {
  for (const slider of sliders(node)) {
    const value = values?.[slider.lycorisBlock];
    if (typeof value === "number") slider.value = value;
  }
}

async function refresh(node) {
  const st = state(node);
  clearTimeout(st.timer);
  st.pending = false;
  const seq = ++st.seq;
  const version = st.specVersion;
  const body = {
    file: widgetNamed(node, "lora_name")?.value ?? NO_FILE,
    preset: widgetNamed(node, "preset")?.value ?? "custom",
    spec: widgetNamed(node, "spec")?.value ?? "",
    lbw_compat: !!widgetNamed(node, "lbw_compat")?.value,
  };
  st.inflight++;
  let data;
  let ok = false;
  try {
    const response = await api.fetchApi(ROUTE, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    data = await response.json();
    ok = response.ok;
  } catch (error) {
    data = { error: `block list unavailable: ${error}` };
  } finally {
    st.inflight--;
  }
  if (seq !== st.seq) return; // a newer request superseded this answer
  if (!ok) {
    st.data = null;
    rebuildSliders(node, null);
    setStatus(node, data?.error ?? "block list unavailable", "error");
  } else {
    st.data = data;
    if (layoutKey(data) !== st.layoutKey || !dynamicWidgets(node).length) rebuildSliders(node, data);
    if (version !== st.specVersion) {
      scheduleRefresh(node); // a slider rewrote the spec meanwhile: these values are stale
    } else {
      if (data.values) applyValues(node, data.values);
      if (data.error) setStatus(node, `spec: ${data.error}`, "error");
      else setStatus(node, summary(data), "info");
    }
  }
  node.setDirtyCanvas?.(true, true);
}

function scheduleRefresh(node) {
  const st = state(node);
  clearTimeout(st.timer);
  st.pending = true;
  st.timer = setTimeout(() => refresh(node), DEBOUNCE_MS);
}

function setupWeightsNode(node) {
  const st = state(node);
  chainCallback(widgetNamed(node, "lora_name"), () => refresh(node));
  chainCallback(widgetNamed(node, "lbw_compat"), () => refresh(node));
  chainCallback(widgetNamed(node, "preset"), () => {
    if (st.configuring) return;
    setSpec(node, ""); // the preset is the new base; sliders show it exactly
    refresh(node);
  });
  chainCallback(widgetNamed(node, "spec"), () => {
    if (!st.writing && !st.configuring) scheduleRefresh(node);
  });
  rebuildSliders(node, null);
  setStatus(node, "Pick a file to get one slider per block.");
  refresh(node);
}

// ----- Block Info node --------------------------------------------------------------------------

function showInfoText(node, text) {
  let widget = widgetNamed(node, "lycoris_info");
  if (!widget) {
    const element = document.createElement("textarea");
    element.readOnly = true;
    element.spellcheck = false;
    Object.assign(element.style, { fontFamily: "monospace", whiteSpace: "pre", width: "100%",
                                   height: "100%", resize: "none", boxSizing: "border-box" });
    widget = node.addDOMWidget("lycoris_info", "lycoris_text", element, {
      getValue: () => element.value,
      setValue: (v) => { element.value = v; },
      serialize: false, // a view of the last run, not an input
    });
    widget.serialize = false;
  }
  widget.value = text;
  node.setDirtyCanvas?.(true, true);
}

// ----- registration ---------------------------------------------------------------------------------

// The web folder can be served twice (WEB_DIRECTORY under the pack's folder name and pyproject's
// [tool.comfy] web under the project name, when the two differ): register once.
const REGISTERED = "__comfyuiLycorisBlocksRegistered";
if (!window[REGISTERED]) {
  window[REGISTERED] = true;
  registerExtension();
}

function chainMethod(node, name, wrap) {
  const original = node[name];
  node[name] = function (...args) {
    return wrap.call(this, original, args);
  };
}

function hookWeightsNode(node) {
  setupWeightsNode(node);
  chainMethod(node, "configure", function (original, args) {
    const st = state(this);
    st.configuring = true; // restoring saved values is not the user picking a preset
    try {
      return original.apply(this, args);
    } finally {
      st.configuring = false;
      refresh(this); // rebuild the sliders from the loaded file, preset and spec
    }
  });
}

function hookInfoNode(node) {
  chainMethod(node, "onExecuted", function (original, args) {
    original?.apply(this, args);
    const text = args[0]?.text;
    if (text?.length) showInfoText(this, Array.isArray(text) ? text.join("\n") : String(text));
  });
}

function registerExtension() {
  app.registerExtension({
    name: "comfyui-lycoris.blocks",
    nodeCreated(node) {
      const type = node.comfyClass ?? node.type;
      if (type === WEIGHTS_NODE) hookWeightsNode(node);
      else if (type === INFO_NODE) hookInfoNode(node);
    },
  });
}
