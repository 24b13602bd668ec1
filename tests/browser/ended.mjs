// A session at its time limit in the web app (run by tests/tests/browser/main.rs against a system whose
// sessions last a few seconds): while the session runs the composer takes a message; once the session has
// ended the page says so, the message box and Send are disabled (the server would refuse the prompt), Stop
// tree stays available for sessions it started, and no console error was logged. Screenshot:
// target/browser/ended.png.
import { ErrorLog, WAIT_MS, baseUrl, launch, newPerson, screenshot, signInByRequest, step } from "./browser.mjs";

const ADA = { login: "ada", name: "Ada Lovelace", email: "ada@example.com" };
const REPO = "demo/hello";

const browser = await launch();
const errors = new ErrorLog();
let page = null;
try {
  const context = await newPerson(browser);
  await signInByRequest(context, ADA);
  const created = await context.request.post(`${baseUrl}/api/sessions`, { data: { repo: REPO } });
  if (created.status() !== 201) throw new Error(`POST /api/sessions answered ${created.status()}`);
  const { id } = await created.json();
  page = errors.watch(await context.newPage(), "ada");
  const message = page.getByRole("textbox", { name: "Message", exact: true });
  const send = page.getByRole("button", { name: "Send", exact: true });

  await step("while the session runs, the composer takes a message", async () => {
    await page.goto(`/s/${id}`);
    await page.locator("[data-testid=app-ready]").waitFor({ timeout: WAIT_MS });
    if (await page.getByTestId("session-ended").count()) throw new Error("the session shows as ended at once");
    await message.fill("a draft");
    if (!(await send.isEnabled())) throw new Error("Send is disabled with a message in the box");
  });

  await step("at the time limit the page says the session ended and disables the composer", async () => {
    await page.getByTestId("session-ended").waitFor({ timeout: WAIT_MS });
    if (!(await message.isDisabled())) throw new Error("the message box still takes input");
    if (!(await send.isDisabled())) throw new Error("Send is still enabled");
    if (!(await page.getByRole("button", { name: "Stop tree", exact: true }).isEnabled())) {
      throw new Error("Stop tree is not available");
    }
    const link = page.getByTestId("session-ended").getByRole("link", { name: "Start a new session" });
    if ((await link.getAttribute("href")) !== "/new") throw new Error("no link to a new session");
    await screenshot(page, "ended");
  });

  await step("no page logged a console error", async () => errors.assertNone("in the ended session"));
} catch (error) {
  if (page) await screenshot(page, "failure-ended").catch(() => {});
  process.stderr.write(`\n${error.stack ?? error.message}\n`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
