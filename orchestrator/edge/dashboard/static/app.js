// vmorch dashboard: hash-routed pages over the HTTP API. Everything shown comes from /api/v1
// with the pasted token (kept in sessionStorage only), so a page never shows more than the
// token may read, and actions the token's role may not take are not offered.

const API = "/api/v1";
const FINAL = new Set(["succeeded", "failed", "canceled"]);
const VM_STATES = ["running", "paused", "shutoff", "crashed", "missing", "unknown"];
const JOB_STATES = ["queued", "waiting", "running", "succeeded", "failed", "canceled"];
const OPS = ["launch", "start", "stop", "kill", "pause", "resume", "reboot", "delete", "set", "snapshot", "revert",
  "tag", "move-out", "move-in"];
// Confirmed before they are sent: they lose a running guest's state or the VM itself.
const DESTRUCTIVE = new Set(["stop", "kill", "reboot", "delete"]);
const VM_ACTIONS = ["start", "stop", "kill", "pause", "resume", "reboot", "snapshot", "delete"];
const POLL_MS = 2000;
const WAIT_S = 2; // long-poll slice: a job reaching its final state shows at once, other changes within it

const session = {
  token: sessionStorage.getItem("vmorch.token"),
  me: null, // whoami: {name, role, namespaces}
  ns: sessionStorage.getItem("vmorch.ns"),
  route: 0, // bumped on every page change so the old page's loops stop
  abort: new AbortController(),
};

class ApiError extends Error {
  constructor(status, error) {
    super(error.message);
    this.status = status;
    this.code = error.code;
    this.hint = error.hint;
  }
}

