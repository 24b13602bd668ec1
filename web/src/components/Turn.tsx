// One turn of the transcript (a prompt and everything the agent did for it) and the compact lines of
// non-turn events. Memoised on the immutable `Turn`/part objects, so an event re-renders only what it touched.
import { memo } from "./memo";
import { useMemo } from "preact/hooks";
import { parseDiff } from "../diff";
import { splitBlocks } from "../blocks";
import { renderMarkdown } from "../markdown";
import { clock, duration } from "../time";
import type { EventPart, FilePart, Part, TextPart, ToolPart, Turn } from "../transcript";
import type { JsonValue } from "../wire";

const DIFF_MAX_LINES = 2000;
const OUTPUT_MAX_CHARS = 100_000;

const MarkdownBlock = memo(function MarkdownBlock({ text }: { text: string }) {
  const html = useMemo(() => renderMarkdown(text), [text]);
  return <div class="md-block" dangerouslySetInnerHTML={{ __html: html }} />;
});

export const Markdown = memo(function Markdown({ text, streaming }: { text: string; streaming: boolean }) {
  // While tokens stream in, finished blocks keep their rendering and only the last one is parsed again.
  const blocks = useMemo(() => (streaming ? splitBlocks(text) : null), [text, streaming]);
  const html = useMemo(() => (streaming ? "" : renderMarkdown(text)), [text, streaming]);
  if (blocks) {
    return (
      <div class="markdown streaming" data-testid="assistant-text">
        {blocks.map((block, i) => (
          <MarkdownBlock key={i} text={block} />
        ))}
      </div>
    );
  }
  return <div class="markdown" data-testid="assistant-text" dangerouslySetInnerHTML={{ __html: html }} />;
});

function inputText(input: JsonValue): string {
  if (typeof input === "string") return input;
  return JSON.stringify(input, null, 2);
}

/** A one-line hint of what a tool call is about (its path or command). */
function toolHint(input: JsonValue): string {
  if (input && typeof input === "object" && !Array.isArray(input)) {
    for (const key of ["path", "command", "pattern", "query", "url"]) {
      const value = input[key];
      if (typeof value === "string") return value.length > 80 ? `${value.slice(0, 79)}…` : value;
    }
  }
  return "";
}

export const ToolCall = memo(function ToolCall({ part }: { part: ToolPart }) {
  const state = part.ok === null ? "running" : part.ok ? "ok" : "failed";
  const output = part.output.length > OUTPUT_MAX_CHARS ? `${part.output.slice(0, OUTPUT_MAX_CHARS)}\n… (${part.output.length - OUTPUT_MAX_CHARS} more characters)` : part.output;
  return (
    <details class={`tool tool-${state}`} data-testid="tool-call" data-tool={part.tool} data-call-id={part.id} data-state={state}>
      <summary>
        <span class="tool-icon" aria-hidden="true">
          {state === "running" ? "◌" : state === "ok" ? "✓" : "✗"}
        </span>
        <span class="tool-name">{part.tool}</span>
        <span class="tool-hint mono">{toolHint(part.input)}</span>
        <span class="tool-duration" data-testid="tool-duration">
          {part.durationMs === null ? "running…" : duration(part.durationMs)}
        </span>
      </summary>
      <div class="tool-body">
        <div class="tool-label">input</div>
        <pre class="tool-input">{inputText(part.input)}</pre>
        <div class="tool-label">output{state === "failed" ? " (failed)" : ""}</div>
        <pre class="tool-output" data-testid="tool-output">
          {output || (state === "running" ? "…" : "(no output)")}
        </pre>
      </div>
    </details>
  );
});

export const Diff = memo(function Diff({ diff, path }: { diff: string; path: string }) {
  const lines = useMemo(() => parseDiff(diff, path), [diff, path]);
  const shown = lines.length > DIFF_MAX_LINES ? lines.slice(0, DIFF_MAX_LINES) : lines;
  return (
    <pre class="diff hljs">
      {shown.map((line, i) => (
        <div key={i} class={`dl dl-${line.kind}`}>
          <span class="dm" aria-hidden="true">
            {line.marker}
          </span>
          <span dangerouslySetInnerHTML={{ __html: line.html || " " }} />
        </div>
      ))}
      {lines.length > shown.length && <div class="dl dl-meta">… {lines.length - shown.length} more lines</div>}
    </pre>
  );
});

