// The 3-D view (/visualize, and the files `gptlab visualize` writes): the model's forward pass on the
// user's text, every tensor drawn with its real values. The data comes once per text from POST /web/view,
// or embedded in the page (<script id="view-data">). What is drawn is data-driven: each step names its
// kind (how it is drawn: DRAW) and its branch (where it sits: a row of its own on the residual stream, or
// a row beside it for a block's attention or MLP), so a new kind of block is a new entry of DRAW.
"use strict";

const $ = (id) => document.getElementById(id);
const KX = 0.25; // scene units per channel
const KY = 2; // per token row
const GAP = 6; // between the boxes of a row
const ROW_GAP = 18; // between rows
const HEAD_GAP = 8; // between the slabs of a stack of heads (z)
const THICK = 0.6; // an activation slab's depth
const BAR = 12; // the length of a bar at the end of its colour scale
const BACKGROUND = [0.93, 0.945, 0.96];
const EDGES = {
  input: [0.45, 0.5, 0.6], stream: [0.2, 0.25, 0.35], attn: [0.85, 0.45, 0.1], mlp: [0.2, 0.6, 0.35],
  output: [0.45, 0.3, 0.65], norm: [0.55, 0.4, 0.8], weight: [0.64, 0.69, 0.78],
};
const view = { data: null, scene: null, steps: [], boxes: [], rows: [], follow: 0, step: -1, playing: false, timer: null };

// ------------------------------------------------------------------ data
function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/** A base64 float16 tensor as {shape, values: Float32Array}. */
function decode(packed) {
  const bin = atob(packed.f16), values = new Float32Array(bin.length >> 1);
  for (let i = 0; i < values.length; i++) values[i] = halfToFloat(bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8));
  return { shape: packed.shape, values };
}

/** The colour scale's end: the 98th percentile of |value|, so a few outlier channels do not wash out the rest. */
function robustScale(values) {
  const a = Float32Array.from(values, Math.abs).sort();
  return a[Math.floor(0.98 * (a.length - 1))] || a[a.length - 1] || 1;
}

// ------------------------------------------------------------------ colours
const NEG = [33, 102, 172], ZERO = [247, 247, 247], POS = [178, 24, 43];
const SEQ = [[251, 251, 251], [245, 158, 11], [124, 45, 18]];
const MASKED = [58, 65, 80];

function mix(a, b, t) {
  return [a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t];
}

/** Blue for negative, white at zero, red for positive; `t` in -1..1. */
function diverging(t) {
  const c = Math.max(-1, Math.min(1, t));
  return c < 0 ? mix(ZERO, NEG, -c) : mix(ZERO, POS, c);
}

/** An attention probability 0..1 (square root, so small weights still show). */
function sequential(p) {
  const t = Math.sqrt(Math.max(0, Math.min(1, p)));
  return t < 0.5 ? mix(SEQ[0], SEQ[1], t * 2) : mix(SEQ[1], SEQ[2], t * 2 - 1);
}

/** An RGBA image of `w` x `h` cells coloured by `colourAt(row, col)`. */
function image(w, h, colourAt) {
  const pixels = new Uint8Array(w * h * 4);
  for (let r = 0; r < h; r++) {
    for (let c = 0; c < w; c++) {
      const [red, green, blue] = colourAt(r, c);
      pixels.set([red, green, blue, 255], (r * w + c) * 4);
    }
  }
  return pixels;
}

// ------------------------------------------------------------------ what is masked
/** Whether the query at drawn row `r` may attend to key column `j` of a step's attention (the first column
 *  holds the earlier, undrawn keys when there are any). */
function allowed(step, r, j) {
  const rows = view.data.rows, query = rows[r], window = view.data.blocks[step.layer].window;
  if (step.earlier && j === 0) return window === null || query - window < rows[0] - 1;
  const key = rows[0] + j - (step.earlier ? 1 : 0);
  return key <= query && (window === null || key > query - window);
}