async function api(path, { method = "GET", body, signal } = {}) {
  const headers = { Authorization: `Bearer ${session.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(API + path, {
    method, headers, signal: signal ?? session.abort.signal,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await r.json().catch(() => null);
  if (!r.ok) {
    const error = data?.error ?? { code: `http_${r.status}`, message: r.statusText };
    if (r.status === 401) logout(error.message);
    throw new ApiError(r.status, error);
  }
  return data;
}

// -- small DOM helpers (text always goes in as text, never as HTML) --------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v; // through the CSSOM: the page's CSP refuses style attributes
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const $main = () => document.getElementById("main");
const badge = (state) => h("span", { class: `badge ${state}`, "data-state": state }, state);
const enc = encodeURIComponent;

// Times as the API gives them, without the ISO clutter: 2026-11-21 16:30:22 UTC
function when(iso) {
  if (!iso) return "–";
  return `${iso.replace("T", " ").slice(0, 19)} UTC`;
}

function ago(iso) {
  if (!iso) return "never";
  const s = (Date.now() - new Date(iso).getTime()) / 1000;
  if (s < 60) return `${Math.max(0, s).toFixed(1)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  return when(iso);
}

function bar(used, total, unit) {
  const pct = total > 0 ? (100 * used) / total : 0;
  const cls = pct > 100 ? "over" : pct >= 80 ? "high" : "";
  return h("div", { class: "bar", title: `${pct.toFixed(0)} % committed` },
    h("div", { class: `fill ${cls}`, style: `width:${Math.min(pct, 100)}%` }),
    h("span", {}, `${used} / ${total} ${unit}`));
}

function errorBox(e) {
  return h("div", { class: "error", role: "alert" }, e.message, e.hint ? ` — ${e.hint}` : "");
}

function jobLink(job) {
  return h("a", { href: `#/jobs/${job.id}` }, `#${job.id}`);
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

// -- who may do what ----------------------------------------------------------------------

function covers(ns) {
  const list = session.me?.namespaces ?? [];
  return list.includes("*") || list.includes(ns);
}

function mayOperate(ns) {
  return session.me !== null && session.me.role !== "read" && covers(ns);
}

// -- page loop: refresh while the page is shown ------------------------------------------------

// Calls `step` again and again until the user leaves the page; `step` returns how to wait:
// a promise (e.g. a long poll) or nothing (then a plain POLL_MS pause).
async function live(step, onError) {
  const mine = session.route;
  const { signal } = session.abort;
  while (mine === session.route) {
    try {
      const waiting = await step(signal);
      if (mine !== session.route) return;
      if (waiting) await waiting; else await sleep(POLL_MS, signal);
    } catch (e) {
      if (signal.aborted || mine !== session.route) return;
      onError(e);
      await sleep(POLL_MS, signal);
    }
  }
}

// Long poll on the unfinished jobs among `jobs`; resolves when all are final or after WAIT_S.
function waitFor(jobs, signal) {
  const ids = jobs.filter((j) => !FINAL.has(j.state)).map((j) => j.id).slice(0, 1000);
  if (!ids.length) return sleep(POLL_MS, signal);
  return api(`/jobs/wait?${ids.map((i) => `ids=${i}`).join("&")}&timeout=${WAIT_S}`, { signal });
}

// The jobs an action created, kept up to date until final: "show the job that was created".
function createdPanel() {
  const box = h("div", { class: "created", id: "created" });
  let jobs = [];
  const render = () => box.replaceChildren(...jobs.map((j) => h("a", { href: `#/jobs/${j.id}`, class: "created-job",
    "data-job": j.id }, `job #${j.id} ${j.op} ${j.vm} `, badge(j.state))));
  let following = false; // one long poll at a time covers every job of the panel
  const follow = async () => {
    if (following) return;
    following = true;
    try { await followAll(); } finally { following = false; }
  };
  const followAll = async () => {
    const mine = session.route;
    const { signal } = session.abort;
    while (mine === session.route && jobs.some((j) => !FINAL.has(j.state))) {
      const ids = jobs.filter((j) => !FINAL.has(j.state)).map((j) => `ids=${j.id}`).join("&");
      try {
        const fresh = await api(`/jobs/wait?${ids}&timeout=${WAIT_S}`, { signal });
        const byId = new Map(fresh.map((j) => [j.id, j]));
        jobs = jobs.map((j) => byId.get(j.id) ?? j);
        render();
      } catch {
        if (signal.aborted) return;
        await sleep(POLL_MS, signal);
      }
    }
  };
  return {
    el: box,
    add(created) { jobs = [...created, ...jobs].slice(0, 12); render(); follow(); },
  };
}

// -- pages --------------------------------------------------------------------------------

function loginPage(message) {
  const input = h("input", { type: "password", id: "token", placeholder: "vmo_…", autocomplete: "off" });
  const err = h("div");
  const form = h("form", {
    class: "panel login", id: "login",
    onsubmit: async (ev) => {
      ev.preventDefault();
      session.token = input.value.trim();
      try {
        await signIn();
        if (location.hash === "#/hosts") route(); else location.hash = "#/hosts";
      } catch (e) {
        sessionStorage.removeItem("vmorch.token");
        err.replaceChildren(errorBox(e));
      }
    },
  },
  h("h1", {}, "Sign in"),
  h("p", { class: "muted" }, "Paste an API token (made with 'vmorch token create'; ",
    "'vmorch up' writes an admin token to ~/.vmorch/token). It is kept in this tab only."),
  message ? h("div", { class: "error" }, message) : null,
  err, input, h("button", { class: "primary", type: "submit" }, "Sign in"));
  $main().replaceChildren(form);
  input.focus();
}

async function hostsPage() {
  const body = h("tbody");
  const err = h("div");
  const stamp = h("span", { class: "live" }, "live");
  $main().replaceChildren(h("h1", {}, "Hosts", stamp), err,
    h("table", { id: "hosts" }, h("thead", {}, h("tr", {}, ["Host", "State", "Memory committed", "vCPUs committed",
      "VMs", "Last heartbeat", "Worker"].map((c) => h("th", { class: c === "VMs" ? "num" : null }, c)))), body));
  await live(async () => {
    const hosts = await api("/hosts");
    err.replaceChildren();
    body.replaceChildren(...hosts.map((x) => h("tr", { "data-host": x.name },
      h("td", {}, h("b", {}, x.name), Object.entries(x.labels ?? {}).map(([k, v]) => [" ", h("span", { class: "chip" },
        `${k}=${v}`)])),
      h("td", {}, badge(x.state)),
      h("td", {}, bar(x.committed_mib, x.memory_mib, "MiB")),
      h("td", {}, bar(x.committed_vcpus, x.cpus, "vCPUs")),
      h("td", { class: "num" }, x.vms),
      h("td", { title: x.heartbeat_at ?? "" }, ago(x.heartbeat_at)),
      h("td", { class: "muted" }, `pid ${x.pid ?? "–"} · ${x.libvirt_uri}`))));
    if (!hosts.length) body.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No host has registered.")));
    stamp.textContent = `live · updated ${new Date().toLocaleTimeString(undefined, { hour12: false })}`;
  }, (e) => err.replaceChildren(errorBox(e)));
}

function needNs() {
  if (session.ns) return false;
  $main().replaceChildren(h("div", { class: "panel" }, "This token covers no namespace you can list yet; ",
    "pick one in the namespace box once it exists."));
  return true;
}

function launchForm(ns, created, err) {
  const f = (name, attrs) => h("label", { class: "field" }, name, h("input", attrs));
  const form = h("form", {
    class: "launch panel", id: "launch",
    onsubmit: async (ev) => {
      ev.preventDefault();
      const data = new FormData(form);
      const params = {
        memory_mib: Number(data.get("memory_mib")), vcpus: Number(data.get("vcpus")),
        disk_gib: Number(data.get("disk_gib")),
      };
      if (data.get("host")) params.host = data.get("host");
      const tags = String(data.get("tags")).split(",").map((t) => t.trim()).filter(Boolean);
      if (tags.length) params.tags = Object.fromEntries(tags.map((t) => {
        const [k, v] = t.split(/=(.*)/s);
        return [k, v ?? ""];
      }));
      try {
        created.add(await api(`/namespaces/${enc(ns)}/vms/${enc(data.get("name"))}/launch`,
          { method: "POST", body: params }));
        err.replaceChildren();
      } catch (e) {
        err.replaceChildren(errorBox(e));
      }
    },
  },
  h("b", { style: "align-self:center" }, "Launch"),
  f("name (or range web[1-3])", { name: "name", required: true, placeholder: "web1" }),
  f("memory MiB", { name: "memory_mib", type: "number", value: 64, min: 16 }),
  f("vCPUs", { name: "vcpus", type: "number", value: 1, min: 1 }),
  f("disk GiB", { name: "disk_gib", type: "number", value: 0, min: 0 }),
  f("tags", { name: "tags", placeholder: "role=web, tier=front" }),
  f("host (empty: placement)", { name: "host", placeholder: "any" }),
  h("button", { class: "primary", type: "submit" }, "Launch"));
  return form;
}

async function vmsPage() {
  if (needNs()) return;
  const ns = session.ns;
  const err = h("div");
  const created = createdPanel();
  const body = h("tbody");
  const filters = h("form", { class: "filters", id: "vm-filters", oninput: () => render() },
    h("label", { class: "field" }, "name", h("input", { name: "name", placeholder: "contains…" })),
    h("label", { class: "field" }, "tag", h("input", { name: "tag", placeholder: "key or key=value" })),
    h("label", { class: "field" }, "host", h("select", { name: "host" }, h("option", { value: "" }, "any"))),
    h("label", { class: "field" }, "state", h("select", { name: "state" }, h("option", { value: "" }, "any"),
      VM_STATES.map((s) => h("option", { value: s }, s)))));
  let vms = [];
  const render = () => {
    const q = Object.fromEntries(new FormData(filters));
    const [tk, tv] = q.tag.includes("=") ? q.tag.split(/=(.*)/s) : [q.tag, null];
    const shown = vms.filter((v) => (!q.name || v.name.includes(q.name)) && (!q.host || v.host === q.host)
      && (!q.state || v.state === q.state)
      && (!tk || (tk in v.tags && (tv === null || v.tags[tk] === tv))));
    body.replaceChildren(...shown.map((v) => h("tr", { "data-vm": v.name },
      h("td", {}, h("a", { href: `#/vms/${enc(v.name)}` }, v.name)),
      h("td", {}, badge(v.state)), h("td", {}, v.host),
      h("td", { class: "num" }, v.memory_mib), h("td", { class: "num" }, v.vcpus),
      h("td", {}, Object.entries(v.tags).map(([k, val]) => h("span", { class: "chip" }, `${k}=${val}`))),
      h("td", { class: "muted" }, v.snapshots.length || ""))));
    if (!shown.length) {
      body.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "muted" },
        vms.length ? "No VM matches the filters." : `No VM in namespace ${ns}.`)));
    }
  };
  $main().replaceChildren(h("h1", {}, `VMs in ${ns}`, h("span", { class: "live" }, "live")), err,
    mayOperate(ns) ? launchForm(ns, created, err) : null, created.el, filters,
    h("table", { id: "vms" }, h("thead", {}, h("tr", {}, ["Name", "State", "Host", "Memory MiB", "vCPUs", "Tags",
      "Snapshots"].map((c) => h("th", { class: /MiB|vCPUs/.test(c) ? "num" : null }, c)))), body));
  const hostSelect = filters.elements.host;
  await live(async () => {
    const [list, hosts] = await Promise.all([api(`/namespaces/${enc(ns)}/vms`), api("/hosts")]);
    vms = list;
    const have = new Set([...hostSelect.options].map((o) => o.value));
    for (const x of hosts) if (!have.has(x.name)) hostSelect.append(h("option", { value: x.name }, x.name));
    render();
  }, (e) => err.replaceChildren(errorBox(e)));
}

