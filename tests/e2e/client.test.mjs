// Test of the reference client (web/client.mjs) under Node, against a real
// Switchboard instance (embedded mode, `--auth none`) started here. The
// client connects through a fault-injecting TCP proxy (below) that reads the
// WebSocket frames going by and can drop, duplicate or replace one, or cut
// the connection mid-stream, so the faults are exact and repeatable.
// Run with `bash tests/e2e/run.sh`, or, once the server is built:
// `node --test tests/e2e/client.test.mjs`.
//
// Environment: SWITCHBOARD_BIN (default target/debug/switchboard).

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";
import { SwitchboardClient, compareSeq, memoryStorage, parseSeq } from "../../web/client.mjs";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const BIN = process.env.SWITCHBOARD_BIN || path.join(ROOT, "target/debug/switchboard");
const INBOX_MAX_LEN = 50;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function until(what, probe, ms = 10000) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last) return last;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for: ${what} (last: ${last})`);
    await sleep(25);
  }
}

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

// ---------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------

const work = fs.mkdtempSync(path.join(os.tmpdir(), "switchboard-client-"));
let server; // { child, port, log, exited }

function startServer(port) {
  const log = path.join(work, "server.log");
  const fd = fs.openSync(log, "a");
  const child = spawn(
    BIN,
    [
      "--auth", "none",
      "--instance-id", "c1",
      "--listen", `127.0.0.1:${port}`,
      "--inbox-max-len", String(INBOX_MAX_LEN),
    ],
    { stdio: ["ignore", fd, fd], env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "info", NO_COLOR: "1" } },
  );
  fs.closeSync(fd);
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  return { child, port, log, exited, running: () => child.exitCode === null && child.signalCode === null };
}

process.on("exit", () => {
  if (server?.running()) server.child.kill("SIGKILL");
});

// ---------------------------------------------------------------------------
// The fault-injecting proxy
// ---------------------------------------------------------------------------

/** Splits complete WebSocket frames off `buf` (unmasking client frames). */
function parseFrames(buf) {
  const frames = [];
  let off = 0;
  for (;;) {
    if (buf.length - off < 2) break;
    const b0 = buf[off];
    const b1 = buf[off + 1];
    let len = b1 & 0x7f;
    let head = 2;
    if (len === 126) {
      if (buf.length - off < 4) break;
      len = buf.readUInt16BE(off + 2);
      head = 4;
    } else if (len === 127) {
      if (buf.length - off < 10) break;
      len = Number(buf.readBigUInt64BE(off + 2));
      head = 10;
    }
    const masked = (b1 & 0x80) !== 0;
    const maskAt = off + head;
    if (masked) head += 4;
    if (buf.length - off < head + len) break;
    const raw = buf.subarray(off, off + head + len);
    let payload = Buffer.from(buf.subarray(off + head, off + head + len));
    if (masked) for (let i = 0; i < payload.length; i++) payload[i] ^= buf[maskAt + (i % 4)];
    const opcode = b0 & 0x0f;
    let json = null;
    if (opcode === 1) {
      try {
        json = JSON.parse(payload.toString("utf8"));
      } catch {
        // not JSON
      }
    }
    frames.push({ opcode, payload, raw, json });
    off += head + len;
  }
  return { frames, rest: buf.subarray(off) };
}

/** An unmasked (server-to-client) frame. */
function serverFrame(opcode, payload) {
  const len = payload.length;
  const head = len < 126 ? Buffer.from([0x80 | opcode, len]) : Buffer.from([0x80 | opcode, 126, len >> 8, len & 0xff]);
  return Buffer.concat([head, payload]);
}

const textFrame = (value) => serverFrame(1, Buffer.from(JSON.stringify(value)));
function closeFrame(code, reason) {
  const payload = Buffer.alloc(2 + Buffer.byteLength(reason));
  payload.writeUInt16BE(code, 0);
  payload.write(reason, 2);
  return serverFrame(8, payload);
}

/**
 * Every connection is recorded (`conns`: its request path, user, since, and
 * the JSON frames each way). `onServerFrame(conn, frame, io)` may handle a
 * server frame itself with `io` (forward, inject, cut, closeWith) and return
 * true; otherwise the frame passes.
 */
class FaultProxy {
  conns = [];
  onServerFrame = null;

  constructor(targetPort) {
    this.targetPort = targetPort;
  }

  async listen() {
    this.server = net.createServer((socket) => this.#accept(socket));
    await new Promise((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.port = this.server.address().port;
    this.url = `ws://127.0.0.1:${this.port}/ws`;
  }

  of(user) {
    return this.conns.filter((c) => c.user === user && c.ws);
  }

  close() {
    for (const conn of this.conns) this.#shut(conn);
    return new Promise((resolve) => this.server.close(resolve));
  }

  #shut(conn) {
    conn.closed = true;
    conn.client.destroy();
    conn.upstream.destroy();
  }

  #io(conn) {
    return {
      forward: (frame) => conn.client.write(frame.raw),
      inject: (value) => conn.client.write(textFrame(value)),
      // An abrupt end: what was written is flushed, then FIN (the client
      // sees 1006), and the server's side is reset.
      cut: () => {
        conn.closed = true;
        conn.client.end();
        conn.upstream.destroy();
      },
      closeWith: (code, reason) => {
        conn.client.write(closeFrame(code, reason));
        conn.closed = true;
        conn.client.end();
        conn.upstream.destroy();
      },
    };
  }

  #accept(client) {
    const upstream = net.createConnection({ host: "127.0.0.1", port: this.targetPort });
    const conn = { client, upstream, path: null, user: null, since: null, ws: false, closed: false, toServer: [], toClient: [] };
    this.conns.push(conn);
    const io = this.#io(conn);
    let up = Buffer.alloc(0);
    let down = Buffer.alloc(0);
    let upHead = false;
    let downHead = false;
    client.on("data", (chunk) => {
      if (conn.closed) return;
      up = Buffer.concat([up, chunk]);
      if (!upHead) {
        const end = up.indexOf("\r\n\r\n");
        if (end < 0) return;
        const head = up.subarray(0, end + 4).toString("latin1");
        conn.path = head.split(" ")[1];
        const query = new URL(conn.path, "http://proxy").searchParams;
        conn.user = query.get("user");
        conn.since = query.get("since");
        conn.ws = /^upgrade:\s*websocket/im.test(head);
        upstream.write(up.subarray(0, end + 4));
        up = up.subarray(end + 4);
        upHead = true;
      }
      if (!conn.ws) {
        upstream.write(up);
        up = Buffer.alloc(0);
        return;
      }
      const { frames, rest } = parseFrames(up);
      up = rest;
      for (const frame of frames) {
        if (frame.json) conn.toServer.push(frame.json);
        upstream.write(frame.raw);
      }
    });
    upstream.on("data", (chunk) => {
      if (conn.closed) return;
      down = Buffer.concat([down, chunk]);
      if (!downHead) {
        const end = down.indexOf("\r\n\r\n");
        if (end < 0) return;
        if (!down.subarray(0, 12).toString("latin1").includes(" 101")) conn.ws = false;
        client.write(down.subarray(0, end + 4));
        down = down.subarray(end + 4);
        downHead = true;
      }
      if (!conn.ws) {
        client.write(down);
        down = Buffer.alloc(0);
        return;
      }
      const { frames, rest } = parseFrames(down);
      down = rest;
      for (const frame of frames) {
        if (conn.closed) return;
        if (frame.json) conn.toClient.push(frame.json);
        if (!this.onServerFrame?.(conn, frame, io)) client.write(frame.raw);
      }
    });
    const shut = () => this.#shut(conn);
    for (const socket of [client, upstream]) {
      socket.on("error", shut);
      socket.on("close", shut);
    }
  }
}