// ------------------------------------------------------------------ drawing, per kind of step
/** Width in scene units of an axis of `n` channels; vocabulary-sized axes are drawn at 4 x n_embd. */
function width(n) {
  return Math.min(n, 4 * view.data.model.n_embd) * KX;
}

function slab(atlas, part, x, y, z, w, colours, cellsW, cellsH, edge) {
  const H = view.data.rows.length * KY;
  return {
    center: [x + w / 2, y - H / 2, z], size: [w, H, THICK], image: atlas.add(cellsW, cellsH, colours),
    color: edge, rows: cellsH, step: part.index, pickable: true, part,
  };
}

const DRAW = {
  /** (P, width): one slab, channels across, tokens down. */
  vector(step, atlas, x, y) {
    const [P, W] = step.tensor.shape, v = step.tensor.values, s = step.scale;
    const w = width(step.shape[step.shape.length - 1]);
    const colours = image(W, P, (r, c) => diverging(v[r * W + c] / s));
    return { boxes: [slab(atlas, { step, index: step.index }, x, y, 0, w, colours, W, P, edgeOf(step))], width: w };
  },
  /** (H, P, d): a stack of slabs, one per head, going back in z. */
  heads(step, atlas, x, y) {
    const [H, P, d] = step.tensor.shape, v = step.tensor.values, s = step.scale;
    const w = width(step.shape[2]);
    const boxes = [];
    for (let h = 0; h < H; h++) {
      const colours = image(d, P, (r, c) => diverging(v[(h * P + r) * d + c] / s));
      boxes.push(slab(atlas, { step, index: step.index, head: h }, x, y, -h * HEAD_GAP, w, colours, d, P, edgeOf(step)));
    }
    return { boxes, width: w };
  },
  /** (H, P, K): a stack of attention matrices, queries down and keys across; masked cells dark. */
  attention(step, atlas, x, y) {
    const [H, P, K] = step.tensor.shape, v = step.tensor.values;
    const w = K * KY;
    const boxes = [];
    for (let h = 0; h < H; h++) {
      const colours = image(K, P, (r, c) => (allowed(step, r, c) ? sequential(v[(h * P + r) * K + c]) : MASKED));
      boxes.push(slab(atlas, { step, index: step.index, head: h }, x, y, -h * HEAD_GAP, w, colours, K, P, edgeOf(step)));
    }
    return { boxes, width: w };
  },
};

function edgeOf(step) {
  return step.name.startsWith("ln") ? EDGES.norm : EDGES[step.branch] || EDGES.stream;
}

/** A weight matrix as a block: its width the outputs, its depth the inputs, its top face the sampled matrix
 *  (outputs across, inputs from back to front). */
function weightBox(weight, index, atlas, x, y) {
  const H = view.data.rows.length * KY, [inputs, outputs] = weight.shape;
  const w = width(outputs), depth = width(inputs);
  const [R, C] = weight.tensor.shape, v = weight.tensor.values, s = weight.scale;
  const colours = image(C, R, (r, c) => diverging(v[r * C + c] / s));
  return {
    center: [x + w / 2, y - H / 2, THICK / 2 - depth / 2], size: [w, H, depth], image: atlas.add(C, R, colours),
    top: true, color: EDGES.weight, rows: 0, step: index, pickable: true, part: { weight, index }, width: w,
  };
}

// ------------------------------------------------------------------ layout
/** Rows of boxes: each step of the residual stream a row of its own at x = 0, each run of a branch's
 *  steps (a block's attention, its MLP, the input, the output) a row to the right, weights before the
 *  step they compute; rows go down in the order of the computation. */
