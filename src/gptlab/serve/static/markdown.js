// A small Markdown renderer for model answers. Safe by construction: every piece of the source is
// HTML-escaped before it is placed, and the only tags emitted are the fixed ones below; a link keeps
// its URL only for http(s), mailto, a same-site path or an anchor.
"use strict";

const HTML_ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => HTML_ESCAPES[c]);
}

function safeUrl(url) {
  return /^(https?:\/\/|mailto:|\/(?!\/)|#)/i.test(url);
}

/** Bold and italic on text that is already escaped (no tag or quote can be in it). */
function emphasis(escaped) {
  return escaped
    .replace(/\*\*(?=\S)(.*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/__(?=\S)(.*?\S)__/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*(?=[^\s*])(.*?[^\s*])\*(?![*\w])/g, "$1<em>$2</em>")
    .replace(/(^|[^_\w])_(?=[^\s_])(.*?[^\s_])_(?![_\w])/g, "$1<em>$2</em>");
}

const INLINE = /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|\[([^\]\n]+)\]\(([^()\s]+)\)/g;

/** One line or paragraph of text: code spans and links first, so their contents are never re-formatted. */
function renderInline(text) {
  let html = "";
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    html += emphasis(escapeHtml(text.slice(last, m.index)));
    if (m[1]) {
      html += `<code>${escapeHtml(m[2])}</code>`;
    } else if (safeUrl(m[4])) {
      html += `<a href="${escapeHtml(m[4])}" target="_blank" rel="noopener noreferrer">${emphasis(escapeHtml(m[3]))}</a>`;
    } else {
      html += emphasis(escapeHtml(m[0]));
    }
    last = m.index + m[0].length;
  }
  return html + emphasis(escapeHtml(text.slice(last)));
}

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const ITEM = /^ {0,3}([-*+]|\d{1,9}[.)])\s+(.*)$/;

/** Markdown source -> HTML: fenced code (also unclosed, while it streams), headings, lists, paragraphs. */
function renderMarkdown(source) {
  const lines = source.replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let paragraph = [];
  let list = null;

  const flushParagraph = () => {
    if (paragraph.length) out.push(`<p>${paragraph.map(renderInline).join("<br>")}</p>`);
    paragraph = [];
  };
  const flushList = () => {
    if (list) out.push(`<${list.tag}>${list.items.map((item) => `<li>${item.map(renderInline).join("<br>")}</li>`).join("")}</${list.tag}>`);
    list = null;
  };

  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      flushParagraph();
      flushList();
      const code = [];
      const marker = fence[1];
      while (++i < lines.length && !(lines[i].trim().startsWith(marker) && lines[i].trim().replace(/[`~]/g, "") === "")) {
        code.push(lines[i]);
      }
      const lang = fence[2] ? ` class="language-${escapeHtml(fence[2])}"` : "";
      out.push(`<pre><code${lang}>${escapeHtml(code.join("\n"))}</code></pre>`);
      continue;
    }
    if (!line.trim()) {
      flushParagraph();
      flushList();
      continue;
    }
    const heading = line.match(HEADING);
    if (heading) {
      flushParagraph();
      flushList();
      const level = heading[1].length;
      out.push(`<h${level}>${renderInline(heading[2])}</h${level}>`);
      continue;
    }
    const item = line.match(ITEM);
    if (item) {
      flushParagraph();
      const tag = /\d/.test(item[1]) ? "ol" : "ul";
      if (list && list.tag !== tag) flushList();
      if (!list) list = { tag, items: [] };
      list.items.push([item[2]]);
      continue;
    }
    if (list && /^\s+\S/.test(line)) {
      list.items[list.items.length - 1].push(line.trim());
      continue;
    }
    flushList();
    paragraph.push(line);
  }
  flushParagraph();
  flushList();
  return out.join("\n");
}