let proxy;

// ---------------------------------------------------------------------------
// Clients: the reference client (through the proxy) and raw sockets (direct)
// ---------------------------------------------------------------------------

const clients = new Set();
const raws = new Set();

function client(user, options = {}) {
  const c = new SwitchboardClient({
    url: proxy.url,
    user,
    WebSocket,
    storage: memoryStorage(),
    backoffBaseMs: 50,
    backoffCapMs: 300,
    retryBaseMs: 50,
    retryCapMs: 200,
    ...options,
  });
  c.events = [];
  for (const type of [
    "welcome", "synced", "dm", "duplicate", "gap", "delivered", "close", "fatal", "error",
    "presence_event", "member_joined", "member_left",
  ]) {
    c.on(type, (detail) => c.events.push({ ...detail, event: type }));
  }
  c.seen = (type) => c.events.filter((e) => e.event === type);
  clients.add(c);
  return c;
}

async function started(c) {
  const synced = c.seen("synced").length;
  c.start();
  await until(`${c.lastUrl} synced`, () => c.seen("synced").length > synced);
  return c;
}

/** A plain WebSocket straight to the server (no proxy, no reference client). */
async function raw(user, query = "") {
  const ws = new WebSocket(`ws://127.0.0.1:${server.port}/ws?user=${user}${query}`, { perMessageDeflate: false });
  const frames = [];
  ws.on("message", (data) => frames.push(JSON.parse(data.toString())));
  raws.add(ws);
  await until(`${user} welcome`, () => frames.some((f) => f.type === "welcome"));
  let next = 1;
  const r = {
    ws,
    frames,
    send: (frame) => ws.send(JSON.stringify(frame)),
    /** Sends a request with an id; resolves with its reply. */
    async request(frame) {
      const id = `r${next++}`;
      r.send({ ...frame, id });
      return until(`reply ${id}`, () => frames.find((f) => f.id === id));
    },
    of: (type) => frames.filter((f) => f.type === type),
    close: () => ws.close(),
  };
  return r;
}

