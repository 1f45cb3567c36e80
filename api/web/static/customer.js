// The customer portal. The private key is made (or imported) here and kept in localStorage only
// encrypted (AES-GCM under a PBKDF2-derived key from the customer's passphrase); unlocked, it lives in
// this page's memory. Every change is an EIP-712 message the customer signs; the API checks it.
import { ethers } from "/static/vendor/ethers.min.js";
import {
  $,
  ApiProblem,
  NoAnswer,
  api,
  el,
  fail,
  failAt,
  nameOf,
  onClick,
  onSubmit,
  plain,
  say,
  short,
  tell,
  verdict,
  when,
} from "/static/common.js";

// The sealed keys this browser holds, the one signed in with last first: [{address, did, salt, iv,
// sealed}]. A key is added only once the service has bound it (claim) or signed it in (import), and
// none is replaced by another: a customer who claims a second account keeps the first one's key.
const KEYS = "consent-ledger.keys";
const LEGACY = "consent-ledger.key"; // the single key that pages before kept; moved into KEYS
// A claim under way: its sealed key and the signed binding request (with the claim code), written
// before the request is sent, so that a reload or a lost answer cannot lose a key the service bound.
// It is promoted into KEYS once the binding is confirmed, and dropped once it is refused.
const PENDING = "consent-ledger.pending";
// A recovery under way (issue 32): the new key, sealed, with its DID and the recovery code that starts
// and then completes it; written before the recovery is started, promoted into KEYS once it completes.
const RECOVERING = "consent-ledger.recovering";
const PBKDF2_ROUNDS = 600000; // OWASP's 2023 figure for PBKDF2-HMAC-SHA256
// Binding waits for a transaction to be mined and indexed; a claim whose answer does not come in time
// stays pending and is finished by sending the same request again.
const BIND_TIMEOUT_MS = 60000;
// The binding route refuses a repeat with these while the first request is still being mined, or
// when another key took the DID: the DID's document tells which.
const UNSETTLED = new Set(["invalid_claim_code", "claim_code_used", "already_bound"]);
const BIND_GRACE_S = 300; // a request sent before its deadline has settled this long after it
const CLAIM_WORDS = {
  unknown_customer: "There is no customer with that DID. Check it against the message we sent you.",
  invalid_claim_code: "That claim code does not match this DID. Check both against the message we sent you.",
};
let wallet = null;
let session = null; // { token, did }
let reference = null; // { partners, purposes, attributes }
let pollTimer = null;
// Consent changes are signed one after another: each takes the next nonce (the customer's route takes
// one signed change at a time, and `prepare` gives the next nonce after those already accepted), so
// two prepared at once would collide. A choice shows what the customer set while it is queued.
let queue = Promise.resolve();
const busy = new Map(); // choice or category id -> "on" | "off", while queued or in flight
const notes = new Map(); // choice id -> { text, fresh }: why its last change was not made
const tracked = new Map(); // choice id -> accepted request id, until the ledger has applied or refused it
const opened = new Set(); // the "Which data" disclosures the customer opened (kept across re-renders)
// What a purpose that is not the customer's to grant shows instead of a switch, by legal basis.
const FIXED = {
  contract: "Always on: needed for the service",
  legal_obligation: "Always on: required by law",
  legitimate_interests: "On: our legitimate interests",
};

const enc = encodeURIComponent;
const b64 = (bytes) => btoa(String.fromCharCode(...new Uint8Array(bytes)));
const unb64 = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));

// key storage ------------------------------------------------------------------------------------

async function wrappingKey(passphrase, salt) {
  const material = await crypto.subtle.importKey("raw", new TextEncoder().encode(passphrase), "PBKDF2", false, [
    "deriveKey",
  ]);
  return crypto.subtle.deriveKey(
    { name: "PBKDF2", salt, iterations: PBKDF2_ROUNDS, hash: "SHA-256" },
    material,
    { name: "AES-GCM", length: 256 },
    false,
    ["encrypt", "decrypt"],
  );
}

async function seal(privateKey, passphrase) {
  const salt = crypto.getRandomValues(new Uint8Array(16));
  const iv = crypto.getRandomValues(new Uint8Array(12));
  const sealed = await crypto.subtle.encrypt(
    { name: "AES-GCM", iv },
    await wrappingKey(passphrase, salt),
    ethers.getBytes(privateKey),
  );
  return { address: new ethers.Wallet(privateKey).address, salt: b64(salt), iv: b64(iv), sealed: b64(sealed) };
}

function readJson(name) {
  try {
    return JSON.parse(localStorage.getItem(name));
  } catch {
    return null;
  }
}

const same = (a, b) => a.toLowerCase() === b.toLowerCase();

function storedKeys() {
  const keys = readJson(KEYS);
  const held = Array.isArray(keys) ? keys : [];
  const legacy = readJson(LEGACY);
  if (legacy?.address && !held.some((k) => same(k.address, legacy.address))) held.push(legacy);
  return held;
}

// Keep `entry` as the first key, beside every other one.
function keepKey(entry) {
  const others = storedKeys().filter((k) => !same(k.address, entry.address));
  localStorage.setItem(KEYS, JSON.stringify([entry, ...others]));
  localStorage.removeItem(LEGACY); // its key is in KEYS now
}

async function unlock(entry, passphrase) {
  let plain;
  try {
    const key = await wrappingKey(passphrase, unb64(entry.salt));
    plain = await crypto.subtle.decrypt({ name: "AES-GCM", iv: unb64(entry.iv) }, key, unb64(entry.sealed));
  } catch {
    throw new Error("That passphrase does not unlock this key.");
  }
  return new ethers.Wallet(ethers.hexlify(new Uint8Array(plain)));
}

