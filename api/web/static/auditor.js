// The auditor portal: search the access log, verify it against the chain, export CSV. The API key
// stays in this tab's sessionStorage (gone when the tab closes).
import { $, api, el, fail, nameOf, onClick, onSubmit, say, short, verdict, when } from "/static/common.js";

const KEY = "consent-ledger.auditor-key";
const PAGE = 50;
// Verifying recomputes the whole hash chain from the chain's events and an export page holds up to
// 10,000 rows: both may take far longer than a search.
const SLOW_MS = 120000;
let apiKey = sessionStorage.getItem(KEY);
let nextAfter = null;
let purposes = [];
let attributes = [];

function query(extra = {}) {
  const form = new FormData($("filters"));
  const params = new URLSearchParams();
  for (const name of ["did", "partner", "purpose", "permitted"]) {
    const value = String(form.get(name) ?? "").trim();
    if (value) params.set(name, value);
  }
  for (const name of ["from", "to"]) {
    const value = form.get(name); // UTC, as the table shows times (the labels say so)
    if (value) params.set(name, new Date(`${value}Z`).toISOString());
  }
  for (const [name, value] of Object.entries(extra)) params.set(name, String(value));
  return params.toString();
}

function row(entry) {
  return el(
    "tr",
    { "data-index": entry.index },
    el("td", {}, entry.index),
    el("td", {}, el("time", { datetime: new Date(entry.block_time * 1000).toISOString() }, when(entry.block_time))),
    el("td", {}, el("code", { title: entry.did }, short(entry.did.split(":").pop()))),
    el("td", {}, entry.partner_name ?? short(entry.partner)),
    el("td", {}, nameOf(purposes, entry.purpose)),
    el("td", {}, entry.attributes.map((key) => nameOf(attributes, key)).join(", ")),
    el("td", {}, verdict(entry.permitted)),
    el("td", {}, el("code", { title: entry.tx_hash }, short(entry.tx_hash)), ` (block ${entry.block_number})`),
  );
}

async function search(append = false) {
  const page = await api(`/audit/accesses?${query({ limit: PAGE, after: append ? nextAfter : -1 })}`, { apiKey });
  const table = $("log");
  if (!append) {
    table.replaceChildren(
      el("caption", {}, "Accesses, in log order"),
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          ["#", "When", "Customer", "Partner", "Purpose", "Data", "Result", "Transaction"].map((h) =>
            el("th", { scope: "col" }, h),
          ),
        ),
      ),
      el("tbody", {}),
    );
  }
  table.querySelector("tbody").append(...page.entries.map(row));
  nextAfter = page.next_after;
  $("more").hidden = nextAfter === null;
  const shown = table.querySelectorAll("tbody tr").length;
  say(shown ? `${shown} entr${shown === 1 ? "y" : "ies"} shown.` : "No entries match.");
}

async function verify() {
  const result = await api("/audit/verify", { method: "POST", apiKey, timeout: SLOW_MS });
  const box = $("verification");
  if (result.ok) {
    box.replaceChildren(
      el("p", {}, el("span", { class: "badge ok" }, "verified"), ` ${result.chain_count} entries; the chain's head matches.`),
      el(
        "dl",
        { class: "facts" },
        el("dt", {}, "Head"),
        el("dd", {}, el("code", {}, result.chain_head)),
        el("dt", {}, "At block"),
        el("dd", {}, result.block_number),
        el("dt", {}, "Entries in this service's copy"),
        el("dd", {}, result.read_model_count),
      ),
    );
  } else {
    const d = result.divergence;
    box.replaceChildren(
      el("p", {}, el("span", { class: "badge denied" }, "divergence"), ` at entry ${d.index}: ${d.code}`),
      el("p", {}, d.detail),
    );
  }
  say(result.ok ? "The log verifies against the chain." : "The log does not verify: see the divergence.", result.ok ? "ok" : "error");
}

// The whole filtered log, however long: page after page (the API gives at most `data-page` rows, 10,000,
// at a time), each page's rows after the last one's index, in one file with one header line.
async function exportCsv() {
  const size = Number($("export").dataset.page);
  const parts = [];
  let after = -1;
  let rows = 0;
  for (;;) {
    const text = await api(`/audit/accesses?${query({ format: "csv", limit: size, after })}`, {
      apiKey,
      raw: true,
      timeout: SLOW_MS,
    });
    const lines = text.split("\r\n").filter((line) => line !== "");
    const [header, ...page] = lines;
    if (!parts.length) parts.push(`${header}\r\n`);
    if (page.length) parts.push(`${page.join("\r\n")}\r\n`);
    rows += page.length;
    if (page.length < size) break;
    after = Number(page[page.length - 1].split(",", 1)[0]); // the index column
    say(`Exporting: ${rows} rows so far …`);
  }
  const link = el("a", { href: URL.createObjectURL(new Blob(parts, { type: "text/csv" })), download: "accesses.csv" });
  document.body.append(link);
  link.click();
  link.remove();
  say(`CSV exported: ${rows} row${rows === 1 ? "" : "s"}.`);
}

const KEY_EVENTS = {
  bound: "key bound",
  recovery_started: "recovery started to",
  recovery_cancelled: "recovery cancelled (vetoed by the key, or replaced by a change it signed), was to",
};

async function keyHistory(did) {
  const events = await api(`/customers/${encodeURIComponent(did)}/keys`, { apiKey });
  $("key-history").replaceChildren(
    ...(events.length
      ? events.map((event) =>
          el(
            "li",
            { "data-event": event.event },
            el("time", { datetime: new Date(event.block_time * 1000).toISOString() }, when(event.block_time)),
            ` — ${KEY_EVENTS[event.event]} `,
            el("code", { title: event.key }, event.key),
            event.effective_at ? `, effective from ${when(event.effective_at)}` : "",
            el("div", { class: "muted" }, "transaction ", el("code", { title: event.tx_hash }, short(event.tx_hash))),
          ),
        )
      : [el("li", {}, "No key was ever bound to this DID.")]),
  );
}

async function enter() {
  const [partners, purposeList, attributeList] = await Promise.all([
    api("/partners", { apiKey }),
    api("/purposes", { apiKey }),
    api("/attributes", { apiKey }),
  ]);
  purposes = purposeList;
  attributes = attributeList;
  $("filter-partner").replaceChildren(
    el("option", { value: "" }, "any"),
    ...partners.map((p) => el("option", { value: p.name }, p.name)),
  );
  $("filter-purpose").replaceChildren(
    el("option", { value: "" }, "any"),
    ...purposes.map((p) => el("option", { value: p.key }, p.name)),
  );
  $("signin").hidden = true;
  $("audit").hidden = false;
  $("sign-out").hidden = false;
  await search();
  $("verify-title").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  onSubmit($("signin-form"), async (data) => {
    apiKey = String(data.get("key")).trim();
    await api("/audit/accesses?limit=1", { apiKey }); // refused unless the key is an auditor's
    sessionStorage.setItem(KEY, apiKey);
    $("signin-form").reset();
    await enter();
  });
  onSubmit($("filters"), () => search(false));
  onSubmit($("keys-form"), (data) => keyHistory(String(data.get("did")).trim()));
  onClick($("more"), () => search(true));
  onClick($("verify"), verify);
  onClick($("export"), exportCsv);
  $("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    apiKey = null;
    $("audit").hidden = true;
    $("signin").hidden = false;
    $("sign-out").hidden = true;
    say("Signed out.");
  });
  if (apiKey) enter().catch((error) => {
    sessionStorage.removeItem(KEY);
    apiKey = null;
    fail(error);
  });
});