/** Sends n DMs from a raw connection; returns their acks, in order. */
async function sendMany(from, to, n, { receipt = false, tag = "m" } = {}) {
  const ids = [];
  for (let i = 0; i < n; i++) {
    const id = `${tag}${i}`;
    ids.push(id);
    from.send({ type: "dm", to, body: { n: i, tag }, id, ...(receipt ? { receipt: true } : {}) });
  }
  return until(`${n} acks`, () => {
    const acks = ids.map((id) => from.frames.find((f) => f.id === id));
    return acks.every(Boolean) && acks;
  });
}

/** Everything after the backlog, on a fresh connection: nothing, or DMs. */
async function backlogOf(user) {
  const r = await raw(user);
  await r.request({ type: "ping" });
  const dms = r.of("dm");
  r.close();
  return dms;
}

before(async () => {
  assert.ok(fs.existsSync(BIN), `${BIN} is missing: build it first (cargo build --bin switchboard)`);
  server = startServer(await freePort());
  await until("the server's /readyz", async () => {
    if (!server.running()) throw new Error(`the server exited:\n${fs.readFileSync(server.log, "utf8")}`);
    try {
      return (await fetch(`http://127.0.0.1:${server.port}/readyz`)).status === 200;
    } catch {
      return false;
    }
  }, 20000);
  proxy = new FaultProxy(server.port);
  await proxy.listen();
});

