// The chat page: conversations kept in localStorage, answers streamed from POST /v1/chat/completions.
"use strict";

const CHATS = "gptlab.chats";
const CURRENT = "gptlab.currentChat";
const SETTINGS = "gptlab.chatSettings";
const $ = (id) => document.getElementById(id);

const state = { info: null, chats: loadStored(CHATS, []), current: loadStored(CURRENT, null), controller: null, live: null,
  image: null };
const MAX_IMAGE_BYTES = 2 * 1024 * 1024; // kept in localStorage with the conversation

// ------------------------------------------------------------------ settings
function settings() {
  return {
    system: $("system").value,
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Math.round(Number($("max-tokens").value)),
  };
}

function initSettings() {
  const saved = loadStored(SETTINGS, {});
  const limit = state.info ? state.info.max_tokens : 256;
  $("system").value = saved.system ?? "";
  $("temperature").value = saved.temperature ?? 0.8;
  $("top-p").value = saved.top_p ?? 1;
  $("max-tokens").value = Math.min(saved.max_tokens ?? 256, limit);
  $("max-tokens").max = limit;
  for (const id of ["system", "temperature", "top-p", "max-tokens"]) {
    $(id).addEventListener("input", () => store(SETTINGS, settings()));
  }
}

// ------------------------------------------------------------------ conversations
function currentChat() {
  return state.chats.find((c) => c.id === state.current) || null;
}

function saveChats() {
  store(CHATS, state.chats);
  store(CURRENT, state.current);
}

function newChat() {
  const chat = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 8), title: "", messages: [], updated: Date.now() };
  state.chats.unshift(chat);
  state.current = chat.id;
  return chat;
}

function openChat(id) {
  if (state.controller) return;
  state.current = id;
  saveChats();
  render();
}

function deleteChat(id) {
  if (state.controller && id === state.current) return;
  state.chats = state.chats.filter((c) => c.id !== id);
  if (state.current === id) state.current = null;
  saveChats();
  render();
}

function renderList() {
  const chats = [...state.chats].sort((a, b) => b.updated - a.updated);
  $("conversations").replaceChildren(...chats.map((c) => el("li", { className: c.id === state.current ? "current" : "" },
    el("button", { type: "button", className: "open", title: c.title, "aria-current": c.id === state.current ? "true" : null, onclick: () => openChat(c.id) },
      c.title || "New chat"),
    el("button", { type: "button", className: "icon", "aria-label": `Delete conversation: ${c.title}`, onclick: () => deleteChat(c.id) }, "×"))));
}

// ------------------------------------------------------------------ messages
function statsText(stats) {
  const rate = stats.seconds > 0 ? stats.tokens / stats.seconds : 0;
  return `${stats.tokens} tokens · ${rate.toFixed(1)} tokens/s · ${stats.seconds.toFixed(1)} s`;
}

/** A message as the API reads it: a user message with an image becomes OpenAI's content parts. */
function apiMessage({ role, content, image }) {
  if (!image) return { role, content };
  return { role, content: [{ type: "text", text: content }, { type: "image_url", image_url: { url: image } }] };
}

/** The messages an answer was generated from: its system prompt, then the conversation before it. */
function promptMessages(history, system) {
  const turns = history.map(apiMessage);
  return system ? [{ role: "system", content: system }, ...turns] : turns;
}

/** A thumb drawn as an outline (no emoji font needed); CSS turns it over for thumbs down. */
function thumbIcon() {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  const path = document.createElementNS(ns, "path");
  for (const [name, value] of [["viewBox", "0 0 24 24"], ["width", "16"], ["height", "16"], ["aria-hidden", "true"]]) svg.setAttribute(name, value);
  path.setAttribute("d", "M7 10v11H3V10h4zm0 0 4-8c1.7 0 2.8 1.3 2.5 3L13 9h6.5c1.3 0 2.2 1.2 1.9 2.4l-1.9 8c-.2 1-1 1.6-2 1.6H7");
  svg.append(path);
  return svg;
}

