// Shared set-up of the browser end-to-end tests (chat.test.mjs,
// presence.test.mjs): a private redis-server, Switchboard instances and
// headless Debian Chromium (playwright-core), every process tracked by pid and
// killed at the end; bounded polling (`until`) for every wait on the DOM.
//
// Each test file runs in a process of its own under `node --test`, so the
// state kept here (the work directory, the children) is per file.
//
// Environment: SWITCHBOARD_BIN (default target/debug/switchboard),
// CHROMIUM_PATH (default /usr/bin/chromium).

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
export const BIN = process.env.SWITCHBOARD_BIN || path.join(ROOT, "target/debug/switchboard");
export const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--no-first-run",
  "--disable-quic",
  "--disable-sync",
];
export const VIEWPORT = { width: 800, height: 600 };

// ---------------------------------------------------------------------------
// Processes: everything started here is tracked by pid and killed at the end.
// ---------------------------------------------------------------------------

export const work = fs.mkdtempSync(path.join(os.tmpdir(), "switchboard-e2e-"));
const children = new Set();

function killAll(signal = "SIGKILL") {
  for (const child of children) {
    try {
      process.kill(child.pid, signal);
    } catch {
      // already gone
    }
  }
}
process.on("exit", () => killAll());
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.once(signal, () => {
    killAll();
    process.exit(130);
  });
}

/** Is this child (from `start`) still running? */
export const running = (child) => children.has(child);

export function start(name, command, args) {
  const log = path.join(work, `${name}.log`);
  const fd = fs.openSync(log, "a");
  const child = spawn(command, args, {
    stdio: ["ignore", fd, fd],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "info", NO_COLOR: "1" },
  });
  fs.closeSync(fd);
  child.label = name;
  child.logPath = log;
  child.exited = new Promise((resolve) => {
    child.once("exit", (code, signal) => {
      children.delete(child);
      resolve({ code, signal });
    });
    child.once("error", (error) => {
      children.delete(child);
      resolve({ code: null, signal: null, error });
    });
  });
  children.add(child);
  return child;
}

/** Sends `signal` and waits for the exit (SIGKILL after `ms`, then throws). */
export async function stop(child, signal = "SIGTERM", ms = 10000) {
  if (!children.has(child)) return child.exited;
  process.kill(child.pid, signal);
  const timer = sleep(ms).then(() => "timeout");
  if ((await Promise.race([child.exited, timer])) === "timeout") {
    process.kill(child.pid, "SIGKILL");
    await child.exited;
    throw new Error(`${child.label} (pid ${child.pid}) ignored ${signal} for ${ms} ms`);
  }
  return child.exited;
}

export function tail(file, lines = 25) {
  try {
    return fs.readFileSync(file, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
  } catch {
    return "(no log)";
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `probe` until it returns something truthy; fails with `what`. */
export async function until(what, probe, ms = 10000) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last) return last;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${ms} ms waiting for: ${what} (last: ${last})`);
    }
    await sleep(100);
  }
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

function redisPing(socket) {
  return new Promise((resolve) => {
    const conn = net.createConnection({ path: socket });
    conn.setTimeout(500);
    conn.once("connect", () => conn.write("PING\r\n"));
    conn.once("data", (data) => {
      conn.destroy();
      resolve(data.toString().startsWith("+PONG"));
    });
    conn.once("error", () => resolve(false));
    conn.once("timeout", () => {
      conn.destroy();
      resolve(false);
    });
  });
}

export const redisSocket = path.join(work, "r.sock");
let redis = null;

/** A private redis-server on a unix socket in the work directory. */
export async function startRedis() {
  redis = start("redis", "redis-server", [
    "--port", "0",
    "--unixsocket", redisSocket,
    "--save", "",
    "--appendonly", "no",
    "--dir", work,
  ]);
  await until("redis-server answering PING", async () => {
    if (!children.has(redis)) throw new Error(`redis-server exited:\n${tail(redis.logPath)}`);
    return redisPing(redisSocket);
  });
  return redis;
}

/** A Switchboard instance on the private Redis (`--auth none`). */
export function startInstance(id, port, extra = []) {
  const child = start(id, BIN, [
    "--auth", "none",
    "--redis-url", `redis+unix://${redisSocket}`,
    "--instance-id", id,
    "--listen", `127.0.0.1:${port}`,
    ...extra,
  ]);
  child.port = port;
  return child;
}

