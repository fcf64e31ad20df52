// dgemma playground logic: send one streaming request with draft events on, parse the SSE stream by hand (fetch +
// ReadableStream: EventSource cannot POST), and render every "dgemma.draft" event as a grid of the canvas's argmax
// tokens with the sampler's accepted positions highlighted (and, under a constraint, the positions a template pins
// and those the constraint forces or narrows). `window.dgemmaPlayground` exposes the progress so the headless-browser
// test can check that the canvas fills in.
"use strict";

const $ = (id) => document.getElementById(id);
const KNOBS = ["max_tokens", "seed", "max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
  "confidence_threshold", "top_k", "top_p"];
const INTEGER = new Set(["max_tokens", "seed", "max_denoising_steps", "stability_threshold", "top_k"]);
const state = window.dgemmaPlayground = {};
let controller = null;

function reset() {
  Object.assign(state, { running: true, done: false, error: null, drafts: 0, trace: [], marks: [], text: "",
    tokens: 0, steps: 0, canvases: 0, finishReason: null, started: performance.now() });
  $("canvas").replaceChildren();
  $("bars").replaceChildren();
  $("output").replaceChildren();
  $("history").textContent = "";
  $("error").textContent = "";
  for (const id of ["s_canvas", "s_step", "s_accepted", "s_tps", "s_finish"]) $(id).textContent = "\u2013";
  $("s_steps").textContent = "0";
  $("s_tokens").textContent = "0";
}

function authHeaders() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function knobValues() {
  const out = {};
  for (const k of KNOBS) {
    const raw = $(k).value.trim();
    if (raw !== "") out[k] = INTEGER.has(k) ? parseInt(raw, 10) : parseFloat(raw);
  }
  return out;
}

// The constraint as vLLM's structured_outputs field (plus dgemma's template), or {} for none.
function constraintField() {
  const kind = $("constraint_kind").value;
  const text = $("constraint").value;
  if (!kind) return {};
  let value = text;
  if (kind === "json") {
    try { value = JSON.parse(text); } catch (e) { throw new Error("the JSON schema is not valid JSON: " + e.message); }
  } else if (kind === "choice") {
    value = text.split("\n").filter((line) => line !== "");
  }
  return { structured_outputs: { [kind]: value } };
}

// Make whitespace and control characters visible in a cell (Unicode control pictures); the text is set with textContent, never as HTML.
function visible(piece) {
  if (piece === "") return "\u2205";
  return piece.replace(/ /g, "\u00b7").replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192")
    .replace(/[\x00-\x1f\x7f]/g, (c) => String.fromCharCode(c === "\x7f" ? 0x2421 : 0x2400 + c.charCodeAt(0)));
}

function renderDraft(d) {
  const grid = $("canvas");
  if (grid.children.length !== d.tokens.length) {
    grid.replaceChildren(...d.tokens.map(() => Object.assign(document.createElement("div"), { className: "cell" })));
    grid.style.gridTemplateColumns = `repeat(${Math.min(16, d.tokens.length)}, minmax(0, 1fr))`;
  }
  let accepted = 0;
  const marks = { pinned: 0, forced: 0, constrained: 0 };
  d.tokens.forEach((piece, i) => {
    const cell = grid.children[i];
    cell.textContent = visible(piece);
    cell.title = `position ${i}: token ${d.token_ids[i]} ${JSON.stringify(piece)}`;
    cell.className = d.accepted[i] ? "cell accepted" : "cell";
    if (d.accepted[i]) accepted++;
    if (!d.allowed) return;  // unconstrained request
    const mark = d.pinned[i] ? "pinned" : d.allowed[i] === 1 ? "forced"
      : d.allowed[i] < d.vocab_size / 2 ? "constrained" : null;
    if (mark) { cell.classList.add(mark); marks[mark]++; }
    cell.title += d.pinned[i] ? " \u2013 pinned by the template"
      : ` \u2013 ${d.allowed[i]} of ${d.vocab_size} tokens allowed`;
  });
  state.marks.push(marks);
  const bars = $("bars");  // accepted positions per step of this canvas: rising bars = the canvas filling in
  if (d.step === 1) bars.replaceChildren();
  const bar = Object.assign(document.createElement("div"), { className: "bar", title: `step ${d.step}: ${accepted}` });
  bar.style.height = `${Math.max(4, (100 * accepted) / d.tokens.length)}%`;
  bars.appendChild(bar);
  state.drafts++;
  state.steps++;
  state.trace.push([d.canvas, d.step, accepted]);  // [canvas, step, accepted positions]
  $("s_canvas").textContent = d.canvas + 1;
  $("s_step").textContent = d.step;
  $("s_accepted").textContent = `${accepted}/${d.tokens.length}`;
  $("s_steps").textContent = state.steps;
}