async function act(ns, vm, op, created, err) {
  let params;
  if (op === "snapshot") {
    const name = prompt(`Snapshot name for ${vm}:`, `snap-${new Date().toISOString().slice(11, 19).replaceAll(":", "")}`);
    if (!name) return;
    params = { name };
  }
  if (DESTRUCTIVE.has(op) && !confirm(`${op} VM ${vm} in ${ns}?`)) return;
  try {
    created.add(await api(`/namespaces/${enc(ns)}/vms/${enc(vm)}/${op}`, { method: "POST", body: params }));
    err.replaceChildren();
  } catch (e) {
    err.replaceChildren(errorBox(e));
  }
}

function jobRows(jobs, { current = null } = {}) {
  return jobs.map((j) => h("tr", { "data-job": j.id, class: j.id === current ? "current" : null },
    h("td", {}, jobLink(j)), h("td", {}, j.op), h("td", {}, h("a", { href: `#/vms/${enc(j.vm)}` }, j.vm)),
    h("td", {}, j.host), h("td", {}, badge(j.state)), h("td", { class: "num" }, j.seq),
    h("td", {}, when(j.submitted_at)), h("td", {}, when(j.finished_at)),
    h("td", { class: "muted" }, j.error ? j.error.message : "")));
}

const JOB_HEAD = () => h("thead", {}, h("tr", {}, ["Job", "Op", "VM", "Host", "State", "Seq", "Submitted", "Finished",
  "Error"].map((c) => h("th", { class: c === "Seq" ? "num" : null }, c))));

function holderText(holder) {
  if (!holder) return "free";
  const [owner, pid] = holder.split(":");
  return `held by ${owner} (pid ${pid})`;
}

async function vmPage(name) {
  if (needNs()) return;
  const ns = session.ns;
  const err = h("div");
  const created = createdPanel();
  const title = h("h1", {}, `VM ${name}`);
  const spec = h("dl", { class: "spec" });
  const tags = h("div");
  const snaps = h("div");
  const queueInfo = h("p", { class: "muted" });
  const queue = h("tbody");
  const history = h("tbody");
  const actions = mayOperate(ns)
    ? h("div", { class: "actions", id: "actions" }, VM_ACTIONS.map((op) => h("button", {
      class: `action ${DESTRUCTIVE.has(op) ? "danger" : ""}`, "data-op": op, type: "button",
      onclick: () => act(ns, name, op, created, err),
    }, op)))
    : null;
  $main().replaceChildren(title, vmTabs(name, "overview"), err, actions, created.el,
    h("div", { class: "grid2" },
      h("div", { class: "panel" }, h("h2", {}, "Spec"), spec),
      h("div", { class: "panel" }, h("h2", {}, "Tags"), tags, h("h2", { style: "margin-top:14px" }, "Snapshots"), snaps)),
    h("div", { class: "panel", style: "margin-top:16px" }, h("h2", {}, "Queue"), queueInfo,
      h("table", { id: "queue" }, JOB_HEAD(), queue)),
    h("div", { class: "panel" }, h("h2", {}, "History"),
      h("table", { id: "history" }, h("thead", {}, h("tr", {}, ["At", "What", "Job", "Op", "State", "By", "Detail"]
        .map((c) => h("th", {}, c)))), history)));
  await live(async (signal) => {
    const base = `/namespaces/${enc(ns)}`;
    const [vm, q, events] = await Promise.all([
      api(`${base}/vms/${enc(name)}`), api(`${base}/vms/${enc(name)}/queue`),
      api(`${base}/events?vm=${enc(name)}&limit=50`)]);
    err.replaceChildren();
    title.replaceChildren(`VM ${vm.name} `, badge(vm.state));
    const row = (k, v) => [h("dt", {}, k), h("dd", {}, v ?? "–")];
    spec.replaceChildren(...row("namespace", vm.namespace), ...row("host", vm.host), ...row("state", vm.state),
      ...row("memory", `${vm.memory_mib} MiB`), ...row("vCPUs", vm.vcpus), ...row("disk", `${vm.disk_gib} GiB`),
      ...row("image", vm.image), ...row("domain", vm.domain), ...row("created", when(vm.created_at)),
      ...row("updated", when(vm.updated_at)), ...(vm.note ? row("note", vm.note) : []));
    const tagList = Object.entries(vm.tags);
    tags.replaceChildren(...(tagList.length ? tagList.map(([k, v]) => h("span", { class: "chip" }, `${k}=${v}`))
      : [h("span", { class: "muted" }, "none")]));
    snaps.replaceChildren(...(vm.snapshots.length ? vm.snapshots.map((s) => h("span", { class: "chip snapshot" }, s))
      : [h("span", { class: "muted" }, "none")]));
    queueInfo.replaceChildren(`Jobs run one at a time under lock ${q.lock}, in seq order — now ${holderText(q.holder)}.`);
    const running = q.jobs.find((j) => j.state === "running");
    queue.replaceChildren(...(q.jobs.length ? jobRows(q.jobs, { current: running?.id ?? null })
      : [h("tr", {}, h("td", { colspan: 9, class: "muted" }, "Nothing queued."))]));
    history.replaceChildren(...events.reverse().map((e) => h("tr", {},
      h("td", {}, when(e.at)), h("td", {}, e.kind), h("td", {}, e.job ? h("a", { href: `#/jobs/${e.job}` }, `#${e.job}`) : ""),
      h("td", {}, e.op), h("td", {}, e.kind === "job" ? badge(e.state) : e.state), h("td", { class: "muted" }, e.by),
      h("td", { class: "muted" }, e.detail))));
    return q.jobs.length ? waitFor(q.jobs, signal) : null;
  }, (e) => err.replaceChildren(errorBox(e)));
}