// claiming ----------------------------------------------------------------------------------------

// The claim is not settled yet: its key stays pending in this browser for another try.
class ClaimOpen extends Error {}

// The address bound to `did` as its DID document says, null if none, undefined if it cannot be told.
async function controllerOf(did) {
  try {
    const resolved = await api(`/dids/${enc(did)}`);
    const method = resolved.didDocument?.verificationMethod?.[0];
    return method ? method.blockchainAccountId.split(":").pop() : null;
  } catch {
    return undefined;
  }
}

// Send the pending claim's binding request (again: the route answers a repeat as it answered the
// first). Returns once the key is bound; throws ClaimOpen while that cannot be told, and the refusal
// once the key will not be bound.
async function bindPending({ did, address, request }) {
  try {
    await api(`/customers/${enc(did)}/controller`, { method: "POST", body: request, timeout: BIND_TIMEOUT_MS });
    return;
  } catch (error) {
    if (!(error instanceof ApiProblem) || error.status >= 500 || error.status === 429) {
      throw new ClaimOpen(`${plain(error)} Your claim is not finished yet; its new key is kept in this browser.`);
    }
    if (!UNSETTLED.has(error.code)) throw error;
    const holder = await controllerOf(did);
    if (holder && same(holder, address)) return;
    const late = Date.now() / 1000 > Number(request.typed_data.message.deadline) + BIND_GRACE_S;
    if (holder === undefined || (holder === null && !late)) {
      throw new ClaimOpen("Your claim is still being recorded on the ledger; its new key is kept in this browser.");
    }
    throw error;
  }
}

// Finish the claim under way, if any: its key joins the stored keys once bound, and is dropped once
// refused. Returns the kept entry.
async function settleClaim() {
  const pending = readJson(PENDING);
  if (!pending) return null;
  const { request, ...entry } = pending;
  if (!storedKeys().some((k) => same(k.address, entry.address))) {
    try {
      await bindPending(pending);
    } catch (error) {
      if (!(error instanceof ClaimOpen)) localStorage.removeItem(PENDING);
      throw error;
    }
    keepKey(entry);
  }
  localStorage.removeItem(PENDING);
  return entry;
}

// The key is made here, and stored only as a pending claim until the service has bound it: a
// refused claim leaves the keys this browser held as they were.
async function claim(form, did, claimCode, passphrase) {
  await settleClaim().finally(showPending); // an earlier claim first: its key must not be lost
  if (storedKeys().some((k) => k.did === did)) {
    throw new Error("This browser holds the key of that DID already: sign in with its passphrase.");
  }
  const fresh = ethers.Wallet.createRandom();
  tell(form, "Making your key and binding it to your DID…", "working");
  try {
    const prepared = await api(`/customers/${enc(did)}/controller/prepare`, {
      method: "POST",
      body: { claim_code: claimCode, address: fresh.address },
    });
    const signature = await signTyped(fresh, prepared.typed_data);
    const sealed = await seal(fresh.privateKey, passphrase);
    const request = { claim_code: claimCode, typed_data: prepared.typed_data, signature };
    localStorage.setItem(PENDING, JSON.stringify({ ...sealed, did, request }));
    return { entry: await settleClaim(), signer: fresh };
  } catch (error) {
    throw claimRefusal(error);
  } finally {
    showPending();
  }
}

// A refused claim in plainer words than the service's title, where there are some.
function claimRefusal(error) {
  return error instanceof ApiProblem && CLAIM_WORDS[error.code] ? new Error(CLAIM_WORDS[error.code]) : error;
}

// backup and recovery -----------------------------------------------------------------------------