function messageView(chat, m, index) {
  const busy = state.controller !== null;
  const body = el("div", { className: "body" });
  const meta = el("div", { className: "meta" });
  const view = el("div", { className: `msg ${m.role}${m.streaming ? " streaming" : ""}` },
    el("div", { className: "who" }, m.role === "user" ? "You" : state.info ? state.info.model : "assistant"), body, meta);
  if (m.role === "user") {
    body.textContent = m.content;
    if (m.image) body.prepend(el("img", { className: "thumb", src: m.image, alt: "Image sent with the message" }));
    meta.append(el("button", { type: "button", className: "icon edit", disabled: busy, onclick: () => startEdit(chat, index, view) }, "Edit"));
    return view;
  }
  body.innerHTML = renderMarkdown(m.content);
  const stats = el("span", { className: "stats" }, m.stats ? statsText(m.stats) : "");
  meta.append(stats);
  if (m.streaming) {
    state.live = { message: m, body, stats };
    return view;
  }
  if (m.dropped) meta.append(el("span", { className: "note" }, `${m.dropped} oldest exchange(s) left out to fit the context`));
  if (m.stopped) meta.append(el("span", { className: "note" }, "stopped"));
  if (m.error) meta.append(el("span", { className: "note error" }, m.error));
  if (index === chat.messages.length - 1) {
    meta.append(el("button", { type: "button", className: "icon regenerate", disabled: busy, onclick: () => regenerate(chat) }, "Regenerate"));
  }
  if (m.content && state.info && state.info.data_dir) {
    for (const [rating, label] of [["up", "Good answer"], ["down", "Bad answer"]]) {
      meta.append(el("button", { type: "button", className: `icon thumb thumb-${rating}`, "aria-label": label, title: label,
        "aria-pressed": m.rating === rating ? "true" : "false", onclick: () => rate(chat, index, rating) }, thumbIcon()));
    }
    if (m.rating) meta.append(el("span", { className: "note ok feedback" }, "feedback saved"));
    if (m.feedbackError) meta.append(el("span", { className: "note error" }, m.feedbackError));
  }
  return view;
}

function renderMessages() {
  const box = $("messages");
  const chat = currentChat();
  state.live = null;
  if (!chat || !chat.messages.length) {
    const ready = !state.info || state.info.chat;
    box.replaceChildren(ready ? el("p", { className: "empty" }, "Send a message to start a conversation.") : "");
    return;
  }
  box.replaceChildren(...chat.messages.map((m, i) => messageView(chat, m, i)));
  box.scrollTop = box.scrollHeight;
}

function render() {
  renderList();
  renderMessages();
}

let livePending = false;

/** Redraw the streaming answer at most once per frame (Markdown is re-rendered as it grows). */
function scheduleLive() {
  if (livePending) return;
  livePending = true;
  requestAnimationFrame(() => {
    livePending = false;
    const live = state.live;
    if (!live) return;
    live.body.innerHTML = renderMarkdown(live.message.content);
    if (live.message.stats) live.stats.textContent = statsText(live.message.stats);
    const box = $("messages");
    box.scrollTop = box.scrollHeight;
  });
}

// ------------------------------------------------------------------ generation
function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

/** The history without its oldest exchange (null when only the last question is left). */
function withoutOldestExchange(history) {
  const next = history.findIndex((m, i) => i > 0 && m.role === "user");
  return next > 0 ? history.slice(next) : null;
}

