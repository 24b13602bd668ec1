// Shared by the browser tests and the `web` bench rows: launch Debian's Chromium through playwright-core,
// open watched pages, sign in through the UI, read the session's event log.
//
// Environment (set by tests/src/browser.rs): NIGHTSHIFT_BASE_URL (the Worker), NIGHTSHIFT_BROWSER_OUT
// (screenshots), NIGHTSHIFT_CHROMIUM (the browser binary).
import { chromium } from "playwright-core";
import path from "node:path";

export const baseUrl = required("NIGHTSHIFT_BASE_URL");
export const outDir = required("NIGHTSHIFT_BROWSER_OUT");

// Generous: a 2-core machine running wrangler, sandboxes and two Chromium pages at once.
export const WAIT_MS = 60_000;

function required(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set (the Rust side of the browser tests sets it)`);
  }
  return value;
}

// Headless Chromium with nothing phoning home.
export async function launch() {
  return chromium.launch({
    executablePath: process.env.NIGHTSHIFT_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless=new",
      "--no-sandbox",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

// A browser context (one person) whose origin may use the clipboard ("Copy share link").
export async function newPerson(browser, options = {}) {
  const context = await browser.newContext({ baseURL: baseUrl, ...options });
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: baseUrl });
  return context;
}

// Lets a test cut the connection of `context`'s pages: every WebSocket a page opens is kept in
// `window.__nightshiftSockets`, and each value `[data-testid=connection]` takes for `data-state` is
// appended to `window.__nightshiftConnectionStates` (seen by a MutationObserver, so a short-lived state
// is not missed between polls).
export async function watchConnections(context) {
  await context.addInitScript(() => {
    const Native = window.WebSocket;
    const sockets = (window.__nightshiftSockets = []);
    const Recorded = function (...args) {
      const socket = new Native(...args);
      sockets.push(socket);
      return socket;
    };
    Recorded.prototype = Native.prototype;
    for (const name of ["CONNECTING", "OPEN", "CLOSING", "CLOSED"]) Recorded[name] = Native[name];
    window.WebSocket = Recorded;
    const states = (window.__nightshiftConnectionStates = []);
    new MutationObserver(() => {
      const state = document.querySelector("[data-testid=connection]")?.getAttribute("data-state");
      if (state && states[states.length - 1] !== state) states.push(state);
    }).observe(document, { childList: true, subtree: true, attributes: true, attributeFilter: ["data-state"] });
  });
}

// Closes every open WebSocket of `page` (from the client side, as a dropped network would end it) and
// returns how many there were; the page was set up by `watchConnections`.
export async function cutConnections(page) {
  return page.evaluate(() => {
    const open = window.__nightshiftSockets.filter((socket) => socket.readyState === WebSocket.OPEN);
    for (const socket of open) socket.close(4000, "cut by the test");
    return open.length;
  });
}

// The `data-state` values the page's connection indicator took, in order (see `watchConnections`).
export async function connectionStates(page) {
  return page.evaluate(() => window.__nightshiftConnectionStates.slice());
}

// Every console error and uncaught exception of the pages opened with `watchedPage`, labelled by page.
export class ErrorLog {
  constructor() {
    this.errors = [];
  }

  watch(page, label) {
    page.on("console", (message) => {
      if (message.type() === "error") {
        const where = message.location()?.url ?? "";
        this.errors.push(`${label}: console.error: ${message.text()} ${where}`.trim());
      }
    });
    page.on("pageerror", (error) => this.errors.push(`${label}: uncaught: ${error.stack ?? error}`));
    return page;
  }

  // Throws with every error seen so far, if any.
  assertNone(when) {
    if (this.errors.length > 0) {
      throw new Error(`console errors ${when}:\n  ${this.errors.join("\n  ")}`);
    }
  }
}

// Dev sign-in through the sign-in page's form; returns once the header shows "Sign out".
export async function signIn(page, { login, name, email }) {
  await page.getByRole("textbox", { name: "Login", exact: true }).fill(login);
  await page.getByRole("textbox", { name: "Name", exact: true }).fill(name);
  await page.getByRole("textbox", { name: "Email", exact: true }).fill(email);
  await page.getByRole("button", { name: "Sign in", exact: true }).click();
  await page.getByRole("button", { name: "Sign out" }).waitFor({ timeout: WAIT_MS });
}

// Dev sign-in over HTTP within `context` (the cookie lands in the context), for the bench.
export async function signInByRequest(context, { login, name, email }) {
  const response = await context.request.post(`${baseUrl}/auth/dev`, { data: { login, name, email } });
  if (!response.ok()) {
    throw new Error(`POST /auth/dev answered ${response.status()}: ${await response.text()}`);
  }
}

// The session's whole event log (`GET /api/sessions/{id}/events`, every page), as `context`'s person.
export async function eventLog(context, sessionId) {
  const events = [];
  let after = 0;
  for (;;) {
    const url = `${baseUrl}/api/sessions/${sessionId}/events?after=${after}&limit=1000`;
    const response = await context.request.get(url);
    if (!response.ok()) {
      throw new Error(`GET ${url} answered ${response.status()}: ${await response.text()}`);
    }
    const page = await response.json();
    events.push(...page.events);
    if (!page.has_more || page.events.length === 0) {
      return events;
    }
    after = page.events[page.events.length - 1].seq;
  }
}

// `target/browser/{name}.png`.
export async function screenshot(page, name, options = {}) {
  const file = path.join(outDir, `${name}.png`);
  await page.screenshot({ path: file, ...options });
  return file;
}

// Poll `probe` (async, returns a value) until `accept(value)` holds; throws with the last value after
// `timeoutMs`. For conditions Playwright's locators cannot express (counts of requests, text growth).
export async function until(what, probe, accept, timeoutMs = WAIT_MS) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await probe();
    if (accept(last)) {
      return last;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last value: ${JSON.stringify(last)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

// A step of a script: logs its name to stderr, and prefixes its failure with it.
export async function step(name, body) {
  const started = Date.now();
  process.stderr.write(`browser: ${name} … `);
  try {
    const value = await body();
    process.stderr.write(`ok (${Date.now() - started} ms)\n`);
    return value;
  } catch (error) {
    process.stderr.write("FAILED\n");
    error.message = `${name}: ${error.message}`;
    throw error;
  }
}

// Whitespace-collapsed text, for comparing rendered markdown with the streamed source.
export function squash(text) {
  return text.replace(/\s+/g, " ").trim();
}