after(async () => {
  for (const c of clients) c.close();
  for (const ws of raws) ws.terminate();
  if (proxy) await proxy.close();
  if (server?.running()) {
    server.child.kill("SIGTERM");
    // An unref'd timer: it must not keep the process alive once the server is gone.
    await Promise.race([server.exited, new Promise((resolve) => setTimeout(resolve, 5000).unref())]);
    if (server.running()) server.child.kill("SIGKILL");
  }
  fs.rmSync(work, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

test("seqs compare as (ms, n) pairs, not as strings", () => {
  assert.equal(compareSeq("9-0", "10-0"), -1, "'9-0' > '10-0' as strings");
  assert.equal(compareSeq("1796136982105-10", "1796136982105-9"), 1);
  assert.equal(compareSeq("5-5", "5-5"), 0);
  assert.deepEqual(parseSeq("18446744073709551615-0"), [18446744073709551615n, 0n]);
  assert.equal(parseSeq("1-2-3"), null);
  assert.equal(parseSeq(7), null);
  assert.throws(() => compareSeq("x", "1-0"), TypeError);
});

test("a connection dropped mid-stream resumes with since: every DM once, in order; recv moves the cursor", async () => {
  const bob = await started(client("bob1"));
  const alice = await raw("alice1");
  // The proxy cuts bob's connection right after his 5th DM.
  let forwarded = 0;
  proxy.onServerFrame = (conn, frame, io) => {
    if (conn.user !== "bob1" || frame.json?.type !== "dm" || forwarded < 0) return false;
    forwarded += 1;
    if (forwarded < 5) return false;
    io.forward(frame);
    io.cut();
    forwarded = -1; // once
    return true;
  };
  const acks = await sendMany(alice, "bob1", 20, { receipt: true });
  assert.ok(acks.every((a) => a.type === "ack" && a.stored === true && parseSeq(a.seq)), JSON.stringify(acks[0]));
  for (let i = 1; i < acks.length; i++) assert.equal(compareSeq(acks[i - 1].seq, acks[i].seq), -1, "seqs increase");

  await until("bob's 20 DMs", () => bob.seen("dm").length >= 20);
  await sleep(300);
  const dms = bob.seen("dm");
  assert.deepEqual(dms.map((d) => d.body.n), [...Array(20).keys()], "each DM once, in order");
  assert.deepEqual(dms.map((d) => d.seq), acks.map((a) => a.seq), "the seqs of the acks");
  assert.equal(bob.seen("duplicate").length, 0, "the server's seam had no duplicate");
  assert.equal(bob.lastSeq, acks[19].seq);

  const conns = proxy.of("bob1");
  assert.ok(conns.length >= 2, "bob reconnected");
  assert.equal(conns[0].since, null, "the first connection had nothing to resume");
  assert.equal(conns[1].since, acks[4].seq, "the reconnect resumed after the last processed DM");
  const close = bob.seen("close")[0];
  assert.equal(close.code, 1006, "an abrupt drop");

  // recv: batched (not one per DM), cumulative, up to the last DM.
  const recvs = conns.flatMap((c) => c.toServer).filter((f) => f.type === "recv");
  assert.ok(recvs.length >= 1 && recvs.length < 20, `${recvs.length} recv frames for 20 DMs`);
  assert.equal(recvs[recvs.length - 1].seq, acks[19].seq);
  for (let i = 1; i < recvs.length; i++) assert.equal(compareSeq(recvs[i - 1].seq, recvs[i].seq), -1);

  // The receipts alice asked for: one per DM, once bob acknowledged it.
  await until("20 delivered receipts", () => alice.of("delivered").length >= 20);
  assert.deepEqual(
    alice.of("delivered").map((d) => d.msg_id).sort(),
    acks.map((a) => a.msg_id).sort(),
  );
  assert.ok(alice.of("delivered").every((d) => d.to === "bob1"));
  // The server-side cursor moved: a device without `since` gets no backlog.
  assert.deepEqual(await backlogOf("bob1"), []);
  proxy.onServerFrame = null;
});

test("DMs seen twice are dropped by seq (duplicate event), listeners see each once", async () => {
  const carl = await started(client("carl2"));
  const alice = await raw("alice2");
  let dms = 0;
  let first = null;
  proxy.onServerFrame = (conn, frame, io) => {
    if (conn.user !== "carl2" || frame.json?.type !== "dm") return false;
    dms += 1;
    first ??= frame;
    io.forward(frame);
    io.forward(frame); // every DM twice
    if (dms === 4) io.forward(first); // and an old one again
    return true;
  };
  const acks = await sendMany(alice, "carl2", 4);
  await until("carl's 4 DMs and 5 duplicates", () => carl.seen("dm").length >= 4 && carl.seen("duplicate").length >= 5);
  await sleep(200);
  assert.deepEqual(carl.seen("dm").map((d) => d.body.n), [0, 1, 2, 3]);
  assert.deepEqual(carl.seen("dm").map((d) => d.seq), acks.map((a) => a.seq));
  assert.deepEqual(
    carl.seen("duplicate").map((d) => d.body.n),
    [0, 1, 2, 3, 0],
    "the copy of each, and the replayed first one",
  );
  proxy.onServerFrame = null;
});

test("a send whose ack is lost with the connection is retried with the same key: one delivery, the first ack", async () => {
  const erin = await raw("erin3");
  const dave = await started(client("dave3"));
  let swallowed = null;
  proxy.onServerFrame = (conn, frame, io) => {
    if (conn.user !== "dave3" || swallowed || frame.json?.type !== "ack" || !frame.json.msg_id) return false;
    swallowed = frame.json; // the ack never reaches dave, and the connection drops
    io.cut();
    return true;
  };
  const ack = await dave.sendDm("erin3", { text: "exactly once" });
  assert.ok(swallowed, "the first ack was swallowed");
  assert.equal(ack.msg_id, swallowed.msg_id, "the retry got the first ack back");
  assert.equal(ack.seq, swallowed.seq);
  assert.equal(ack.status, swallowed.status);
  const sent = proxy.of("dave3").flatMap((c) => c.toServer).filter((f) => f.type === "dm");
  assert.equal(sent.length, 2, "sent twice, on two connections");
  assert.equal(sent[0].key, sent[1].key, "with one key");
  assert.ok(sent[0].key.length <= 64);
  assert.notEqual(proxy.of("dave3")[0], proxy.of("dave3")[1]);
  await sleep(300);
  const got = erin.of("dm").filter((d) => d.body?.text === "exactly once");
  assert.equal(got.length, 1, "delivered once");
  assert.equal(got[0].msg_id, ack.msg_id);
  proxy.onServerFrame = null;
});

test("unavailable and timeout errors are retried with the same key; other errors reject", async () => {
  const erin = await raw("erin4");
  const dave = await started(client("dave4"));
  const swallowed = [];
  const codes = ["unavailable", "timeout"];
  const failedKeys = new Set();
  proxy.onServerFrame = (conn, frame, io) => {
    const f = frame.json;
    if (conn.user !== "dave4" || f?.type !== "ack" || !f.msg_id || !codes.length) return false;
    // The first ack of each DM: it was stored, but dave is told it failed
    // (as after a Redis hiccup).
    const { key } = conn.toServer.find((c) => c.id === f.id);
    if (failedKeys.has(key)) return false;
    failedKeys.add(key);
    swallowed.push(f);
    io.inject({ type: "error", id: f.id, code: codes.shift(), message: "injected by the test" });
    return true;
  };
  const first = await dave.sendDm("erin4", { text: "one" });
  const second = await dave.sendDm("erin4", { text: "two" });
  assert.equal(swallowed.length, 2);
  assert.equal(first.msg_id, swallowed[0].msg_id);
  assert.equal(second.msg_id, swallowed[1].msg_id);
  const sent = proxy.of("dave4").flatMap((c) => c.toServer).filter((f) => f.type === "dm");
  assert.equal(sent.length, 4, "each sent twice");
  assert.equal(sent[0].key, sent[1].key);
  assert.equal(sent[2].key, sent[3].key);
  assert.notEqual(sent[0].key, sent[2].key, "a key per DM");
  assert.equal(proxy.of("dave4").length, 1, "on the same connection");
  await sleep(300);
  assert.deepEqual(erin.of("dm").map((d) => d.body.text), ["one", "two"], "each delivered once");

  await assert.rejects(dave.sendDm("not a name!", { text: "x" }), (error) => error.code === "invalid_name");
  // Ephemeral (store: false): no key, no seq.
  const ephemeral = await dave.sendDm("erin4", { typing: true }, { store: false });
  assert.equal(ephemeral.stored, false);
  assert.equal(ephemeral.seq, undefined);
  assert.equal(proxy.of("dave4")[0].toServer.at(-1).key, undefined);
  proxy.onServerFrame = null;
});

test("a close with 1013 (inbox unavailable) reconnects with since", async () => {
  const fay = await started(client("fay5"));
  const alice = await raw("alice5");
  const acks1 = await sendMany(alice, "fay5", 2, { tag: "a" });
  await until("fay's first 2", () => fay.seen("dm").length === 2);
  let closed = false;
  proxy.onServerFrame = (conn, frame, io) => {
    if (conn.user !== "fay5" || closed || frame.json?.type !== "dm") return false;
    closed = true;
    io.closeWith(1013, "inbox unavailable; reconnect");
    return true;
  };
  const acks2 = await sendMany(alice, "fay5", 3, { tag: "b" });
  await until("fay's 5", () => fay.seen("dm").length >= 5);
  await sleep(200);
  assert.equal(fay.seen("close")[0].code, 1013);
  assert.equal(proxy.of("fay5")[1].since, acks1[1].seq);
  assert.deepEqual(fay.seen("dm").map((d) => d.seq), [...acks1, ...acks2].map((a) => a.seq));
  const replayed = fay.seen("dm").slice(2);
  assert.ok(replayed.every((d) => d.replayed), "the 3 came in the replay of the new connection");
  assert.equal(fay.seen("synced").at(-1).replayed, 3);
  proxy.onServerFrame = null;
});

test("the last seq survives in the injected storage; trimmed entries are reported as a gap", async () => {
  const storage = memoryStorage();
  const gina = await started(client("gina6", { storage }));
  const alice = await raw("alice6");
  const [firstAck] = await sendMany(alice, "gina6", 1, { tag: "x" });
  await until("gina's first DM", () => gina.seen("dm").length === 1);
  gina.close();
  assert.equal(storage.getItem("switchboard:last-seq:gina6"), firstAck.seq);
  await sleep(200);

  // 60 more while she is away: the inbox keeps the newest 50.
  const acks = await sendMany(alice, "gina6", 60, { tag: "y" });
  assert.ok(acks.every((a) => a.status === "offline" && a.stored));
  const again = await started(client("gina6", { storage }));
  assert.equal(proxy.of("gina6").at(-1).since, firstAck.seq, "resumed from the stored seq");
  await until("the kept 50", () => again.seen("dm").length >= INBOX_MAX_LEN);
  const [gap] = again.seen("gap");
  assert.ok(gap, "a gap frame");
  assert.equal(gap.after, firstAck.seq);
  assert.equal(gap.first, acks[60 - INBOX_MAX_LEN].seq);
  assert.deepEqual(
    again.seen("dm").map((d) => d.body.n),
    [...Array(INBOX_MAX_LEN).keys()].map((i) => i + 60 - INBOX_MAX_LEN),
  );
  assert.ok(again.seen("dm").every((d) => d.replayed));
  assert.equal(storage.getItem("switchboard:last-seq:gina6"), acks[59].seq);
});

test("watch and members: presence_event, member_joined and member_left come as events", async () => {
  const watcher = await started(client("walt7"));
  const ack = await watcher.request({ type: "watch", users: ["pam7"] });
  assert.deepEqual(ack.online, { pam7: false }, JSON.stringify(ack));
  assert.equal((await watcher.request({ type: "join", room: "hall7" })).status, "ok");
  const listed = await watcher.request({ type: "members", room: "hall7" });
  assert.equal(listed.type, "members", JSON.stringify(listed));
  assert.deepEqual(listed.users, ["walt7"]);

  const pam = await raw("pam7");
  await until("pam7 online (presence_event)", () => watcher.seen("presence_event").length === 1);
  const [online] = watcher.seen("presence_event");
  assert.equal(online.user, "pam7");
  assert.equal(online.online, true);
  assert.equal(typeof online.ts, "number");
  assert.equal((await pam.request({ type: "join", room: "hall7" })).status, "ok");
  await until("pam7 joined hall7", () => watcher.seen("member_joined").some((e) => e.user === "pam7"));
  assert.equal(watcher.seen("member_joined").find((e) => e.user === "pam7").room, "hall7");

  // Closing: she leaves the room and goes offline, after the grace.
  pam.close();
  await until("pam7 left hall7", () => watcher.seen("member_left").some((e) => e.user === "pam7"));
  await until("pam7 offline", () => watcher.seen("presence_event").length === 2);
  assert.equal(watcher.seen("presence_event")[1].online, false);
  assert.ok(watcher.seen("presence_event")[1].ts >= online.ts);
  assert.deepEqual(watcher.seen("error"), [], "no unsolicited error frame");
});
