// Side panels of the session view: participants and typing, the queue, usage against the ceilings, stop and
// share controls, and the notice banner.
import { useState } from "preact/hooks";
import { count, timeLeft, usd } from "../time";
import type { Notice, Usage } from "../transcript";
import { costUsd } from "../transcript";
import type { LifecycleState, Participant, QueuedPrompt, StopScope } from "../wire";

export function Participants({ participants, you }: { participants: Participant[]; you: string | null }) {
  const typing = participants.filter((p) => p.typing && p.login !== you);
  const typingText =
    typing.length === 0
      ? ""
      : typing.length === 1
        ? `${typing[0]?.name ?? ""} is typing…`
        : `${typing.map((p) => p.name).join(", ")} are typing…`;
  return (
    <section class="panel" aria-label="Participants">
      <h2 class="panel-title">People</h2>
      <ul class="participants" data-testid="participants">
        {participants.map((p) => (
          <li
            key={p.login}
            class={`participant${p.online ? " online" : ""}${p.typing ? " typing" : ""}`}
            data-testid="participant"
            data-login={p.login}
            data-online={String(p.online)}
            data-typing={String(p.typing)}
            title={`${p.login} · ${p.role}${p.online ? " · online" : " · away"}`}
          >
            <span class="dot" aria-hidden="true" />
            <span class="pname">{p.name}</span>
            {p.login === you && <span class="muted small"> (you)</span>}
            {p.role === "owner" && <span class="muted small"> · owner</span>}
            <span class="sr-only">{p.online ? " online" : " away"}</span>
          </li>
        ))}
      </ul>
      <p class="typing-line muted" data-testid="typing" aria-live="polite" hidden={!typingText}>
        {typingText}
      </p>
    </section>
  );
}

export function Queue({ items, onCancel }: { items: QueuedPrompt[]; onCancel: (promptId: string) => void }) {
  return (
    <section class={`panel queue-panel${items.length === 0 ? " empty" : ""}`} aria-label="Queue">
      <h2 class="panel-title">Queue{items.length > 0 ? ` (${items.length})` : ""}</h2>
      <ol class="queue" data-testid="queue">
        {items.map((q) => (
          <li key={q.prompt_id} class="queue-item" data-testid="queue-item" data-prompt-id={q.prompt_id}>
            <span class="qauthor">{q.author.name}</span>
            <span class="qtext" title={q.text}>
              {q.text}
            </span>
            <button type="button" class="small" aria-label="Cancel queued prompt" onClick={() => onCancel(q.prompt_id)}>
              Cancel
            </button>
          </li>
        ))}
      </ol>
      {items.length === 0 && <p class="muted small">Nothing waiting.</p>}
    </section>
  );
}

export function UsagePanel({ usage, lifecycle, nowMs }: { usage: Usage; lifecycle: LifecycleState | null; nowMs: number }) {
  const cost = costUsd(usage);
  const tokens = usage.inputTokens + usage.outputTokens;
  const ceiling = lifecycle?.cost_ceiling_usd ?? null;
  const share = cost !== null && ceiling ? Math.min(1, cost / ceiling) : null;
  return (
    <section class="panel" aria-label="Usage">
      <h2 class="panel-title">Usage</h2>
      <dl class="usage" data-testid="usage">
        <dt>Tokens</dt>
        <dd title={`${usage.inputTokens} in, ${usage.outputTokens} out`}>
          {count(tokens)}
          {lifecycle && cost === null ? <span class="muted"> / {count(lifecycle.token_ceiling)}</span> : null}
        </dd>
        <dt>Cost</dt>
        <dd>
          {cost === null ? "unknown" : usd(cost)}
          {ceiling !== null && <span class="muted"> / {usd(ceiling)}</span>}
        </dd>
        <dt>Time</dt>
        <dd>{lifecycle ? timeLeft(lifecycle.ends_ms, nowMs) : "…"}</dd>
      </dl>
      {share !== null && (
        <div class={`meter${share > 0.8 ? " hot" : ""}`} role="presentation">
          <div style={{ width: `${(share * 100).toFixed(1)}%` }} />
        </div>
      )}
      {lifecycle?.ceiling_reached && (
        <p class="error small" role="alert">
          Ceiling reached: {lifecycle.ceiling_reached}
        </p>
      )}
    </section>
  );
}

// The stops that reach beyond the turn ask for a second click.
const CONFIRMED_SCOPES = ["session", "tree"] as const;

export function StopControls({ onStop }: { onStop: (scope: StopScope) => void }) {
  const [confirming, setConfirming] = useState<StopScope | null>(null);
  const confirm = (scope: StopScope) => {
    setConfirming(null);
    onStop(scope);
  };
  return (
    <div class="stop-controls" role="group" aria-label="Stop">
      <button type="button" class="small" onClick={() => onStop("turn")}>
        Stop turn
      </button>
      {CONFIRMED_SCOPES.map((scope) =>
        confirming === scope ? (
          <button key={scope} type="button" class="small danger" onClick={() => confirm(scope)}>
            Confirm stop {scope}
          </button>
        ) : (
          <button key={scope} type="button" class="small" onClick={() => setConfirming(scope)}>
            Stop {scope}
          </button>
        ),
      )}
      {confirming && (
        <button type="button" class="small link" onClick={() => setConfirming(null)}>
          Keep running
        </button>
      )}
    </div>
  );
}

export function NoticeBanner({ notices, onDismiss }: { notices: Notice[]; onDismiss: () => void }) {
  if (notices.length === 0) return null;
  const worst = notices.some((n) => n.level === "error") ? "error" : notices.some((n) => n.level === "warn") ? "warn" : "info";
  // The same notice repeated (e.g. once per turn) is shown once, with a count.
  const grouped = new Map<string, { notice: Notice; times: number }>();
  for (const notice of notices) {
    const key = `${notice.level}\u0000${notice.text}`;
    const seen = grouped.get(key);
    grouped.delete(key);
    grouped.set(key, { notice, times: (seen?.times ?? 0) + 1 });
  }
  const all = [...grouped.values()];
  const shown = all.slice(-3);
  return (
    <div class={`banner banner-${worst}`} data-testid="notice-banner" aria-label="Notices" role="region">
      <ul>
        {shown.map(({ notice, times }) => (
          <li key={notice.seq} data-level={notice.level}>
            <strong>{notice.level}</strong> {notice.text}
            {times > 1 && <span class="muted"> ×{times}</span>}
          </li>
        ))}
        {all.length > shown.length && <li class="muted">and {all.length - shown.length} more</li>}
      </ul>
      <button type="button" class="small" onClick={onDismiss}>
        Dismiss
      </button>
    </div>
  );
}