// -- a VM's serial console ------------------------------------------------------------------
// One WebSocket per open console view (api/consolesocket.py): the token goes in its first
// message, never in the URL. The server decides who types: one writer lease per VM, shared with
// 'vmorch vm console'; a read token, or anyone while another session holds the lease, only watches.

// A terminal answers "where is the cursor?" (ESC [ 6 n) by typing the answer: never pass it on (as the CLI).
const CURSOR_QUERY = "\x1b[6n";
const CONSOLE_LINES = 500; // the last lines shown on opening; then everything as it comes

function vmTabs(name, current) {
  const tab = (id, label, href) => h("a", { href, class: id === current ? "active" : null, "data-tab": id }, label);
  return h("div", { class: "tabs", id: "vm-tabs" }, tab("overview", "Overview", `#/vms/${enc(name)}`),
    tab("console", "Console", `#/vms/${enc(name)}/console`));
}

// xterm.js styles its DOM renderer with <style> elements and style attributes, which the page's CSP
// refuses (style-src 'self', so that injected markup can't style the page either; even an empty
// <style> is refused). The same rules go through the CSSOM instead, which the CSP allows: a <style>
// asked for by script is an inert <template> with a constructed style sheet behind its textContent,
// and setting a style attribute sets the element's cssText.
const xtermSheets = new Set();
let cssomOnly = false;

function styleThroughCssom() {
  if (cssomOnly) return;
  cssomOnly = true;
  const create = Document.prototype.createElement;
  Document.prototype.createElement = function createElement(tag, options) {
    if (String(tag).toLowerCase() !== "style") return create.call(this, tag, options);
    const el = create.call(this, "template");
    const doc = this;
    const sheet = new CSSStyleSheet();
    xtermSheets.add(sheet);
    doc.adoptedStyleSheets = [...doc.adoptedStyleSheets, sheet];
    Object.defineProperty(el, "textContent", {
      get: () => [...sheet.cssRules].map((r) => r.cssText).join("\n"),
      set: (text) => sheet.replaceSync(String(text ?? "")),
    });
    el.remove = function remove() {
      xtermSheets.delete(sheet);
      doc.adoptedStyleSheets = doc.adoptedStyleSheets.filter((x) => x !== sheet);
      Element.prototype.remove.call(this);
    };
    return el;
  };
  const setAttribute = Element.prototype.setAttribute;
  Element.prototype.setAttribute = function set(name, value) {
    if (String(name).toLowerCase() === "style") this.style.cssText = String(value);
    else setAttribute.call(this, name, value);
  };
}

function dropXtermSheets() {
  document.adoptedStyleSheets = document.adoptedStyleSheets.filter((x) => !xtermSheets.has(x));
  xtermSheets.clear();
}

