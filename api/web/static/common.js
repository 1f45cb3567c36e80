// Shared by both portals: API calls (RFC 9457 problems become errors with their `code`), safe DOM
// building (text nodes only: no HTML from data), status messages for screen readers.

export const API = "/api/v1";

export class ApiProblem extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.code = problem.code || "http_error";
    this.problem = problem;
  }
}

// Integers beyond 2^53 (keyed nonces) must reach the signer exactly: keep them as decimal strings.
export function parseJson(text) {
  return JSON.parse(text, (key, value, context) =>
    typeof value === "number" && !Number.isSafeInteger(value) && context && /^\d+$/.test(context.source)
      ? context.source
      : value,
  );
}

export async function api(path, { method = "GET", body, token, apiKey, headers = {}, raw = false } = {}) {
  const sent = { ...headers };
  if (body !== undefined) sent["Content-Type"] = "application/json";
  if (token) sent.Authorization = `Bearer ${token}`;
  if (apiKey) sent["X-API-Key"] = apiKey;
  const response = await fetch(API + path, {
    method,
    headers: sent,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
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
}

export function fail(error) {
  const code = error instanceof ApiProblem ? ` (${error.code})` : "";
  say(`${error.message}${code}`, "error");
}

export function when(epoch) {
  return new Date(epoch * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

export function short(hex) {
  return hex && hex.length > 14 ? `${hex.slice(0, 8)}…${hex.slice(-6)}` : hex;
}

// Run `action` with `buttons` disabled, reporting a failure in the status region.
async function whileBusy(buttons, action) {
  buttons.forEach((b) => (b.disabled = true));
  try {
    await action();
  } catch (error) {
    fail(error);
  } finally {
    buttons.forEach((b) => (b.disabled = false));
  }
}

// A form's submit handler that disables the form's buttons while it runs and reports failures.
export function onSubmit(form, handler) {
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    whileBusy(form.querySelectorAll("button"), () => handler(new FormData(form)));
  });
}

// The same for a button outside a form.
export function onClick(button, action) {
  button.addEventListener("click", () => whileBusy([button], action));
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
