// Streaming markdown blocks: `node --test web/test/blocks.test.ts` with Node 22.
import assert from "node:assert/strict";
import { test } from "node:test";
import { splitBlocks } from "../src/blocks.ts";

test("blocks split at blank lines, never inside a code fence", () => {
  const text = "one\ntwo\n\n```\na\n\nb\n```\n\nthree";
  const blocks = splitBlocks(text);
  assert.deepEqual(blocks, ["one\ntwo\n", "```\na\n\nb\n```\n", "three"]);
  assert.equal(blocks.join("\n"), text);
});

test("an unfinished fence keeps the rest in one block", () => {
  assert.deepEqual(splitBlocks("a\n\n```js\nx\n\ny"), ["a\n", "```js\nx\n\ny"]);
});
