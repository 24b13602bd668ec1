// The session's state as the web app shows it, built from server messages by one reducer.
//
// `applyMessage` takes every server message in order and updates a `Transcript`. It has no DOM and no I/O,
// so it is deterministic and testable on its own. It is O(1) per event: its containers (the entry list and
// the maps) are updated in place, while every `Turn` is immutable and replaced when it changes, so memoised
// components re-render exactly the turns an event touched. `version` grows with every change.
//
// Invariant: an event is applied at most once: anything with `seq <= lastSeq` is ignored, so a replay after
// a reconnect never duplicates what is shown.
import type {
  Author,
  EventEnvelope,
  Event,
  FileChange,
  JsonValue,
  Participant,
  PromptStatus,
  QueuedPrompt,
  SandboxStatus,
  ServerMessage,
  SessionInfo,
} from "./wire";

export interface TextPart {
  kind: "text";
  id: string;
  text: string;
  /** Whether the model's final `message` arrived (otherwise tokens are still streaming into it). */
  final: boolean;
}

export interface ToolPart {
  kind: "tool";
  id: string;
  tool: string;
  input: JsonValue;
  output: string;
  /** `null` while it runs. */
  ok: boolean | null;
  durationMs: number | null;
  startedMs: number;
}

export interface FilePart {
  kind: "file";
  id: string;
  path: string;
  change: FileChange;
  additions: number;
  deletions: number;
  /** Unified diff, when known. */
  diff: string | null;
}

/** An event that is not part of a turn's own flow (sandbox, git, notices…), shown as a compact line. */
export interface EventPart {
  kind: "event";
  id: string;
  seq: number;
  tsMs: number;
  event: Event;
}

export type Part = TextPart | ToolPart | FilePart | EventPart;

export interface Turn {
  promptId: string;
  author: Author;
  text: string;
  status: PromptStatus;
  queuedMs: number;
  startedMs: number | null;
  finishedMs: number | null;
  error: string | null;
  cancelledBy: string | null;
  parts: readonly Part[];
  /** Diffs read from `edit_file` results, by path, waiting for their `file_changed`. */
  diffs: Readonly<Record<string, string>>;
}

export type Entry = { kind: "turn"; key: string; promptId: string } | { kind: "event"; key: string; part: EventPart | FilePart };

export interface Notice {
  seq: number;
  tsMs: number;
  level: string;
  text: string;
}

export interface Usage {
  inputTokens: number;
  outputTokens: number;
  /** Sum of the priced calls. */
  summedCostUsd: number;
  /** Whether some call had no known price. */
  unpriced: boolean;
  /** The latest session total the server reported, if any. */
  totalCostUsd: number | null;
}

export interface Transcript {
  version: number;
  lastSeq: number;
  /** The log's last `seq` when the latest `welcome` came: its replay is complete once `lastSeq` reaches it. */
  welcomeSeq: number;
  session: SessionInfo | null;
  you: Participant | null;
  participants: Participant[];
  entries: Entry[];
  turns: Map<string, Turn>;
  /** Call id → prompt id. */
  calls: Map<string, string>;
  /** Unfinished prompts in arrival order. */
  queue: Map<string, QueuedPrompt>;
  runningId: string | null;
  sandbox: { status: SandboxStatus; detail: string } | null;
  gitSync: { state: string; commit: string | null } | null;
  push: { branch: string; commit: string } | null;
  pullRequest: { number: number; url: string; state: string } | null;
  usage: Usage;
  notices: Notice[];
  /** The last `error` message the server sent. */
  lastError: { code: string; message: string } | null;
  /** Idempotency keys of this client's prompts the server accepted. */
  acceptedKeys: Set<string>;
}

/** Whether a `welcome` came and everything logged before it has been applied. */
export function caughtUp(t: Transcript): boolean {
  return t.session !== null && t.lastSeq >= t.welcomeSeq;
}

