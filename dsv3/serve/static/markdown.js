// A small Markdown renderer for chat answers: fenced code blocks, inline code, headings, bold,
// italic, links (http/https only), lists, block quotes, paragraphs. Everything is HTML-escaped
// first, so model output can never inject markup. An unclosed fence (an answer still streaming)
// renders as a code block up to the end.
"use strict";

const Markdown = (() => {
  function escapeHtml(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
            .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  // inline: code spans first (their content is left alone), then links, bold, italic
  function inline(text) {
    const parts = text.split(/(`[^`\n]+`)/g);
    return parts.map((part, i) => {
      if (i % 2 === 1) return "<code>" + escapeHtml(part.slice(1, -1)) + "</code>";
      let s = escapeHtml(part);
      s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
                    (m, label, url) => `<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`);
      s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
      s = s.replace(/__([^_\n]+)__/g, "<strong>$1</strong>");
      s = s.replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>");
      s = s.replace(/(^|[^\w_])_([^_\n]+)_(?![\w])/g, "$1<em>$2</em>");
      return s;
    }).join("");
  }

  function codeBlock(lang, lines) {
    const cls = lang ? ` class="language-${escapeHtml(lang)}"` : "";
    const label = lang ? `<div class="code-lang">${escapeHtml(lang)}</div>` : "";
    return `<div class="code">${label}<pre><code${cls}>${escapeHtml(lines.join("\n"))}</code></pre></div>`;
  }

  function render(src) {
    const lines = src.replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let para = [];
    let list = null; // {type: "ul"|"ol", items: []}
    let quote = [];

    const flushPara = () => {
      if (para.length) out.push("<p>" + para.map(inline).join("<br>") + "</p>");
      para = [];
    };
    const flushList = () => {
      if (list) out.push(`<${list.type}>` + list.items.map(it => "<li>" + inline(it) + "</li>").join("") + `</${list.type}>`);
      list = null;
    };
    const flushQuote = () => {
      if (quote.length) out.push("<blockquote>" + render(quote.join("\n")) + "</blockquote>");
      quote = [];
    };
    const flushAll = () => { flushPara(); flushList(); flushQuote(); };

    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*(```|~~~)\s*([\w+#.-]*)\s*$/);
      if (fence) {
        flushAll();
        const body = [];
        i++;
        while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
        out.push(codeBlock(fence[2], body));
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      if (heading) {
        flushAll();
        const n = heading[1].length;
        out.push(`<h${n}>${inline(heading[2])}</h${n}>`);
        continue;
      }
      const q = line.match(/^>\s?(.*)$/);
      if (q) { flushPara(); flushList(); quote.push(q[1]); continue; }
      flushQuote();
      const ul = line.match(/^\s*[-*+]\s+(.*)$/);
      const ol = line.match(/^\s*\d+[.)]\s+(.*)$/);
      if (ul || ol) {
        flushPara();
        const type = ul ? "ul" : "ol";
        if (!list || list.type !== type) { flushList(); list = {type, items: []}; }
        list.items.push((ul || ol)[1]);
        continue;
      }
      if (/^\s*(---+|\*\*\*+)\s*$/.test(line)) { flushAll(); out.push("<hr>"); continue; }
      if (!line.trim()) { flushAll(); continue; }
      flushList();
      para.push(line);
    }
    flushAll();
    return out.join("\n");
  }

  return {render, escapeHtml};
})();
