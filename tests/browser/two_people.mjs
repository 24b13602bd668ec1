// Two people, Ada and Bob, in one session through the web app in real Chromium (the scenario of the
// browser tests; run by tests/tests/browser/main.rs against a running system).
//
// Ada signs in, opens a session from the New session page (the first keystroke warms the repository up) and
// prompts; Bob joins through her share link, watches her prompt stream under her name, types (Ada sees it)
// and queues a follow-up; Ada cancels it and stops her turn; a third prompt streams while Ada reloads and
// Bob's connection is cut (his page shows it reconnecting), and both transcripts then say exactly what the
// server's event log says. Then the view at phone width, Bob's
// sessions list, and Stop session with its inline confirmation. Every page, the signed-out sign-in page
// included, must stay free of console errors throughout. Screenshots go to target/browser/.
import {
  ErrorLog,
  WAIT_MS,
  connectionStates,
  cutConnections,
  eventLog,
  launch,
  newPerson,
  screenshot,
  signIn,
  squash,
  step,
  until,
  watchConnections,
} from "./browser.mjs";

const ADA = { login: "ada", name: "Ada Lovelace", email: "ada@example.com" };
const BOB = { login: "bob", name: "Bob Noyce", email: "bob@example.com" };
const REPO = "demo/hello";
// 20 text deltas over 90 s: still running when Ada stops it, long after Bob has queued and she cancelled.
const FIRST_PROMPT = "[script:slow ms=90000] Ada asks first";
const FOLLOW_UP = "[script:tokens count=5 rate=0] Bob follows up";
const FOLLOW_UP_SECOND_LINE = "on two lines";
// 600 tokens at 30/s: Ada reloads 1 s in, the stream goes on for 19 s more.
const STREAM_TOKENS = 600;
const STREAMED_PROMPT = `[script:tokens count=${STREAM_TOKENS} rate=30]`;
// A sandbox's cold start before the first prompt runs, on a loaded machine.
const READY_WAIT_MS = 120_000;
const PHONE = { width: 390, height: 844 };

const browser = await launch();
const errors = new ErrorLog();
const pages = new Map();
try {
  await scenario();
} catch (error) {
  for (const [label, page] of pages) {
    await screenshot(page, `failure-${label}`).catch(() => {});
  }
  if (errors.errors.length > 0) {
    process.stderr.write(`console errors so far:\n  ${errors.errors.join("\n  ")}\n`);
  }
  const frames = (error.stack ?? "").split("\n").filter((line) => line.trim().startsWith("at "));
  process.stderr.write(`\n${error.message}\n${frames.join("\n")}\n`);
  process.exitCode = 1;
} finally {
  await browser.close();
}

async function openPage(context, label) {
  const page = errors.watch(await context.newPage(), label);
  pages.set(label, page);
  return page;
}

function turn(page, promptId) {
  return page.locator(`[data-testid=turn][data-prompt-id="${promptId}"]`);
}

function turnWithStatus(page, promptId, status) {
  return page.locator(`[data-testid=turn][data-prompt-id="${promptId}"][data-status="${status}"]`);
}

function queueItem(page, promptId) {
  return page.locator(`[data-testid=queue-item][data-prompt-id="${promptId}"]`);
}

async function assistantText(page, promptId) {
  const parts = await turn(page, promptId).locator("[data-testid=assistant-text]").allInnerTexts();
  return parts.join(" ");
}