function layout(atlas) {
  const H = view.data.rows.length * KY, indent = width(view.data.model.n_embd) + 4 * GAP;
  const boxes = [], rows = [];
  let row = null;
  for (const step of view.steps) {
    if (!row || step.branch === "stream" || row.branch !== step.branch || row.layer !== step.layer) {
      const y = row ? row.y - H - ROW_GAP : 0;
      row = { branch: step.branch, layer: step.layer, y, x: step.branch === "stream" ? 0 : indent, steps: [], weight: null };
      rows.push(row);
    }
    if (step.weight && step.weight !== row.weight) {
      const box = weightBox(view.data.weights[step.weight], step.index, atlas, row.x, row.y);
      boxes.push(box);
      row.x += box.width + GAP;
      row.weight = step.weight;
    }
    const drawn = DRAW[step.kind](step, atlas, row.x, row.y);
    step.boxes = drawn.boxes;
    step.x0 = row.x;
    step.y0 = row.y;
    boxes.push(...drawn.boxes);
    row.x += drawn.width + GAP;
    row.steps.push(step);
  }
  // The residual stream's wire down the left, and one branch-off to each row beside it.
  const top = rows[0].y, bottom = rows[rows.length - 1].y - H;
  boxes.push({ center: [-3, (top + bottom) / 2, 0], size: [0.8, top - bottom, 0.8], color: EDGES.stream });
  for (const r of rows) {
    if (r.branch !== "stream") boxes.push({ center: [(indent - 3) / 2, r.y - H / 2, 0], size: [indent - 3, 0.5, 0.5], color: EDGES.stream });
  }
  return { boxes, rows };
}

// ------------------------------------------------------------------ bars: the followed token, by height
function barsOf(step) {
  const f = view.follow, P = view.data.rows.length, H = P * KY, bars = [];
  const unit = step.boxes.length > 1 ? (HEAD_GAP - 1) / 1.5 : BAR; // a head's bars stop short of the next slab
  for (const box of step.boxes) {
    const W = box.image.w, cellW = box.size[0] / W, head = box.part.head ?? 0, v = step.tensor.values;
    const x0 = box.center[0] - box.size[0] / 2, y = box.center[1] + H / 2 - (f + 0.5) * KY, z0 = box.center[2] + THICK / 2;
    for (let c = 0; c < W; c++) {
      let value, colour;
      if (step.kind === "attention") {
        if (!allowed(step, f, c)) continue;
        value = v[(head * P + f) * W + c];
        colour = sequential(value);
      } else {
        value = v[(head * P + f) * W + c] / step.scale;
        colour = diverging(value);
      }
      const length = Math.max(0.05, Math.min(1.5, Math.abs(value))) * unit;
      bars.push({
        center: [x0 + (c + 0.5) * cellW, y, z0 + length / 2], size: [cellW * 0.8, KY * 0.8, length],
        color: colour.map((x) => x / 255), step: step.index, bar: true,
      });
    }
  }
  return bars;
}

/** Bars for one step only, the one in focus (the current step, else the selected part's): a few hundred
 *  boxes, which a software renderer still draws smoothly, where bars everywhere would be thousands. */
function updateBars() {
  const part = view.selected;
  const focus = view.step >= 0 ? view.steps[view.step] : part && view.steps[part.index];
  view.scene.setBars(focus ? barsOf(focus) : []);
}

// ------------------------------------------------------------------ labels over the canvas
function makeLabels() {
  const labels = [];
  const H = view.data.rows.length * KY;
  const rowName = (r) => {
    if (r.branch === "stream") return r.steps[0].name.startsWith("ln") ? "residual stream · LayerNorm" : "residual stream";
    if (r.branch === "input") return "input: embeddings";
    if (r.branch === "output") return "output: LM head";
    const block = view.data.blocks[r.layer];
    if (r.branch === "mlp") return block.experts ? `block ${r.layer} · MoE · ${block.experts} experts` : `block ${r.layer} · MLP`;
    return `block ${r.layer} · attention · ${block.window === null ? "dense" : `banded (w=${block.window})`}`
      + (block.norm === "post" ? " · post-LN" : "");
  };
  for (const r of view.rows) {
    if (r.branch === "stream" && r.steps[0].name !== "embed" && !r.steps[0].name.startsWith("ln")) continue;
    labels.push({ text: rowName(r), at: [-8, r.y - H / 2, 0], cls: "row-label", anchor: "right" });
  }
  for (const step of view.steps) {
    const box = step.boxes[0];
    const heads = step.boxes.length > 1 ? ` ×${step.boxes.length}` : "";
    labels.push({ text: shortLabel(step) + heads, at: [step.x0, step.y0 + 1.5, box.center[2]],
      right: [step.x0 + box.size[0], step.y0, box.center[2]], cls: "part-label", step: step.index });
  }
  $("labels").replaceChildren(...labels.map((l) => (l.node = el("span", { className: l.cls }, l.text))));
  view.labels = labels;
}