export function emptyTranscript(): Transcript {
  return {
    version: 0,
    lastSeq: 0,
    welcomeSeq: 0,
    session: null,
    you: null,
    participants: [],
    entries: [],
    turns: new Map(),
    calls: new Map(),
    queue: new Map(),
    runningId: null,
    sandbox: null,
    gitSync: null,
    push: null,
    pullRequest: null,
    usage: { inputTokens: 0, outputTokens: 0, summedCostUsd: 0, unpriced: false, totalCostUsd: null },
    notices: [],
    lastError: null,
    acceptedKeys: new Set(),
  };
}

/** Applies one server message; returns whether anything changed. */
export function applyMessage(t: Transcript, message: ServerMessage): boolean {
  switch (message.type) {
    case "welcome":
      t.welcomeSeq = message.last_seq;
      t.session = message.session;
      t.you = message.you;
      t.participants = message.participants;
      t.queue = new Map(message.queue.map((q) => [q.prompt_id, q]));
      t.version++;
      return true;
    case "presence":
      t.participants = message.participants;
      t.version++;
      return true;
    case "event":
      return applyEvents(t, [message]);
    case "events":
      return applyEvents(t, message.events);
    case "error":
      t.lastError = { code: message.code, message: message.message };
      t.version++;
      return true;
    case "prompt_accepted":
      t.acceptedKeys.add(message.idempotency_key);
      return false;
    case "pong":
      return false;
  }
}

/** Applies envelopes in order, skipping any already applied; returns whether any was new. */
export function applyEvents(t: Transcript, envelopes: readonly EventEnvelope[]): boolean {
  let changed = false;
  for (const envelope of envelopes) {
    if (envelope.seq <= t.lastSeq) continue;
    t.lastSeq = envelope.seq;
    applyEvent(t, envelope.seq, envelope.ts_ms, envelope.event);
    changed = true;
  }
  if (changed) t.version++;
  return changed;
}

/** The prompts still waiting (not running), in order. */
export function waitingPrompts(t: Transcript): QueuedPrompt[] {
  const waiting: QueuedPrompt[] = [];
  for (const q of t.queue.values()) if (q.status === "queued") waiting.push(q);
  return waiting;
}

/** Session cost so far: the server's total when it sent one, otherwise the sum of priced calls. */
export function costUsd(usage: Usage): number | null {
  if (usage.totalCostUsd !== null) return usage.totalCostUsd;
  if (usage.summedCostUsd === 0 && usage.unpriced) return null;
  return usage.summedCostUsd;
}

const EDITED_LINE = /^edited (.+?): [^\n]*\(\+\d+ -\d+\)$/;

/** The unified diff in an `edit_file` result (`edited PATH: … (+a -d)` then the diff), if any. */
export function diffFromEditOutput(output: string): { path: string; diff: string } | null {
  const newline = output.indexOf("\n");
  if (newline < 0) return null;
  const match = EDITED_LINE.exec(output.slice(0, newline));
  const diff = output.slice(newline + 1);
  if (!match || !match[1] || !diff.trim()) return null;
  return { path: match[1], diff };
}

function placeholderTurn(promptId: string, tsMs: number): Turn {
  return {
    promptId,
    author: { login: "", name: "unknown", email: "" },
    text: "",
    status: "running",
    queuedMs: tsMs,
    startedMs: null,
    finishedMs: null,
    error: null,
    cancelledBy: null,
    parts: [],
    diffs: {},
  };
}

function turnFor(t: Transcript, promptId: string, tsMs: number): Turn {
  const existing = t.turns.get(promptId);
  if (existing) return existing;
  const turn = placeholderTurn(promptId, tsMs);
  t.turns.set(promptId, turn);
  t.entries.push({ kind: "turn", key: `p:${promptId}`, promptId });
  return turn;
}

function update(t: Transcript, turn: Turn, change: Partial<Turn>): Turn {
  const next = { ...turn, ...change };
  t.turns.set(turn.promptId, next);
  return next;
}

/**
 * Index of the text part tokens still stream into: the last part that is not a non-turn event line (those
 * may arrive mid-stream, e.g. a `git_sync`), when it is unfinished text; otherwise -1.
 */
function openTextIndex(parts: readonly Part[]): number {
  for (let i = parts.length - 1; i >= 0; i--) {
    const part = parts[i];
    if (part?.kind === "event") continue;
    return part?.kind === "text" && !part.final ? i : -1;
  }
  return -1;
}