function consoleUrl(ns, name) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}${API}/namespaces/${enc(ns)}/vms/${enc(name)}/console/ws`;
}

async function consolePage(name) {
  if (needNs()) return;
  const ns = session.ns;
  const mine = session.route;
  const { signal } = session.abort;
  const err = h("div");
  const mode = h("span", { class: "console-mode", id: "console-mode", "data-mode": "connecting" }, "connecting…");
  const take = h("button", { type: "button", id: "console-take", hidden: true }, "Take the keyboard");
  const give = h("button", { type: "button", id: "console-release", hidden: true }, "Stop typing");
  const screen = h("div", { class: "console", id: "console" });
  $main().replaceChildren(h("h1", {}, `VM ${name}`), vmTabs(name, "console"), err,
    h("div", { class: "actions console-bar" }, mode, take, give), screen);
  let Terminal;
  try {
    ({ Terminal } = await import("./vendor/xterm.mjs")); // only when a console is opened
  } catch (e) {
    err.replaceChildren(errorBox(e));
    return;
  }
  if (mine !== session.route) return;
  styleThroughCssom();
  const term = new Terminal({ cols: 100, rows: 30, scrollback: 5000, fontSize: 13, cursorBlink: true,
    fontFamily: "ui-monospace, SFMono-Regular, Menlo, monospace", disableStdin: true });
  term.open(screen);
  let socket = null;
  let writer = false;
  const send = (msg) => { if (socket?.readyState === WebSocket.OPEN) socket.send(JSON.stringify(msg)); };
  take.addEventListener("click", () => send({ type: "claim" }));
  give.addEventListener("click", () => send({ type: "release" }));
  // A read-only session's keys go nowhere (and the server would drop them anyway).
  term.onData((data) => { if (writer) send({ type: "input", data }); });
  signal.addEventListener("abort", () => {
    socket?.close(1000, "left the page");
    term.dispose();
    dropXtermSheets();
  }, { once: true });
  const show = (m) => {
    writer = m.writer;
    term.options.disableStdin = !writer;
    mode.dataset.mode = writer ? "read-write" : "read-only";
    mode.textContent = writer ? "read-write: you type on this console" : `read-only: ${m.why ?? "watching"}`;
    take.hidden = writer || !mayOperate(ns);
    give.hidden = !writer;
    if (writer) term.focus();
  };
  // One connection; resolves when it ends (to reconnect after a pause), rejects on a refusal.
  const connect = () => new Promise((resolve, reject) => {
    const ws = new WebSocket(consoleUrl(ns, name));
    socket = ws;
    let refusal = null;
    ws.addEventListener("open", () => ws.send(JSON.stringify({ token: session.token, lines: CONSOLE_LINES })));
    ws.addEventListener("message", (ev) => {
      const m = JSON.parse(ev.data);
      if (m.type === "output") term.write(m.data.replaceAll(CURSOR_QUERY, ""));
      else if (m.type === "ready") { term.reset(); err.replaceChildren(); show(m); }
      else if (m.type === "mode") show(m);
      else if (m.type === "error") refusal = m.error;
    });
    ws.addEventListener("close", (ev) => {
      socket = null;
      writer = false;
      if (mine !== session.route) { resolve(); return; }
      take.hidden = give.hidden = true;
      if (ev.code >= 4000 && ev.code < 5000) {
        mode.dataset.mode = "refused";
        mode.textContent = "not connected";
        const e = new ApiError(ev.code - 4000, refusal ?? { code: `ws_${ev.code}`, message: ev.reason });
        if (e.status === 401) logout(e.message);
        reject(e);
        return;
      }
      mode.dataset.mode = "closed";
      mode.textContent = "disconnected: reconnecting…";
      resolve(sleep(POLL_MS, signal));
    });
  });
  await live(() => connect(), (e) => err.replaceChildren(errorBox(e)));
}

async function jobsPage() {
  if (needNs()) return;
  const ns = session.ns;
  const err = h("div");
  const body = h("tbody");
  const stamp = h("span", { class: "live", id: "jobs-live" }, "live");
  const filters = h("form", { class: "filters", id: "job-filters", onchange: () => kick() },
    h("label", { class: "field" }, "VM", h("input", { name: "vm", placeholder: "exact name" })),
    h("label", { class: "field" }, "state", h("select", { name: "state" }, h("option", { value: "" }, "any"),
      JOB_STATES.map((s) => h("option", { value: s }, s)))),
    h("label", { class: "field" }, "op", h("select", { name: "op" }, h("option", { value: "" }, "any"),
      OPS.map((s) => h("option", { value: s }, s)))),
    h("label", { class: "field" }, "show", h("select", { name: "limit" },
      [50, 200, 1000].map((n) => h("option", { value: n }, `${n} newest`)))));
  $main().replaceChildren(h("h1", {}, `Jobs in ${ns}`, stamp), err, filters,
    h("table", { id: "jobs" }, JOB_HEAD(), body));
  // A filter change cuts the current long poll short instead of waiting it out.
  let poll = new AbortController();
  const kick = () => poll.abort();
  session.abort.signal.addEventListener("abort", kick);
  await live(async () => {
    poll = new AbortController();
    const q = new URLSearchParams([...new FormData(filters)].filter(([, v]) => v !== ""));
    const jobs = await api(`/namespaces/${enc(ns)}/jobs?${q}`);
    err.replaceChildren();
    body.replaceChildren(...(jobs.length ? jobRows(jobs)
      : [h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No job matches."))]));
    stamp.textContent = `live · updated ${new Date().toLocaleTimeString(undefined, { hour12: false })}`;
    return waitFor(jobs, poll.signal).catch((e) => { if (!poll.signal.aborted) throw e; });
  }, (e) => err.replaceChildren(errorBox(e)));
}

function timeline(job, events) {
  const first = (state) => events.find((e) => e.kind === "job" && e.state === state);
  const order = ["queued", "waiting", "running"];
  const reached = job.state === "queued" ? 0 : job.state === "waiting" ? 1 : job.state === "running" ? 2 : 3;
  const steps = order.map((s, i) => {
    const ev = first(s);
    const cls = i < reached ? "done" : i === reached ? "now" : "";
    const at = ev?.at ?? (s === "queued" ? job.submitted_at : s === "running" ? job.started_at : null);
    return h("li", { class: cls, "data-step": s }, h("b", {}, s), h("small", {}, at ? when(at) : i > reached ? "–"
      : "skipped"), ev?.by ? h("small", {}, `by ${ev.by}`) : null, ev?.detail ? h("small", {}, ev.detail) : null);
  });
  const final = FINAL.has(job.state);
  const ev = final ? first(job.state) : null;
  steps.push(h("li", { class: !final ? "" : job.state === "succeeded" ? "done" : "bad", "data-step": "final" },
    h("b", {}, final ? job.state : "final"), h("small", {}, final ? when(job.finished_at) : "–"),
    ev?.detail ? h("small", {}, ev.detail) : null));
  return h("ol", { class: "timeline", id: "timeline" }, steps);
}

// What the job waited for: the VM lock, and who held it -- read live while the job waits;
// afterwards, the job just ahead of it in the VM's order if that one was still unfinished then.
async function lockStory(job, queue) {
  const lock = queue.lock;
  if (!FINAL.has(job.state) && job.state !== "running") {
    const ahead = queue.jobs.filter((j) => j.seq < job.seq);
    return [`Waits for lock ${lock}, ${holderText(queue.holder)}. `,
      ahead.length ? ["Ahead of it in the VM's order: ", ahead.map((j) => [jobLink(j), ` ${j.op} (${j.state}) `])]
        : "Nothing ahead of it in the VM's order."];
  }
  const before = await api(`/namespaces/${enc(job.namespace)}/jobs?vm=${enc(job.vm)}&before=${job.id}&limit=20`);
  const prev = before.find((j) => j.seq === job.seq - 1);
  const waited = prev && prev.finished_at && job.submitted_at && prev.finished_at > job.submitted_at;
  const now = job.state === "running" ? `Runs under lock ${lock}, ${holderText(queue.holder)}. ` : `Ran under lock ${lock}. `;
  return [now, waited
    ? ["It waited behind ", jobLink(prev), ` ${prev.op}, which held it until ${when(prev.finished_at)}.`]
    : "The VM's previous job had finished when it was submitted, so it did not wait for another job."];
}

async function jobPage(id) {
  const err = h("div");
  const title = h("h1", {}, `Job #${id}`);
  const buttons = h("div", { class: "actions", id: "job-actions" });
  const tl = h("div");
  const lock = h("p", { id: "lock" });
  const spec = h("dl", { class: "spec" });
  const events = h("tbody");
  const extra = h("div", { class: "stack" });
  $main().replaceChildren(title, err, buttons,
    h("div", { class: "panel" }, h("h2", {}, "Timeline"), tl, lock),
    h("div", { class: "grid2" }, h("div", { class: "panel" }, h("h2", {}, "Job"), spec),
      h("div", { class: "panel" }, h("h2", {}, "Parameters, result, error"), extra)),
    h("div", { class: "panel", style: "margin-top:16px" }, h("h2", {}, "Events"),
      h("table", { id: "job-events" }, h("thead", {}, h("tr", {}, ["At", "State", "By", "Detail"].map((c) => h("th", {}, c)))),
        events)));
  let done = false;
  await live(async (signal) => {
    if (done) return sleep(24 * 3600 * 1000, signal); // final: nothing changes any more
    const job = await api(`/jobs/${id}`);
    const base = `/namespaces/${enc(job.namespace)}`;
    // A parent job (a bulk command's) has no VM, so no queue: its children tell its story.
    const [evs, queue, children] = await Promise.all([api(`${base}/events?job_id=${id}&limit=100`),
      job.vm ? api(`${base}/vms/${enc(job.vm)}/queue`) : null,
      job.vm ? null : api(`/jobs/${id}/children`)]);
    err.replaceChildren();
    title.replaceChildren(`Job #${job.id} ${job.op} `, h("a", { href: `#/vms/${enc(job.vm)}` }, job.vm), " ",
      badge(job.state));
    const canCancel = mayOperate(job.namespace) && !FINAL.has(job.state);
    const canRetry = mayOperate(job.namespace) && job.state === "failed";
    buttons.replaceChildren(...(canCancel ? [h("button", {
      class: "danger action", "data-op": "cancel", type: "button",
      onclick: async () => {
        if (!confirm(`Cancel job #${job.id} (${job.op} ${job.vm})?`)) return;
        try { await api(`/jobs/${job.id}/cancel`, { method: "POST" }); } catch (e) { err.replaceChildren(errorBox(e)); }
      },
    }, "cancel")] : []), ...(canRetry ? [h("button", {
      class: "action", "data-op": "retry", type: "button",
      onclick: async () => {
        try {
          const jobs = await api(`/jobs/${job.id}/retry`, { method: "POST" });
          const next = jobs[0].parent ?? jobs[0].id; // a parent's retry is a new parent over the failed children
          location.hash = `#/jobs/${next}`;
        } catch (e) { err.replaceChildren(errorBox(e)); }
      },
    }, "retry")] : []));
    tl.replaceChildren(timeline(job, evs));
    if (queue) {
      lock.replaceChildren(...[await lockStory(job, queue)].flat(Infinity));
    } else {
      lock.replaceChildren(h("div", { id: "job-children" }, `Children (${children.length}): `,
        ...children.map((c) => h("span", {}, jobLink(c), ` ${c.vm} `, badge(c.state), " "))));
    }
    const row = (k, v) => [h("dt", {}, k), h("dd", {}, v ?? "–")];
    spec.replaceChildren(...row("namespace", job.namespace), ...row("VM", job.vm), ...row("host", job.host),
      ...row("seq", job.seq), ...row("attempts", job.attempts), ...row("submitted", when(job.submitted_at)),
      ...row("started", when(job.started_at)), ...row("finished", when(job.finished_at)),
      ...(job.cancel_requested_by ? row("cancel asked by", job.cancel_requested_by) : []));
    extra.replaceChildren(h("pre", {}, `params ${JSON.stringify(job.params, null, 1)}`),
      h("pre", {}, `result ${JSON.stringify(job.result, null, 1)}`),
      ...(job.error ? [h("div", { class: "error", id: "job-error" }, `${job.error.code}: ${job.error.message}`,
        job.error.hint ? ` — ${job.error.hint}` : "")] : []));
    events.replaceChildren(...evs.map((e) => h("tr", {}, h("td", {}, when(e.at)), h("td", {}, badge(e.state)),
      h("td", { class: "muted" }, e.by), h("td", { class: "muted" }, e.detail))));
    done = FINAL.has(job.state);
    return done ? null : api(`/jobs/${id}/wait?timeout=${WAIT_S}`, { signal });
  }, (e) => err.replaceChildren(errorBox(e)));
}

