// Pure helpers of the block-weights UI (no frontend imports, so node can test them): slider
// rounding and the text edit a slider makes in the spec.
export const SLIDER = { min: -1, max: 2, step: 0.05 };

const CODE_ALIASES = { MID: "M", MIDDLE: "M", DOUBLE: "D", SINGLE: "S", JOINT: "J" };
const ASSIGNMENT =
  /^\s*([A-Za-z][A-Za-z0-9 ]*?)\s*=\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*$/;

export function roundToStep(value) {
  const steps = Math.round(Number(value) / SLIDER.step);
  return parseFloat((steps * SLIDER.step).toFixed(4));
}

export function formatValue(value) {
  return String(parseFloat(Number(value).toFixed(4)));
}

/** Canonical spelling of a single-block selector (IN4 -> IN04, MID0 -> M00, base -> BASE). */
export function canonicalSelector(text) {
  const s = String(text).replace(/\s+/g, "").toUpperCase();
  const m = /^([A-Z]+?)(\d{1,3})$/.exec(s);
  if (m) {
    const code = CODE_ALIASES[m[1]] ?? m[1];
    return code + String(parseInt(m[2], 10)).padStart(2, "0");
  }
  return CODE_ALIASES[s] ?? s;
}

/**
 * The spec with `selector=value` as its last item, earlier plain `selector=number` items of the
 * same selector removed (they were overridden anyway). Everything else is kept verbatim.
 */
export function setBlockInSpec(text, selector, value) {
  const target = canonicalSelector(selector);
  const parts = String(text ?? "").split(/([,;\n])/); // items at even indexes, separators at odd
  const kept = [];
  for (let i = 0; i < parts.length; i += 2) {
    const m = ASSIGNMENT.exec(parts[i]);
    if (m && m[1].trim().toLowerCase() !== "default" && canonicalSelector(m[1]) === target) continue;
    kept.push(parts[i]);
    if (i + 1 < parts.length) kept.push(parts[i + 1]);
  }
  const body = kept.join("").replace(/[\s,;]+$/, "").replace(/^[\s,;]+/, "");
  const original = String(text ?? "");
  const separator = original.includes("\n") && !original.includes(",") ? "\n" : ", ";
  return (body ? body + separator : "") + `${selector}=${formatValue(value)}`;
}