function shortLabel(step) {
  return step.label.replace(/^block \d+ · /, "");
}

function placeLabels(viewProj) {
  const scene = view.scene;
  for (const l of view.labels || []) {
    const p = scene.project(l.at, viewProj);
    let show = p !== null && p[0] > -200 && p[0] < scene.canvas.clientWidth + 200 && p[1] > -20 && p[1] < scene.canvas.clientHeight + 20;
    if (show && l.right) {
      const q = scene.project(l.right, viewProj);
      show = q !== null && q[0] - p[0] > 48;
    }
    if (show && l.step !== undefined && view.step >= 0 && l.step > view.step) show = false;
    l.node.hidden = !show;
    if (show) l.node.style.transform = `translate(${p[0].toFixed(1)}px, ${p[1].toFixed(1)}px)${l.anchor === "right" ? " translate(-100%, -50%)" : " translate(0, -100%)"}`;
  }
}

// ------------------------------------------------------------------ the information panel
function fmt(x) {
  return Number.isFinite(x) ? Number(x.toPrecision(4)).toString() : String(x);
}

function shapeText(step) {
  const s = step.shape;
  if (step.kind === "attention") return `(${s[0]} heads, ${s[1]} queries, ${s[2]} keys)`;
  if (step.kind === "heads") return `(${s[0]} heads, ${s[1]} tokens, ${s[2]} per head)`;
  if (step.name === "logits") return `(${s[0]} tokens, ${s[1]} vocabulary entries)`;
  return `(${s[0]} tokens, ${s[1]} channels)`;
}

function drawnText(step) {
  const P = view.data.rows.length, T = view.data.tokens.length;
  const tokens = P < T ? `the last ${P} of ${T} tokens` : `all ${T} tokens`;
  if (step.kind === "attention") {
    return `${tokens}${step.earlier ? `; keys before them summed in the first column (${step.earlier} tokens)` : ""}`;
  }
  const n = step.shape[step.shape.length - 1], k = step.cols.length;
  const what = step.name === "logits" ? `the ${k} most probable of ${n} entries` :
    k < n ? `${k} of ${n} ${step.kind === "heads" ? "channels per head" : "channels"} (every ${step.cols[1] - step.cols[0]}th)` : `all ${n} channels`;
  return `${tokens} × ${what}`;
}

function fact(name, value, attrs = {}) {
  return [el("dt", {}, name), el("dd", attrs, value)];
}

function histogram(summary) {
  const canvas = $("histogram"), ctx = canvas.getContext("2d"), counts = summary.hist.counts;
  const max = Math.max(...counts) || 1, w = canvas.width / counts.length, base = canvas.height - 16;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  counts.forEach((n, i) => {
    const centre = summary.hist.lo + (i + 0.5) * (summary.hist.hi - summary.hist.lo) / counts.length;
    ctx.fillStyle = `rgb(${diverging(centre / (Math.max(Math.abs(summary.hist.lo), Math.abs(summary.hist.hi)) || 1)).map(Math.round).join(",")})`;
    const h = (n / max) * (base - 4);
    ctx.fillRect(i * w + 1, base - h, w - 2, h);
    ctx.strokeStyle = "#98a2b3";
    ctx.strokeRect(i * w + 1.5, base - h + 0.5, w - 3, h);
  });
  ctx.fillStyle = "#667085";
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillText(fmt(summary.hist.lo), 2, canvas.height - 3);
  const hi = fmt(summary.hist.hi);
  ctx.fillText(hi, canvas.width - ctx.measureText(hi).width - 2, canvas.height - 3);
  canvas.hidden = false;
}

