// Drives faed's dashboard in headless Chromium (Debian's /usr/bin/chromium through playwright-core), step by
// step for tests/dashboard/test_dashboard.py: one JSON object per line on stdout for each step; after the
// steps that change something, it waits for a line on stdin (the test checks the effect meanwhile).
//
// Usage: node drive.js '{"url": ..., "drainUrl": ..., "token": ..., "artifacts": DIR, "method": "lc_get"}'
"use strict";
const { chromium } = require("playwright-core");
const readline = require("readline");

const cfg = JSON.parse(process.argv[2]);
const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const proceed = async () => { const l = await lines.next(); if (l.done) throw new Error("the test went away"); };

// What the page shows of its charts and counters now.
const sample = (page) => page.evaluate(() => ({
  points: charts.calls.data[0].length,
  t: charts.calls.data[0].slice(-5),
  calls: charts.calls.data[1].slice(-5),
  p99: charts.latency.data[2].slice(-5),
  rss: charts.memory.data[1].slice(-5),
  callsNow: document.getElementById("calls-now").textContent,
  canvases: document.querySelectorAll("canvas").length,
}));

(async () => {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1500, height: 1800 } });
    const consoleErrors = [];
    page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
    page.on("pageerror", (e) => consoleErrors.push(String(e)));
    page.on("response", (r) => { if (r.status() >= 400) consoleErrors.push(r.status() + " " + r.url()); });
    // Nothing but the admin port itself is fetched (no CDN).
    const foreign = [];
    page.on("request", (r) => { if (!r.url().startsWith(cfg.url)) foreign.push(r.url()); });

    await page.goto(cfg.url);
    await page.waitForFunction(() => document.querySelectorAll("tr.member").length === 3 &&
      document.querySelectorAll("#vbuckets .vb").length === 1024, null, { timeout: 20000 });
    await page.waitForFunction(() => charts.calls.data[0].length >= 2, null, { timeout: 10000 });
    const first = await sample(page);
    await page.waitForTimeout(3000);
    const second = await sample(page);
    const cluster = await page.evaluate(() => ({
      members: [...document.querySelectorAll("tr.member")].map((tr) => [...tr.cells].map((c) => c.textContent)),
      links: [...document.querySelectorAll("tr.member a")].map((a) => a.href),
      cells: document.querySelectorAll("#vbuckets .vb").length,
      colours: new Set([...document.querySelectorAll("#vbuckets .vb")].map((d) => d.style.background)).size,
      summary: document.getElementById("cluster-summary").textContent,
    }));
    await page.screenshot({ path: cfg.artifacts + "/dashboard-cluster.png", fullPage: true });
    say({ step: "loaded", first, second, cluster, foreign, consoleErrors });
    await proceed();

    // Degrade without the token: refused, and the page says so.
    const button = (cls) => `button.${cls}[data-method="${cfg.method}"]`;
    await page.waitForSelector(button("degrade"), { timeout: 10000 });
    await page.click(button("degrade"));
    await page.waitForFunction(() => document.getElementById("message").textContent.includes("401"), null,
      { timeout: 5000 });
    const refused = await page.textContent("#message");
    // With the token.
    await page.fill("#token", cfg.token);
    await page.dispatchEvent("#token", "change");
    await page.click(button("degrade"));
    await page.waitForSelector(`tr.degraded[data-method="${cfg.method}"]`, { timeout: 5000 });
    await page.screenshot({ path: cfg.artifacts + "/dashboard-degraded.png", fullPage: true });
    say({ step: "degraded", refused });
    await proceed();

    await page.click(button("restore"));
    await page.waitForSelector(button("degrade"), { timeout: 5000 });
    await page.waitForTimeout(2500);
    await page.screenshot({ path: cfg.artifacts + "/dashboard-restored.png", fullPage: true });
    const after = await sample(page);
    say({ step: "restored", after, message: await page.textContent("#message") });
    await proceed();

    // Drain another member from its own dashboard (the page asks to confirm).
    const other = await browser.newPage();
    other.on("dialog", (d) => d.accept());
    await other.goto(cfg.drainUrl);
    await other.waitForFunction(() => document.querySelectorAll("tr.member").length === 3, null, { timeout: 20000 });
    await other.fill("#token", cfg.token);
    await other.dispatchEvent("#token", "change");
    const seen = [];
    other.on("response", async (r) => { if (r.url().endsWith("/api/drain")) seen.push([r.status(), await r.text()]); });
    other.on("requestfailed", (r) => { if (r.url().endsWith("/api/drain")) seen.push([0, r.failure().errorText]); });
    await other.click("#drain");
    for (let i = 0; i < 50 && !seen.length; i++) await other.waitForTimeout(100);
    const [status, body] = seen[0] || [-1, "no answer, no failure"];
    say({ step: "draining", status, body });
    await proceed();
    say({ step: "done", consoleErrors, foreign });
  } finally {
    await browser.close();
  }
  process.exit(0);
})().catch((e) => { say({ step: "error", error: String(e && e.stack || e) }); process.exit(1); });
