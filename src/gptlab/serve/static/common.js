// Shared by the three pages: DOM building, the API key kept in this browser, JSON and SSE requests.
"use strict";

const KEY_STORE = "gptlab.apiKey";

/** Build an element; attributes starting with "on" become listeners; children are nodes or text. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== undefined && child !== null && child !== false) node.append(child);
  }
  return node;
}

function loadStored(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value === null ? fallback : value;
  } catch {
    return fallback;
  }
}

function store(key, value) {
  localStorage.setItem(key, JSON.stringify(value));
}

/** An error answered by the server in OpenAI's shape (or a stream that failed). */
class ApiError extends Error {
  constructor(status, message, code = null, param = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY_STORE);
  if (key) headers.Authorization = "Bearer " + key;
  return headers;
}

async function asApiError(res) {
  let error = {};
  try {
    error = (await res.json()).error || {};
  } catch {
    // not JSON: keep the status text
  }
  if (res.status === 401) showKeyBar(error.message);
  return new ApiError(res.status, error.message || `${res.status} ${res.statusText}`, error.code, error.param);
}

/** GET (body undefined) or POST JSON to the server with the API key; throws ApiError on an error status. */
async function request(path, body, signal) {
  const init = { method: body === undefined ? "GET" : "POST", headers: requestHeaders(), signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  const res = await fetch(path, init);
  if (!res.ok) throw await asApiError(res);
  return res;
}

async function getJSON(path) {
  return (await request(path)).json();
}

async function postJSON(path, body) {
  return (await request(path, body)).json();
}

/** The JSON events of a server-sent-event response, read from the fetch body until [DONE]. */
async function* streamEvents(path, body, signal) {
  const res = await request(path, body, signal);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const parsed = JSON.parse(data);
      if (parsed.error) throw new ApiError(500, parsed.error.message, parsed.error.code);
      yield parsed;
    }
  }
}

/** The bar asking for the API key: shown when the server answers 401, or from the header's key button. */
function showKeyBar(message) {
  let bar = document.getElementById("keybar");
  if (!bar) {
    const input = el("input", { type: "password", id: "api-key", placeholder: "API key", autocomplete: "off", "aria-label": "API key" });
    input.value = localStorage.getItem(KEY_STORE) || "";
    const save = () => {
      const key = input.value.trim();
      if (key) localStorage.setItem(KEY_STORE, key);
      else localStorage.removeItem(KEY_STORE);
      location.reload();
    };
    input.addEventListener("keydown", (e) => { if (e.key === "Enter") save(); });
    bar = el("div", { id: "keybar", role: "region", "aria-label": "API key" },
      el("span", { className: "msg" }), input,
      el("button", { type: "button", className: "primary", onclick: save }, "Save key"),
      el("button", { type: "button", onclick: () => bar.remove() }, "Close"));
    document.querySelector("header.top").after(bar);
  }
  bar.querySelector(".msg").textContent = message
    ? message.split(":")[0] + ": this server needs the key it was started with (--api-key); it is kept in this browser only."
    : "The key is kept in this browser only (localStorage).";
  bar.querySelector("input").focus();
}

/** Fill the header's model name and key button; resolves to GET /web/info (null when it failed). */
async function initPage() {
  document.getElementById("key-button").addEventListener("click", () => showKeyBar());
  try {
    const info = await getJSON("/web/info");
    document.getElementById("model").textContent = `model: ${info.model} · context ${info.context} tokens`;
    return info;
  } catch (e) {
    document.getElementById("model").textContent = e.message;
    return null;
  }
}

/** Show whitespace inside a token: a space as ␣, a newline as ↵, a tab as ⇥. */
function visibleToken(text) {
  return text.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥");
}