export const FileChangeView = memo(function FileChangeView({ part }: { part: FilePart }) {
  const summary = (
    <>
      <span class={`change change-${part.change}`}>{part.change}</span>
      <span class="mono path">{part.path}</span>
      <span class="adds">+{part.additions}</span>
      <span class="dels">−{part.deletions}</span>
    </>
  );
  if (!part.diff) {
    return (
      <div class="file-change" data-testid="file-change" data-path={part.path}>
        <div class="file-head">{summary}</div>
      </div>
    );
  }
  return (
    <details class="file-change" data-testid="file-change" data-path={part.path} open>
      <summary class="file-head">{summary}</summary>
      <Diff diff={part.diff} path={part.path} />
    </details>
  );
});

function describeEvent(part: EventPart): string {
  const event = part.event;
  switch (event.type) {
    case "sandbox_status":
      return `sandbox ${event.status}${event.detail ? ` — ${event.detail}` : ""}`;
    case "git_sync":
      return `git sync ${event.state}${event.commit ? ` @ ${event.commit.slice(0, 12)}` : ""}`;
    case "push":
      return `pushed ${event.branch} @ ${event.commit.slice(0, 12)}`;
    case "pull_request":
      return `pull request #${event.number} ${event.state}`;
    case "snapshot":
      return `snapshot ${event.id.slice(0, 12)} (${event.reason.replaceAll("_", " ")})`;
    case "child_session":
      return `sub-session ${event.id.slice(0, 12)} ${event.status}`;
    case "notice":
      return event.text;
    default:
      return event.type.replaceAll("_", " ");
  }
}

export const EventLine = memo(function EventLine({ part }: { part: EventPart }) {
  const event = part.event;
  if (event.type === "notice") {
    const loud = event.level === "warn" || event.level === "error";
    return (
      <div class={`notice notice-${event.level}`} data-testid="notice" data-level={event.level} role={loud ? "alert" : "status"}>
        <span class="notice-level">{event.level}</span> {event.text}
      </div>
    );
  }
  return (
    <div class={`system-event ev-${event.type}`} data-testid="system-event" data-type={event.type} data-seq={part.seq}>
      <span class="ev-time">{clock(part.tsMs)}</span>
      <span class="ev-text">{describeEvent(part)}</span>
      {event.type === "pull_request" && (
        <a href={event.url} target="_blank" rel="noopener noreferrer">
          open
        </a>
      )}
    </div>
  );
});

function PartView({ part, live }: { part: Part; live: boolean }) {
  switch (part.kind) {
    case "text":
      return <Markdown text={(part as TextPart).text} streaming={live && !part.final} />;
    case "tool":
      return <ToolCall part={part} />;
    case "file":
      return <FileChangeView part={part} />;
    case "event":
      return <EventLine part={part} />;
  }
}

export const TurnView = memo(function TurnView({ turn, mine }: { turn: Turn; mine: boolean }) {
  const running = turn.status === "running";
  const tookMs = turn.startedMs !== null && turn.finishedMs !== null ? turn.finishedMs - turn.startedMs : null;
  return (
    <article class={`turn turn-${turn.status}`} data-testid="turn" data-prompt-id={turn.promptId} data-status={turn.status}>
      <header class="turn-head">
        <span class={`avatar${mine ? " mine" : ""}`} aria-hidden="true">
          {(turn.author.name || "?").slice(0, 1).toUpperCase()}
        </span>
        <span class="turn-author" data-testid="turn-author" title={turn.author.login}>
          {turn.author.name}
        </span>
        <span class="turn-time muted">{clock(turn.queuedMs)}</span>
        <span class={`badge status-${turn.status}`}>{turn.status}</span>
        {tookMs !== null && <span class="muted">{duration(tookMs)}</span>}
      </header>
      <div class="turn-prompt" data-testid="turn-prompt">
        {turn.text}
      </div>
      {(turn.parts.length > 0 || running) && (
        <div class="turn-body">
          {turn.parts.map((part) => (
            <PartView key={part.id} part={part} live={running} />
          ))}
          {running && turn.parts.length === 0 && <div class="thinking muted">working…</div>}
        </div>
      )}
      {turn.error && (
        <div class="turn-error" role="alert">
          {turn.error}
        </div>
      )}
      {turn.status === "cancelled" && <div class="muted small">cancelled{turn.cancelledBy ? ` by ${turn.cancelledBy}` : ""}</div>}
    </article>
  );
});