function appendText(text) {
  const out = $("output");
  for (const old of out.querySelectorAll(".fresh")) old.classList.remove("fresh");
  out.appendChild(Object.assign(document.createElement("span"), { className: "fresh", textContent: text }));
  state.text += text;
  for (const cell of $("canvas").children) cell.classList.add("committed");
}

function updateRate() {
  const secs = (performance.now() - state.started) / 1000;
  $("s_tokens").textContent = state.tokens;
  if (secs > 0) $("s_tps").textContent = (state.tokens / secs).toFixed(1);
}

function handle(obj) {
  if (obj.error) throw new Error(obj.error.message);
  if (obj.object === "dgemma.draft") return renderDraft(obj.dgemma);
  if (obj.usage) { state.tokens = obj.usage.completion_tokens; updateRate(); }
  const choice = (obj.choices || [])[0];
  if (!choice) return;
  const text = choice.delta ? choice.delta.content : choice.text;
  if (text) {
    state.canvases++;
    if (obj.dgemma && obj.dgemma.tokens) state.tokens += obj.dgemma.tokens;
    appendText(text);
    updateRate();
  }
  if (choice.finish_reason) {
    state.finishReason = choice.finish_reason;
    $("s_finish").textContent = choice.finish_reason;
    if (obj.dgemma) $("history").textContent = obj.dgemma.steps_per_canvas.join(" \u00b7 ") +
      `   (${obj.dgemma.tokens_per_forward} tokens per step)`;
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// The chosen image as a data: URL (sent as an OpenAI image_url part), or null.
function imageDataUrl() {
  const file = $("image") && $("image").files[0];
  if (!file) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("cannot read the image file"));
    reader.readAsDataURL(file);
  });
}

async function run() {
  reset();
  controller = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  const chat = $("mode").value === "chat";
  const prompt = $("prompt").value;
  const delay = parseInt($("delay").value || "0", 10);
  try {
    const image = chat ? await imageDataUrl() : null;
    const content = image ? [{ type: "image_url", image_url: { url: image } }, { type: "text", text: prompt }] : prompt;
    const body = Object.assign(chat ? { messages: [{ role: "user", content }] } : { prompt }, knobValues(),
      constraintField(),
      { stream: true, stream_options: { include_usage: true }, dgemma: { drafts: true } });
    const res = await fetch(chat ? "/v1/chat/completions" : "/v1/completions",
      { method: "POST", headers: authHeaders(), body: JSON.stringify(body), signal: controller.signal });
    if (!res.ok) {
      const err = await res.json().catch(() => ({ error: { message: res.statusText } }));
      throw new Error(`${res.status}: ${err.error.message}`);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") { state.done = true; continue; }
          const obj = JSON.parse(data);
          handle(obj);
          if (delay > 0 && obj.object === "dgemma.draft") await sleep(delay);
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") { state.error = String(e.message || e); $("error").textContent = state.error; }
  } finally {
    state.running = false;
    updateRate();
    $("run").disabled = false;
    $("stop").disabled = true;
  }
}

async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: authHeaders() });
    const data = await res.json();
    $("model").textContent = res.ok ? data.data.map((m) => `${m.id} \u00b7 max_model_len ${m.max_model_len}`).join(", ")
      : "models: " + data.error.message;
  } catch (e) { $("model").textContent = "server unreachable"; }
}

$("run").addEventListener("click", run);
$("stop").addEventListener("click", () => controller && controller.abort());
$("api_key").addEventListener("change", loadModel);
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(); });
loadModel();