function replaceAt(parts: readonly Part[], index: number, part: Part): Part[] {
  const next = parts.slice();
  next[index] = part;
  return next;
}

/** Closes a streaming text part, so what follows starts a new one. */
function closeText(parts: readonly Part[]): readonly Part[] {
  const index = openTextIndex(parts);
  const open = parts[index];
  if (open?.kind === "text") return replaceAt(parts, index, { ...open, final: true });
  return parts;
}

function updateTool(t: Transcript, callId: string, change: (part: ToolPart) => ToolPart): void {
  const promptId = t.calls.get(callId);
  if (promptId === undefined) return;
  const turn = t.turns.get(promptId);
  if (!turn) return;
  for (let i = turn.parts.length - 1; i >= 0; i--) {
    const part = turn.parts[i];
    if (part?.kind === "tool" && part.id === callId) {
      const parts = turn.parts.slice();
      parts[i] = change(part);
      update(t, turn, { parts });
      return;
    }
  }
}

/**
 * A turn takes its place in the timeline when it starts, so what happened while it waited (sandbox
 * status, git sync, other turns) shows above it. Searches from the end, where a waiting turn usually is.
 */
function moveTurnToEnd(t: Transcript, promptId: string): void {
  const key = `p:${promptId}`;
  for (let i = t.entries.length - 1; i >= 0; i--) {
    const entry = t.entries[i];
    if (entry?.kind === "turn" && entry.key === key) {
      if (i === t.entries.length - 1) return;
      t.entries.splice(i, 1);
      t.entries.push(entry);
      return;
    }
  }
}

function finishQueue(t: Transcript, promptId: string): void {
  t.queue.delete(promptId);
  if (t.runningId === promptId) t.runningId = null;
}

/** A non-turn event goes into the running turn when there is one (to keep its place), else the timeline. */
function addEventPart(t: Transcript, part: EventPart | FilePart): void {
  const running = t.runningId === null ? undefined : t.turns.get(t.runningId);
  if (running) {
    update(t, running, { parts: [...running.parts, part] });
    return;
  }
  t.entries.push({ kind: "event", key: part.id, part });
}

