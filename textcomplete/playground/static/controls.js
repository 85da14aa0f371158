// The settings: reading the controls into a request body, the logit_bias rows with their token lookup,
// and showing an error envelope's message at the control its `param` names.

import { APIError, callJSON } from "./api.js";

const $ = (id) => document.getElementById(id);

/** "\n", "\t", "\r" and "\\" typed into a one-line field, as the characters they name. */
export function unescape(text) {
  return text.replace(/\\([ntr\\])/g, (_, c) => ({ n: "\n", t: "\t", r: "\r", "\\": "\\" })[c]);
}

function number(id) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = Number(raw);
  return Number.isNaN(value) ? raw : value;   // the server names what is wrong with it
}

function seed() {
  const value = number("seed");
  if (typeof value === "number" && Number.isInteger(value) && !Number.isSafeInteger(value)) {
    throw new APIError(0, "A browser cannot send this seed exactly: use one between -(2^53-1) and 2^53-1.", "seed");
  }
  return value;
}

/** The request body the controls describe; fields left at the server's defaults are left out. */
export function requestBody(suffixShown) {
  const body = { model: $("model").value, prompt: $("prompt").value };
  const suffix = $("suffix").value;
  if (suffixShown && suffix) body.suffix = suffix;
  const maxTokens = number("max_tokens");
  body.max_tokens = maxTokens === undefined ? null : maxTokens;
  const optional = [["temperature", undefined], ["top_p", 1], ["n", 1], ["best_of", undefined],
    ["presence_penalty", 0], ["frequency_penalty", 0]];
  for (const [name, fallback] of optional) {
    const value = number(name);
    if (value !== undefined && value !== fallback) body[name] = value;
  }
  const stops = [1, 2, 3, 4].map((i) => $(`stop-${i}`).value).filter((s) => s !== "").map(unescape);
  if (stops.length) body.stop = stops;
  const s = seed();
  if (s !== undefined) body.seed = s;
  if ($("logprobs").value !== "") body.logprobs = Number($("logprobs").value);
  if ($("echo").checked) body.echo = true;
  const bias = logitBias();
  if (Object.keys(bias).length) body.logit_bias = bias;
  if ($("user").value) body.user = $("user").value;
  // best_of above n cannot stream (the best are known only at the end): that request is sent whole.
  if (!(typeof body.best_of === "number" && body.best_of > (body.n ?? 1))) {
    body.stream = true;
    body.stream_options = { include_usage: true };
  }
  return body;
}

// ----- errors ---------------------------------------------------------------------------------------

const FIELDS = ["api_key", "prompt", "suffix", "model", "max_tokens", "temperature", "top_p", "n", "best_of",
  "stop", "presence_penalty", "frequency_penalty", "seed", "logprobs", "echo", "logit_bias", "user"];

/** Which control an error belongs to: the key for 401/403, the field `param` names, else the form. */
export function fieldOf(error) {
  if (error.status === 401 || error.status === 403) return "api_key";
  const name = (error.param || "").split(/[.[]/)[0];
  return FIELDS.includes(name) ? name : "general";
}

export function showError(error, field = fieldOf(error)) {
  const box = $(`err-${field}`);
  box.textContent = error.message;
  box.hidden = false;
  const control = box.closest(".field")?.querySelector("input, select, textarea");
  if (control) control.setAttribute("aria-invalid", "true");
  if (field !== "general") $("err-general").hidden = true;
  box.scrollIntoView({ block: "nearest" });
}

export function clearErrors() {
  for (const box of document.querySelectorAll(".field-error")) {
    box.hidden = true;
    box.textContent = "";
  }
  for (const c of document.querySelectorAll("[aria-invalid]")) c.removeAttribute("aria-invalid");
}

// ----- logit_bias -----------------------------------------------------------------------------------

function logitBias() {
  const bias = {};
  for (const row of $("bias-rows").rows) {
    const id = row.querySelector(".bias-id").value.trim();
    const value = row.querySelector(".bias-value").value.trim();
    if (id === "" || value === "") continue;
    const amount = Number(value);
    bias[id] = Number.isNaN(amount) ? value : amount;
  }
  return bias;
}

function addBiasRow(id = "", piece = "", bias = "0") {
  const row = document.createElement("tr");
  const idInput = Object.assign(document.createElement("input"), { type: "number", className: "bias-id",
    value: String(id), min: "0", step: "1", inputMode: "numeric" });
  idInput.setAttribute("aria-label", "token id");
  const pieceCell = Object.assign(document.createElement("td"), { className: "piece", textContent: piece });
  const biasInput = Object.assign(document.createElement("input"), { type: "number", className: "bias-value",
    value: bias, min: "-100", max: "100", step: "1", inputMode: "decimal" });
  const remove = Object.assign(document.createElement("button"), { type: "button", textContent: "×" });
  remove.setAttribute("aria-label", "remove this token");
  remove.addEventListener("click", () => row.remove());
  idInput.addEventListener("change", () => describeToken(idInput, pieceCell));
  const cells = [idInput, null, biasInput, remove].map((child) => {
    if (child === null) return pieceCell;
    const td = document.createElement("td");
    td.append(child);
    return td;
  });
  row.append(...cells);
  $("bias-rows").append(row);
  biasInput.setAttribute("aria-label", piece ? `bias for ${JSON.stringify(piece)}` : "bias");
  return biasInput;
}

async function describeToken(idInput, pieceCell) {
  pieceCell.textContent = "";
  const id = Number(idInput.value);
  if (idInput.value === "" || !Number.isInteger(id)) return;
  try {
    pieceCell.textContent = JSON.stringify((await callJSON("/detokenize", currentKey(), { tokens: [id] })).prompt);
  } catch (err) {
    pieceCell.textContent = "?";
    if (err instanceof APIError) showError(err, "logit_bias");
  }
}

let currentKey = () => "";

async function lookUp() {
  const text = unescape($("bias-text").value);
  if (!text) return;
  $("err-logit_bias").hidden = true;
  try {
    const { tokens } = await callJSON("/tokenize", currentKey(), { prompt: text, add_special_tokens: false });
    let last = null;
    for (const id of tokens) {
      const { prompt } = await callJSON("/detokenize", currentKey(), { tokens: [id] });
      last = addBiasRow(id, JSON.stringify(prompt));
    }
    if (last) {
      last.focus();
      last.select();
    }
  } catch (err) {
    if (err instanceof APIError) showError(err, "logit_bias");
    else throw err;
  }
}

/** Wire the logit_bias controls; `key()` gives the API key the lookups send. */
export function initBias(key) {
  currentKey = key;
  $("bias-lookup").addEventListener("click", lookUp);
  $("bias-text").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.ctrlKey && !e.metaKey) {
      e.preventDefault();
      lookUp();
    }
  });
  $("bias-add").addEventListener("click", () => {
    addBiasRow();
    $("bias-rows").lastElementChild.querySelector(".bias-id").focus();
  });
}
