// Nightshift's minimal web page: dev sign-in, new session, and a live view of a session's event stream.
// Plain modules, no build step; the full app comes later.

const app = document.getElementById("app");
const meEl = document.getElementById("me");

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: body ? { "content-type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
    credentials: "same-origin",
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error ? `${data.error.code}: ${data.error.message}` : `HTTP ${response.status}`);
  return data;
}

async function me() {
  try { return await api("GET", "/api/me"); } catch { return null; }
}

function signInForm(next) {
  const login = el("input", { name: "login", placeholder: "login", required: "" });
  const name = el("input", { name: "name", placeholder: "Name", required: "" });
  const email = el("input", { name: "email", placeholder: "email@example.com", required: "" });
  const status = el("p", { class: "muted" });
  const form = el("form", {
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        await api("POST", "/auth/dev", { login: login.value, name: name.value, email: email.value });
        next();
      } catch (err) { status.textContent = String(err); }
    },
  }, login, name, email, el("button", { type: "submit" }, "Sign in (dev)"));
  return el("section", {}, el("h2", {}, "Sign in"), el("p", { class: "muted" }, "Dev sign-in: pick any identity."), form, status);
}

function home(user) {
  const repo = el("input", { name: "repo", value: "demo/hello", required: "" });
  const status = el("p", { class: "muted" });
  const form = el("form", {
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        const created = await api("POST", "/api/sessions", { repo: repo.value });
        location.href = `/s/${created.id}`;
      } catch (err) { status.textContent = String(err); }
    },
  }, repo, el("button", { type: "submit", id: "create" }, "New session"));
  const mine = el("ul", { id: "sessions" });
  app.replaceChildren(el("h2", {}, `Hello, ${user.name}`), form, status, el("h3", {}, "Your sessions"), mine);
  // Sessions you created or joined, most recently active first (the D1 index).
  api("GET", "/api/sessions").then(({ sessions }) => {
    mine.replaceChildren(...sessions.map((s) => el("li", {},
      el("a", { href: `/s/${s.id}` }, s.title), ` · ${s.repo} · ${s.status} · ${s.role} · ${s.participants.join(", ")}`)));
  }).catch((err) => { mine.replaceChildren(el("li", { class: "muted" }, String(err))); });
}

function describe(event) {
  switch (event.type) {
    case "prompt_queued": return `${event.author.name} (${event.author.login}) asked: ${event.text}`;
    case "prompt_started": return `started ${event.prompt_id}`;
    case "prompt_finished": return `finished ${event.prompt_id}: ${event.status}${event.error ? " — " + event.error : ""}`;
    case "prompt_cancelled": return `cancelled ${event.prompt_id}${event.by ? " by " + event.by : ""}`;
    case "message": return `${event.role}: ${event.text}`;
    case "tool_call": return `→ ${event.tool} ${JSON.stringify(event.input).slice(0, 300)}`;
    case "tool_result": return `← ${event.ok ? "ok" : "error"} (${event.duration_ms} ms) ${event.output.slice(0, 300)}`;
    case "tool_output": return `  ${event.text.slice(0, 300)}`;
    case "git_sync": return `git sync ${event.state}${event.commit ? " @ " + event.commit.slice(0, 12) : ""}`;
    case "file_changed": return `${event.change} ${event.path} +${event.additions} −${event.deletions}`;
    case "sandbox_status": return `sandbox ${event.status}${event.detail ? " — " + event.detail : ""}`;
    case "usage": return `usage: ${event.input_tokens} in, ${event.output_tokens} out, cost ${event.cost_usd ?? "unknown"}`;
    case "notice": return `${event.level}: ${event.text}`;
    case "push": return `pushed ${event.branch} @ ${event.commit}`;
    case "snapshot": return `snapshot ${event.id.slice(0, 12)} (${event.reason.replaceAll("_", " ")})`;
    default: return JSON.stringify(event);
  }
}