export async function waitReady(child) {
  await until(`${child.label} /readyz on port ${child.port}`, async () => {
    if (!children.has(child)) {
      throw new Error(`${child.label} exited early:\n${tail(child.logPath)}`);
    }
    try {
      const response = await fetch(`http://127.0.0.1:${child.port}/readyz`);
      return response.status === 200;
    } catch {
      return false;
    }
  }, 20000);
}

// ---------------------------------------------------------------------------
// Browser
// ---------------------------------------------------------------------------

export let browser = null;

export async function launchBrowser() {
  assert.ok(fs.existsSync(BIN), `${BIN} is missing: build it first (cargo build --bin switchboard)`);
  try {
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_ARGS,
      timeout: 30000,
    });
  } catch (error) {
    throw new Error(`cannot start Chromium at ${CHROMIUM} (install Debian's chromium package): ${error.message}`);
  }
  return browser;
}

/**
 * A page in a fresh browser context (its own localStorage). The entry records
 * dialogs, script errors, CSP violations and, in `sent` / `received`, every
 * WebSocket frame the page sent / received ({ at, url, frame }: parsed JSON).
 */
export async function openPage() {
  const context = await browser.newContext({ viewport: VIEWPORT, deviceScaleFactor: 1 });
  const page = await context.newPage();
  const entry = { page, dialogs: [], problems: [], sent: [], received: [] };
  page.on("dialog", (dialog) => {
    entry.dialogs.push(`${dialog.type()}: ${dialog.message()}`);
    dialog.dismiss().catch(() => {});
  });
  page.on("pageerror", (error) => entry.problems.push(`page error: ${error.message}`));
  page.on("console", (message) => {
    if (/Content.Security.Policy/i.test(message.text())) {
      entry.problems.push(`CSP: ${message.text()}`);
    }
  });
  page.on("websocket", (ws) => {
    const record = (list) => ({ payload }) => {
      try {
        list.push({ at: Date.now(), url: ws.url(), frame: JSON.parse(String(payload)) });
      } catch {
        // not JSON
      }
    };
    ws.on("framesent", record(entry.sent));
    ws.on("framereceived", record(entry.received));
  });
  page.setDefaultTimeout(10000);
  return entry;
}

export const byTest = (page, id) => page.locator(`[data-testid="${id}"]`);
export const contactRow = (page, user) => page.locator(`[data-testid="contact-row"][data-user="${user}"]`);
export const roomRow = (page, room) => page.locator(`[data-testid="room-row"][data-room="${room}"]`);
export const attr = (locator, name) => locator.getAttribute(name, { timeout: 1000 });

export async function signIn(page, port, user) {
  await page.goto(`http://127.0.0.1:${port}/`);
  await byTest(page, "signin-user").fill(user);
  await byTest(page, "signin-submit").click();
  await until(`${user} connected`, async () =>
    (await attr(byTest(page, "conn-state"), "data-state")) === "connected");
}

export async function instanceLabel(page) {
  return byTest(page, "instance-label").textContent();
}

// ---------------------------------------------------------------------------
// Steps and tear-down
// ---------------------------------------------------------------------------

let failed = false;

/** A test that stops the sequence at the first failure (later steps fail fast). */
export function step(name, fn, timeout = 30000) {
  test(name, { timeout }, async () => {
    if (failed) throw new Error("not run: an earlier step failed");
    try {
      await fn();
    } catch (error) {
      failed = true;
      throw error;
    }
  });
}

/** Registers the tear-down: browser, instances (SIGTERM), then Redis; logs on failure. */
export function teardown() {
  after(async () => {
    if (browser) await browser.close().catch(() => {});
    const left = [...children].filter((child) => child !== redis);
    await Promise.all(left.map((child) => stop(child, "SIGTERM", 5000).catch(() => {})));
    if (redis) await stop(redis, "SIGTERM", 5000).catch(() => {});
    if (failed) {
      for (const file of fs.readdirSync(work).filter((f) => f.endsWith(".log"))) {
        console.log(`---- ${file} (last lines)\n${tail(path.join(work, file))}`);
      }
    }
    fs.rmSync(work, { recursive: true, force: true });
  });
}