// The key as a Web3 Secret Storage (keystore v3) file: scrypt and AES-128-CTR, what wallets import.
async function downloadBackup(passphrase) {
  const keystore = await wallet.encrypt(passphrase);
  const link = el("a", {
    href: URL.createObjectURL(new Blob([keystore], { type: "application/json" })),
    download: `consent-ledger-key-${wallet.address}.json`,
  });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

async function openBackup(file, passphrase) {
  const text = await file.text();
  try {
    JSON.parse(text);
  } catch {
    throw new Error("That file is not a key backup (expected the .json file downloaded here).");
  }
  try {
    return await ethers.Wallet.fromEncryptedJson(text, passphrase);
  } catch (error) {
    if (/password/i.test(String(error?.message))) throw new Error("That passphrase does not open this backup.");
    throw new Error("That file is not a key backup this page can open.");
  }
}

// Start a recovery with a new key made here; it is stored (sealed) before the request is sent. A retry
// (same DID and code) reuses the stored key, so the service sees the same start again and answers it;
// the stored key is never dropped on an error (it may already be the one the ledger is moving to).
async function startRecovery(form, did, code, passphrase) {
  const stored = readJson(RECOVERING);
  const retry = stored && stored.did === did && stored.code === code;
  const fresh = retry ? await unlock(stored, passphrase) : ethers.Wallet.createRandom();
  tell(form, retry ? "Starting the recovery with your new key…" : "Making your new key and starting the recovery…", "working");
  const prepared = await api(`/customers/${enc(did)}/recovery/prepare`, {
    method: "POST",
    body: { claim_code: code, address: fresh.address },
  });
  const signature = await signTyped(fresh, prepared.typed_data);
  const sealed = retry ? stored : { ...(await seal(fresh.privateKey, passphrase)), did, code };
  if (!retry) localStorage.setItem(RECOVERING, JSON.stringify(sealed));
  const started = await api(`/customers/${enc(did)}/recovery`, {
    method: "POST",
    body: { claim_code: code, typed_data: prepared.typed_data, signature },
    timeout: BIND_TIMEOUT_MS,
  });
  localStorage.setItem(RECOVERING, JSON.stringify({ ...sealed, effective_at: started.effective_at }));
  return started;
}

function showRecovering() {
  const recovering = readJson(RECOVERING);
  $("pending-recovery").hidden = !recovering;
  if (!recovering) return;
  $("recovery-did").textContent = recovering.did;
  const at = $("recovery-when");
  at.textContent = recovering.effective_at ? when(recovering.effective_at) : "the end of its waiting time";
  if (recovering.effective_at) at.setAttribute("datetime", new Date(recovering.effective_at * 1000).toISOString());
}

// Complete the recovery under way: its key joins the stored keys. Returns the kept entry.
async function finishRecovery() {
  const recovering = readJson(RECOVERING);
  if (!recovering) return null;
  const { code, effective_at: _at, ...entry } = recovering;
  let done;
  try {
    done = await api(`/customers/${enc(entry.did)}/recovery/complete`, {
      method: "POST",
      body: { claim_code: code },
      timeout: BIND_TIMEOUT_MS,
    });
  } catch (error) {
    if (error instanceof ApiProblem && error.code === "recovery_not_due") {
      const due = Number(error.problem.detail);
      throw new Error(`Your new key takes effect from ${when(due)}. Come back then to finish.`);
    }
    if (error instanceof ApiProblem && ["no_recovery", "invalid_claim_code"].includes(error.code)) {
      // The new key stays stored: only the service's "completed" answer says it is no longer needed.
      throw new Error(
        "This recovery is no longer pending: your old key cancelled it, or it was replaced. Ask us for a new code.",
      );
    }
    throw error;
  }
  if (done?.status !== "completed") throw new Error("The service did not confirm the recovery; try again.");
  keepKey(entry); // bound: the service answered "completed"
  localStorage.removeItem(RECOVERING);
  return entry;
}

// signing and calls -------------------------------------------------------------------------------

async function signTyped(signer, typed) {
  const types = { ...typed.types };
  delete types.EIP712Domain; // ethers derives the domain type itself
  return signer.signTypedData(typed.domain, types, typed.message);
}

async function signIn(signer = wallet) {
  const challenge = await api("/auth/siwe/challenge", { method: "POST", body: { address: signer.address } });
  const signature = await signer.signMessage(challenge.message);
  const token = await api("/auth/siwe", { method: "POST", body: { message: challenge.message, signature } });
  session = { token: token.access_token, did: token.did };
}

// The bearer token lasts minutes; with the key unlocked, sign in again instead of failing.
async function call(path, options = {}) {
  try {
    return await api(path, { ...options, token: session.token });
  } catch (error) {
    if (!(error instanceof ApiProblem) || error.status !== 401 || !wallet) throw error;
    try {
      await signIn();
    } catch (refused) {
      if (refused instanceof ApiProblem && refused.code === "sign_in_failed") {
        throw new Error("This key no longer speaks for your account (a recovery replaced it). Sign in with your new key.");
      }
      throw refused;
    }
    return api(path, { ...options, token: session.token });
  }
}

// views ---------------------------------------------------------------------------------------------

// The sign-in forms: a key to unlock (`chosen` first), a claim left unfinished.
function showSetup(chosen) {
  $("account").hidden = true;
  $("sign-out").hidden = true;
  $("setup").hidden = false;
  const keys = storedKeys();
  $("unlock-form").hidden = !keys.length;
  $("stored-one").hidden = keys.length !== 1;
  $("stored-choice").hidden = keys.length < 2;
  if (keys.length === 1) $("stored-address").textContent = keys[0].address;
  $("stored-keys").replaceChildren(
    ...keys.map((k) =>
      el(
        "option",
        { value: k.address, selected: chosen !== undefined && same(k.address, chosen) },
        k.did ? `${short(k.address)} (DID …${k.did.slice(-8)})` : k.address,
      ),
    ),
  );
  showPending();
}

function showPending() {
  showRecovering();
  const pending = readJson(PENDING);
  $("pending-claim").hidden = !pending;
  if (pending) $("pending-did").textContent = pending.did;
}

// Sign in with an unlocked key; it becomes the first stored key, its DID noted.
async function enter(entry, signer, welcome) {
  await signIn(signer);
  wallet = signer;
  keepKey({ ...entry, did: session.did });
  say(welcome);
  await showAccount();
}

async function showAccount() {
  $("setup").hidden = true;
  $("account").hidden = false;
  $("sign-out").hidden = false;
  $("did").textContent = session.did;
  $("address").textContent = wallet.address;
  $("identity-title").focus();
  await loadAll().catch(fail);
}

async function loadAll() {
  if (!reference) {
    const [partners, purposes, attributes] = await Promise.all([
      call("/partners"),
      call("/purposes"),
      call("/attributes"),
    ]);
    reference = { partners, purposes, attributes };
    const select = $("redeem-partner");
    select.replaceChildren(...partners.map((p) => el("option", { value: p.name }, p.name)));
  }
  await refresh();
}

async function refresh() {
  await Promise.all([loadConsents(), loadAccesses(), loadPoints(), loadRecovery(), loadKeys()]);
}

// A recovery of this account to another key: shown with the time it can take effect, and a veto.
async function loadRecovery() {
  let pending = null;
  try {
    pending = await call(`/customers/${enc(session.did)}/recovery`);
  } catch (error) {
    if (!(error instanceof ApiProblem) || error.code !== "no_recovery") throw error;
  }
  const alert = $("recovery-alert");
  if (!pending) {
    alert.hidden = true;
    return;
  }
  $("recovery-text").textContent =
    `We started moving your account to a new key (${short(pending.new_controller)}), as someone who said they ` +
    `were you and had lost this key asked us. It takes effect from ${when(pending.effective_at)}. If that was ` +
    "not you, cancel it: your key stays in control.";
  alert.hidden = false;
}

const KEY_EVENTS = {
  bound: "Key bound: it speaks for you from then on",
  recovery_started: "Recovery to this key started",
  recovery_cancelled: "Recovery to this key cancelled",
};

async function loadKeys() {
  const events = await call(`/customers/${enc(session.did)}/keys`);
  $("key-history").replaceChildren(
    ...events
      .slice()
      .reverse()
      .map((event) =>
        el(
          "li",
          { "data-event": event.event },
          el("time", { datetime: new Date(event.block_time * 1000).toISOString() }, when(event.block_time)),
          ` — ${KEY_EVENTS[event.event]}: `,
          el("code", { title: event.key }, short(event.key)),
          event.effective_at ? ` (can take effect from ${when(event.effective_at)})` : "",
          el("div", { class: "muted" }, "transaction ", el("code", { title: event.tx_hash }, short(event.tx_hash))),
        ),
      ),
  );
}

// The purposes the customer chooses (consent); the others are shown with their basis, without a switch.
const choosable = () => reference.purposes.filter((p) => p.legal_basis === "consent");
const choiceId = (i, j) => `choice-${i}-${j}`;
let consentsByKey = new Map();

function consentOf(partner, purpose) {
  return consentsByKey.get(`${partner.address.toLowerCase()}|${purpose.key}`);
}

// The kinds of data shared now or about to be (a revocation counts once accepted, a grant is on its way).
function sharedOf(consent) {
  if (!consent || consent.status === "expired") return new Set();
  const shared = new Set([...consent.attributes, ...consent.pending_grant]);
  consent.pending_revoke.forEach((key) => shared.delete(key));
  return shared;
}

// One state per partner and purpose, never two that contradict each other.
function stateOf(id, consent) {
  const all = reference.attributes.length;
  if (busy.has(id)) return busy.get(id) === "on" ? ["Turning on…", "pending"] : ["Turning off…", "pending"];
  if (notes.has(id)) return ["Failed", "failed"];
  if (consent?.pending_grant.length) return ["Turning on…", "pending"];
  if (consent?.status === "expired") return ["Off (your consent expired)", "off"];
  const shared = sharedOf(consent).size;
  if (shared === 0) return ["Off", "off"];
  return shared === all ? ["On", "on"] : [`On for ${shared} of ${all} kinds of data`, "on"];
}

function renderChoice(partner, i, purpose, j) {
  const id = choiceId(i, j);
  const consent = consentOf(partner, purpose);
  const shared = sharedOf(consent);
  const [state, kind] = stateOf(id, consent);
  const note = notes.get(id);
  const described = [`state-${id}`, note ? `note-${id}` : null].filter(Boolean).join(" ");
  const intent = busy.get(id);
  const on = intent ? intent === "on" : shared.size > 0;
  const categories = reference.attributes.map((attribute) => {
    const cid = `${id}-${attribute.bit}`;
    return el(
      "li",
      {},
      el(
        "label",
        { class: "check" },
        el("input", {
          type: "checkbox",
          id: cid,
          checked: busy.has(cid) ? busy.get(cid) === "on" : shared.has(attribute.key),
          "aria-label": `Share ${attribute.name} with ${partner.name} for ${purpose.name}`,
          "aria-describedby": described,
          onchange: (event) =>
            applyChanges(
              [{ partner, purpose, i, j, action: event.target.checked ? "grant" : "revoke", attributes: [attribute] }],
              null,
              cid,
            ),
        }),
        attribute.name,
      ),
    );
  });
  const input = el("input", {
    type: "checkbox",
    role: "switch",
    id,
    checked: on,
    "aria-label": `Share with ${partner.name} for ${purpose.name}`,
    "aria-describedby": described,
    onchange: (event) => {
      const granting = event.target.checked;
      // Off: every kind shared (or on its way) stops; on: every kind is shared.
      const attributes = granting ? reference.attributes : reference.attributes.filter((a) => shared.has(a.key));
      applyChanges([{ partner, purpose, i, j, action: granting ? "grant" : "revoke", attributes }], null);
    },
  });
  const details = el(
    "details",
    { id: `data-${id}`, open: opened.has(`data-${id}`) },
    el("summary", {}, `Which data (${shared.size} of ${reference.attributes.length})`),
    el("ul", { class: "categories" }, categories),
  );
  details.addEventListener("toggle", () =>
    details.open ? opened.add(details.id) : opened.delete(details.id),
  );
  return el(
    "div",
    { class: "choice", "data-partner": partner.name, "data-purpose": purpose.key },
    el("label", { class: "switch" }, input, partner.name),
    el("span", { class: `badge state ${kind}`, id: `state-${id}` }, state),
    note
      ? el("p", { class: "note error", id: `note-${id}`, role: note.fresh ? "alert" : null }, note.text)
      : null,
    details,
  );
}

// The changes that make every partner-and-purpose pair in `pairs` all on (grant) or all off (revoke).
function changesFor(pairs, action) {
  return pairs.flatMap(({ partner, i, purpose, j }) => {
    const shared = sharedOf(consentOf(partner, purpose));
    const attributes = reference.attributes.filter((a) => (action === "grant" ? true : shared.has(a.key)));
    const pending = consentOf(partner, purpose)?.pending_grant.length;
    const done = action === "grant" ? shared.size === reference.attributes.length && !pending : !attributes.length;
    return done ? [] : [{ partner, purpose, i, j, action, attributes }];
  });
}

// Allow all / refuse all for a group of choices (`id` names the group), after one confirmation beside
// the buttons. What it asks and what it last said are kept across re-renders (the page polls).
const confirming = new Map(); // group id -> "grant" | "revoke", while its question is open
const bulkNotes = new Map(); // group id -> [text, kind]

function bulk(id, label, pairs, where) {
  const box = el("div", { class: "bulk", id, ...where.data }, el("span", { class: "bulk-label" }, where.title));
  const ask = (action) => {
    bulkNotes.delete(id);
    if (changesFor(pairs, action).length) confirming.set(id, action);
    else bulkNotes.set(id, [action === "grant" ? "Already all on." : "Already all off.", "ok"]);
    renderConsents();
    document.getElementById(`${id}-yes`)?.focus();
  };
  const allow = el("button", { type: "button", class: "secondary", id: `${id}-allow`, "aria-label": `Allow all ${where.name}` }, "Allow all");
  const refuse = el("button", { type: "button", class: "secondary", id: `${id}-refuse`, "aria-label": `Refuse all ${where.name}` }, "Refuse all");
  allow.addEventListener("click", () => ask("grant"));
  refuse.addEventListener("click", () => ask("revoke"));
  box.append(el("span", { class: "bulk-buttons" }, allow, refuse));
  const action = confirming.get(id);
  const changes = action ? changesFor(pairs, action) : [];
  if (action && changes.length) {
    const names = changes.map((c) => (where.byPartner ? c.purpose.name : c.partner.name)).join(", ");
    const count = changes.length === 1 ? "One change" : `${changes.length} changes`;
    const question =
      action === "grant"
        ? `Share every kind of data ${label} for: ${names}? ${count}, each signed with your key.`
        : `Stop sharing ${label} for: ${names}? ${count}, each signed with your key; in effect at once.`;
    const yes = el("button", { type: "button", id: `${id}-yes` }, action === "grant" ? "Yes, allow" : "Yes, refuse");
    const no = el("button", { type: "button", class: "secondary", id: `${id}-no` }, "Cancel");
    yes.addEventListener("click", () => {
      confirming.delete(id);
      applyChanges(changesFor(pairs, action), id);
    });
    no.addEventListener("click", () => {
      confirming.delete(id);
      renderConsents();
      document.getElementById(`${id}-${action === "grant" ? "allow" : "refuse"}`)?.focus();
    });
    box.append(el("div", { class: "confirm", role: "group", "aria-label": "Confirm" }, el("p", {}, question), yes, no));
  } else {
    confirming.delete(id);
  }
  const said = bulkNotes.get(id);
  if (said) box.append(el("p", { class: `note ${said[1]}`, role: said[1] === "error" ? "alert" : "status" }, said[0]));
  return box;
}

async function loadConsents() {
  const consents = await call(`/customers/${enc(session.did)}/consents`);
  consentsByKey = new Map(consents.map((c) => [`${c.partner.toLowerCase()}|${c.purpose}`, c]));
  await settleTracked();
  renderConsents();
  clearTimeout(pollTimer);
  const pending = consents.some((c) => c.pending_grant.length || c.pending_revoke.length) || tracked.size > 0;
  if (pending) pollTimer = setTimeout(() => loadConsents().catch(fail), 1000);
}

// Signed out: nothing of this account's choices may show (or be used) when the next one signs in.
function forgetConsents() {
  for (const kept of [busy, notes, tracked, opened, confirming, bulkNotes]) kept.clear();
  consentsByKey = new Map();
  $("consent-partners").replaceChildren();
  $("consents").replaceChildren();
}

// Accepted changes the ledger has since applied or refused: a refusal shows beside its choice.
async function settleTracked() {
  for (const [id, request] of [...tracked]) {
    const found = await call(`/consents/${enc(request)}`).catch(() => null);
    if (!found || found.status === "pending") continue;
    tracked.delete(id);
    if (found.status === "failed") {
      notes.set(id, {
        text: "Failed: the ledger did not apply this change, so nothing changed. Please try again.",
        fresh: true,
      });
    }
  }
}

function renderConsents() {
  const focused = document.activeElement?.id;
  const partners = reference.partners;
  const purposes = choosable();
  const pairsOf = (filter) =>
    partners.flatMap((partner, i) =>
      reference.purposes.map((purpose, j) => ({ partner, i, purpose, j })).filter((p) => choosable().includes(p.purpose) && filter(p)),
    );
  $("consent-partners").replaceChildren(
    ...partners.map((partner, i) =>
      bulk(`bulk-partner-${i}`, `with ${partner.name}`, pairsOf((p) => p.partner === partner), {
        title: `Everything with ${partner.name}`,
        name: `purposes for ${partner.name}`,
        byPartner: true,
        data: { "data-partner": partner.name },
      }),
    ),
  );
  $("consents").replaceChildren(
    ...reference.purposes.map((purpose, j) => {
      const consent = purpose.legal_basis === "consent";
      return el(
        "li",
        { class: "purpose", "data-purpose": purpose.key },
        el("h3", {}, purpose.name),
        el("p", {}, purpose.description),
        // What consent means is said once, above the cards; any other basis says why there is no switch.
        el(
          "p",
          { class: "basis muted" },
          consent ? "Legal basis: " : `${purpose.legal_basis_description} `,
          el("span", { class: "article" }, consent ? purpose.legal_basis_article : `(${purpose.legal_basis_article})`),
        ),
        ...(consent
          ? [
              partners.length > 1 && purposes.length
                ? bulk(`bulk-purpose-${j}`, "with every partner", pairsOf((p) => p.purpose === purpose), {
                    title: "Every partner",
                    name: `partners for ${purpose.name}`,
                    byPartner: false,
                    data: { "data-purpose": purpose.key },
                  })
                : null,
              ...partners.map((partner, i) => renderChoice(partner, i, purpose, j)),
            ]
          : [
              el("p", { class: "badge fixed" }, FIXED[purpose.legal_basis] ?? "Always on"),
              // A grant earlier pages offered for it stays withdrawable.
              ...partners.flatMap((partner, i) =>
                sharedOf(consentOf(partner, purpose)).size ? [renderChoice(partner, i, purpose, j)] : [],
              ),
            ]),
      );
    }),
  );
  notes.forEach((note) => (note.fresh = false)); // announced once
  if (focused) document.getElementById(focused)?.focus();
}

// Sign and send `changes` one after another (see `queue`). Each failure is said beside its choice (and
// beside the bulk buttons, `where`, how many went through); `cid` is the category switch used, if any.
function applyChanges(changes, where, cid = null) {
  for (const c of changes) {
    const id = choiceId(c.i, c.j);
    notes.delete(id);
    busy.set(id, c.action === "grant" ? "on" : "off");
    if (cid) busy.set(cid, c.action === "grant" ? "on" : "off");
  }
  if (where) bulkNotes.set(where, [`Signing and sending ${changes.length === 1 ? "1 change" : `${changes.length} changes`}…`, "working"]);
  renderConsents();
  queue = queue.then(async () => {
    let made = 0;
    for (const c of changes) {
      if (await change(c)) made += 1;
      busy.delete(choiceId(c.i, c.j));
      renderConsents();
    }
    if (cid) busy.delete(cid);
    if (where) {
      const failed = changes.length - made;
      bulkNotes.set(where, [
        failed
          ? `${made} of ${changes.length} changes made; ${failed === 1 ? "the one not made says" : "those not made say"} why below.`
          : `Done: ${changes.length === 1 ? "1 change" : `${changes.length} changes`} signed.`,
        failed ? "error" : "ok",
      ]);
    }
    await loadConsents().catch(fail);
  });
}

async function change({ partner, purpose, i, j, action, attributes }) {
  const id = choiceId(i, j);
  try {
    const prepared = await call("/consents/prepare", {
      method: "POST",
      body: { action, partner: partner.name, purpose: purpose.key, attributes: attributes.map((a) => a.key) },
    });
    const signature = await signTyped(wallet, prepared.typed_data);
    const accepted = await call("/consents", { method: "POST", body: { typed_data: prepared.typed_data, signature } });
    tracked.set(id, accepted.id);
    const what = attributes.length === reference.attributes.length ? "" : ` (${attributes.map((a) => a.name).join(", ")})`;
    say(
      action === "grant"
        ? `Signed: share with ${partner.name} for ${purpose.name}${what}. On once it is on the ledger.`
        : `Signed: stop sharing with ${partner.name} for ${purpose.name}${what}. In effect now.`,
    );
    return true;
  } catch (error) {
    // Beside the choice, not at the top of the page; the choice then shows what the service has.
    const text =
      error instanceof NoAnswer
        ? `${error.message} The change may not have been made: look at this choice again in a minute.`
        : `Not changed. ${plain(error)}`;
    notes.set(id, { text, fresh: true });
    return false;
  }
}

async function loadAccesses() {
  const page = await call(`/customers/${enc(session.did)}/accesses`);
  const list = $("accesses");
  if (!page.entries.length) {
    list.replaceChildren(el("li", {}, "No one has accessed your data."));
    return;
  }
  list.replaceChildren(
    ...page.entries
      .slice()
      .reverse()
      .map((entry) =>
        el(
          "li",
          { "data-index": entry.index },
          el("time", { datetime: new Date(entry.block_time * 1000).toISOString() }, when(entry.block_time)),
          " — ",
          el("strong", {}, entry.partner_name ?? short(entry.partner)),
          ` for ${nameOf(reference.purposes, entry.purpose)}: ${entry.attributes.map((key) => nameOf(reference.attributes, key)).join(", ")} `,
          verdict(entry.permitted),
          el("div", { class: "muted" }, "transaction ", el("code", { title: entry.tx_hash }, short(entry.tx_hash))),
        ),
      ),
  );
}

async function loadPoints() {
  const points = await call(`/customers/${enc(session.did)}/points`);
  $("balance").textContent = points.balance.toLocaleString("en");
  const tier = points.tier;
  $("tier").textContent = tier.next
    ? `${tier.name} (${tier.earned_12m} earned in 12 months; ${tier.points_to_next} more for ${tier.next})`
    : `${tier.name} (${tier.earned_12m} earned in 12 months)`;
  $("lots").replaceChildren(
    el("caption", {}, "Your points by expiry"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Points"), el("th", { scope: "col" }, "Expire"))),
    el(
      "tbody",
      {},
      points.lots.length
        ? points.lots.map((lot) => el("tr", {}, el("td", {}, lot.remaining), el("td", {}, when(lot.expires_at))))
        : el("tr", {}, el("td", { colspan: 2 }, "No points yet.")),
    ),
  );
  $("history").replaceChildren(
    el("caption", {}, "History"),
    el(
      "thead",
      {},
      el(
        "tr",
        {},
        ["When", "What", "Points", "Partner", "Balance after"].map((h) => el("th", { scope: "col" }, h)),
      ),
    ),
    el(
      "tbody",
      {},
      points.history
        .slice()
        .reverse()
        .map((event) =>
          el(
            "tr",
            {},
            el("td", {}, when(event.block_time)),
            el("td", {}, event.kind.replace("_", " ")),
            el("td", {}, event.amount),
            el(
              "td",
              {},
              event.partner_name ?? (event.partner ? short(event.partner) : ""),
              event.reference ? el("div", { class: "muted" }, `their ref. ${event.reference}`) : "",
            ),
            el("td", {}, event.balance ?? ""),
          ),
        ),
    ),
  );
  labelCells($("history"));
  await loadCodes();
}

// short redemption codes ------------------------------------------------------------------------------

// What the code routes' refusals mean to the customer, beside the control that caused them.
const CODE_WORDS = {
  insufficient_points: "You do not have that many points. Choose fewer.",
  code_outstanding: "You already have a code for this partner. Use it, or cancel it below, then make a new one.",
  code_used: "The partner has used this code already.",
  code_expired: "This code has expired already.",
  code_cancelled: "This code was cancelled already.",
  unknown_code: "This code is not yours or no longer exists.",
};

function codeFailure(error) {
  return error instanceof ApiProblem && CODE_WORDS[error.code] ? new Error(CODE_WORDS[error.code]) : error;
}

let shownCodes = null; // the listing last drawn: redrawn only when it changes (a poll keeps buttons and notes)

// A table of class "cards" becomes one card per row on a phone (portal.css): each cell is named by its
// column's heading, which the card shows beside it.
function labelCells(table) {
  const headings = [...table.querySelectorAll("thead th")].map((th) => th.textContent);
  for (const row of table.querySelectorAll("tbody tr")) {
    [...row.children].forEach((cell, i) => {
      if (headings[i]) cell.dataset.label = headings[i];
    });
  }
}

async function loadCodes() {
  const { codes } = await call("/points/codes");
  const drawn = JSON.stringify(codes.map((c) => c.code));
  if (drawn === shownCodes) return;
  shownCodes = drawn;
  $("codes").replaceChildren(
    el("caption", {}, "Codes a partner can still use"),
    el(
      "thead",
      {},
      el("tr", {}, ["Code", "Points", "Partner", "Works until", ""].map((h) => el("th", { scope: "col" }, h))),
    ),
    el(
      "tbody",
      {},
      codes.length
        ? codes.map((c) => {
            const cancel = el(
              "button",
              { type: "button", class: "secondary", "aria-label": `Cancel code ${c.code}` },
              "Cancel",
            );
            onClick(cancel, () => cancelCode(c));
            return el(
              "tr",
              { "data-code": c.code },
              el("td", {}, el("span", { class: "code" }, c.code)),
              el("td", {}, c.amount),
              el("td", {}, c.partner_name ?? short(c.partner)),
              el("td", {}, when(c.expires_at)),
              el("td", {}, cancel),
            );
          })
        : el("tr", {}, el("td", { colspan: 5 }, "No outstanding codes.")),
    ),
  );
  labelCells($("codes"));
}

async function cancelCode(c) {
  try {
    await call(`/points/codes/${enc(c.code)}`, { method: "DELETE" });
  } catch (error) {
    throw codeFailure(error);
  }
  if ($("redemption-code").textContent === c.code) $("redeem-result").hidden = true;
  say(`Code ${c.code} is cancelled: ${c.partner_name ?? "the partner"} can no longer use it.`);
  await loadCodes();
}

// wiring ------------------------------------------------------------------------------------------

// A claim link (`claim_url` of the enrolment) carries the DID and the claim code in its fragment: fill
// them in, and take them out of the address bar and the history (the code works once; it need not stay).
function claimFromLink() {
  const given = new URLSearchParams(location.hash.slice(1));
  if (given.has("did") && given.has("recovery")) {
    const form = $("recover-form");
    $("recover").open = true;
    form.elements.did.value = given.get("did");
    form.elements.code.value = given.get("recovery");
    history.replaceState(null, "", location.pathname + location.search);
    tell(form, "Your DID and recovery code are filled in: choose a passphrase for your new key.", "ok");
    form.elements.passphrase.focus();
    return;
  }
  if (!given.has("did") || !given.has("claim")) return;
  const form = $("claim-form");
  form.elements.did.value = given.get("did");
  form.elements.claim.value = given.get("claim");
  history.replaceState(null, "", location.pathname + location.search);
  tell(form, "Your DID and claim code are filled in: choose a passphrase to finish.", "ok");
  form.elements.passphrase.focus();
}

document.addEventListener("DOMContentLoaded", () => {
  showSetup();
  claimFromLink();

  onSubmit($("claim-form"), async (data) => {
    const form = $("claim-form");
    const held = storedKeys().length;
    const did = data.get("did").trim();
    const { entry, signer } = await claim(form, did, data.get("claim").trim(), data.get("passphrase"));
    tell(form, "");
    showSetup(entry.address);
    const welcome =
      "Your key is bound to your DID and you are signed in." +
      (held ? " The other key stored in this browser is kept: choose it when you sign in." : "");
    try {
      await enter(entry, signer, welcome);
    } catch (error) {
      throw new Error(`Your key is bound and stored in this browser, but signing in failed. ${plain(error)}`);
    }
  });

  onClick($("finish-claim"), async () => {
    let entry;
    try {
      entry = await settleClaim();
    } catch (error) {
      if (error instanceof ClaimOpen) throw error; // said beside this button
      showSetup();
      tell($("claim-form"), `Your claim did not go through. ${plain(claimRefusal(error))}`);
      return;
    }
    showSetup(entry?.address);
    if (entry) {
      tell($("unlock-form"), "Your claim is finished and its key is stored. Enter its passphrase to sign in.", "ok");
    }
  });

  onSubmit($("unlock-form"), async (data) => {
    const entry = storedKeys().find((k) => same(k.address, data.get("address")));
    await enter(entry, await unlock(entry, data.get("passphrase")), "Signed in.");
  });

  // An imported key is stored only once it signs in: a key no account holds is not kept.
  onSubmit($("import-form"), async (data) => {
    let imported;
    try {
      imported = new ethers.Wallet(data.get("key").trim());
    } catch {
      throw new Error("That is not a private key (expected 0x and 64 hex digits).");
    }
    const entry = await seal(imported.privateKey, data.get("passphrase"));
    try {
      await enter(entry, imported, "Key imported; signed in.");
    } catch (error) {
      if (error instanceof ApiProblem && error.code === "sign_in_failed") {
        throw new Error("No account here has this key bound to it, so it was not stored.");
      }
      throw error;
    }
  });

  onSubmit($("restore-form"), async (data) => {
    const form = $("restore-form");
    tell(form, "Opening the backup…", "working");
    const restored = await openBackup(data.get("file"), data.get("passphrase"));
    const entry = await seal(restored.privateKey, data.get("passphrase"));
    try {
      await enter(entry, new ethers.Wallet(restored.privateKey), "Key restored from your backup; signed in.");
    } catch (error) {
      if (error instanceof ApiProblem && error.code === "sign_in_failed") {
        throw new Error("No account here has this key bound to it any more, so it was not stored.");
      }
      throw error;
    }
    tell(form, "");
  });

  onSubmit($("recover-form"), async (data) => {
    const form = $("recover-form");
    const started = await startRecovery(form, data.get("did").trim(), data.get("code").trim(), data.get("passphrase"));
    showRecovering();
    tell(
      form,
      `Recovery started. Your new key takes effect from ${when(started.effective_at)}; come back then and ` +
        "choose Finish recovery. Until then your old key, if anyone holds it, sees the recovery and can stop it.",
      "ok",
    );
  });

  onClick($("finish-recovery"), async () => {
    const entry = await finishRecovery();
    showSetup(entry?.address);
    if (entry) {
      tell($("unlock-form"), "Your new key is in effect and stored. Enter its passphrase to sign in.", "ok");
      $("unlock-form").elements.passphrase.focus();
    }
  });

  onSubmit($("backup-form"), async (data) => {
    const form = $("backup-form");
    tell(form, "Encrypting your key…", "working");
    await downloadBackup(data.get("passphrase"));
    form.reset();
    tell(form, "Backup downloaded. Keep the file and its passphrase safe, and apart.", "ok");
  });

  onClick($("cancel-recovery"), async () => {
    const prepared = await call(`/customers/${enc(session.did)}/recovery/cancel/prepare`, { method: "POST" });
    const signature = await signTyped(wallet, prepared.typed_data);
    await call(`/customers/${enc(session.did)}/recovery/cancel`, {
      method: "POST",
      body: { typed_data: prepared.typed_data, signature },
      timeout: BIND_TIMEOUT_MS,
    });
    say("Recovery cancelled: your key stays in control.");
    await Promise.all([loadRecovery(), loadKeys()]);
  });

  onSubmit($("redeem-form"), async (data) => {
    let code;
    try {
      const prepared = await call("/points/redemptions/prepare", {
        method: "POST",
        body: { partner: data.get("partner"), amount: Number(data.get("amount")) },
      });
      const signature = await signTyped(wallet, prepared.typed_data);
      code = await call("/points/codes", { method: "POST", body: { typed_data: prepared.typed_data, signature } });
    } catch (error) {
      throw codeFailure(error);
    }
    const partner = code.partner_name ?? data.get("partner");
    $("redemption-code").textContent = code.code;
    $("redemption-qr").src = code.qr_svg;
    $("redemption-qr").alt = `QR code of the code ${code.code}`;
    $("code-label").textContent = `Show this code to ${partner}. It works once, for ${code.amount} points, until ${when(code.expires_at)}.`;
    $("redeem-result").hidden = false;
    say(`Code ${code.code} created for ${code.amount} points at ${partner}; it works once, until ${when(code.expires_at)}.`);
    await loadCodes();
  });

  onClick($("copy-code"), async () => {
    const code = $("redemption-code").textContent;
    try {
      await navigator.clipboard.writeText(code);
    } catch {
      throw new Error(`Copying is not allowed here: write the code down instead (${code}).`);
    }
    tell($("copy-code"), "Code copied.", "ok");
  });

  $("sign-out").addEventListener("click", () => {
    wallet = null;
    session = null;
    clearTimeout(pollTimer);
    forgetConsents();
    say("Signed out. Your key stays in this browser, locked.");
    showSetup();
  });

  setInterval(() => {
    if (!session || document.hidden) return;
    const loads = reference ? [loadAccesses(), loadPoints(), loadRecovery(), loadKeys()] : [loadAll()];
    Promise.all(loads).catch(fail);
  }, 5000);

  if (readJson(PENDING)) $("finish-claim").click(); // a claim the last visit left half-way
});
