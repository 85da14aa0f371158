// Talking to this server: JSON calls and the completions stream, with the key the page keeps.
// Every URL is on the page's own origin; the page's content security policy allows no other.

const KEY_STORAGE = "textcomplete.apiKey";

export function loadKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";   // storage disabled: the key lives in the field only
  }
}

export function saveKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage disabled
  }
}

/** A failure as the server's error envelope describes it (status, message, param), or a network failure. */
export class APIError extends Error {
  constructor(status, message, param = null, code = null) {
    super(message);
    this.status = status;
    this.param = param;
    this.code = code;
  }
}

function headers(key, json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

async function errorFrom(response) {
  let error = null;
  try {
    error = (await response.json()).error;
  } catch {
    // not an envelope (a proxy's page, say): fall back to the status line
  }
  if (error && typeof error.message === "string") {
    return new APIError(response.status, error.message, error.param ?? null, error.code ?? null);
  }
  return new APIError(response.status, `${response.status} ${response.statusText}`.trim());
}

async function send(path, key, init) {
  try {
    return await fetch(path, { ...init, headers: headers(key, init.body !== undefined), cache: "no-store" });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new APIError(0, `Cannot reach the server: ${err.message}`);
  }
}

/** GET or POST a JSON endpoint; resolves to the parsed body, or throws an APIError. */
export async function callJSON(path, key, body = undefined, signal = undefined) {
  const init = body === undefined ? { method: "GET", signal }
    : { method: "POST", body: JSON.stringify(body), signal };
  const response = await send(path, key, init);
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

/**
 * POST /v1/completions with stream: true, calling onEvent(chunk) for each event as it arrives.
 * An in-band error event (the stream had begun) is thrown as an APIError; aborting `signal` closes the
 * connection, which the server sees as a disconnect and aborts the request.
 */
export async function streamCompletion(body, key, signal, onEvent) {
  const response = await send("/v1/completions", key, { method: "POST", body: JSON.stringify(body), signal });
  if (!response.ok) throw await errorFrom(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new APIError(200, chunk.error.message, chunk.error.param ?? null, chunk.error.code);
      onEvent(chunk);
    }
  }
}