// -- schedules and experiment runs ----------------------------------------------------------

function until(iso) {
  const s = (new Date(iso).getTime() - Date.now()) / 1000;
  if (s < 60) return `in ${Math.max(0, s).toFixed(1)} s`;
  if (s < 3600) return `in ${Math.floor(s / 60)} min`;
  if (s < 48 * 3600) return `in ${Math.floor(s / 3600)} h`;
  return `in ${Math.floor(s / 86400)} days`;
}

const scheduleBadge = (s) => badge(s.paused ? "paused" : "active");

function nextFiring(s) {
  if (s.paused) return h("span", { class: "muted" }, "paused");
  if (!s.next_at) return h("span", { class: "muted" }, "none (done)");
  return [when(s.next_at), " ", h("span", { class: "muted" }, `(${until(s.next_at)})`)];
}

// Children final out of all of a parent job's children: a step's progress.
function progress(job) {
  const c = job?.children;
  if (!c) return h("span", { class: "muted" }, "–");
  const done = c.total - c.pending;
  const pct = c.total > 0 ? (100 * done) / c.total : 0;
  const bad = c.failed + c.canceled;
  return h("div", { class: "bar progress", title: `${c.succeeded} succeeded, ${c.failed} failed, ${c.canceled} canceled` },
    h("div", { class: `fill ${bad ? "bad" : ""}`, style: `width:${pct}%` }),
    h("span", {}, `${done} / ${c.total}`, bad ? ` · ${bad} not succeeded` : ""));
}

function head(...cols) {
  return h("thead", {}, h("tr", {}, cols.map((c) => h("th", {}, c))));
}

function sourceLink(source) {
  const m = /^schedule:(.+)$/.exec(source ?? "");
  if (m) return ["schedule ", h("a", { href: `#/schedules/${enc(m[1])}` }, m[1])];
  return source || h("span", { class: "muted" }, "–");
}

function stamped(stamp) {
  stamp.textContent = `live · updated ${new Date().toLocaleTimeString(undefined, { hour12: false })}`;
}

async function schedulesPage() {
  if (needNs()) return;
  const ns = session.ns;
  const err = h("div");
  const body = h("tbody");
  const stamp = h("span", { class: "live" }, "live");
  $main().replaceChildren(h("h1", {}, `Schedules in ${ns}`, stamp), err,
    h("table", { id: "schedules" }, head("Name", "When", "What", "Next firing", "State", "Last firing", "By"), body));
  await live(async () => {
    const list = await api(`/namespaces/${enc(ns)}/schedules`);
    err.replaceChildren();
    body.replaceChildren(...list.map((s) => {
      const last = s.history[0];
      return h("tr", { "data-schedule": s.name },
        h("td", {}, h("a", { href: `#/schedules/${enc(s.name)}` }, s.name)),
        h("td", {}, s.when), h("td", { class: "what" }, s.what),
        h("td", { "data-col": "next", title: s.next_at ?? "" }, nextFiring(s)),
        h("td", { "data-col": "state" }, scheduleBadge(s)),
        h("td", { "data-col": "last" }, last ? [badge(last.state), " ",
          h("span", { class: "muted", title: last.fired_at }, ago(last.fired_at))] : h("span", { class: "muted" }, "never")),
        h("td", { class: "muted" }, s.by));
    }));
    if (!list.length) {
      body.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "muted" },
        `No schedule in namespace ${ns} ('vmorch schedule add' makes one).`)));
    }
    stamped(stamp);
  }, (e) => err.replaceChildren(errorBox(e)));
}

