// waport operator console (DESIGN.md §13). Plain JavaScript, no framework, no build step.
//
// Everything goes through the public §9 routes with the token of this tab (sessionStorage: never a URL,
// a cookie or a log), so the console can do nothing the API does not let that token do. Events come
// from `fetch` streaming and QR codes as blob URLs, because EventSource and <img src> cannot send the
// Authorization header. Every text from the API is set with textContent, never parsed as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "waport.console.token";
  const STATES = ["stopped", "starting", "pairing", "connecting", "connected", "disconnected", "backoff",
    "stopping", "failed", "logged_out", "replaced", "banned", "outdated"];
  const ALIVE = new Set(["starting", "pairing", "connecting", "connected", "disconnected", "stopping"]);
  const STREAM_SILENCE_MS = 45000; // the API sends a keep-alive every 15 s: silence this long is a dead link
  const RETRY_MIN_MS = 1000;
  const RETRY_MAX_MS = 15000;
  const WEBHOOK_REFRESH_MS = 5000; // deliveries have no event of their own: the open company's are re-read

  const $ = (id) => document.getElementById(id);
  const enc = encodeURIComponent;

  const ui = {
    token: null,
    records: new Map(), // company -> session record (§4)
    counts: new Map(), // company -> {in, out}: messages seen on the event stream since the page opened
    rows: new Map(), // company -> <tr>
    selected: null,
    webhookTimer: null,
    qrUrl: null,
    qrSeq: 0,
    stream: null, // AbortController of the event stream
    streamRun: 0,
    lastEventId: null,
    timers: new Map(), // debounced refreshes by key
  };

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // ------------------------------------------------------------------ small helpers

  /** An element with attributes and children; strings become text nodes (never markup). */
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v !== null && v !== undefined) node.setAttribute(k, String(v));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function text(node, value) {
    node.textContent = value === null || value === undefined ? "" : String(value);
  }

  function stateClass(state) {
    return "state state-" + (STATES.includes(state) ? state : "other");
  }

  function when(ts) {
    if (typeof ts !== "number" || !ts) return "";
    const d = new Date(ts * 1000);
    const today = new Date().toDateString() === d.toDateString();
    return today ? d.toLocaleTimeString() : d.toLocaleString();
  }

  function later(key, ms, fn) {
    clearTimeout(ui.timers.get(key));
    ui.timers.set(key, setTimeout(() => { ui.timers.delete(key); fn(); }, ms));
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // ------------------------------------------------------------------ the API

  async function api(method, path, { body, accept } = {}) {
    const headers = { Authorization: `Bearer ${ui.token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (accept) headers.Accept = accept;
    const r = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store", credentials: "omit",
    });
    if (!r.ok) {
      let code = "error";
      let message = `HTTP ${r.status}`;
      try {
        const error = (await r.json()).error;
        code = String(error.code);
        message = String(error.message);
      } catch (_) { /* not the §9 error body: keep the status */ }
      if (r.status === 401) signOut("The token was refused: unknown, revoked or expired.");
      throw new ApiError(r.status, code, message);
    }
    return accept === "image/png" ? r.blob() : r.json();
  }

  function notice(message) {
    text($("notice"), message);
  }

  // ------------------------------------------------------------------ signing in and out

  async function signIn(token) {
    ui.token = token;
    let listing;
    try {
      listing = await api("GET", "/v1/sessions");
    } catch (e) {
      if (e.status !== 401) {
        ui.token = null;
        text($("login-error"), `Cannot sign in: ${e.message}`);
      }
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    text($("login-error"), "");
    $("login").hidden = true;
    $("console").hidden = false;
    $("signout").hidden = false;
    showSessions(listing.sessions);
    runStream();
  }

  function signOut(why) {
    sessionStorage.removeItem(TOKEN_KEY);
    ui.token = null;
    ui.streamRun += 1;
    if (ui.stream) ui.stream.abort();
    ui.stream = null;
    ui.lastEventId = null;
    ui.records.clear();
    ui.counts.clear();
    ui.rows.clear();
    select(null);
    $("sessions").tBodies[0].replaceChildren();
    $("console").hidden = true;
    $("signout").hidden = true;
    $("login").hidden = false;
    text($("live"), "");
    $("live").className = "";
    text($("login-error"), why || "");
    $("token").value = "";
    $("token").focus();
  }

  // ------------------------------------------------------------------ the sessions table

  function showSessions(records) {
    const seen = new Set();
    for (const record of records) {
      seen.add(record.company);
      ui.records.set(record.company, record);
      renderRow(record.company);
    }
    for (const company of [...ui.records.keys()]) {
      if (!seen.has(company)) forget(company);
    }
    afterTableChange();
    // A company token sees one company: open it at once.
    if (ui.selected === null && records.length === 1) select(records[0].company);
    else if (ui.selected !== null) renderDetail();
  }

  function afterTableChange() {
    const n = ui.records.size;
    text($("count"), `(${n})`);
    $("empty").hidden = n > 0;
  }

  function forget(company) {
    ui.records.delete(company);
    ui.counts.delete(company);
    const row = ui.rows.get(company);
    if (row) row.remove();
    ui.rows.delete(company);
    if (ui.selected === company) select(null);
    afterTableChange();
  }

  function renderRow(company) {
    const record = ui.records.get(company);
    let row = ui.rows.get(company);
    if (!row) {
      const open = el("button", { type: "button", class: "company", "aria-label": `Open ${company}` }, company);
      open.addEventListener("click", () => select(company));
      row = el("tr", { "data-company": company },
        el("td", {}, open), el("td", { "data-field": "state" }), el("td", { "data-field": "reason", class: "opt" }),
        el("td", { "data-field": "phone" }), el("td", { "data-field": "restarts", class: "opt" }),
        el("td", { "data-field": "since", class: "opt" }), el("td", { "data-field": "messages" }));
      ui.rows.set(company, row);
      const body = $("sessions").tBodies[0];
      const after = [...body.rows].find((r) => r.dataset.company > company);
      body.insertBefore(row, after || null);
    }
    const cell = (name) => row.querySelector(`[data-field="${name}"]`);
    text(cell("state"), record.state);
    cell("state").className = stateClass(record.state);
    text(cell("reason"), record.reason);
    text(cell("phone"), record.phone);
    text(cell("restarts"), record.restarts);
    text(cell("since"), when(record.since));
    const counts = ui.counts.get(company) || { in: 0, out: 0 };
    text(cell("messages"), `${counts.in} / ${counts.out}`);
    row.classList.toggle("selected", ui.selected === company);
  }

  async function refreshSessions() {
    try {
      showSessions((await api("GET", "/v1/sessions")).sessions);
      notice("");
    } catch (e) {
      if (e.status !== 401) notice(`Cannot list the sessions: ${e.message}`);
    }
  }

  async function refreshRecord(company) {
    try {
      ui.records.set(company, await api("GET", `/v1/sessions/${enc(company)}`));
      renderRow(company);
      afterTableChange();
      if (ui.selected === company) renderDetail();
    } catch (e) {
      if (e.code === "unknown_company") forget(company); // deleted
    }
  }

  // ------------------------------------------------------------------ one company

  function select(company) {
    const before = ui.selected;
    ui.selected = company;
    for (const [c, row] of ui.rows) row.classList.toggle("selected", c === company);
    if (company !== before) {
      dropQr();
      text($("pair-code"), "");
      text($("d-result"), "");
      $("messages").replaceChildren();
      $("webhook").replaceChildren();
    }
    $("detail").hidden = company === null;
    clearInterval(ui.webhookTimer);
    ui.webhookTimer = null;
    if (company === null) return;
    renderDetail();
    loadMessages();
    loadWebhook();
    ui.webhookTimer = setInterval(() => { if (!document.hidden) loadWebhook(); }, WEBHOOK_REFRESH_MS);
  }

  function renderDetail() {
    const company = ui.selected;
    const record = ui.records.get(company);
    if (!record) return;
    text($("detail-title"), company);
    text($("d-state"), record.state);
    $("d-state").className = stateClass(record.state);
    text($("d-reason"), record.reason ? `(${record.reason})` : "");
    const facts = [["phone", record.phone], ["since", when(record.since)], ["restarts", record.restarts],
      ["pid", record.pid], ["queued", record.queued], ["last error", record.last_error],
      ["next restart", when(record.next_restart_at)]];
    $("d-facts").replaceChildren(...facts.filter(([, v]) => v !== null && v !== undefined && v !== "")
      .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
    for (const button of document.querySelectorAll("#detail [data-action]")) {
      const action = button.dataset.action;
      const label = { start: "Start", stop: "Stop", restart: "Restart", logout: "Log out" }[action];
      button.setAttribute("aria-label", `${label} ${company}`);
      button.disabled = (action === "start" && ALIVE.has(record.state)) ||
        (action === "stop" && record.state === "stopped") ||
        (action === "logout" && !ALIVE.has(record.state));
    }
    const pairing = record.state === "pairing";
    const box = $("pairing");
    if (pairing && box.hidden) {
      box.hidden = false;
      loadQr();
    } else if (!pairing && !box.hidden) {
      box.hidden = true;
      dropQr();
      text($("pair-code"), "");
    }
  }

  async function act(action) {
    const company = ui.selected;
    if (!company) return;
    if (action === "logout" && !window.confirm(`Log ${company} out? The phone's linked device is removed; ` +
        "linking again needs a new QR scan.")) return;
    const buttons = document.querySelectorAll("#detail [data-action]");
    for (const b of buttons) b.disabled = true;
    text($("d-result"), `${action}…`);
    try {
      const record = await api("POST", `/v1/sessions/${enc(company)}/${action}`);
      if (record && record.company === company && record.state) ui.records.set(company, record);
      text($("d-result"), `${action}: done`);
    } catch (e) {
      text($("d-result"), `${action} failed: ${e.message}`);
    }
    renderRow(company);
    if (ui.selected === company) renderDetail();
  }

  async function create(company) {
    try {
      const record = await api("PUT", `/v1/sessions/${enc(company)}`);
      ui.records.set(record.company, record);
      renderRow(record.company);
      afterTableChange();
      $("new-company").value = "";
      notice("");
      select(record.company);
    } catch (e) {
      notice(`Cannot add ${company}: ${e.message}`);
    }
  }

  // ------------------------------------------------------------------ pairing

  function dropQr() {
    ui.qrSeq += 1;
    const img = $("qr");
    img.removeAttribute("src");
    if (ui.qrUrl) URL.revokeObjectURL(ui.qrUrl);
    ui.qrUrl = null;
  }

  async function loadQr() {
    const company = ui.selected;
    const seq = ++ui.qrSeq;
    let blob;
    try {
      blob = await api("GET", `/v1/sessions/${enc(company)}/qr`, { accept: "image/png" });
    } catch (e) {
      if (seq === ui.qrSeq) $("qr-waiting").hidden = false; // not_found: no code yet; the `qr` event brings it
      return;
    }
    if (seq !== ui.qrSeq || ui.selected !== company) return; // a newer code, or another company, meanwhile
    const url = URL.createObjectURL(blob);
    const img = $("qr");
    img.alt = `QR code to link a phone to ${company}`;
    img.src = url;
    if (ui.qrUrl) URL.revokeObjectURL(ui.qrUrl);
    ui.qrUrl = url;
    $("qr-waiting").hidden = true;
  }

  async function pairingCode(phone) {
    const company = ui.selected;
    text($("pair-code"), "…");
    try {
      const result = await api("POST", `/v1/sessions/${enc(company)}/pairing-code`, { body: { phone } });
      text($("pair-code"), result.code);
    } catch (e) {
      text($("pair-code"), "");
      text($("d-result"), `pairing code failed: ${e.message}`);
    }
  }

  // ------------------------------------------------------------------ messages and webhook

  async function loadMessages() {
    const company = ui.selected;
    let listing;
    try {
      listing = await api("GET", `/v1/sessions/${enc(company)}/messages?limit=20`);
    } catch (e) {
      if (ui.selected === company) $("messages").replaceChildren(el("li", {}, `Cannot read: ${e.message}`));
      return;
    }
    if (ui.selected !== company) return;
    const items = [
      ...(listing.inbound || []).map((m) => ({ ts: m.ts || m.received, dir: "in", m })),
      ...(listing.outbound || []).map((m) => ({ ts: m.created, dir: "out", m })),
    ].sort((a, b) => (b.ts || 0) - (a.ts || 0)).slice(0, 20);
    if (!items.length) {
      $("messages").replaceChildren(el("li", { class: "hint" }, "No messages yet."));
      return;
    }
    $("messages").replaceChildren(...items.map(({ ts, dir, m }) => {
      const who = dir === "in"
        ? `from ${m.push_name ? `${m.push_name} ` : ""}${m.from || m.chat || ""}`
        : `to ${m.to || ""} · ${m.status || ""}${m.error ? ` (${m.error})` : ""}`;
      const body = m.text || (m.type && m.type !== "text" ? `[${m.type}]` : "");
      return el("li", { "data-direction": dir, "data-id": dir === "in" ? m.id : m.message_id },
        el("span", { class: "meta" }, el("span", { class: "dir" }, dir === "in" ? "↓ in" : "↑ out"),
          `${when(ts)} ${who}`),
        el("span", { class: "text" }, body));
    }));
  }

  async function loadWebhook() {
    const company = ui.selected;
    let listing;
    try {
      listing = await api("GET", `/v1/sessions/${enc(company)}/webhook/deliveries?limit=20`);
    } catch (e) {
      if (ui.selected === company) $("webhook").replaceChildren(el("p", {}, `Cannot read: ${e.message}`));
      return;
    }
    if (ui.selected !== company) return;
    const ep = listing.endpoint;
    if (!ep) {
      $("webhook").replaceChildren(el("p", { class: "hint" }, "No webhook endpoint."));
      return;
    }
    const counts = listing.counts || {};
    const last = (listing.events || []).find((e) => e.last_attempt_at);
    const facts = [["url", ep.url], ["scope", ep.scope], ["events", (ep.events || []).join(", ")],
      ["status", ep.disabled ? `disabled (answered ${ep.disabled.status ?? "410"})` : "enabled"],
      ["pending", counts.pending ?? 0], ["delivered", counts.ok ?? 0], ["dead", counts.dead ?? 0]];
    if (last) {
      facts.push(["last attempt", `${when(last.last_attempt_at)} ${last.last_status ?? ""} ${last.last_error ?? ""}`]);
    }
    $("webhook").replaceChildren(el("dl", {}, ...facts.flatMap(([k, v]) => [
      el("dt", {}, k), el("dd", { "data-field": k }, String(v))])));
  }

  // ------------------------------------------------------------------ the event stream

  function setLive(status) {
    const node = $("live");
    node.className = status;
    text(node, { live: "live", connecting: "connecting…", reconnecting: "reconnecting…" }[status] || status);
  }

  /** GET /v1/events read with fetch, for as long as this tab is signed in: a dropped or silent stream
   *  is opened again (with Last-Event-ID, so nothing kept by the API is missed) after a growing pause. */
  async function runStream() {
    const mine = ++ui.streamRun; // a later sign-in starts a run of its own: this one then ends
    let retry = RETRY_MIN_MS;
    let first = true;
    while (ui.token && ui.streamRun === mine) {
      const ctrl = new AbortController();
      ui.stream = ctrl;
      setLive(first ? "connecting" : "reconnecting");
      first = false;
      let watchdog = null;
      const quiet = () => {
        clearTimeout(watchdog);
        watchdog = setTimeout(() => ctrl.abort(), STREAM_SILENCE_MS);
      };
      try {
        const headers = { Authorization: `Bearer ${ui.token}`, Accept: "text/event-stream" };
        if (ui.lastEventId) headers["Last-Event-ID"] = ui.lastEventId;
        quiet();
        const r = await fetch("/v1/events", { headers, signal: ctrl.signal, cache: "no-store", credentials: "omit" });
        if (r.status === 401) {
          signOut("The token was refused: unknown, revoked or expired.");
          return;
        }
        if (!r.ok || !r.body) throw new Error(`HTTP ${r.status}`);
        setLive("live");
        retry = RETRY_MIN_MS;
        refreshSessions(); // what changed while the stream was not there
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          quiet();
          buffer += value.replace(/\r\n?/g, "\n");
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            onBlock(block);
          }
        }
      } catch (_) {
        // dropped, refused or silent: try again below
      } finally {
        clearTimeout(watchdog);
      }
      if (!ui.token || ui.streamRun !== mine) return; // signed out, or a newer run took over
      setLive("reconnecting");
      await sleep(retry);
      retry = Math.min(retry * 2, RETRY_MAX_MS);
    }
  }

  function onBlock(block) {
    let data = "";
    let id = null;
    for (const line of block.split("\n")) {
      if (line.startsWith("data:")) data += line.slice(line[5] === " " ? 6 : 5);
      else if (line.startsWith("id:")) id = line.slice(line[3] === " " ? 4 : 3);
    }
    if (id !== null) ui.lastEventId = id;
    if (!data) return;
    let event;
    try {
      event = JSON.parse(data);
    } catch (_) {
      return;
    }
    if (event && typeof event.company === "string") onEvent(event);
  }

  function onEvent(event) {
    const company = event.company;
    const data = event.data && typeof event.data === "object" ? event.data : {};
    const record = ui.records.get(company);
    if (!record) {
      later(`record:${company}`, 200, () => refreshRecord(company)); // a company new to this page
      return;
    }
    const selected = ui.selected === company;
    switch (event.type) {
      case "state":
        record.state = data.state;
        record.reason = data.reason;
        if (typeof event.ts === "number") record.since = event.ts;
        renderRow(company);
        if (selected) renderDetail();
        later(`record:${company}`, 300, () => refreshRecord(company)); // phone, restarts, pid
        break;
      case "connected":
        if (data.phone) record.phone = data.phone;
        renderRow(company);
        break;
      case "qr":
        if (selected && record.state === "pairing") loadQr(); // a new code: the old image is stale
        break;
      case "message":
      case "sent": {
        const counts = ui.counts.get(company) || { in: 0, out: 0 };
        counts[event.type === "message" ? "in" : "out"] += 1;
        ui.counts.set(company, counts);
        renderRow(company);
        if (selected) later("messages", 300, loadMessages);
        if (selected) later("webhook", 1000, loadWebhook);
        break;
      }
      case "send_failed":
      case "receipt":
        if (selected) later("messages", 300, loadMessages);
        break;
      default:
        if (selected && event.type.startsWith("webhook")) later("webhook", 300, loadWebhook);
    }
  }

  // ------------------------------------------------------------------ wiring

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const token = $("token").value.trim();
      if (token) signIn(token);
    });
    $("signout").addEventListener("click", () => signOut(""));
    for (const button of document.querySelectorAll("#detail [data-action]")) {
      button.addEventListener("click", () => act(button.dataset.action));
    }
    $("new-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const company = $("new-company").value.trim();
      if (company) create(company);
    });
    $("pair-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const phone = $("pair-phone").value.trim();
      if (phone) pairingCode(phone);
    });
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) {
      signIn(token).then(() => {
        if (!ui.token) {
          $("login").hidden = false;
        }
      });
    } else {
      $("login").hidden = false;
      $("token").focus();
    }
  });
})();