function valueTable(headers, rows) {
  return el("table", { className: "values" },
    el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, ...rows.map(([label, value, attrs]) => el("tr", attrs, el("th", { scope: "row" }, label), el("td", {}, fmt(value))))));
}

/** The followed token's values in a step (one head's, for a stack), as rows of a table. */
function followedRows(step, head) {
  const P = view.data.rows.length, f = view.follow, v = step.tensor.values;
  const W = step.tensor.shape[step.tensor.shape.length - 1], base = ((head ?? 0) * P + f) * W;
  if (step.kind === "attention") {
    return Array.from({ length: W }, (_, j) => {
      const earlier = step.earlier && j === 0;
      const pos = view.data.rows[0] + j - (step.earlier ? 1 : 0);
      const label = earlier ? `${step.earlier} earlier tokens` : `${pos}: ${visibleToken(view.data.tokens[pos])}`;
      return [label, v[base + j], { "data-key": earlier ? "earlier" : pos }];
    });
  }
  const name = (col, j) => (step.name === "logits" ? visibleToken(step.col_labels[j])
    : step.name === "router" || step.name === "gates" ? `expert ${col}` : `ch ${col}`);
  return step.cols.map((col, j) => [name(col, j), v[base + j], { "data-col": col }]);
}

function showPart(part) {
  view.selected = part;
  if (!part) return;
  const facts = [];
  let summary, table;
  if (part.weight) {
    const w = part.weight;
    $("info-title").textContent = `weights ${w.id}`;
    $("info-explain").textContent = `The matrix W of x @ W (inputs down, outputs across)${w.param !== w.id ? `; the same tensor as ${w.param}` : ""}.`;
    facts.push(...fact("shape", `(${w.shape[0]} in, ${w.shape[1]} out)`, { id: "info-shape", "data-shape": w.shape.join(",") }),
      ...fact("drawn", `${w.rows.length} of ${w.shape[0]} rows × ${w.cols.length} of ${w.shape[1]} columns`));
    summary = w;
    const R = w.tensor.shape[0], C = w.tensor.shape[1], n = Math.min(6, R, C);
    table = el("table", { className: "values grid" },
      el("thead", {}, el("tr", {}, el("th"), ...w.cols.slice(0, n).map((c) => el("th", { scope: "col" }, `out ${c}`)))),
      el("tbody", {}, ...w.rows.slice(0, n).map((r, i) => el("tr", {}, el("th", { scope: "row" }, `in ${r}`),
        ...w.cols.slice(0, n).map((_, j) => el("td", {}, fmt(w.tensor.values[i * C + j])))))));
  } else {
    const step = part.step, head = part.head;
    $("info-title").textContent = step.label + (head !== undefined ? ` · head ${head}` : "");
    $("info-explain").textContent = step.explain;
    facts.push(...fact("shape", shapeText(step), { id: "info-shape", "data-shape": step.shape.join(",") }),
      ...fact("module", step.module || "(the sum)"), ...fact("drawn", drawnText(step)));
    summary = step;
    if (step.boxes.length > 1) {  // a stack of heads: any head from here, not only the one in front
      facts.push(...fact("head", el("span", { className: "heads" }, ...step.boxes.map((_, h) => el("button", {
        type: "button", "data-head": h, "aria-pressed": h === head ? "true" : "false",
        onclick: () => showPart({ step, index: step.index, head: h }),
      }, String(h))))));
    }
    const token = view.data.rows[view.follow];
    table = el("div", {}, el("p", { className: "hint" }, `Token ${token} (${visibleToken(view.data.tokens[token])})${head !== undefined ? `, head ${head}` : ""}:`),
      valueTable([step.kind === "attention" ? "key" : "column", "value"], followedRows(step, head)));
  }
  facts.push(...fact("statistics", `min ${fmt(summary.min)} · max ${fmt(summary.max)} · mean ${fmt(summary.mean)} · std ${fmt(summary.std)}`,
    { id: "info-stats", "data-min": summary.min, "data-max": summary.max, "data-mean": summary.mean, "data-std": summary.std }));
  $("info-facts").replaceChildren(...facts);
  histogram(summary);
  $("info-table").replaceChildren(table);
  $("info").dataset.part = part.weight ? part.weight.id : part.step.id;
  $("info").dataset.head = part.head ?? "";
  updateBars();
}

