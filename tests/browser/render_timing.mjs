// The `web_first_render` and `web_10k_events` bench rows: load a signed-in session view `/s/{id}` in
// Chromium several times and time, from navigation start (performance.now() is relative to it), until
// `[data-testid=app-ready]` exists and, optionally, until a given text (the last streamed token) is in the
// transcript. The moments are taken in the page by a MutationObserver installed before any of the app's
// code runs, so Playwright's polling does not add to them.
//
// Environment, besides browser.mjs's: NIGHTSHIFT_BENCH_PATH (`/s/{id}`), NIGHTSHIFT_BENCH_LOGIN (a
// participant's dev login), NIGHTSHIFT_BENCH_LOADS, NIGHTSHIFT_BENCH_LAST_TEXT (optional).
// Prints one JSON line: {"app_ready_ms": [...], "dom_content_loaded_ms": [...], "last_text_ms": [...]}.
import { ErrorLog, WAIT_MS, launch, newPerson, screenshot, signInByRequest } from "./browser.mjs";

const path = process.env.NIGHTSHIFT_BENCH_PATH;
const login = process.env.NIGHTSHIFT_BENCH_LOGIN;
const loads = Number(process.env.NIGHTSHIFT_BENCH_LOADS ?? "20");
const lastText = process.env.NIGHTSHIFT_BENCH_LAST_TEXT || null;
if (!path || !login || !(loads > 0)) {
  throw new Error("NIGHTSHIFT_BENCH_PATH, NIGHTSHIFT_BENCH_LOGIN and NIGHTSHIFT_BENCH_LOADS are required");
}

const browser = await launch();
try {
  const context = await newPerson(browser);
  await signInByRequest(context, { login, name: `Bench ${login}`, email: `${login}@bench.example` });
  await context.addInitScript((lastText) => {
    const marks = (window.__nightshiftMarks = {});
    const check = () => {
      if (marks.appReady === undefined && document.querySelector("[data-testid=app-ready]")) {
        marks.appReady = performance.now();
      }
      if (lastText !== null && marks.lastText === undefined) {
        const transcript = document.querySelector("[data-testid=transcript]");
        if (transcript?.textContent.includes(lastText)) {
          marks.lastText = performance.now();
        }
      }
    };
    // The app may mark an element it already had (an attribute change) or add a marked one.
    new MutationObserver(check).observe(document, {
      childList: true,
      subtree: true,
      characterData: true,
      attributes: true,
      attributeFilter: ["data-testid"],
    });
  }, lastText);

  const errors = new ErrorLog();
  const appReady = [];
  const domContentLoaded = [];
  const lastTextShown = [];
  for (let i = 0; i < loads; i++) {
    const page = errors.watch(await context.newPage(), `load ${i}`);
    await page.goto(path, { waitUntil: "commit" });
    const marks = await page
      .waitForFunction(
        (wantText) => {
          const marks = window.__nightshiftMarks;
          return marks?.appReady !== undefined && (!wantText || marks.lastText !== undefined) && marks;
        },
        lastText,
        { timeout: WAIT_MS, polling: 100 },
      )
      .then((handle) => handle.jsonValue())
      .catch(async (error) => {
        await screenshot(page, "bench-render-failure").catch(() => {});
        throw new Error(`load ${i} of ${path}: ${error.message}`);
      });
    appReady.push(marks.appReady);
    domContentLoaded.push(
      await page.evaluate(() => performance.getEntriesByType("navigation")[0]?.domContentLoadedEventEnd ?? null),
    );
    if (lastText !== null) {
      lastTextShown.push(marks.lastText);
    }
    await page.close();
  }
  errors.assertNone(`while loading ${path}`);
  process.stdout.write(`${JSON.stringify({
      app_ready_ms: appReady,
      dom_content_loaded_ms: domContentLoaded.filter((ms) => ms !== null),
      last_text_ms: lastTextShown,
    })}\n`);
} finally {
  await browser.close();
}