async function schedulePage(name) {
  if (needNs()) return;
  const ns = session.ns;
  const path = `/namespaces/${enc(ns)}/schedules/${enc(name)}`;
  const err = h("div");
  const title = h("h1", {}, `Schedule ${name}`);
  const buttons = h("div", { class: "actions", id: "schedule-actions" });
  const spec = h("dl", { class: "spec", id: "schedule-spec" });
  const firings = h("tbody");
  const stamp = h("span", { class: "live" }, "live");
  $main().replaceChildren(title, err, buttons, h("div", { class: "panel" }, h("h2", {}, "Schedule"), spec),
    h("div", { class: "panel" }, h("h2", {}, "Firings, newest first ", stamp),
      h("table", { id: "firings" }, head("Slot", "Fired at", "State", "By", "Run", "Jobs", "Error"), firings)));
  let jobs = new Map(); // the firings' jobs as last read, by id
  const send = async (op) => {
    try {
      const s = await api(`${path}/${op}`, { method: "POST" });
      err.replaceChildren();
      render(s);
    } catch (e) { err.replaceChildren(errorBox(e)); }
  };
  const remove = async () => {
    if (!confirm(`Remove schedule ${name} from ${ns}? Its history goes with it.`)) return;
    try {
      await api(path, { method: "DELETE" });
      location.hash = "#/schedules";
    } catch (e) { err.replaceChildren(errorBox(e)); }
  };
  const render = (s) => {
    title.replaceChildren(`Schedule ${s.name} `, scheduleBadge(s));
    // A read token is offered no buttons (the API would refuse them anyway).
    buttons.replaceChildren(...(mayOperate(ns) ? [
      s.paused
        ? h("button", { class: "action primary", "data-op": "resume", type: "button", onclick: () => send("resume") },
          "resume")
        : h("button", { class: "action", "data-op": "pause", type: "button", onclick: () => send("pause") }, "pause"),
      h("button", { class: "action danger", "data-op": "remove", type: "button", onclick: remove }, "remove"),
    ] : []));
    const row = (k, v, field) => [h("dt", {}, k), h("dd", { "data-field": field }, v ?? "–")];
    spec.replaceChildren(...row("namespace", s.namespace), ...row("when", s.when, "when"),
      ...row("what", s.what, "what"), ...row("next firing", nextFiring(s), "next"),
      ...row("state", s.paused ? "paused: fires no more until resumed" : "active", "state"),
      ...row("last slot", when(s.last_slot)),
      ...row("missed firings", s.missed === "skip" ? "skipped (more than 60 s late)" : "run once, late"),
      ...row("created", when(s.created_at)), ...row("by", s.by));
    firings.replaceChildren(...s.history.map((f) => h("tr", { "data-slot": f.slot },
      h("td", {}, when(f.slot)), h("td", {}, when(f.fired_at)), h("td", {}, badge(f.state)),
      h("td", { class: "muted" }, f.by),
      h("td", {}, f.run ? h("a", { href: `#/experiments/${f.run}` }, `run #${f.run}`) : ""),
      h("td", { class: "firing-jobs" }, f.jobs.map((i) => h("span", { class: "job-ref" }, jobLink({ id: i }), " ",
        jobs.has(i) ? badge(jobs.get(i).state) : null, " "))),
      h("td", { class: "muted" }, f.error ?? ""))));
    if (!s.history.length) {
      firings.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "It has not fired yet.")));
    }
  };
  await live(async () => {
    const s = await api(`${path}?history=30`);
    const ids = [...new Set(s.history.flatMap((f) => f.jobs))].slice(0, 1000);
    if (ids.some((i) => !FINAL.has(jobs.get(i)?.state))) {
      try {
        const fresh = await api(`/jobs/wait?${ids.map((i) => `ids=${i}`).join("&")}&timeout=0`);
        jobs = new Map(fresh.map((j) => [j.id, j]));
      } catch (e) {
        if (e.status !== 404) throw e; // a job gone from the store: its state is not shown
      }
    }
    err.replaceChildren();
    render(s);
    stamped(stamp);
  }, (e) => err.replaceChildren(errorBox(e)));
}

const stepJobs = (run) => Object.values(run.jobs);

async function experimentsPage() {
  if (needNs()) return;
  const ns = session.ns;
  const err = h("div");
  const body = h("tbody");
  const stamp = h("span", { class: "live" }, "live");
  const filters = h("form", { class: "filters", id: "run-filters", onchange: () => poll.abort() },
    h("label", { class: "field" }, "show", h("select", { name: "limit" },
      [20, 100, 1000].map((n) => h("option", { value: n }, `${n} newest`)))));
  $main().replaceChildren(h("h1", {}, `Experiment runs in ${ns}`, stamp), err, filters,
    h("table", { id: "runs" }, head("Run", "Name", "State", "Steps final", "Started", "Source", "By"), body));
  let poll = new AbortController();
  session.abort.signal.addEventListener("abort", () => poll.abort());
  await live(async () => {
    poll = new AbortController();
    const runs = await api(`/namespaces/${enc(ns)}/experiments?limit=${filters.elements.limit.value}`);
    err.replaceChildren();
    body.replaceChildren(...runs.map((r) => {
      const jobs = stepJobs(r);
      const total = { total: r.steps.length, pending: jobs.filter((j) => !FINAL.has(j.state)).length,
        succeeded: jobs.filter((j) => j.state === "succeeded").length,
        failed: jobs.filter((j) => j.state === "failed").length,
        canceled: jobs.filter((j) => j.state === "canceled").length };
      return h("tr", { "data-run": r.id },
        h("td", {}, h("a", { href: `#/experiments/${r.id}` }, `#${r.id}`)), h("td", {}, r.name),
        h("td", {}, badge(r.state)), h("td", {}, progress({ children: total })), h("td", {}, when(r.started_at)),
        h("td", {}, sourceLink(r.source)), h("td", { class: "muted" }, r.by));
    }));
    if (!runs.length) {
      body.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "muted" },
        `No experiment run in namespace ${ns} ('vmorch experiment run FILE' starts one).`)));
    }
    stamped(stamp);
    const running = runs.filter((r) => !FINAL.has(r.state)).flatMap(stepJobs);
    return waitFor(running, poll.signal).catch((e) => { if (!poll.signal.aborted) throw e; });
  }, (e) => err.replaceChildren(errorBox(e)));
}

