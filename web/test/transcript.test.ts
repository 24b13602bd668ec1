// The transcript reducer: `node --test web/test/transcript.test.ts` with Node 22 (it strips the types; no build).
import assert from "node:assert/strict";
import { test } from "node:test";
import { applyEvents, applyMessage, caughtUp, costUsd, diffFromEditOutput, emptyTranscript, waitingPrompts } from "../src/transcript.ts";
import type { Event, EventEnvelope, QueuedPrompt, ServerMessage } from "../src/wire.ts";

const ada = { login: "ada", name: "Ada", email: "ada@example.com" };

function log(events: Event[], from = 1): EventEnvelope[] {
  return events.map((event, i) => ({ seq: from + i, ts_ms: 1000 + from + i, event }));
}

function welcomeMessage(lastSeq: number, queue: QueuedPrompt[]): ServerMessage {
  return {
    type: "welcome",
    session: {
      id: "s",
      repo: "o/r",
      base_branch: "main",
      branch: "b",
      title: "t",
      model: "m",
      created_by: ada,
      created_ms: 0,
    },
    you: { login: "ada", name: "Ada", role: "owner", online: true, typing: false },
    participants: [],
    queue,
    last_seq: lastSeq,
  };
}

const turn: Event[] = [
  { type: "prompt_queued", prompt_id: "p1", author: ada, text: "fix it" },
  { type: "prompt_started", prompt_id: "p1" },
  { type: "token", prompt_id: "p1", text: "Look" },
  { type: "git_sync", state: "done", commit: "abc" },
  { type: "token", prompt_id: "p1", text: "ing" },
  { type: "message", prompt_id: "p1", role: "assistant", text: "Looking." },
  { type: "tool_call", prompt_id: "p1", call_id: "c1", tool: "edit_file", input: { path: "a.ts" } },
  { type: "tool_output", call_id: "c1", text: "partial" },
  {
    type: "tool_result",
    call_id: "c1",
    ok: true,
    output: "edited a.ts: 1 replacement (+1 -1)\n--- a/a.ts\n+++ b/a.ts\n@@ -1 +1 @@\n-x\n+y\n",
    duration_ms: 7,
  },
  { type: "file_changed", path: "a.ts", change: "modified", additions: 1, deletions: 1 },
  { type: "usage", prompt_id: "p1", input_tokens: 10, output_tokens: 5, cost_usd: 0.5, total_cost_usd: null },
  { type: "prompt_finished", prompt_id: "p1", status: "completed" },
];

test("a turn: streamed tokens are replaced by the final message, never shown twice", () => {
  const t = emptyTranscript();
  applyEvents(t, log(turn));
  const p1 = t.turns.get("p1");
  assert.ok(p1);
  assert.equal(p1.status, "completed");
  const texts = p1.parts.filter((p) => p.kind === "text");
  assert.deepEqual(
    texts.map((p) => (p.kind === "text" ? p.text : "")),
    ["Looking."],
  );
  const tool = p1.parts.find((p) => p.kind === "tool");
  assert.ok(tool && tool.kind === "tool");
  assert.equal(tool.ok, true);
  assert.equal(tool.durationMs, 7);
  const file = p1.parts.find((p) => p.kind === "file");
  assert.ok(file && file.kind === "file");
  assert.match(file.diff ?? "", /^@@ -1 \+1 @@/m);
  assert.equal(costUsd(t.usage), 0.5);
  assert.equal(t.runningId, null);
});

test("replayed events (seq <= last seen) are ignored", () => {
  const once = emptyTranscript();
  applyEvents(once, log(turn));
  const twice = emptyTranscript();
  applyEvents(twice, log(turn.slice(0, 6)));
  // A reconnect replays from an older seq: overlap must not duplicate anything.
  assert.equal(applyEvents(twice, log(turn.slice(3, 6), 4)), false);
  applyEvents(twice, log(turn, 1));
  assert.deepEqual(twice.turns.get("p1"), once.turns.get("p1"));
  assert.equal(twice.entries.length, once.entries.length);
  assert.equal(twice.usage.inputTokens, 10);
});