// ------------------------------------------------------------------ tokens and next tokens
function renderTokens() {
  const { rows, tokens } = view.data;
  $("tokens").replaceChildren(...rows.map((pos, i) => el("button", {
    type: "button", className: "tok", "data-pos": pos, "aria-pressed": i === view.follow ? "true" : "false",
    title: `position ${pos}, id ${view.data.ids[pos]}`, onclick: () => setFollow(i),
  }, visibleToken(tokens[pos]))));
  const top = view.data.next[view.follow];
  $("next-title").textContent = `Next token after position ${rows[view.follow]}`;
  $("top").replaceChildren(...top.map((c) => {
    const percent = `${(100 * c.prob).toFixed(c.prob < 0.001 ? 3 : 1)}%`;
    const fill = el("span");
    fill.style.width = `${Math.max(0.5, 100 * c.prob)}%`;
    return el("li", { className: "cand", "data-id": c.id, "data-prob": c.prob },
      el("span", { className: "t mono" }, visibleToken(c.token)), el("span", { className: "bar" }, fill), el("span", { className: "p" }, percent));
  }));
}

function setFollow(i) {
  view.follow = i;
  view.scene.set({ follow: i });
  renderTokens();
  updateBars();
  if (view.selected) showPart(view.selected);
}

// ------------------------------------------------------------------ stepping
/** The corners of the box around `boxes`. */
function bounds(boxes) {
  const lo = [Infinity, Infinity, Infinity], hi = [-Infinity, -Infinity, -Infinity];
  for (const b of boxes) {
    for (let a = 0; a < 3; a++) {
      lo[a] = Math.min(lo[a], b.center[a] - b.size[a] / 2);
      hi[a] = Math.max(hi[a], b.center[a] + b.size[a] / 2);
    }
  }
  return [lo, hi];
}

/** The camera on a step: its boxes (and its weights) in the middle, with room for its neighbours. */
function stepTarget(step) {
  const own = view.boxes.filter((b) => b.part && b.part.index === step.index);
  const [lo, hi] = bounds(own);
  return view.scene.frame(lo, hi, 2);
}

function revealMs() {
  return Math.min(1400, view.data.rows.length * 60);
}