async function runPage(id) {
  if (needNs()) return;
  const ns = session.ns;
  const err = h("div");
  const title = h("h1", {}, `Run #${id}`);
  const spec = h("dl", { class: "spec" });
  const steps = h("tbody");
  const stamp = h("span", { class: "live" }, "live");
  $main().replaceChildren(title, err, h("div", { class: "panel" }, h("h2", {}, "Run"), spec),
    h("div", { class: "panel" }, h("h2", {}, "Steps, in order ", stamp),
      h("table", { id: "steps" }, head("Step", "Kind", "After", "Job", "State", "Progress", "Started", "Finished",
        "Error"), steps)));
  let done = false;
  await live(async (signal) => {
    if (done) return sleep(24 * 3600 * 1000, signal); // final: nothing changes any more
    const run = await api(`/namespaces/${enc(ns)}/experiments/${id}`);
    err.replaceChildren();
    title.replaceChildren(`Run #${run.id} ${run.name} `, badge(run.state));
    const jobs = stepJobs(run);
    const finished = FINAL.has(run.state) ? jobs.map((j) => j.finished_at).filter(Boolean).sort().pop() : null;
    const row = (k, v) => [h("dt", {}, k), h("dd", {}, v ?? "–")];
    spec.replaceChildren(...row("name", run.name), ...row("namespace", run.namespace), ...row("state", run.state),
      ...row("source", sourceLink(run.source)), ...row("by", run.by), ...row("started", when(run.started_at)),
      ...row("finished", when(finished)),
      ...row("steps final", `${jobs.filter((j) => FINAL.has(j.state)).length} of ${run.steps.length}`));
    steps.replaceChildren(...run.steps.map((s) => {
      const j = run.jobs[s.name];
      return h("tr", { "data-step": s.name, "data-kind": s.kind },
        h("td", {}, h("b", {}, s.name)), h("td", {}, s.kind),
        h("td", { class: "muted" }, s.after.join(", ")),
        h("td", {}, jobLink({ id: s.job })), h("td", {}, j ? badge(j.state) : h("span", { class: "muted" }, "gone")),
        h("td", {}, progress(j)), h("td", {}, when(j?.started_at)), h("td", {}, when(j?.finished_at)),
        h("td", { class: "muted" }, j?.error ? j.error.message : ""));
    }));
    stamped(stamp);
    done = FINAL.has(run.state);
    return done ? null : waitFor(jobs, signal);
  }, (e) => err.replaceChildren(errorBox(e)));
}

// -- session, navigation ------------------------------------------------------------------

async function signIn() {
  session.me = await api("/whoami");
  sessionStorage.setItem("vmorch.token", session.token);
  const listed = (await api("/namespaces")).map((n) => n.name);
  const named = session.me.namespaces.filter((n) => n !== "*");
  // A cluster-wide token may use namespaces that hold nothing yet, the CLI's "default" first.
  const anyNs = session.me.namespaces.includes("*");
  const all = [...new Set([...named, ...listed, ...(anyNs ? ["default"] : []), ...(session.ns ? [session.ns] : [])])]
    .filter(covers).sort();
  if (!all.includes(session.ns)) session.ns = all.includes("default") ? "default" : all[0] ?? null;
  if (session.ns) sessionStorage.setItem("vmorch.ns", session.ns);
  const select = document.getElementById("ns-select");
  select.replaceChildren(...all.map((n) => h("option", { value: n, selected: n === session.ns }, n)),
    anyNs ? h("option", { value: "" }, "other…") : null);
  document.getElementById("nav").hidden = false;
  document.getElementById("who").replaceChildren(
    h("span", { id: "whoami", "data-role": session.me.role }, `${session.me.name} · ${session.me.role}`),
    h("button", { type: "button", id: "logout", onclick: () => logout() }, "Sign out"));
}

function logout(message) {
  session.token = null;
  session.me = null;
  sessionStorage.removeItem("vmorch.token");
  document.getElementById("nav").hidden = true;
  document.getElementById("who").replaceChildren();
  newRoute();
  loginPage(message);
}

function newRoute() {
  session.route += 1;
  session.abort.abort();
  session.abort = new AbortController();
}

async function route() {
  newRoute();
  if (!session.token) return loginPage();
  if (!session.me) {
    try { await signIn(); } catch (e) { if (e.status !== 401) logout(e.message); return; }
  }
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === parts[0]);
  if (parts[0] === "vms" && parts[1] && parts[2] === "console") return consolePage(parts[1]);
  if (parts[0] === "vms" && parts[1]) return vmPage(parts[1]);
  if (parts[0] === "vms") return vmsPage();
  if (parts[0] === "jobs" && parts[1]) return jobPage(Number(parts[1]));
  if (parts[0] === "jobs") return jobsPage();
  if (parts[0] === "schedules" && parts[1]) return schedulePage(parts[1]);
  if (parts[0] === "schedules") return schedulesPage();
  if (parts[0] === "experiments" && parts[1]) return runPage(Number(parts[1]));
  if (parts[0] === "experiments") return experimentsPage();
  return hostsPage();
}

document.getElementById("ns-select").addEventListener("change", async (ev) => {
  const picked = ev.target.value || prompt("Namespace:")?.trim();
  if (picked && !covers(picked)) alert(`This token does not cover namespace ${picked}.`);
  if (!picked || !covers(picked)) {
    ev.target.value = session.ns ?? "";
    return;
  }
  session.ns = picked;
  if (!ev.target.value) await signIn(); // lists the new name in the select
  sessionStorage.setItem("vmorch.ns", session.ns);
  // another namespace's VM, schedule or run: back to the list
  const detail = /^#\/(vms|schedules|experiments)\/./.exec(location.hash);
  if (detail) location.hash = `#/${detail[1]}`;
  else route();
});
window.addEventListener("hashchange", route);
route();
