// `/`: the sessions the signed-in person owns or joined, newest activity first, with filters.
import { useEffect, useState } from "preact/hooks";
import { api, describeError } from "../api";
import { markReady } from "../route";
import { ago, dateTime } from "../time";
import type { SessionStatus, SessionSummary } from "../wire";

const STATUSES: SessionStatus[] = ["starting", "idle", "running", "stopped", "failed"];
const FILTER_DEBOUNCE_MS = 250;

type Load = { state: "loading" } | { state: "failed"; message: string } | { state: "loaded"; sessions: SessionSummary[] };

export function SessionsPage() {
  const [repo, setRepo] = useState("");
  const [appliedRepo, setAppliedRepo] = useState("");
  const [status, setStatus] = useState<SessionStatus | "">("");
  const [load, setLoad] = useState<Load>({ state: "loading" });
  const [nowMs, setNowMs] = useState(Date.now());

  useEffect(() => {
    const timer = setTimeout(() => setAppliedRepo(repo.trim()), FILTER_DEBOUNCE_MS);
    return () => clearTimeout(timer);
  }, [repo]);

  useEffect(() => {
    let live = true;
    const fetchList = () =>
      api
        .sessions({ repo: appliedRepo, status })
        .then((response) => {
          if (!live) return;
          setNowMs(Date.now());
          setLoad({ state: "loaded", sessions: response.sessions });
        })
        .catch((error: unknown) => {
          if (live) setLoad({ state: "failed", message: describeError(error) });
        });
    void fetchList();
    const timer = setInterval(() => void fetchList(), 15_000);
    return () => {
      live = false;
      clearInterval(timer);
    };
  }, [appliedRepo, status]);

  useEffect(() => {
    if (load.state !== "loading") markReady();
  }, [load.state]);

  return (
    <main class="page">
      <div class="page-head">
        <h1>Sessions</h1>
        <div class="filters">
          <input
            type="text"
            aria-label="Filter by repository"
            placeholder="Filter by repository (owner/name)"
            value={repo}
            onInput={(e) => setRepo(e.currentTarget.value)}
          />
          <label class="inline">
            <span>Status</span>
            <select value={status} onChange={(e) => setStatus(e.currentTarget.value as SessionStatus | "")}>
              <option value="">any</option>
              {STATUSES.map((s) => (
                <option value={s} key={s}>
                  {s}
                </option>
              ))}
            </select>
          </label>
        </div>
      </div>
      {load.state === "loading" && <p class="muted">Loading sessions…</p>}
      {load.state === "failed" && (
        <p role="alert" class="error">
          Could not load sessions: {load.message}
        </p>
      )}
      {load.state === "loaded" &&
        (load.sessions.length === 0 ? (
          <div class="empty card">
            <p>No sessions{appliedRepo || status ? " match these filters" : " yet"}.</p>
            <a class="button primary" href="/new">
              Start a session
            </a>
          </div>
        ) : (
          <ul class="session-list">
            {load.sessions.map((s) => (
              <SessionRow key={s.id} session={s} nowMs={nowMs} />
            ))}
          </ul>
        ))}
    </main>
  );
}

// " #12" from a pull request url ending in `/pull/12`, else "".
function prNumber(url: string): string {
  const number = /\/pull\/(\d+)\/?$/.exec(url)?.[1];
  return number ? ` #${number}` : "";
}

function SessionRow({ session, nowMs }: { session: SessionSummary; nowMs: number }) {
  const prUrl = session.pull_request_url ?? null;
  return (
    <li class="session-row" data-testid="session-row" data-session-id={session.id}>
      <a class="title" href={`/s/${encodeURIComponent(session.id)}`}>
        {session.title || session.id}
      </a>
      <span class="repo mono">{session.repo}</span>
      <span class={`status badge status-${session.status}`} data-status={session.status}>
        {session.status}
      </span>
      <span class="activity muted" title={dateTime(session.last_activity_ms)}>
        {ago(session.last_activity_ms, nowMs)}
      </span>
      <span class="people muted" title={session.participants.join(", ")}>
        {session.role === "owner" ? "mine" : "joined"} · {session.participants.length} {session.participants.length === 1 ? "person" : "people"}
      </span>
      {prUrl && (
        <a class="pr" href={prUrl} target="_blank" rel="noopener noreferrer">
          PR{prNumber(prUrl)}
        </a>
      )}
    </li>
  );
}
