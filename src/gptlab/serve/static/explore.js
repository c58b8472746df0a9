// The GPT-2 Explorer: the model's top next tokens for a text, one click to append one, and the last
// token's attention in every layer and head (POST /web/next).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { last: null, selected: null, seq: 0, timer: null }; // selected: [layer, head], null = average

/** A warm colour whose strength is `x` in 0..1 (dark text stays readable on it). */
function heatColour(x) {
  return x > 0 ? `rgba(245, 124, 0, ${(0.06 + 0.8 * x).toFixed(3)})` : "transparent";
}

/** The tooltip's note for a token that holds only some of a character's bytes (byte-level BPE on Chinese). */
function partNote(partial) {
  return partial ? " · part of a character split across tokens: it shows the whole character" : "";
}

/** A token's text with its whitespace made visible and muted. */
function tokenNodes(text) {
  return text.split(/([ \n\t])/).filter(Boolean)
    .map((part) => (/^[ \n\t]$/.test(part) ? el("span", { className: "ws" }, visibleToken(part)) : part));
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "hint";
}

async function predict(body) {
  const seq = ++state.seq;
  setStatus("predicting…");
  try {
    const result = await postJSON("/web/next", { ...body, top: 10, attention: $("heat").checked });
    if (seq !== state.seq) return; // a newer request superseded this one
    state.last = result;
    if (body.ids) $("text").value = result.text;
    setStatus(result.truncated ? `the first ${result.truncated} tokens were left out to fit the context` : "");
    render();
  } catch (e) {
    if (seq === state.seq) setStatus(e.message, true);
  }
}

function append(id) {
  if (state.last) predict({ ids: [...state.last.ids, id] });
}

/** The weights the tokens are coloured with: one head, or the average of every layer and head. */
function selectedWeights() {
  const attention = state.last.attention;
  if (state.selected) return attention[state.selected[0]][state.selected[1]];
  const rows = attention.flat();
  return rows[0].map((_, j) => rows.reduce((sum, row) => sum + row[j], 0) / rows.length);
}

function renderTokens() {
  const r = state.last;
  const weights = $("heat").checked && r.attention ? selectedWeights() : null;
  const max = weights ? Math.max(...weights) || 1 : 1;
  $("tokens").replaceChildren(...r.tokens.map((token, i) => {
    const title = (weights ? `attention ${weights[i].toFixed(3)}` : `token id ${r.ids[i]}`) + partNote(r.partial[i]);
    const className = `tok${i === r.tokens.length - 1 ? " query" : ""}${r.partial[i] ? " part" : ""}`;
    const chip = el("span", { className, title }, tokenNodes(token));
    if (weights) chip.style.backgroundColor = heatColour(weights[i] / max);
    return chip;
  }));
  $("count").textContent = `(${r.tokens.length})`;
}

function renderTop() {
  $("top").replaceChildren(...state.last.top.map((c) => {
    const percent = `${(100 * c.prob).toFixed(c.prob < 0.001 ? 3 : 1)}%`;
    const fill = el("span");
    fill.style.width = `${Math.max(0.5, 100 * c.prob)}%`;
    return el("li", {}, el("button", {
      type: "button", className: "cand", "data-id": c.id, onclick: () => append(c.id), title: `token id ${c.id}${partNote(c.partial)}`,
      "aria-label": `Append ${JSON.stringify(c.token)}${c.partial ? " (part of a character)" : ""}, probability ${percent}`,
    }, el("span", { className: c.partial ? "t part" : "t" }, tokenNodes(c.token)), el("span", { className: "bar" }, fill), el("span", { className: "p" }, percent)));
  }));
}

function drawStrip(canvas, weights) {
  const ctx = canvas.getContext("2d");
  const max = Math.max(...weights) || 1;
  const width = canvas.width / weights.length;
  ctx.fillStyle = "#f1f3f6";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  weights.forEach((w, i) => {
    ctx.fillStyle = heatColour(w / max);
    ctx.fillRect(i * width, 0, Math.ceil(width), canvas.height);
  });
}

function cell(weights, layer, head) {
  const canvas = el("canvas", { width: 144, height: 28 });
  drawStrip(canvas, weights);
  return el("button", {
    type: "button", className: "cell", "aria-label": `Layer ${layer}, head ${head}`, title: `layer ${layer}, head ${head}`,
    "data-layer": layer, "data-head": head, onclick: () => select([layer, head]),
  }, canvas);
}

function renderGrid() {
  const attention = state.last && state.last.attention;
  $("heat-panel").hidden = !$("heat").checked;
  if (!$("heat").checked || !attention) {
    $("grid").replaceChildren();
    return;
  }
  $("grid").replaceChildren(el("table", {},
    el("thead", {}, el("tr", {}, el("th"), ...attention[0].map((_, h) => el("th", { scope: "col" }, `head ${h}`)))),
    el("tbody", {}, ...attention.map((heads, l) => el("tr", {}, el("th", { scope: "row" }, `layer ${l}`),
      ...heads.map((weights, h) => el("td", {}, cell(weights, l, h))))))));
  markSelected();
}

function markSelected() {
  const [layer, head] = state.selected || [-1, -1];
  for (const button of document.querySelectorAll("#grid .cell")) {
    const on = Number(button.dataset.layer) === layer && Number(button.dataset.head) === head;
    button.setAttribute("aria-pressed", on ? "true" : "false");
  }
  $("mean").setAttribute("aria-pressed", state.selected ? "false" : "true");
  $("selection").textContent = state.selected ? `colouring: layer ${layer}, head ${head}` : "colouring: the average";
}

function select(selected) {
  state.selected = selected;
  markSelected();
  renderTokens();
}

function render() {
  renderTokens();
  renderTop();
  renderGrid();
}

function clear() {
  state.seq += 1;
  state.last = null;
  $("tokens").replaceChildren();
  $("top").replaceChildren();
  $("grid").replaceChildren();
  $("count").textContent = "";
  setStatus("");
}

function onType() {
  clearTimeout(state.timer);
  state.timer = setTimeout(() => ($("text").value ? predict({ text: $("text").value }) : clear()), 250);
}

function onHeat() {
  if (!state.last) {
    renderGrid();
    return;
  }
  if ($("heat").checked && !state.last.attention) predict({ ids: state.last.ids });
  else render();
}

async function main() {
  await initPage();
  $("text").addEventListener("input", onType);
  $("heat").addEventListener("change", onHeat);
  $("mean").addEventListener("click", () => select(null));
  if ($("text").value) predict({ text: $("text").value });
}

main();
