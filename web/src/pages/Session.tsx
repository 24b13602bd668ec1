// `/s/{id}`: the live, multiplayer session view. One `SessionSocket` feeds the transcript reducer; renders
// are coalesced to one per animation frame however fast events arrive.
import { useCallback, useEffect, useLayoutEffect, useMemo, useRef, useState } from "preact/hooks";
import { ApiError, api, describeError, newKey } from "../api";
import { NoticeBanner, Participants, Queue, StopControls, UsagePanel } from "../components/SessionPanels";
import { EventLine, FileChangeView, TurnView } from "../components/Turn";
import { warmMarkdown } from "../markdown";
import { markReady } from "../route";
import { type ConnectionState, SessionSocket } from "../socket";
import { applyMessage, caughtUp, emptyTranscript, type Transcript, waitingPrompts } from "../transcript";
import type { Author, LifecycleState, SessionState, StopScope } from "../wire";

const WINDOW_ENTRIES = 60;
const WINDOW_STEP = 100;
const TYPING_INTERVAL_MS = 2000;
const STATE_REFRESH_MIN_MS = 5000;
const STATE_REFRESH_EVERY_MS = 60_000;
const CLOCK_TICK_MS = 5000;

interface Connection {
  state: ConnectionState;
  attempt: number;
}

function useSession(id: string) {
  const transcript = useRef<Transcript>(emptyTranscript());
  const socket = useRef<SessionSocket | null>(null);
  const [, setVersion] = useState(0);
  const [connection, setConnection] = useState<Connection>({ state: "reconnecting", attempt: 0 });
  const [state, setState] = useState<SessionState | null>(null);
  const [missing, setMissing] = useState<string | null>(null);
  const lastStateFetch = useRef(0);
  const pendingStateFetch = useRef<ReturnType<typeof setTimeout> | null>(null);

  const refreshState = useCallback(() => {
    const sinceMs = Date.now() - lastStateFetch.current;
    if (pendingStateFetch.current) return;
    const run = () => {
      pendingStateFetch.current = null;
      lastStateFetch.current = Date.now();
      api
        .session(id)
        .then(setState)
        .catch((error: unknown) => {
          if (error instanceof ApiError && (error.status === 404 || error.status === 403)) {
            setMissing(describeError(error));
            socket.current?.close();
          }
        });
    };
    if (sinceMs >= STATE_REFRESH_MIN_MS) run();
    else pendingStateFetch.current = setTimeout(run, STATE_REFRESH_MIN_MS - sinceMs);
  }, [id]);

  useEffect(() => {
    const t = emptyTranscript();
    transcript.current = t;
    let frame = 0;
    let fallback: ReturnType<typeof setTimeout> | null = null;
    const flush = () => {
      if (frame) cancelAnimationFrame(frame);
      if (fallback) clearTimeout(fallback);
      frame = 0;
      fallback = null;
      setVersion(t.version);
    };
    const schedule = () => {
      if (frame || fallback) return;
      frame = requestAnimationFrame(flush);
      // Hidden tabs get no animation frames; keep them current anyway, just less often.
      fallback = setTimeout(flush, 250);
    };
    let shownCaughtUp = false;
    const live = new SessionSocket(id, {
      message: (message) => {
        if (applyMessage(t, message)) schedule();
        // After a welcome, the next frame is drawn as soon as its replay is in: the whole replay at once,
        // not the welcome alone.
        if (message.type === "welcome") shownCaughtUp = false;
        if (!shownCaughtUp && caughtUp(t)) {
          shownCaughtUp = true;
          flush();
        }
        // Usage, notices (ceilings), finished prompts and sandbox changes (parked, ended) move the lifecycle:
        // refresh it (throttled).
        const moves = (type: string) =>
          type === "usage" || type === "notice" || type === "prompt_finished" || type === "sandbox_status";
        const stale =
          (message.type === "event" && moves(message.event.type)) ||
          (message.type === "events" && message.events.some((e) => moves(e.event.type)));
        if (stale) refreshState();
      },
      state: (next, attempt) => setConnection({ state: next, attempt }),
      lastSeq: () => (t.lastSeq > 0 ? t.lastSeq : null),
    });
    socket.current = live;
    warmMarkdown();
    refreshState();
    const timer = setInterval(refreshState, STATE_REFRESH_EVERY_MS);
    return () => {
      live.close();
      socket.current = null;
      clearInterval(timer);
      if (frame) cancelAnimationFrame(frame);
      if (fallback) clearTimeout(fallback);
      if (pendingStateFetch.current) clearTimeout(pendingStateFetch.current);
      pendingStateFetch.current = null;
    };
  }, [id, refreshState]);

  return { transcript: transcript.current, socket, connection, state, missing };
}

