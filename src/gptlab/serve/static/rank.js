// The labeler's page (InstructGPT): K sampled responses to a prompt, ordered best first by a person,
// saved by POST /web/rankings to the data directory's rankings.jsonl (what gptlab rm reads).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, prompt: "", responses: [], order: [], dragged: null };

function setStatus(id, text, kind = "hint") {
  $(id).textContent = text;
  $(id).className = kind;
}

function announce(text) {
  $("announce").textContent = text;
}

/** `n` samples for `prompt`: a user message for a chat model, a continuation for a base model. */
async function sampleBatch(prompt, n) {
  const common = { model: state.info.model, n, temperature: Number($("temperature").value), max_tokens: Math.round(Number($("max-tokens").value)) };
  if (state.info.chat) {
    const r = await postJSON("/v1/chat/completions", { ...common, messages: [{ role: "user", content: prompt }] });
    return r.choices.map((c) => c.message.content || "");
  }
  const r = await postJSON("/v1/completions", { ...common, prompt });
  return r.choices.map((c) => c.text || "");
}

/** Sample until K distinct, non-empty responses (a few rounds at most: a model may repeat itself). */
async function sample() {
  const prompt = $("prompt").value;
  const k = Number($("k").value);
  if (!prompt.trim()) {
    setStatus("sample-status", "type a prompt first", "error");
    return;
  }
  $("sample").disabled = true;
  setStatus("sample-status", "sampling…");
  const responses = [];
  try {
    for (let round = 0; round < 4 && responses.length < k; round++) {
      const n = Math.min(k - responses.length, Math.max(1, state.info.max_n));
      for (const text of await sampleBatch(prompt, n)) {
        if (text.trim() && !responses.includes(text) && responses.length < k) responses.push(text);
      }
    }
  } catch (e) {
    setStatus("sample-status", e.message, "error");
    return;
  } finally {
    $("sample").disabled = false;
  }
  if (responses.length < 2) {
    setStatus("sample-status", `only ${responses.length} distinct non-empty response(s): raise the temperature or max tokens and sample again`, "error");
    return;
  }
  setStatus("sample-status", responses.length < k ? `${responses.length} distinct responses (the model repeated itself)` : "");
  Object.assign(state, { prompt, responses, order: responses.map((_, i) => i) });
  $("submit").disabled = !state.info.data_dir;
  setStatus("submit-status", state.info.data_dir ? "" : "this server has no data directory, so rankings cannot be saved (gptlab serve --data-dir DIR)",
    state.info.data_dir ? "hint" : "error");
  $("ranking-panel").hidden = false;
  renderList();
}

function focusItem(position) {
  const item = $("responses").children[position];
  if (item) item.focus();
}

function move(from, to, focus = true) {
  const [index] = state.order.splice(from, 1);
  state.order.splice(to, 0, index);
  renderList();
  if (focus) focusItem(to);
  announce(`Moved to position ${to + 1} of ${state.order.length}`);
  if (state.info.data_dir) {
    $("submit").disabled = false;
    setStatus("submit-status", "");
  }
}

function onKey(event, position) {
  if (event.key !== "ArrowUp" && event.key !== "ArrowDown") return;
  event.preventDefault();
  const to = position + (event.key === "ArrowUp" ? -1 : 1);
  if (to < 0 || to >= state.order.length) return;
  if (event.altKey) move(position, to);
  else focusItem(to);
}

/** A chat model's answer rendered as the chat page shows it; a base model's continuation as plain text. */
function responseView(text) {
  if (!state.info.chat) return el("div", { className: "text plain" }, text);
  const view = el("div", { className: "text body" });
  view.innerHTML = renderMarkdown(text);
  return view;
}

function item(index, position) {
  const text = state.responses[index];
  const last = state.order.length - 1;
  const li = el("li", { tabindex: 0, draggable: "true", "data-index": index, "aria-label": `Rank ${position + 1}: ${text.slice(0, 120)}` },
    el("span", { className: "rank", "aria-hidden": "true" }, String(position + 1)),
    responseView(text),
    el("div", { className: "moves" },
      el("button", { type: "button", className: "up", "aria-label": `Move rank ${position + 1} up`, disabled: position === 0, onclick: () => move(position, position - 1) }, "▲"),
      el("button", { type: "button", className: "down", "aria-label": `Move rank ${position + 1} down`, disabled: position === last, onclick: () => move(position, position + 1) }, "▼")));
  li.addEventListener("keydown", (e) => onKey(e, position));
  li.addEventListener("dragstart", (e) => {
    state.dragged = position;
    e.dataTransfer.effectAllowed = "move";
    e.dataTransfer.setData("text/plain", String(position));
    li.classList.add("dragging");
  });
  li.addEventListener("dragend", () => li.classList.remove("dragging"));
  li.addEventListener("dragover", (e) => {
    e.preventDefault();
    li.classList.add("over");
  });
  li.addEventListener("dragleave", () => li.classList.remove("over"));
  li.addEventListener("drop", (e) => {
    e.preventDefault();
    li.classList.remove("over");
    if (state.dragged !== null && state.dragged !== position) move(state.dragged, position, false);
    state.dragged = null;
  });
  return li;
}

function renderList() {
  $("responses").replaceChildren(...state.order.map(item));
}

async function submit() {
  $("submit").disabled = true;
  try {
    const saved = await postJSON("/web/rankings", { prompt: state.prompt, responses: state.responses, ranking: state.order });
    setStatus("submit-status", `Saved to ${saved.saved}. Type or get the next prompt.`, "ok");
  } catch (e) {
    $("submit").disabled = false;
    setStatus("submit-status", e.message, "error");
  }
}

async function getPrompt() {
  try {
    $("prompt").value = (await getJSON("/web/prompt")).prompt;
    setStatus("sample-status", "");
  } catch (e) {
    setStatus("sample-status", e.message, "error");
  }
}

async function main() {
  state.info = await initPage();
  if (!state.info) return;
  $("mode").textContent = state.info.chat
    ? "The prompt is sent as the user's message to /v1/chat/completions, as gptlab rm will score it."
    : "A base model: the responses are continuations of the prompt from /v1/completions.";
  $("get-prompt").hidden = !state.info.prompts;
  $("get-prompt").addEventListener("click", getPrompt);
  $("sample").addEventListener("click", sample);
  $("submit").addEventListener("click", submit);
}

main();
