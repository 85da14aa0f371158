// The playground page: models, submit and stop, the run's figures, the code dialog, theme and keyboard.

import { APIError, callJSON, loadKey, saveKey, streamCompletion } from "./api.js";
import { clearErrors, initBias, requestBody, showError } from "./controls.js";
import { ChoiceView, Tooltip } from "./render.js";
import { LANGUAGES } from "./snippets.js";

const $ = (id) => document.getElementById(id);
const THEME_STORAGE = "textcomplete.theme";
const tooltip = new Tooltip($("tooltip"));
let running = null;   // the AbortController of the request under way
let language = "curl";

const key = () => $("api-key").value.trim();

// ----- models -----------------------------------------------------------------------------------------

let modelsAsked = 0;

async function loadModels() {
  const select = $("model");
  const previous = select.value;
  const asked = ++modelsAsked;
  try {
    const { data } = await callJSON("/v1/models", key());
    if (asked !== modelsAsked) return;   // the key changed meanwhile: a later answer decides
    select.replaceChildren(...data.map((m) => {
      const option = new Option(m.id, m.id);
      option.dataset.suffix = m.supports_suffix ? "1" : "";
      return option;
    }));
    if (data.some((m) => m.id === previous)) select.value = previous;
    $("err-api_key").hidden = true;
    $("api-key").removeAttribute("aria-invalid");
  } catch (err) {
    if (!(err instanceof APIError)) throw err;
    if (asked === modelsAsked) showError(err);
  }
  showSuffix();
}

function suffixShown() {
  const option = $("model").selectedOptions[0];
  return Boolean(option && option.dataset.suffix);
}

function showSuffix() {
  $("suffix-field").hidden = !suffixShown();
}

// ----- a run ------------------------------------------------------------------------------------------

function setRunning(controller) {
  running = controller;
  $("submit").disabled = Boolean(controller);
  $("stop").disabled = !controller;
  $("output").setAttribute("aria-busy", controller ? "true" : "false");
}

function localBody() {
  try {
    return requestBody(suffixShown());
  } catch (err) {
    if (!(err instanceof APIError)) throw err;
    showError(err);
    return null;
  }
}

async function submit() {
  if (running) return;
  clearErrors();
  tooltip.hide();
  const body = localBody();
  if (!body) return;
  const output = $("output");
  output.replaceChildren();
  output.dataset.state = "running";
  output.dataset.run = String(Number(output.dataset.run || 0) + 1);   // tells one run's end from the last's
  const count = typeof body.n === "number" && body.n > 1 ? Math.min(body.n, 128) : 1;
  output.style.setProperty("--columns", String(Math.min(count, 4)));
  const context = { prompt: body.prompt, suffix: body.suffix || "", echo: Boolean(body.echo),
    stops: body.stop || [] };
  const views = new Map();
  const view = (i) => {
    if (!views.has(i)) views.set(i, new ChoiceView(output, i, context, tooltip));
    return views.get(i);
  };
  for (let i = 0; i < count; i += 1) view(i);
  const run = { started: performance.now(), first: null, last: null, usage: null, fingerprint: null,
    streamed: Boolean(body.stream) };
  const take = (envelope) => {
    run.fingerprint = envelope.system_fingerprint ?? run.fingerprint;
    if (envelope.usage) run.usage = envelope.usage;
    for (const choice of envelope.choices) {
      if (choice.text || choice.logprobs?.tokens?.length) {
        run.last = performance.now();
        run.first ??= run.last;
      }
      view(choice.index).add(choice);
    }
  };
  const controller = new AbortController();
  setRunning(controller);
  try {
    if (body.stream) await streamCompletion(body, key(), controller.signal, take);
    else take(await callJSON("/v1/completions", key(), body, controller.signal));
    output.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      output.dataset.state = "stopped";
    } else {
      output.dataset.state = "error";
      showError(err instanceof APIError ? err : new APIError(0, String(err)));
    }
  } finally {
    run.ended = performance.now();
    setRunning(null);
    showStats(run, [...views.values()], output.dataset.state);
  }
}

function stop() {
  if (running) running.abort();
}

function seconds(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
}