function useNow(intervalMs: number): number {
  const [nowMs, setNowMs] = useState(Date.now());
  useEffect(() => {
    const timer = setInterval(() => setNowMs(Date.now()), intervalMs);
    return () => clearInterval(timer);
  }, [intervalMs]);
  return nowMs;
}

function dismissedKey(id: string): string {
  return `nightshift.dismissed.${id}`;
}

function readDismissed(id: string): number {
  try {
    return Number(localStorage.getItem(dismissedKey(id)) ?? 0) || 0;
  } catch {
    return 0;
  }
}

export function SessionPage({ id, user }: { id: string; user: Author }) {
  const { transcript: t, socket, connection, state, missing } = useSession(id);
  const nowMs = useNow(CLOCK_TICK_MS);
  const [shown, setShown] = useState(WINDOW_ENTRIES);
  const [dismissedSeq, setDismissedSeq] = useState(() => readDismissed(id));
  const [shareUrl, setShareUrl] = useState<string | null>(null);
  const [shareNote, setShareNote] = useState<string | null>(null);
  const [actionError, setActionError] = useState<string | null>(null);
  const welcomed = t.session !== null;
  const ready = caughtUp(t);

  // Layout effect: the mark goes on with the DOM it marks, not a frame later.
  useLayoutEffect(() => {
    if (ready || missing) markReady();
  }, [ready, missing]);

  useEffect(() => {
    if (t.lastError) setActionError(`${t.lastError.message} (${t.lastError.code})`);
  }, [t.lastError]);

  // Follow the stream while the reader is at the bottom; leave them alone when they scrolled up.
  const atBottom = useRef(true);
  useEffect(() => {
    const onScroll = () => {
      const doc = document.documentElement;
      atBottom.current = doc.scrollHeight - (window.scrollY + window.innerHeight) < 120;
    };
    window.addEventListener("scroll", onScroll, { passive: true });
    return () => window.removeEventListener("scroll", onScroll);
  }, []);
  useLayoutEffect(() => {
    if (atBottom.current && welcomed) window.scrollTo(0, document.documentElement.scrollHeight);
  }, [t.version, welcomed]);

  const sandboxStatus = t.sandbox?.status ?? state?.sandbox.status ?? null;
  const sandboxDetail = t.sandbox?.detail ?? state?.sandbox.detail ?? "";
  const lifecycle: LifecycleState | null = state?.lifecycle ?? null;
  const queue = waitingPrompts(t);
  const running = t.runningId ? t.turns.get(t.runningId) : undefined;
  const banner = t.notices.filter((n) => n.seq > dismissedSeq);
  const title = t.session?.title ?? state?.session.title ?? "Session";
  const repo = t.session?.repo ?? state?.session.repo ?? "";
  const branch = t.session?.branch ?? state?.session.branch ?? "";

  useEffect(() => {
    document.title = `${title} · Nightshift`;
    return () => {
      document.title = "Nightshift";
    };
  }, [title]);

  const dismiss = () => {
    const last = t.notices[t.notices.length - 1];
    if (!last) return;
    setDismissedSeq(last.seq);
    try {
      localStorage.setItem(dismissedKey(id), String(last.seq));
    } catch {
      // Private mode: dismissal lasts for this page only.
    }
  };

  const stop = (scope: StopScope) => {
    setActionError(null);
    if (socket.current?.send({ type: "stop", scope })) return;
    api.stop(id, scope).catch((error: unknown) => setActionError(describeError(error)));
  };

  const cancel = (promptId: string) => {
    setActionError(null);
    if (!socket.current?.send({ type: "cancel_prompt", prompt_id: promptId })) setActionError("not connected; try again in a moment");
  };

  const share = async () => {
    setShareNote(null);
    try {
      const invite = await api.invite(id);
      setShareUrl(invite.share_url);
      try {
        await navigator.clipboard.writeText(invite.share_url);
        setShareNote("Copied");
      } catch {
        setShareNote("Copy it from here");
      }
    } catch (error) {
      setShareNote(describeError(error));
    }
  };

  const entries = t.entries;
  const start = Math.max(0, entries.length - shown);
  const visible = useMemo(() => entries.slice(start), [entries, start, t.version]);

  if (missing) {
    return (
      <main class="page narrow">
        <h1>Session not found</h1>
        <p class="muted">
          It does not exist, or you are not a participant. <a href="/">Back to sessions</a>
        </p>
      </main>
    );
  }

  return (
    <main class="page session">
      <div class="session-head">
        <div class="session-title-row">
          <h1 data-testid="session-title">{title}</h1>
          <span
            class={`badge sandbox sandbox-${sandboxStatus ?? "unknown"}`}
            title={sandboxDetail ? `sandbox: ${sandboxDetail}` : "sandbox"}
          >
            <span class="muted">sandbox </span>
            <span data-testid="sandbox-status" data-status={sandboxStatus ?? ""}>
              {sandboxStatus ?? "…"}
            </span>
          </span>
          <span class={`connection conn-${connection.state}`} data-testid="connection" data-state={connection.state} role="status">
            {connection.state === "connected"
              ? "live"
              : connection.state === "offline"
                ? "Offline"
                : welcomed || connection.attempt > 0
                  ? "Reconnecting…"
                  : "Connecting…"}
          </span>
        </div>
        <div class="session-meta muted">
          <span class="mono">{repo}</span>
          {branch && <span class="mono">⎇ {branch}</span>}
          {t.gitSync && (
            <span data-testid="git-sync" data-state={t.gitSync.state}>
              git {t.gitSync.state}
              {t.gitSync.commit ? ` @ ${t.gitSync.commit.slice(0, 8)}` : ""}
            </span>
          )}
          {t.push && <span class="mono">pushed {t.push.commit.slice(0, 8)}</span>}
          {t.pullRequest && (
            <a href={t.pullRequest.url} target="_blank" rel="noopener noreferrer" data-testid="pull-request">
              PR #{t.pullRequest.number} ({t.pullRequest.state})
            </a>
          )}
        </div>
      </div>
      <NoticeBanner notices={banner} onDismiss={dismiss} />
      <div class="session-grid">
        <aside class="session-side">
          <Participants participants={t.participants} you={t.you?.login ?? user.login} />
          <Queue items={queue} onCancel={cancel} />
          <UsagePanel usage={t.usage} lifecycle={lifecycle} nowMs={nowMs} />
          <section class="panel" aria-label="Share">
            <h2 class="panel-title">Share</h2>
            <button type="button" class="small" onClick={() => void share()}>
              Copy share link
            </button>
            {shareNote && <span class="muted small"> {shareNote}</span>}
            {shareUrl && (
              <input class="share-url mono" data-testid="share-url" readOnly value={shareUrl} aria-label="Share link" onFocus={(e) => e.currentTarget.select()} />
            )}
          </section>
        </aside>
        <div class="session-main">
          <div class="transcript" data-testid="transcript" aria-label="Transcript" role="log" aria-live="off">
            {start > 0 && (
              <button
                type="button"
                class="show-earlier"
                onClick={() => {
                  // Keep what the reader looks at in place while earlier turns appear above it.
                  const heightBefore = document.documentElement.scrollHeight;
                  setShown((n) => n + WINDOW_STEP);
                  requestAnimationFrame(() => window.scrollBy(0, document.documentElement.scrollHeight - heightBefore));
                }}
              >
                Show earlier ({start} more)
              </button>
            )}
            {!welcomed && entries.length === 0 && <p class="muted">Loading the session…</p>}
            {welcomed && entries.length === 0 && <p class="muted">No prompts yet. Say what the agent should do.</p>}
            {visible.map((entry) => {
              if (entry.kind === "turn") {
                const turn = t.turns.get(entry.promptId);
                return turn ? <TurnView key={entry.key} turn={turn} mine={turn.author.login === user.login} /> : null;
              }
              return entry.part.kind === "file" ? (
                <FileChangeView key={entry.key} part={entry.part} />
              ) : (
                <EventLine key={entry.key} part={entry.part} />
              );
            })}
          </div>
          <Composer
            sessionId={id}
            socket={socket}
            transcript={t}
            running={running !== undefined}
            onStop={stop}
            error={actionError}
            onError={setActionError}
            ended={lifecycle?.phase === "ended"}
          />
        </div>
      </div>
    </main>
  );
}