async function scenario() {
  const adaContext = await newPerson(browser);
  const bobContext = await newPerson(browser);
  await watchConnections(bobContext);
  const ada = await openPage(adaContext, "ada");
  const warmUps = [];
  ada.on("request", (request) => {
    if (request.method() === "POST" && new URL(request.url()).pathname === "/api/repos/warm") {
      warmUps.push(request.postDataJSON());
    }
  });

  await step("signed out, the sign-in page shows without console errors", async () => {
    await ada.goto("/");
    await ada.getByRole("textbox", { name: "Login", exact: true }).waitFor({ timeout: WAIT_MS });
    await ada.getByRole("button", { name: "Sign in", exact: true }).waitFor();
    await screenshot(ada, "sign-in");
    errors.assertNone("on the signed-out sign-in page");
  });

  await step("Ada signs in through the form", async () => {
    await signIn(ada, ADA);
    await ada.getByRole("heading", { name: "Sessions" }).waitFor({ timeout: WAIT_MS });
    await ada.getByText(ADA.name).first().waitFor();
  });

  await step("the new-session box warms the repository up on the first keystroke, once", async () => {
    await ada.getByRole("link", { name: "New session" }).click();
    await ada.waitForURL("**/new", { timeout: WAIT_MS });
    const repository = ada.getByRole("combobox", { name: "Repository", exact: true });
    await repository.locator(`option[value="${REPO}"]`).waitFor({ state: "attached", timeout: WAIT_MS });
    await repository.selectOption(REPO);
    const optionText = await repository.locator(`option[value="${REPO}"]`).textContent();
    if (!optionText.includes(REPO)) {
      throw new Error(`the repository option reads ${JSON.stringify(optionText)}`);
    }
    const box = ada.getByRole("textbox", { name: "Prompt", exact: true });
    await box.click();
    // Nothing to wait for: a warm-up before any keystroke would have been sent by now.
    await ada.waitForTimeout(300);
    if (warmUps.length !== 0) {
      throw new Error(`warm-up sent before the first keystroke: ${JSON.stringify(warmUps)}`);
    }
    await ada.keyboard.type(FIRST_PROMPT.slice(0, 1));
    await until("one POST /api/repos/warm after the first key", () => warmUps.length, (n) => n >= 1);
    await ada.keyboard.type(FIRST_PROMPT.slice(1));
    if ((await box.inputValue()) !== FIRST_PROMPT) {
      throw new Error(`the prompt box holds ${JSON.stringify(await box.inputValue())}`);
    }
    if (warmUps.length !== 1 || warmUps[0]?.repo !== REPO) {
      throw new Error(`expected exactly one warm-up of ${REPO}, got ${JSON.stringify(warmUps)}`);
    }
    await screenshot(ada, "new-session");
  });

  const sessionId = await step("Start session opens the session view with Ada's prompt", async () => {
    await ada.getByRole("button", { name: "Start session" }).click();
    await ada.waitForURL(/\/s\/[^/?#]+$/, { timeout: WAIT_MS });
    const id = new URL(ada.url()).pathname.split("/").pop();
    if (warmUps.length !== 1) {
      throw new Error(`the new-session page sent ${warmUps.length} warm-ups in all: ${JSON.stringify(warmUps)}`);
    }
    const first = ada.locator("[data-testid=turn]").first();
    await first.waitFor({ timeout: WAIT_MS });
    await expectText(first.locator("[data-testid=turn-author]"), ADA.name);
    await expectText(first.locator("[data-testid=turn-prompt]"), FIRST_PROMPT);
    return id;
  });
  const firstId = await ada.locator("[data-testid=turn]").first().getAttribute("data-prompt-id");

  await step("the sandbox gets ready and Ada's prompt runs", async () => {
    await turnWithStatus(ada, firstId, "running").waitFor({ timeout: READY_WAIT_MS });
    await ada.locator('[data-testid=connection][data-state="connected"]').waitFor({ timeout: WAIT_MS });
  });

  const shareUrl = await step("Copy share link shows the link (and copies it)", async () => {
    await ada.getByRole("button", { name: "Copy share link" }).click();
    const shown = ada.getByTestId("share-url");
    await shown.waitFor({ timeout: WAIT_MS });
    // The link may be shown as text or in a read-only field.
    const shownUrl = () => shown.evaluate((e) => (e instanceof HTMLInputElement ? e.value : e.textContent).trim());
    const url = await until("a share link", shownUrl, (t) => t.includes("/join/"));
    const copied = await ada.evaluate(() => navigator.clipboard.readText());
    if (copied.trim() !== url) {
      throw new Error(`the clipboard holds ${JSON.stringify(copied)}, the page shows ${JSON.stringify(url)}`);
    }
    return url;
  });

  const bob = await openPage(bobContext, "bob");
  await step("Bob opens the link, signs in, and lands in the session", async () => {
    await bob.goto(shareUrl);
    await bob.getByRole("textbox", { name: "Login", exact: true }).waitFor({ timeout: WAIT_MS });
    await signIn(bob, BOB);
    await bob.waitForURL(`**/s/${sessionId}`, { timeout: WAIT_MS });
    await ada.locator(`[data-testid=participant][data-login="${BOB.login}"]`).waitFor({ timeout: WAIT_MS });
  });

  await step("Bob sees Ada's prompt stream live, under her name", async () => {
    await expectText(turn(bob, firstId).locator("[data-testid=turn-author]"), ADA.name);
    await turnWithStatus(bob, firstId, "running").waitFor({ timeout: WAIT_MS });
    const before = await until("streamed text at Bob", () => assistantText(bob, firstId), (t) => t.trim().length > 0);
    await until("more streamed text at Bob", () => assistantText(bob, firstId), (t) => t.length > before.length);
  });

  const followUpId = await step("Bob types (Ada sees it), and his follow-up (Enter sends, Shift+Enter is a newline) queues for both", async () => {
    const composer = bob.getByRole("textbox", { name: "Message", exact: true });
    await composer.click();
    await bob.keyboard.type(FOLLOW_UP);
    const bobAtAda = ada.locator(`[data-testid=participant][data-login="${BOB.login}"]`);
    await ada.locator(`[data-testid=participant][data-login="${BOB.login}"][data-typing="true"]`).waitFor({ timeout: WAIT_MS });
    await expectText(ada.getByTestId("typing"), "typing");
    if ((await bobAtAda.getAttribute("data-online")) !== "true") {
      throw new Error("Bob is typing but not shown online at Ada's");
    }
    await bob.keyboard.press("Shift+Enter");
    await bob.keyboard.type(FOLLOW_UP_SECOND_LINE);
    const written = await composer.inputValue();
    if (written !== `${FOLLOW_UP}\n${FOLLOW_UP_SECOND_LINE}`) {
      throw new Error(`Shift+Enter should insert a newline; the composer holds ${JSON.stringify(written)}`);
    }
    if ((await bob.locator("[data-testid=queue-item]").count()) !== 0) {
      throw new Error("Shift+Enter sent the message");
    }
    await bob.keyboard.press("Enter");
    await until("an emptied composer", () => composer.inputValue(), (v) => v === "");
    const item = bob.locator("[data-testid=queue-item]").filter({ hasText: "Bob follows up" });
    await item.waitFor({ timeout: WAIT_MS });
    const id = await item.getAttribute("data-prompt-id");
    for (const page of [ada, bob]) {
      await queueItem(page, id).waitFor({ timeout: WAIT_MS });
      await expectText(queueItem(page, id), BOB.name);
      await turnWithStatus(page, id, "queued").waitFor({ timeout: WAIT_MS });
      await expectText(turn(page, id).locator("[data-testid=turn-prompt]"), FOLLOW_UP_SECOND_LINE);
    }
    if ((await turn(ada, firstId).getAttribute("data-status")) !== "running") {
      throw new Error("Ada's first prompt should still be running while Bob's waits");
    }
    await screenshot(ada, "ada-queued");
    await screenshot(bob, "bob-queued");
    return id;
  });

  await step("Ada cancels it: gone from both queues, its turn cancelled", async () => {
    await queueItem(ada, followUpId).getByRole("button", { name: /^Cancel/ }).click();
    for (const page of [ada, bob]) {
      await queueItem(page, followUpId).waitFor({ state: "detached", timeout: WAIT_MS });
      await turnWithStatus(page, followUpId, "cancelled").waitFor({ timeout: WAIT_MS });
    }
  });

  await step("Stop turn ends the running prompt for both", async () => {
    if ((await turn(ada, firstId).getAttribute("data-status")) !== "running") {
      throw new Error("Ada's first prompt ended before it was stopped");
    }
    await ada.getByRole("button", { name: "Stop turn" }).click();
    for (const page of [ada, bob]) {
      await turnWithStatus(page, firstId, "stopped").waitFor({ timeout: WAIT_MS });
    }
  });

  const streamedId = await step("Ada reloads and Bob's connection is cut while a third prompt streams", async () => {
    const composer = ada.getByRole("textbox", { name: "Message", exact: true });
    await composer.fill(STREAMED_PROMPT);
    await composer.press("Enter");
    const third = ada.locator("[data-testid=turn]").nth(2);
    await third.waitFor({ timeout: WAIT_MS });
    const id = await third.getAttribute("data-prompt-id");
    await until("tok30 at Ada", () => assistantText(ada, id), (t) => t.includes("tok30"));
    if ((await turn(ada, id).getAttribute("data-status")) !== "running") {
      throw new Error("the stream ended before the reload");
    }
    await ada.reload();
    // Bob's connection drops mid-stream too: his page says so, reconnects, and replays what it missed.
    const cut = await cutConnections(bob);
    if (cut !== 1) throw new Error(`Bob's page had ${cut} open sockets, not 1`);
    await until("Bob live again", () => connectionStates(bob), (states) => {
      const afterCut = states.slice(states.lastIndexOf("reconnecting"));
      return states.includes("reconnecting") && afterCut[afterCut.length - 1] === "connected";
    });
    await ada.locator("[data-testid=transcript]").waitFor({ timeout: WAIT_MS });
    for (const page of [ada, bob]) {
      await turnWithStatus(page, id, "completed").waitFor({ timeout: WAIT_MS });
    }
    return id;
  });

  await step("both transcripts hold every turn once, as the event log says, with no duplicated text", async () => {
    const events = await eventLog(adaContext, sessionId);
    const expected = turnsFromLog(events);
    if (expected.map((t) => t.id).join() !== [firstId, followUpId, streamedId].join()) {
      throw new Error(`the event log's prompts are ${JSON.stringify(expected.map((t) => t.id))}`);
    }
    for (const [label, page] of [["Ada (reloaded)", ada], ["Bob", bob]]) {
      const shown = await turnsOnPage(page);
      const ids = shown.map((t) => t.id);
      if (ids.join() !== expected.map((t) => t.id).join()) {
        throw new Error(`${label}'s turns are ${JSON.stringify(ids)}, the log's ${JSON.stringify(expected.map((t) => t.id))}`);
      }
      for (const [i, want] of expected.entries()) {
        const got = shown[i];
        const problems = [];
        if (got.status !== want.status) problems.push(`status ${got.status}, log ${want.status}`);
        if (squash(got.author) !== want.author) problems.push(`author ${JSON.stringify(got.author)}`);
        if (!squash(got.prompt).includes(squash(want.prompt))) problems.push(`prompt ${JSON.stringify(got.prompt)}`);
        if (squash(got.text) !== squash(want.text)) {
          problems.push(`text differs from the log's: ${difference(squash(got.text), squash(want.text))}`);
        }
        if (problems.length > 0) {
          throw new Error(`${label}, turn ${want.id}: ${problems.join("; ")}`);
        }
      }
      const streamed = squash(shown[2].text).split(" ");
      const everyTokenOnce = Array.from({ length: STREAM_TOKENS }, (_, i) => `tok${i}`);
      if (streamed.join(" ") !== everyTokenOnce.join(" ")) {
        throw new Error(`${label}'s streamed turn is not tok0…tok${STREAM_TOKENS - 1} exactly once each`);
      }
    }
    await screenshot(ada, "ada-session", { fullPage: true });
    await screenshot(bob, "bob-session", { fullPage: true });
  });

  const phone = await step("at phone width (390x844) the transcript fits, with no horizontal scroll", async () => {
    const phone = await openPage(bobContext, "bob-phone");
    await phone.setViewportSize(PHONE);
    await phone.goto(`/s/${sessionId}`);
    const transcript = phone.getByTestId("transcript");
    await transcript.waitFor({ state: "visible", timeout: WAIT_MS });
    await turnWithStatus(phone, streamedId, "completed").waitFor({ timeout: WAIT_MS });
    await screenshot(phone, "phone");
    const box = await transcript.boundingBox();
    if (!box || box.x < 0 || box.x + box.width > PHONE.width + 0.5 || box.height <= 0) {
      throw new Error(`the transcript is at ${JSON.stringify(box)} in a ${PHONE.width} px wide viewport`);
    }
    const scrollWidth = await phone.evaluate(() => document.documentElement.scrollWidth);
    if (scrollWidth > PHONE.width) {
      throw new Error(`the page scrolls sideways: scrollWidth ${scrollWidth} > ${PHONE.width}`);
    }
    return phone;
  });

  await step("Bob's sessions list has the session he joined", async () => {
    await bob.getByRole("link", { name: "Nightshift" }).click();
    await bob.getByRole("heading", { name: "Sessions" }).waitFor({ timeout: WAIT_MS });
    const row = bob.locator("[data-testid=session-row]").filter({ has: bob.locator(`a[href$="/s/${sessionId}"]`) });
    await row.waitFor({ timeout: WAIT_MS });
    await expectText(row, REPO);
  });

  await step("Stop session asks inline (no dialog), then stops the sandbox for everyone watching", async () => {
    const dialogs = [];
    ada.on("dialog", (dialog) => {
      dialogs.push(dialog.message());
      dialog.dismiss().catch(() => {});
    });
    await ada.getByRole("button", { name: "Stop session", exact: true }).click();
    await ada.getByRole("button", { name: "Confirm stop session" }).click({ timeout: WAIT_MS });
    for (const page of [ada, phone]) {
      await page.locator('[data-testid=sandbox-status][data-status="stopped"]').waitFor({ timeout: WAIT_MS });
    }
    if (dialogs.length > 0) {
      throw new Error(`the page opened dialogs: ${JSON.stringify(dialogs)}`);
    }
    await screenshot(ada, "ada-stopped");
  });

  await step("no page logged a console error", async () => {
    errors.assertNone("during the scenario");
  });
}

// What each turn should show, from the log: prompt_queued in order, its end, and its streamed text (the
// tokens; a turn's `message` repeats them, so it is the text only when nothing streamed).
function turnsFromLog(events) {
  const turns = new Map();
  for (const { event } of events) {
    const t = event.prompt_id && turns.get(event.prompt_id);
    switch (event.type) {
      case "prompt_queued":
        turns.set(event.prompt_id, {
          id: event.prompt_id,
          author: event.author.name,
          prompt: event.text,
          status: "queued",
          tokens: "",
          messages: "",
        });
        break;
      case "prompt_started":
        if (t) t.status = "running";
        break;
      case "prompt_finished":
        if (t) t.status = event.status;
        break;
      case "prompt_cancelled":
        if (t) t.status = "cancelled";
        break;
      case "token":
        if (t) t.tokens += event.text;
        break;
      case "message":
        if (t && event.role === "assistant") t.messages += `${event.text} `;
        break;
    }
  }
  return [...turns.values()].map((t) => ({ ...t, text: t.tokens || t.messages }));
}

async function turnsOnPage(page) {
  return page.locator("[data-testid=turn]").evaluateAll((elements) =>
    elements.map((element) => ({
      id: element.dataset.promptId,
      status: element.dataset.status,
      author: element.querySelector("[data-testid=turn-author]")?.textContent ?? "",
      prompt: element.querySelector("[data-testid=turn-prompt]")?.textContent ?? "",
      text: [...element.querySelectorAll("[data-testid=assistant-text]")].map((e) => e.innerText).join(" "),
    })),
  );
}

// Where `shown` departs from `logged`, with a little context, and both lengths.
function difference(shown, logged) {
  let at = 0;
  while (at < shown.length && shown[at] === logged[at]) at++;
  const around = (text) => JSON.stringify(text.slice(Math.max(0, at - 40), at + 60));
  return `${shown.length} chars shown, ${logged.length} logged; from char ${at} the page has ${around(shown)}, the log ${around(logged)}`;
}

async function expectText(locator, text) {
  await locator.first().waitFor({ timeout: WAIT_MS });
  await until(`${text} in ${locator}`, async () => squash(await locator.first().innerText()), (t) =>
    t.includes(squash(text)),
  );
}