function sessionView(user, id) {
  const title = el("h2", {}, "Session");
  const people = el("div", { id: "people" });
  const sandbox = el("span", { class: "pill", id: "sandbox" }, "sandbox: …");
  const stream = el("div", { class: "stream", id: "stream" });
  const log = el("div", { id: "log" });
  let typingSentMs = 0;
  const text = el("textarea", { id: "prompt", placeholder: "Ask the agent…", oninput: () => {
    // Others see "typing…" for a few seconds after each `typing`; one every 2 s keeps it on.
    if (Date.now() - typingSentMs < 2000 || socket?.readyState !== WebSocket.OPEN) return;
    typingSentMs = Date.now();
    socket.send(JSON.stringify({ type: "typing" }));
  } });
  const share = el("button", { class: "secondary", type: "button", onclick: async () => {
    const invite = await api("POST", `/api/sessions/${id}/invites`);
    shareOut.textContent = invite.share_url;
  } }, "Invite");
  const shareOut = el("code", { id: "share" });
  let socket; let lastSeq = 0; let streamingPrompt = null;

  const form = el("form", {
    onsubmit: (e) => {
      e.preventDefault();
      if (!text.value.trim() || !socket || socket.readyState !== WebSocket.OPEN) return;
      socket.send(JSON.stringify({ type: "prompt", text: text.value, idempotency_key: crypto.randomUUID() }));
      text.value = "";
    },
  }, text, el("button", { type: "submit", id: "send" }, "Send"),
     el("button", { class: "secondary", type: "button", onclick: () => socket?.send(JSON.stringify({ type: "stop", scope: "turn" })) }, "Stop"));
  app.replaceChildren(title, el("div", { class: "row" }, sandbox, people, share, shareOut), form,
    el("h3", {}, "Live output"), stream, el("h3", {}, "Events"), log);

  function onEvent({ seq, event }) {
    if (seq <= lastSeq) return;
    lastSeq = seq;
    if (event.type === "token") {
      if (streamingPrompt !== event.prompt_id) { stream.textContent = ""; streamingPrompt = event.prompt_id; }
      stream.textContent += event.text;
      return;
    }
    if (event.type === "message" && event.role === "assistant") stream.textContent += "\n\n";
    if (event.type === "sandbox_status") sandbox.textContent = `sandbox: ${event.status}`;
    log.append(el("div", { class: `ev ${event.type}`, "data-seq": String(seq) }, el("span", { class: "seq" }, `#${seq}`), describe(event)));
    log.scrollTop = log.scrollHeight;
  }

  function connect(delayMs = 0) {
    setTimeout(() => {
      const scheme = location.protocol === "https:" ? "wss" : "ws";
      socket = new WebSocket(`${scheme}://${location.host}/api/sessions/${id}/ws`);
      socket.onopen = () => socket.send(JSON.stringify({ type: "hello", protocol_version: 1, last_seq: lastSeq, client: "web" }));
      socket.onmessage = (m) => {
        const msg = JSON.parse(m.data);
        if (msg.type === "welcome") title.textContent = msg.session.title;
        if (msg.type === "welcome" || msg.type === "presence") {
          people.replaceChildren(...msg.participants.map((p) =>
            el("span", { class: `pill${p.online ? " online" : ""}`, title: p.role }, p.typing ? `${p.name} (typing…)` : p.name)));
        }
        if (msg.type === "event") onEvent(msg);
        if (msg.type === "events") msg.events.forEach(onEvent);
        if (msg.type === "error") log.append(el("div", { class: "ev error" }, `${msg.code}: ${msg.message}`));
      };
      socket.onclose = () => connect(Math.min(5000, (delayMs || 250) * 2));
    }, delayMs);
  }
  connect();
}

async function main() {
  const path = location.pathname;
  let session = await me();
  if (session) meEl.textContent = `${session.user.name} (${session.user.login})`;
  if (!session) {
    app.replaceChildren(signInForm(() => location.reload()));
    return;
  }
  const join = path.match(/^\/join\/([0-9a-f]{32}\.[0-9a-f]+)$/);
  if (join) {
    try {
      const joined = await api("POST", `/api/join/${join[1]}`);
      location.replace(`/s/${joined.id}`);
    } catch (err) { app.replaceChildren(el("p", {}, `Could not join: ${err}`)); }
    return;
  }
  const open = path.match(/^\/s\/([0-9a-f]{32})$/);
  if (open) sessionView(session.user, open[1]);
  else home(session.user);
}

main();