/** Show the computation up to step `index` (-1: all of it); `animate` brings the step's tokens in one by one. */
function goTo(index, animate = false) {
  const n = view.steps.length;
  view.step = Math.max(-1, Math.min(n - 1, index));
  const P = view.data.rows.length;
  if (animate && view.step >= 0) {
    const start = performance.now(), ms = revealMs();
    view.scene.animate = (now) => {
      const t = Math.min(1, (now - start) / ms);
      view.scene.uniforms.reveal = Math.min(P, Math.floor(t * P) + 1);
      return t < 1;
    };
  } else {
    view.scene.animate = null;
  }
  view.scene.set({ step: view.step, reveal: animate ? 1 : P });
  const status = $("step-status");
  if (view.step < 0) {
    updateBars();
    status.textContent = "Overview: every step computed.";
    status.dataset.step = "";
    status.dataset.layer = "";
  } else {
    const step = view.steps[view.step];
    status.textContent = `Step ${view.step + 1} of ${n}: ${step.label}`;
    status.dataset.step = step.id;
    status.dataset.layer = step.layer ?? "";
    showPart({ step, index: step.index, head: step.boxes.length > 1 ? 0 : undefined });
    if ($("follow-camera").checked) view.scene.moveTo(stepTarget(step));
  }
  for (const [i, item] of [...$("steps").children].entries()) item.classList.toggle("current", i === view.step);
  const current = $("steps").children[view.step], list = $("steps");
  if (current && (current.offsetTop < list.scrollTop || current.offsetTop + current.offsetHeight > list.scrollTop + list.clientHeight)) {
    list.scrollTop = current.offsetTop - list.clientHeight / 2;  // the list only: the page itself stays put
  }
  $("prev").disabled = view.step < 0;
  $("next").disabled = view.step >= n - 1;
}

function setPlaying(on) {
  view.playing = on;
  $("play").setAttribute("aria-pressed", on ? "true" : "false");
  $("play").textContent = on ? "Pause" : "Play";
  clearTimeout(view.timer);
  if (!on) return;
  const tick = () => {
    if (!view.playing) return;
    if (view.step >= view.steps.length - 1) {
      setPlaying(false);
      return;
    }
    goTo(view.step + 1, true);
    view.timer = setTimeout(tick, revealMs() + 500);
  };
  tick();
}

function renderStepList() {
  $("steps").replaceChildren(...view.steps.map((step, i) => el("li", {},
    el("button", { type: "button", className: "step", onclick: () => { setPlaying(false); goTo(i, true); } }, step.label))));
}

// ------------------------------------------------------------------ the whole view
function overview() {
  const [lo, hi] = bounds(view.boxes);
  lo[0] -= 0.3 * (hi[0] - lo[0]) + 40;  // room for the rows' labels on the left
  return { ...view.scene.frame(lo, hi), yaw: -0.4, pitch: 0.3 };
}

function modelLine(m) {
  const pattern = [...m.attention_pattern].map((k) => (k === "L" ? `banded (w=${m.attn_window})` : "dense")).join(" / ");
  const millions = (n) => `${(n / 1e6).toFixed(n < 1e7 ? 2 : 1)}M`;
  const norm = m.norm === "rmsnorm" ? "RMSNorm" : "LN";
  const modern = [m.pos_embedding === "rotary" && "rotary", m.qk_norm && "QK-norm", m.activation === "relu2" && "ReLU²",
    m.logit_softcap > 0 && `softcap ${m.logit_softcap}`].filter(Boolean);
  return `${m.name}: ${m.n_layer} blocks · ${m.n_head} heads · ${m.n_embd} wide · ${m.norm_position}-${norm} · ${pattern} · `
    + modern.map((x) => `${x} · `).join("")
    + (m.n_experts ? `MoE ${m.n_experts} experts, top ${m.top_k} · ${millions(m.params)} parameters (${millions(m.active_params)} active)`
      : `${millions(m.params)} parameters`);
}

function samplingText() {
  const d = view.data, s = d.sampling;
  const parts = [s.positions < s.tokens
    ? `Drawn: the last ${s.positions} of ${s.tokens} tokens (all ${s.tokens} went through the model; attention to earlier tokens is summed in each matrix's first column).`
    : `Drawn: all ${s.tokens} tokens.`];
  parts.push(s.channels < s.width ? `${s.channels} of ${s.width} channels per tensor (every ${s.stride}th), a share per head;`
    : `every channel of ${s.width};`);
  parts.push("the logits' columns are the most probable tokens; weights are strided the same way. Statistics and histograms use every channel.");
  return parts.join(" ");
}