function showStats(run, views, state) {
  const set = (name, value) => {
    document.querySelector(`[data-stat="${name}"]`).textContent = value;
  };
  const reasons = [...new Set(views.map((v) => v.finishReason).filter(Boolean))];
  set("finish", state === "stopped" ? "stopped (request aborted)" : state === "error" ? "error"
    : reasons.join(", ") || "—");
  const usage = run.usage;
  set("prompt_tokens", usage ? String(usage.prompt_tokens) : "—");
  set("cached_tokens", usage ? String(usage.prompt_tokens_details?.cached_tokens ?? 0) : "—");
  set("completion_tokens", usage ? String(usage.completion_tokens) : "—");
  set("total_tokens", usage ? String(usage.total_tokens) : "—");
  set("ttft", run.streamed && run.first !== null ? seconds(run.first - run.started) : "—");
  let rate = "—";
  if (usage && run.streamed && run.last > run.first && usage.completion_tokens > views.length) {
    rate = ((usage.completion_tokens - views.length) / ((run.last - run.first) / 1000)).toFixed(1);
  } else if (usage && !run.streamed && run.ended > run.started) {
    rate = (usage.completion_tokens / ((run.ended - run.started) / 1000)).toFixed(1);
  }
  set("rate", rate);
  set("elapsed", seconds(run.ended - run.started));
  set("fingerprint", run.fingerprint ?? "—");
  $("run-stats").hidden = false;
}

// ----- view code --------------------------------------------------------------------------------------

function renderCode() {
  const body = localBody();
  if (!body) return false;
  const withKey = $("code-key").checked ? key() : "";
  $("code").firstElementChild.textContent = LANGUAGES[language](body, `${location.origin}/v1`, withKey);
  $("code-copied").textContent = "";
  return true;
}

function selectTab(tab) {
  language = tab.dataset.lang;
  for (const t of document.querySelectorAll('[role="tab"]')) {
    t.setAttribute("aria-selected", t === tab ? "true" : "false");
    t.tabIndex = t === tab ? 0 : -1;
  }
  $("code").setAttribute("aria-labelledby", tab.id);
  renderCode();
}

async function copyCode() {
  const text = $("code").textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const range = document.createRange();   // no clipboard API (not a secure context): select and copy
    range.selectNodeContents($("code"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    document.execCommand("copy");
  }
  $("code-copied").textContent = "Copied";
}

function initCode() {
  $("view-code").addEventListener("click", () => {
    clearErrors();
    if (renderCode()) $("code-dialog").showModal();
  });
  $("code-close").addEventListener("click", () => $("code-dialog").close());
  $("code-copy").addEventListener("click", copyCode);
  $("code-key").addEventListener("change", renderCode);
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (!step) return;
      const next = tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length];
      next.focus();
      selectTab(next);
    });
  }
}

// ----- theme, key, keyboard -----------------------------------------------------------------------------

function applyTheme(value) {
  if (value === "light" || value === "dark") document.documentElement.dataset.theme = value;
  else delete document.documentElement.dataset.theme;
}

function initTheme() {
  let saved = "auto";
  try {
    saved = localStorage.getItem(THEME_STORAGE) || "auto";
  } catch {
    // storage disabled
  }
  $("theme").value = saved;
  applyTheme(saved);
  $("theme").addEventListener("change", () => {
    applyTheme($("theme").value);
    try {
      localStorage.setItem(THEME_STORAGE, $("theme").value);
    } catch {
      // storage disabled
    }
  });
}

function initKeyboard() {
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      if (!$("code-dialog").open) $("form").requestSubmit();
    } else if (e.key === "Escape") {
      tooltip.hide();
      if (running && !$("code-dialog").open) {
        e.preventDefault();
        stop();
      }
    }
  });
}

function init() {
  initTheme();
  $("api-key").value = loadKey();
  $("api-key").addEventListener("input", () => saveKey(key()));
  $("api-key").addEventListener("change", loadModels);
  $("model").addEventListener("change", showSuffix);
  $("form").addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
  $("stop").addEventListener("click", stop);
  window.addEventListener("resize", () => tooltip.follow());
  window.addEventListener("scroll", () => tooltip.follow(), { passive: true });
  initBias(key);
  initCode();
  initKeyboard();
  loadModels().finally(() => {
    document.body.dataset.ready = "true";
  });
}

init();