function Composer({
  sessionId,
  socket,
  transcript,
  running,
  onStop,
  error,
  onError,
  ended,
}: {
  sessionId: string;
  socket: { current: SessionSocket | null };
  transcript: Transcript;
  running: boolean;
  onStop: (scope: StopScope) => void;
  error: string | null;
  onError: (message: string | null) => void;
  /** The session reached its time limit: it takes no more prompts. */
  ended: boolean;
}) {
  const [text, setText] = useState("");
  const [sending, setSending] = useState(false);
  const typingSentMs = useRef(0);
  const pending = useRef<{ key: string; text: string } | null>(null);

  // A prompt the server refused (e.g. a full queue) comes back into the box instead of being lost.
  useEffect(() => {
    const sent = pending.current;
    if (!transcript.lastError || !sent) return;
    pending.current = null;
    if (!transcript.acceptedKeys.has(sent.key)) setText((current) => current || sent.text);
  }, [transcript.lastError]);

  const send = async () => {
    const body = text.trim();
    if (!body || sending) return;
    onError(null);
    const key = newKey();
    if (socket.current?.send({ type: "prompt", text: body, idempotency_key: key })) {
      pending.current = { key, text: body };
      setText("");
      return;
    }
    setSending(true);
    try {
      await api.prompt(sessionId, body, key);
      setText("");
    } catch (err) {
      onError(describeError(err));
    } finally {
      setSending(false);
    }
  };

  return (
    <form
      class="composer"
      onSubmit={(e) => {
        e.preventDefault();
        void send();
      }}
    >
      {error && (
        <p class="error small" role="alert">
          {error}
        </p>
      )}
      {ended && (
        <p class="muted small" data-testid="session-ended">
          This session has ended: it reached its time limit. <a href="/new">Start a new session</a> to go on.
        </p>
      )}
      <label class="sr-only" for="composer-message">
        Message
      </label>
      <textarea
        id="composer-message"
        rows={2}
        disabled={ended}
        placeholder={
          ended
            ? "This session has ended."
            : running
              ? "Queue a follow-up… (Enter to send, Shift+Enter for a new line)"
              : "Message the agent… (Enter to send, Shift+Enter for a new line)"
        }
        value={text}
        onInput={(e) => {
          setText(e.currentTarget.value);
          const nowMs = Date.now();
          if (nowMs - typingSentMs.current >= TYPING_INTERVAL_MS && socket.current?.send({ type: "typing" })) {
            typingSentMs.current = nowMs;
          }
        }}
        onKeyDown={(e) => {
          if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
            e.preventDefault();
            void send();
          }
        }}
      />
      <div class="composer-actions">
        <StopControls onStop={onStop} />
        <button type="submit" class="primary" disabled={ended || sending || !text.trim()}>
          Send
        </button>
      </div>
    </form>
  );
}