test("only the turns an event touches change identity", () => {
  const t = emptyTranscript();
  applyEvents(
    t,
    log([
      { type: "prompt_queued", prompt_id: "p1", author: ada, text: "one" },
      { type: "prompt_queued", prompt_id: "p2", author: ada, text: "two" },
      { type: "prompt_started", prompt_id: "p1" },
    ]),
  );
  const before = t.turns.get("p2");
  applyEvents(t, log([{ type: "token", prompt_id: "p1", text: "x" }], 4));
  assert.equal(t.turns.get("p2"), before);
});

test("the queue follows welcome and prompt events", () => {
  const t = emptyTranscript();
  const welcome = welcomeMessage(0, [{ prompt_id: "p0", author: ada, text: "waiting", status: "queued", created_ms: 0 }]);
  applyMessage(t, welcome);
  assert.deepEqual(
    waitingPrompts(t).map((q) => q.prompt_id),
    ["p0"],
  );
  applyEvents(
    t,
    log([
      { type: "prompt_queued", prompt_id: "p1", author: ada, text: "next" },
      { type: "prompt_started", prompt_id: "p0" },
      { type: "prompt_cancelled", prompt_id: "p1", by: "ada" },
    ]),
  );
  assert.deepEqual(waitingPrompts(t), []);
  assert.equal(t.turns.get("p1")?.status, "cancelled");
  assert.equal(t.runningId, "p0");
});

test("a turn takes its timeline place when it starts", () => {
  const t = emptyTranscript();
  applyEvents(
    t,
    log([
      { type: "prompt_queued", prompt_id: "p1", author: ada, text: "one" },
      { type: "sandbox_status", status: "ready", detail: "" },
      { type: "prompt_started", prompt_id: "p1" },
    ]),
  );
  assert.deepEqual(
    t.entries.map((e) => e.key),
    ["e:2", "p:p1"],
  );
});

test("edit_file output parses into a path and a diff", () => {
  assert.deepEqual(diffFromEditOutput("edited src/a b.rs: 2 replacements (+2 -2)\n@@ -1 +1 @@\n-a\n+b\n"), {
    path: "src/a b.rs",
    diff: "@@ -1 +1 @@\n-a\n+b\n",
  });
  assert.equal(diffFromEditOutput("wrote 3 bytes to a.txt (+1 -0)"), null);
});

test("10k events apply in well under a second", () => {
  const events: Event[] = [{ type: "prompt_queued", prompt_id: "p", author: ada, text: "go" }, { type: "prompt_started", prompt_id: "p" }];
  for (let i = 0; i < 10_000; i++) events.push({ type: "token", prompt_id: "p", text: `t${i} ` });
  const t = emptyTranscript();
  const started = performance.now();
  applyEvents(t, log(events));
  assert.ok(performance.now() - started < 1000);
  const part = t.turns.get("p")?.parts[0];
  assert.ok(part && part.kind === "text" && part.text.startsWith("t0 t1 "));
});

test("caught up once a welcome's replay is applied, and again after a reconnect's", () => {
  const t = emptyTranscript();
  const welcome = (lastSeq: number) => welcomeMessage(lastSeq, []);
  assert.equal(caughtUp(t), false, "nothing yet");
  applyMessage(t, welcome(3));
  assert.equal(caughtUp(t), false, "the replay of seq 1..3 is still to come");
  applyEvents(t, log(turn.slice(0, 2)));
  assert.equal(caughtUp(t), false);
  applyEvents(t, log(turn.slice(2, 3), 3));
  assert.equal(caughtUp(t), true);
  applyMessage(t, welcome(5));
  assert.equal(caughtUp(t), false, "a reconnect's welcome names a newer seq");
  applyEvents(t, log(turn.slice(3, 5), 4));
  assert.equal(caughtUp(t), true);
});
