// Human times.
import assert from "node:assert/strict";
import { test } from "node:test";
import { clock, dateTime, duration, timeLeft } from "../src/time.ts";

test("clock is the local time as HH:MM:SS on a 24-hour clock", () => {
  const afternoon = new Date(2026, 11, 3, 13, 5, 9).getTime();
  assert.equal(clock(afternoon), "13:05:09");
  const midnight = new Date(2026, 11, 3, 0, 0, 0).getTime();
  assert.equal(clock(midnight), "00:00:00");
  assert.equal(dateTime(afternoon), "2026-12-03 13:05:09");
});

test("durations and time left read naturally", () => {
  assert.equal(duration(250), "250 ms");
  assert.equal(duration(4_000), "4.0 s");
  assert.equal(duration(125_000), "2 min 5 s");
  assert.equal(timeLeft(1_000, 2_000), "ended");
  assert.equal(timeLeft(90 * 60_000, 0), "90 min left");
  assert.equal(timeLeft(150 * 60_000, 0), "2h 30m left");
});
