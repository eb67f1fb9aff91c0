// The dsv3 chat page: a multi-turn conversation with the server's /v1/chat/completions, streamed
// over server-sent events read from fetch(), with a stop button (AbortController), a system
// prompt, temperature and max-tokens controls, and the conversation and settings kept in
// localStorage so a reload brings them back.
"use strict";

const STORE_CHAT = "dsv3.chat.messages";
const STORE_SETTINGS = "dsv3.chat.settings";

const $ = (id) => document.getElementById(id);
const els = {
  messages: $("messages"), input: $("input"), send: $("send"), stop: $("stop"), status: $("status"),
  composer: $("composer"), system: $("system-prompt"), temperature: $("temperature"),
  temperatureValue: $("temperature-value"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
  settings: $("settings"), toggleSettings: $("toggle-settings"), newChat: $("new-chat"), modelName: $("model-name"),
};

let conversation = load(STORE_CHAT, []); // [{role, content, stopped?, error?}]
let model = null;
let controller = null; // AbortController of the answer being streamed

function load(key, fallback) {
  try { const v = JSON.parse(localStorage.getItem(key)); return v ?? fallback; } catch { return fallback; }
}
function save() { localStorage.setItem(STORE_CHAT, JSON.stringify(conversation)); }
function saveSettings() {
  localStorage.setItem(STORE_SETTINGS, JSON.stringify({
    system: els.system.value, temperature: els.temperature.value, maxTokens: els.maxTokens.value,
    apiKey: els.apiKey.value,
  }));
}
function restoreSettings() {
  const s = load(STORE_SETTINGS, {});
  if (s.system !== undefined) els.system.value = s.system;
  if (s.temperature !== undefined) els.temperature.value = s.temperature;
  if (s.maxTokens !== undefined) els.maxTokens.value = s.maxTokens;
  if (s.apiKey !== undefined) els.apiKey.value = s.apiKey;
  els.temperatureValue.textContent = els.temperature.value;
}

function headers() {
  const h = {"Content-Type": "application/json"};
  if (els.apiKey.value) h["Authorization"] = "Bearer " + els.apiKey.value;
  return h;
}

// ---- rendering ----------------------------------------------------------------------------
function messageNode(msg) {
  const node = document.createElement("div");
  node.className = `msg ${msg.role}`;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = msg.role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "content";
  node.append(role, body);
  fill(node, msg);
  return node;
}

function fill(node, msg) {
  const body = node.querySelector(".content");
  if (msg.role === "assistant") body.innerHTML = Markdown.render(msg.content || "");
  else body.textContent = msg.content;
  node.classList.toggle("stopped", !!msg.stopped);
  node.classList.toggle("error", !!msg.error);
  let note = node.querySelector(".note");
  const text = msg.error ? "Error: " + msg.error : msg.stopped ? "(stopped)" : "";
  if (text && !note) { note = document.createElement("div"); note.className = "note"; node.append(note); }
  if (note) note.textContent = text;
}

function renderAll() {
  els.messages.replaceChildren(...conversation.map(messageNode));
  els.messages.scrollTop = els.messages.scrollHeight;
}

function setBusy(busy) {
  els.send.hidden = busy;
  els.stop.hidden = !busy;
  els.input.disabled = false;
}

// ---- server-sent events from a fetch body --------------------------------------------------
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter(l => l.startsWith("data:")).map(l => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

async function errorText(response) {
  try { const body = await response.json(); return body.error?.message || response.statusText; }
  catch { return `${response.status} ${response.statusText}`; }
}

// ---- sending ------------------------------------------------------------------------------
async function send(text) {
  conversation.push({role: "user", content: text});
  const answer = {role: "assistant", content: ""};
  conversation.push(answer);
  save();
  renderAll();
  const node = els.messages.lastElementChild;
  node.classList.add("streaming");

  const messages = [];
  if (els.system.value.trim()) messages.push({role: "system", content: els.system.value});
  for (const m of conversation.slice(0, -1)) if (!m.error) messages.push({role: m.role, content: m.content});

  controller = new AbortController();
  setBusy(true);
  els.status.textContent = "generating…";
  const body = {
    messages, stream: true, temperature: Number(els.temperature.value),
    max_tokens: Math.max(1, parseInt(els.maxTokens.value, 10) || 512),
  };
  if (model) body.model = model;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of sseEvents(response)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      const delta = event.choices?.[0]?.delta;
      if (delta?.content) {
        answer.content += delta.content;
        fill(node, answer);
        els.messages.scrollTop = els.messages.scrollHeight;
      }
      const reason = event.choices?.[0]?.finish_reason;
      if (reason) els.status.textContent = `finished: ${reason}`;
    }
  } catch (err) {
    if (err.name === "AbortError") { answer.stopped = true; els.status.textContent = "stopped"; }
    else { answer.error = err.message; els.status.textContent = "error"; }
  } finally {
    controller = null;
    node.classList.remove("streaming");
    fill(node, answer);
    save();
    setBusy(false);
    els.input.focus();
  }
}

// ---- wiring -------------------------------------------------------------------------------
els.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = els.input.value.trim();
  if (!text || controller) return;
  els.input.value = "";
  send(text);
});
els.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); els.composer.requestSubmit(); }
});
els.stop.addEventListener("click", () => { if (controller) controller.abort(); });
els.newChat.addEventListener("click", () => {
  if (controller) controller.abort();
  conversation = [];
  save();
  renderAll();
  els.status.textContent = "";
});
els.toggleSettings.addEventListener("click", () => {
  els.settings.hidden = !els.settings.hidden;
  els.toggleSettings.setAttribute("aria-expanded", String(!els.settings.hidden));
});
els.temperature.addEventListener("input", () => { els.temperatureValue.textContent = els.temperature.value; });
for (const el of [els.system, els.temperature, els.maxTokens, els.apiKey]) el.addEventListener("change", saveSettings);

async function loadModel() {
  try {
    const response = await fetch("/v1/models", {headers: headers()});
    if (!response.ok) { els.status.textContent = await errorText(response); return; }
    const data = await response.json();
    model = data.data?.[0]?.id ?? null;
    els.modelName.textContent = model ? "· " + model : "";
  } catch (err) { els.status.textContent = "server unreachable"; }
}

restoreSettings();
renderAll();
loadModel();
els.apiKey.addEventListener("change", loadModel);