function applyEvent(t: Transcript, seq: number, tsMs: number, event: Event): void {
  switch (event.type) {
    case "prompt_queued": {
      const existing = t.turns.get(event.prompt_id);
      if (existing) {
        update(t, existing, { author: event.author, text: event.text, queuedMs: tsMs });
      } else {
        t.turns.set(event.prompt_id, {
          ...placeholderTurn(event.prompt_id, tsMs),
          author: event.author,
          text: event.text,
          status: "queued",
        });
        t.entries.push({ kind: "turn", key: `p:${event.prompt_id}`, promptId: event.prompt_id });
      }
      const queued = t.queue.get(event.prompt_id);
      t.queue.set(event.prompt_id, {
        prompt_id: event.prompt_id,
        author: event.author,
        text: event.text,
        status: queued?.status ?? "queued",
        created_ms: queued?.created_ms ?? tsMs,
      });
      return;
    }
    case "prompt_started": {
      const turn = turnFor(t, event.prompt_id, tsMs);
      update(t, turn, { status: "running", startedMs: tsMs });
      moveTurnToEnd(t, event.prompt_id);
      const queued = t.queue.get(event.prompt_id);
      if (queued) t.queue.set(event.prompt_id, { ...queued, status: "running" });
      t.runningId = event.prompt_id;
      return;
    }
    case "prompt_finished": {
      const turn = turnFor(t, event.prompt_id, tsMs);
      update(t, turn, {
        status: event.status,
        finishedMs: tsMs,
        error: event.error ?? null,
        parts: closeText(turn.parts),
      });
      finishQueue(t, event.prompt_id);
      return;
    }
    case "prompt_cancelled": {
      const turn = turnFor(t, event.prompt_id, tsMs);
      update(t, turn, { status: "cancelled", finishedMs: tsMs, cancelledBy: event.by ?? null });
      finishQueue(t, event.prompt_id);
      return;
    }
    case "token": {
      const turn = turnFor(t, event.prompt_id, tsMs);
      const index = openTextIndex(turn.parts);
      const open = turn.parts[index];
      if (open?.kind === "text") {
        update(t, turn, { parts: replaceAt(turn.parts, index, { ...open, text: open.text + event.text }) });
      } else {
        update(t, turn, { parts: [...turn.parts, { kind: "text", id: `t:${seq}`, text: event.text, final: false }] });
      }
      return;
    }
    case "message": {
      if (event.role === "user") return;
      const turn = turnFor(t, event.prompt_id, tsMs);
      const index = openTextIndex(turn.parts);
      const open = turn.parts[index];
      // The final text of one model call: it replaces the tokens streamed for it, never adds to them.
      if (event.role === "assistant" && open?.kind === "text") {
        update(t, turn, { parts: replaceAt(turn.parts, index, { ...open, text: event.text, final: true }) });
      } else {
        update(t, turn, { parts: [...turn.parts, { kind: "text", id: `m:${seq}`, text: event.text, final: true }] });
      }
      return;
    }
    case "tool_call": {
      const turn = turnFor(t, event.prompt_id, tsMs);
      t.calls.set(event.call_id, event.prompt_id);
      const part: ToolPart = {
        kind: "tool",
        id: event.call_id,
        tool: event.tool,
        input: event.input,
        output: "",
        ok: null,
        durationMs: null,
        startedMs: tsMs,
      };
      update(t, turn, { parts: [...closeText(turn.parts), part] });
      return;
    }
    case "tool_output":
      updateTool(t, event.call_id, (part) => ({ ...part, output: part.output + event.text }));
      return;
    case "tool_result": {
      let tool = "";
      updateTool(t, event.call_id, (part) => {
        tool = part.tool;
        return { ...part, output: event.output, ok: event.ok, durationMs: event.duration_ms };
      });
      const edited = event.ok && tool === "edit_file" ? diffFromEditOutput(event.output) : null;
      const promptId = t.calls.get(event.call_id);
      const turn = promptId === undefined ? undefined : t.turns.get(promptId);
      if (edited && turn) update(t, turn, { diffs: { ...turn.diffs, [edited.path]: edited.diff } });
      return;
    }
    case "file_changed": {
      const running = t.runningId === null ? undefined : t.turns.get(t.runningId);
      let diff = event.diff || null;
      if (diff === null && running) diff = running.diffs[event.path] ?? null;
      const part: FilePart = {
        kind: "file",
        id: `f:${seq}`,
        path: event.path,
        change: event.change,
        additions: event.additions,
        deletions: event.deletions,
        diff,
      };
      if (running) {
        const { [event.path]: _used, ...diffs } = running.diffs;
        update(t, running, { parts: [...closeText(running.parts), part], diffs });
      } else {
        t.entries.push({ kind: "event", key: part.id, part });
      }
      return;
    }
    case "sandbox_status":
      t.sandbox = { status: event.status, detail: event.detail };
      break;
    case "git_sync":
      t.gitSync = { state: event.state, commit: event.commit ?? null };
      break;
    case "push":
      t.push = { branch: event.branch, commit: event.commit };
      break;
    case "pull_request":
      t.pullRequest = { number: event.number, url: event.url, state: event.state };
      break;
    case "usage": {
      const u = t.usage;
      t.usage = {
        inputTokens: u.inputTokens + event.input_tokens + (event.cache_read_tokens ?? 0) + (event.cache_write_tokens ?? 0),
        outputTokens: u.outputTokens + event.output_tokens,
        summedCostUsd: u.summedCostUsd + (event.cost_usd ?? 0),
        unpriced: u.unpriced || event.cost_usd === null,
        totalCostUsd: event.total_cost_usd ?? u.totalCostUsd,
      };
      return;
    }
    case "notice":
      t.notices = [...t.notices, { seq, tsMs, level: event.level, text: event.text }];
      break;
    case "child_session":
    case "snapshot":
      break;
  }
  addEventPart(t, { kind: "event", id: `e:${seq}`, seq, tsMs, event });
}
