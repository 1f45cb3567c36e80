// Shared by both portals: API calls (RFC 9457 problems become errors with their `code`; every call has
// a deadline), safe DOM building (text nodes only: no HTML from data), messages in plain words beside
// the control they concern, status messages for screen readers.

export const API = "/api/v1";
// Reads and most writes answer in well under a second; past this the page says so instead of hanging.
export const TIMEOUT_MS = 15000;

export class ApiProblem extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.code = problem.code || "http_error";
    this.problem = problem;
  }
}

// The request got no answer: the network failed, or the service did not answer in time. Whether a
// write took effect is unknown.
export class NoAnswer extends Error {}

// Integers beyond 2^53 (keyed nonces) must reach the signer exactly: keep them as decimal strings.
export function parseJson(text) {
  return JSON.parse(text, (key, value, context) =>
    typeof value === "number" && !Number.isSafeInteger(value) && context && /^\d+$/.test(context.source)
      ? context.source
      : value,
  );
}

export async function api(
  path,
  { method = "GET", body, token, apiKey, headers = {}, raw = false, timeout = TIMEOUT_MS } = {},
) {
  const sent = { ...headers };
  if (body !== undefined) sent["Content-Type"] = "application/json";
  if (token) sent.Authorization = `Bearer ${token}`;
  if (apiKey) sent["X-API-Key"] = apiKey;
  let response, text;
  try {
    response = await fetch(API + path, {
      method,
      headers: sent,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(timeout), // covers reading the body too
    });
    text = await response.text();
  } catch (error) {
    if (error.name === "TimeoutError") {
      throw new NoAnswer(`The service did not answer within ${Math.round(timeout / 1000)} seconds.`);
    }
    throw new NoAnswer("The service could not be reached. Check your connection.");
  }
  if (!response.ok) {
    let problem;
    try {
      problem = JSON.parse(text);
    } catch {
      problem = { title: response.statusText };
    }
    throw new ApiProblem(response.status, problem);
  }
  if (raw) return text;
  return text ? parseJson(text) : null;
}

export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function say(text, kind = "ok") {
  const status = document.getElementById("status");
  status.className = `status ${kind}`;
  status.textContent = text;
  delete status.dataset.code;
}

// What went wrong, in words for the person using the page. A problem's `code` is for programs: it
// stays out of the text (in `data-code`, for support and tests).
export function plain(error) {
  if (error instanceof ApiProblem) {
    // A failure of the service's: its reference finds the request in the service's log (for support).
    const reference = error.problem.request_id ? ` Reference: ${error.problem.request_id}.` : "";
    if (error.code === "chain_unavailable") {
      return `The ledger is not answering right now. Please try again in a few minutes.${reference}`;
    }
    if (error.status >= 500) return `The service ran into a problem. Please try again in a few minutes.${reference}`;
    return error.problem.title || error.message;
  }
  if (error instanceof NoAnswer) return `${error.message} Please try again in a few minutes.`;
  return error.message;
}

export function fail(error) {
  say(plain(error), "error");
  if (error instanceof ApiProblem) document.getElementById("status").dataset.code = error.code;
}

// The message area beside `target` (inside a form, as its last line; right after a button).
function noteFor(target) {
  const form = target instanceof HTMLFormElement;
  const existing = form ? target.querySelector(":scope > .note") : target.nextElementSibling;
  if (existing?.classList.contains("note")) return existing;
  const note = el("p", { class: "note", role: "alert" });
  if (form) target.append(note);
  else target.after(note);
  return note;
}

// Say `text` beside `target` (a form or a button); an empty text clears it.
export function tell(target, text, kind = "error") {
  const note = noteFor(target);
  note.className = `note ${kind}`;
  note.textContent = text;
  delete note.dataset.code;
  return note;
}

// A failure beside the control that caused it, in plain words.
export function failAt(target, error) {
  const note = tell(target, plain(error));
  if (error instanceof ApiProblem) note.dataset.code = error.code;
}

export function when(epoch) {
  return new Date(epoch * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

export function short(hex) {
  return hex && hex.length > 14 ? `${hex.slice(0, 8)}…${hex.slice(-6)}` : hex;
}

// Run `action` with `buttons` disabled, reporting a failure beside `target`.
async function whileBusy(buttons, target, action) {
  buttons.forEach((b) => (b.disabled = true));
  tell(target, "");
  try {
    await action();
  } catch (error) {
    failAt(target, error);
  } finally {
    buttons.forEach((b) => (b.disabled = false));
  }
}

// A form's submit handler that disables the form's buttons while it runs and reports failures in
// the form.
export function onSubmit(form, handler) {
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    whileBusy(form.querySelectorAll("button"), form, () => handler(new FormData(form)));
  });
}

// The same for a button outside a form; failures show right after it.
export function onClick(button, action) {
  button.addEventListener("click", () => whileBusy([button], button, action));
}

export const $ = (id) => document.getElementById(id);

// The display name of a reference-data key (purpose, attribute), or the key itself.
export function nameOf(items, key) {
  return items.find((item) => item.key === key)?.name ?? key;
}

// An access-log entry's outcome as a badge.
export function verdict(permitted) {
  return el("span", { class: `badge ${permitted ? "allowed" : "denied"}` }, permitted ? "allowed" : "denied");
}