function show(data) {
  view.data = data;
  view.follow = data.rows.length - 1;
  view.selected = null;
  $("info-facts").replaceChildren();
  $("info-table").replaceChildren();
  $("histogram").hidden = true;
  view.steps = data.steps.map((s, index) => {
    const tensor = decode(s.data);
    return { ...s, index, tensor, scale: s.kind === "attention" ? 1 : robustScale(tensor.values) };
  });
  for (const w of Object.values(data.weights)) {
    w.tensor = decode(w.data);
    w.scale = robustScale(w.tensor.values);
  }
  const atlas = new Atlas();
  const { boxes, rows } = layout(atlas);
  view.boxes = boxes;
  view.rows = rows;
  view.scene.setBoxes(boxes, atlas);
  makeLabels();
  renderStepList();
  renderTokens();
  $("sampling").textContent = samplingText();
  $("model").textContent = modelLine(data.model);
  Object.assign(view.scene.camera, overview());
  setPlaying(false);
  goTo(-1);
  view.scene.set({ follow: view.follow });
  document.body.dataset.ready = "true";
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "hint";
}

async function run() {
  const text = $("text").value;
  if (!text) {
    setStatus("type some text first", true);
    return;
  }
  setStatus("running the model…");
  document.body.dataset.ready = "false";
  try {
    const data = await postJSON("/web/view", { text });
    setStatus(data.truncated ? `the first ${data.truncated} tokens were left out to fit the context` : "");
    show(data);
  } catch (e) {
    setStatus(e.message, true);
  }
}

/** What tests, benchmarks and people at the console may ask of the page. */
window.gptlabView = {
  /** Show the computation up to a step, by its id ("5.attn"); null: the overview. */
  goTo(stepId) {
    goTo(stepId === null ? -1 : view.steps.findIndex((s) => s.id === stepId));
  },
  redraw() {
    view.scene.render();
  },
  /** Where a step's slab (head `head` of a stack) is on the page, in CSS pixels. */
  screenPoint(stepId, head = 0) {
    const step = view.steps.find((s) => s.id === stepId);
    const box = step.boxes[Math.min(head, step.boxes.length - 1)];
    const r = view.scene.canvas.getBoundingClientRect(), p = view.scene.project(box.center);
    return p && [r.left + p[0], r.top + p[1]];
  },
  /** Face a step head-on from the front (yaw 0) or from another side (yaw π: from behind). */
  lookAt(stepId, yaw = 0) {
    const step = view.steps.find((s) => s.id === stepId);
    const to = stepTarget(step);
    Object.assign(view.scene.camera, { ...to, yaw, pitch: 0 });
    view.scene.glide = null;
    view.scene.render();
  },
  get frames() { return view.scene.frames || 0; },
  get camera() { return view.scene.camera; },
};

async function main() {
  try {
    view.scene = new Scene($("scene"), { background: BACKGROUND, onPick: (box) => box && box.part && showPart(box.part), onFrame: placeLabels });
  } catch (e) {
    $("step-status").textContent = e.message;
    $("step-status").className = "error";
    return;
  }
  $("prev").addEventListener("click", () => { setPlaying(false); goTo(view.step - 1); });
  $("next").addEventListener("click", () => { setPlaying(false); goTo(view.step + 1, true); });
  $("play").addEventListener("click", () => setPlaying(!view.playing));
  $("all").addEventListener("click", () => {
    setPlaying(false);
    goTo(-1);
    view.scene.moveTo(overview());
  });
  const embedded = $("view-data");
  if (embedded) {  // a page written by `gptlab visualize`: the data is here, and there is no server to ask
    document.body.classList.add("offline");
    const data = JSON.parse(embedded.textContent);
    $("text").value = data.text;
    $("text").readOnly = true;
    show(data);
    return;
  }
  $("run").addEventListener("click", run);
  $("text").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(); });
  await initPage();
  const text = new URLSearchParams(location.search).get("text");
  if (text) {
    $("text").value = text;
    run();
  }
}

main();