/** Stream a new assistant answer to the conversation's last user message. */
async function answer(chat) {
  const s = settings();
  const message = { role: "assistant", content: "", system: s.system || undefined, streaming: true, stats: null };
  chat.messages.push(message);
  chat.updated = Date.now();
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  saveChats();
  render();
  let history = chat.messages.slice(0, -1);
  let pieces = 0;
  let usage = null;
  let dropped = 0;
  const started = performance.now();
  const elapsed = () => (performance.now() - started) / 1000;
  try {
    for (;;) {
      const body = {
        model: state.info.model, messages: promptMessages(history, message.system), stream: true,
        stream_options: { include_usage: true }, temperature: s.temperature, top_p: s.top_p, max_tokens: s.max_tokens,
      };
      try {
        for await (const event of streamEvents("/v1/chat/completions", body, controller.signal)) {
          if (event.usage) usage = event.usage;
          const choice = event.choices && event.choices[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) {
            message.content += choice.delta.content;
            pieces += 1;
          }
          if (choice.finish_reason) message.finish = choice.finish_reason;
          message.stats = { tokens: pieces, seconds: elapsed() };
          scheduleLive();
        }
        break;
      } catch (e) {
        const shorter = withoutOldestExchange(history);
        if (e.code !== "context_length_exceeded" || pieces > 0 || !shorter) throw e;
        history = shorter;
        dropped += 1;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") message.stopped = true;
    else message.error = e.message;
  } finally {
    message.streaming = false;
    message.stats = { tokens: usage ? usage.completion_tokens : pieces, seconds: elapsed() };
    if (dropped) message.dropped = dropped;
    state.controller = null;
    setBusy(false);
    saveChats();
    render();
  }
}

function send() {
  const text = $("input").value;
  if (!text.trim() || state.controller || !state.info || !state.info.chat) return;
  const chat = currentChat() || newChat();
  chat.messages.push(state.image ? { role: "user", content: text, image: state.image } : { role: "user", content: text });
  setImage(null);
  if (!chat.title) chat.title = text.trim().slice(0, 60);
  $("input").value = "";
  answer(chat);
}

function regenerate(chat) {
  if (state.controller) return;
  chat.messages.pop();
  answer(chat);
}

function startEdit(chat, index, view) {
  const area = el("textarea", { rows: 3, "aria-label": "Edit the message" });
  area.value = chat.messages[index].content;
  const resend = () => {
    if (!area.value.trim() || state.controller) return;
    const image = chat.messages[index].image;
    chat.messages = chat.messages.slice(0, index);
    chat.messages.push(image ? { role: "user", content: area.value, image } : { role: "user", content: area.value });
    answer(chat);
  };
  view.querySelector(".body").replaceWith(el("div", { className: "editor" }, area,
    el("div", { className: "row" },
      el("button", { type: "button", className: "primary resend", onclick: resend }, "Send"),
      el("button", { type: "button", onclick: renderMessages }, "Cancel"))));
  view.querySelector(".meta").remove();
  area.focus();
}

async function rate(chat, index, rating) {
  const m = chat.messages[index];
  try {
    await postJSON("/web/feedback", { messages: promptMessages(chat.messages.slice(0, index), m.system), answer: m.content, rating });
    m.rating = rating;
    m.feedbackError = null;
  } catch (e) {
    m.feedbackError = e.message;
  }
  saveChats();
  renderMessages();
}

// ------------------------------------------------------------------ images
function setImage(dataUrl) {
  state.image = dataUrl;
  $("attachment").hidden = !dataUrl;
  if (dataUrl) $("attachment-thumb").src = dataUrl;
  else $("attachment-thumb").removeAttribute("src");
  $("image-file").value = "";
}

function showNotice(text) {
  $("notice").replaceChildren(text);
  $("notice").hidden = false;
}

/** The image button of a model that takes images: the chosen file becomes a data URL (nothing is uploaded
 * until the message is sent, inside it). */
function initImages() {
  if (!state.info || !state.info.images) return;
  $("image-button").hidden = false;
  $("image-button").addEventListener("click", () => $("image-file").click());
  $("attachment-remove").addEventListener("click", () => setImage(null));
  $("image-file").addEventListener("change", () => {
    const file = $("image-file").files[0];
    if (!file) return;
    if (file.size > MAX_IMAGE_BYTES) {
      showNotice(`${file.name} is larger than 2 MB; choose a smaller image.`);
      setImage(null);
      return;
    }
    const reader = new FileReader();
    reader.onload = () => { $("notice").hidden = true; setImage(reader.result); };
    reader.readAsDataURL(file);
  });
}

// ------------------------------------------------------------------ start
function showBaseModelNotice() {
  const notice = $("notice");
  notice.replaceChildren(
    el("strong", {}, `“${state.info.model}” is a base model.`),
    " It was not trained with a chat format (gptlab sft, ppo or dpo), so it continues text rather than answering ",
    "messages. See what it predicts in the ", el("a", { href: "/explore" }, "Explorer"),
    ", sample from it on the ", el("a", { href: "/rank" }, "labeler's page"),
    " or through /v1/completions, or fine-tune it for chat with gptlab sft.");
  notice.hidden = false;
  $("input").disabled = true;
  $("send").disabled = true;
}

async function main() {
  state.info = await initPage();
  initSettings();
  initImages();
  if (state.current && !currentChat()) state.current = null;
  for (const m of state.chats.flatMap((c) => c.messages).filter((m) => m.streaming)) {
    m.streaming = false; // the page was closed while it streamed
    m.stopped = true;
  }
  $("new-chat").addEventListener("click", () => {
    if (state.controller) return;
    state.current = null;
    saveChats();
    render();
    $("input").focus();
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  if (state.info && !state.info.chat) showBaseModelNotice();
  render();
}

main();
