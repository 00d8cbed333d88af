// Switchboard reference client (wire protocol v1.1, the "inbox").
//
// One plain ES module, no dependencies, for the browser and for Node >= 20.
// It keeps a connection up and makes DMs reliable end to end:
//
// - remembers the last processed inbox `seq` per user (browser: localStorage
//   key `switchboard:last-seq:<user>`; elsewhere: `options.storage`, any
//   object with getItem/setItem, default in memory);
// - reconnects with capped, jittered backoff and `?since=<last seq>`, so the
//   server replays exactly what was missed (a `gap` event says when retention
//   dropped some);
// - drops any stored DM whose seq is not above the last processed one
//   (`duplicate` event), so a listener sees every stored DM once, in order;
// - acknowledges processed DMs with `recv` (debounced, `recvDelayMs`, 200 ms:
//   one cumulative `recv` per burst);
// - sends DMs with an idempotency `key` of its own and retries them with the
//   same key on `unavailable` / `timeout` / `rate_limited` errors, on a lost
//   connection (resent after the reconnect) and when no reply comes within
//   `replyTimeoutMs`: the server answers a retry with the first ack and does
//   not deliver it twice. `sendDm` resolves with the ack frame.
//
// Usage
//
//   import { SwitchboardClient } from "./client.mjs";
//   const client = new SwitchboardClient({
//     url: "ws://127.0.0.1:8080/ws", // browser default: this origin's /ws
//     user: "bob",                   // or token: "eyJ..." (JWT)
//     WebSocket,                     // Node: e.g. `import WebSocket from "ws"`
//     storage,                       // optional { getItem, setItem }
//   });
//   client.on("dm", (dm) => show(dm)); // dm.replayed: from the backlog
//   client.start();
//   const ack = await client.sendDm("alice", { text: "hi" }, { receipt: true });
//
// Events (an EventTarget: `addEventListener(type, e => e.detail)`, or the
// `on(type, detail => ...)` shorthand, which returns an unsubscribe function):
//
//   state      { state: "connecting"|"connected"|"reconnecting"|"closed",
//                reason, attempt, delayMs, retryAt }
//   welcome    the welcome frame ({ user, instance, conn }) plus `since`
//   synced     { replayed }: the backlog is out, what follows is live (the
//              server reads no frame before its replay is queued, so the
//              reply to a ping sent on `welcome` marks the end of it)
//   dm         the dm frame plus `replayed` (true while the backlog is read)
//              and `ephemeral` (no seq: `store: false`, never deduplicated)
//   duplicate  a stored dm frame dropped because its seq was already seen
//   gap        { after, first }: entries after `after` were trimmed
//   delivered  { msg_id, to, seq }: a recipient acknowledged a DM that was
//              sent with `receipt: true`
//   room, presence, error (an error frame that answers no request), frame
//              (every frame, before the others)
//   presence_event  { user, online, ts }: a watched user's transition (after
//              a `watch` request; watches end with the connection: watch again
//              on every `welcome`, the reply gives the current state)
//   member_joined, member_left  { room, user, ts }: a user-level change of the
//              members of a room this connection joined (ask `members` on
//              every join: the reply is the starting list)
//   close      { code, reason, opened, wasConnected, description }
//   fatal      { message, status }: credentials refused, or the server closed
//              with 4001/4002/4003 (status: the close code); no more reconnects
//
// Seqs are opaque strings `MS-N`: compare them with `compareSeq` (a pair of
// integers), never as strings.

const SEQ_RE = /^(\d{1,20})-(\d{1,20})$/;
const OPEN = 1; // WebSocket.OPEN, the same in browsers and in `ws`
const RETRYABLE = new Set(["unavailable", "timeout", "rate_limited"]);

/** `[ms, n]` as BigInts, or null for anything that is not a seq. */
export function parseSeq(seq) {
  const m = typeof seq === "string" ? SEQ_RE.exec(seq) : null;
  return m ? [BigInt(m[1]), BigInt(m[2])] : null;
}

/** -1, 0 or 1, comparing two seqs as the pair (MS, N). */
export function compareSeq(a, b) {
  const x = parseSeq(a);
  const y = parseSeq(b);
  if (!x || !y) throw new TypeError(`not a seq: ${JSON.stringify(x ? b : a)}`);
  if (x[0] !== y[0]) return x[0] < y[0] ? -1 : 1;
  if (x[1] !== y[1]) return x[1] < y[1] ? -1 : 1;
  return 0;
}

/** A storage object kept in memory (the default outside the browser). */
export function memoryStorage(initial = {}) {
  const map = new Map(Object.entries(initial));
  return {
    getItem: (key) => (map.has(key) ? map.get(key) : null),
    setItem: (key, value) => void map.set(key, String(value)),
    removeItem: (key) => void map.delete(key),
  };
}

/** What a close event means, in words. */
export function describeClose(event) {
  const { code, reason } = event;
  switch (code) {
    case 1000:
      return reason ? `closed: ${reason}` : "closed";
    case 1001:
      return reason ? `closed by the server: ${reason}` : "the instance is shutting down";
    case 1008:
      return `closed by the server: ${reason || "policy violation"}`;
    case 1009:
      return "closed by the server: message too large";
    case 1013:
      return "the server could not read the inbox";
    case 1006:
      return "connection lost";
    case 4001:
      return "the token expired";
    case 4002:
      return `disconnected by the server: ${reason || "no reason given"}`;
    case 4003:
      return "refused: a token for another user";
    default:
      return reason ? `closed: ${reason} (${code})` : `closed (${code})`;
  }
}

function defaultStorage() {
  try {
    const storage = globalThis.localStorage;
    if (storage && typeof storage.getItem === "function") return storage;
  } catch {
    // access denied (sandboxed frame, disabled storage)
  }
  return memoryStorage();
}

function defaultUrl() {
  const loc = globalThis.location;
  if (!loc || !loc.host) throw new TypeError("options.url is required outside a page");
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/ws`;
}

/** The `sub` of a JWT, unverified: only a storage-key hint before `welcome`. */
function tokenSubject(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const sub = JSON.parse(atob(part.padEnd(Math.ceil(part.length / 4) * 4, "="))).sub;
    return typeof sub === "string" ? sub : null;
  } catch {
    return null;
  }
}

function randomKey() {
  const bytes = new Uint8Array(16);
  if (globalThis.crypto?.getRandomValues) globalThis.crypto.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return `k-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function failure(code, message, frame) {
  return Object.assign(new Error(message ? `${code}: ${message}` : code), { code, frame });
}

export class SwitchboardClient extends EventTarget {
  #WS;
  #url;
  #creds;
  #storage;
  #fetch;
  #opt;
  #ws = null;
  #started = false;
  #stopped = false;
  #connected = false;
  #state = "idle";
  #user = null;
  #instance = null;
  #attempt = 0;
  #retryTimer = null;
  #connectTimer = null;
  #nextId = 1;
  #pending = new Map(); // request id -> { onReply, onLost, timer }
  #outbox = new Set(); // DM sends not answered yet
  #lastSeq = null;
  #recvSeq = null; // processed, not yet sent in a recv
  #recvTimer = null;
  #syncing = false;
  #replayed = 0;
  #lastUrl = null;

  /**
   * @param {object} options
   * @param {string} [options.url] the `/ws` URL (browser default: this origin's)
   * @param {string} [options.user] user name (`--auth none` servers)
   * @param {string} [options.token] a JWT (instead of `user`)
   * @param {Function} [options.WebSocket] constructor (default: the global one)
   * @param {{getItem: Function, setItem: Function}} [options.storage]
   * @param {Function} [options.fetch] for `probe` (default: the global fetch)
   * @param {boolean} [options.probe=true] ask the server why a connection
   *   failed before opening (a refused credential stops the reconnects)
   * @param {number} [options.backoffBaseMs=500] @param {number} [options.backoffCapMs=10000]
   * @param {number} [options.recvDelayMs=200] @param {number} [options.replyTimeoutMs=10000]
   * @param {number} [options.retryBaseMs=250] @param {number} [options.retryCapMs=5000]
   * @param {number} [options.maxSendAttempts=10] @param {number} [options.connectTimeoutMs=15000]
   * @param {string} [options.storagePrefix="switchboard:last-seq:"]
   */
  constructor(options = {}) {
    super();
    this.#WS = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WS !== "function") {
      throw new TypeError("no WebSocket constructor: pass options.WebSocket (under Node, e.g. the ws package)");
    }
    if (!options.user && !options.token) throw new TypeError("options.user or options.token is required");
    this.#url = options.url ?? defaultUrl();
    this.#creds = options.token ? { token: options.token } : { user: options.user };
    this.#storage = options.storage ?? defaultStorage();
    this.#fetch = options.fetch ?? (globalThis.fetch ? globalThis.fetch.bind(globalThis) : null);
    this.#opt = {
      probe: true,
      backoffBaseMs: 500,
      backoffCapMs: 10000,
      recvDelayMs: 200,
      replyTimeoutMs: 10000,
      retryBaseMs: 250,
      retryCapMs: 5000,
      maxSendAttempts: 10,
      connectTimeoutMs: 15000,
      storagePrefix: "switchboard:last-seq:",
      ...Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)),
    };
    const hint = this.#creds.user ?? tokenSubject(this.#creds.token);
    if (hint) this.#lastSeq = this.#storedSeq(hint);
  }

  // -------------------------------------------------------------------------
  // Public API
  // -------------------------------------------------------------------------

  /** `on(type, detail => ...)`: a listener on `detail`; returns its remover. */
  on(type, fn) {
    const listener = (event) => fn(event.detail, event);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  get state() {
    return this.#state;
  }
  get connected() {
    return this.#connected;
  }
  /** The user id from the last `welcome` (null before). */
  get user() {
    return this.#user;
  }
  get instance() {
    return this.#instance;
  }
  /** The last stored DM's seq this client processed (null: none yet). */
  get lastSeq() {
    return this.#lastSeq;
  }
  /** The URL of the last connection attempt (it carries the credentials). */
  get lastUrl() {
    return this.#lastUrl;
  }
  /** True from `welcome` until the backlog is out (`synced`). */
  get syncing() {
    return this.#syncing;
  }

  /** Starts connecting (and keeps reconnecting until `close`). */
  start() {
    if (this.#started) return this;
    this.#started = true;
    this.#connect();
    return this;
  }

  /** Closes for good: sends a pending `recv`, rejects unanswered sends. */
  close(reason = "client closed") {
    if (this.#stopped) return;
    this.flushRecv();
    this.#stopped = true;
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#connectTimer);
    clearTimeout(this.#recvTimer);
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      try {
        ws.close(1000, reason);
      } catch {
        // already closing
      }
    }
    this.#lost();
    for (const entry of [...this.#outbox]) this.#settle(entry, failure("closed", "the client was closed"));
    this.#setState("closed", { reason });
  }

  /** Skips the backoff wait (e.g. when the browser comes back online). */
  reconnectNow() {
    if (!this.#started || this.#stopped || this.#ws) return;
    this.#connect();
  }

  /**
   * Sends a DM; resolves with its ack frame (`status`, `msg_id`, `seq`,
   * `stored`), rejects with an Error whose `code` is the server's error code
   * (or `closed`). Stored DMs carry an idempotency key (`options.key`, else a
   * random one) and are retried with it; ephemeral ones (`store: false`) are
   * retried only on `unavailable` and fail with `disconnected` on a lost
   * connection. Queued while disconnected.
   */
  sendDm(to, body, { receipt = false, store = true, key } = {}) {
    return new Promise((resolve, reject) => {
      if (this.#stopped) {
        reject(failure("closed", "the client was closed"));
        return;
      }
      const frame = { type: "dm", to, body };
      if (store) {
        frame.key = key ?? randomKey();
        if (receipt) frame.receipt = true;
      } else {
        frame.store = false;
      }
      const entry = { frame, attempts: 0, resolve, reject, retryTimer: null, id: null };
      this.#outbox.add(entry);
      if (this.#connected) this.#transmit(entry);
    });
  }

  /**
   * Sends any other request (join, leave, room, presence, watch, unwatch,
   * members, ping) with a fresh
   * id; resolves with the reply frame, whatever its type (an `error` frame
   * too); rejects with code `disconnected` when not connected or when the
   * connection closes first, `timeout` when no reply comes in time.
   */
  request(frame, { timeoutMs = this.#opt.replyTimeoutMs } = {}) {
    return new Promise((resolve, reject) => {
      if (!this.#connected) {
        reject(failure("disconnected", "not connected"));
        return;
      }
      const id = this.#send(frame, {
        onReply: resolve,
        onLost: () => reject(failure("disconnected", "the connection closed before the reply")),
        onTimeout: () => reject(failure("timeout", "no reply in time")),
        timeoutMs,
      });
      if (id === null) reject(failure("disconnected", "not connected"));
    });
  }

  /** Sends the pending `recv` now (it is otherwise debounced). */
  flushRecv() {
    clearTimeout(this.#recvTimer);
    this.#recvTimer = null;
    if (!this.#recvSeq || !this.#connected || !this.#ws || this.#ws.readyState !== OPEN) return false;
    this.#ws.send(JSON.stringify({ type: "recv", seq: this.#recvSeq }));
    this.#recvSeq = null;
    return true;
  }

  /**
   * Asks the server, with a plain GET of the upgrade URL, whether it would
   * accept these credentials (a WebSocket hides the status of a refused
   * upgrade). Valid credentials get 400/426 (not an upgrade), bad ones 401.
   * Returns { ok } | { fatal, message, status } | { retry, message }.
   */
  async probe() {
    if (!this.#fetch) return { ok: true };
    let response;
    try {
      const http = this.#url.replace(/^ws(s?):/i, "http$1:");
      response = await this.#fetch(`${http}?${this.#credentialQuery()}`, {
        cache: "no-store",
        credentials: "omit",
        redirect: "error",
      });
    } catch {
      return { retry: true, message: "server unreachable" };
    }
    let detail = "";
    try {
      detail = (await response.json()).error || "";
    } catch {
      // not JSON: keep the status alone
    }
    switch (response.status) {
      case 401:
        return {
          fatal: true,
          status: 401,
          message: this.#creds.token
            ? "Invalid credentials: the server refused this token (wrong, expired or not for this server)."
            : "Invalid credentials: the server refused this name. It may require a token (--auth jwt).",
        };
      case 403:
        return { fatal: true, status: 403, message: `Refused by the server: ${detail || "forbidden"}.` };
      case 429:
        return { retry: true, message: detail || "too many connections for this user" };
      case 503:
        return { retry: true, message: detail || "instance unavailable" };
      default:
        return { ok: true };
    }
  }

  // -------------------------------------------------------------------------
  // Connection
  // -------------------------------------------------------------------------

  #credentialQuery(since) {
    const query = new URLSearchParams();
    if (this.#creds.token) query.set("token", this.#creds.token);
    else query.set("user", this.#creds.user);
    if (since) query.set("since", since);
    return query.toString();
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  #setState(state, extra = {}) {
    this.#state = state;
    this.#emit("state", { state, attempt: this.#attempt, ...extra });
  }

  #connect() {
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    if (this.#stopped) return;
    const since = this.#lastSeq;
    const url = `${this.#url}?${this.#credentialQuery(since)}`;
    this.#lastUrl = url;
    let ws;
    try {
      ws = new this.#WS(url);
    } catch (error) {
      this.#scheduleReconnect(`cannot connect: ${error.message}`);
      return;
    }
    this.#ws = ws;
    let opened = false;
    this.#setState("connecting", { since });
    clearTimeout(this.#connectTimer);
    this.#connectTimer = setTimeout(() => {
      if (this.#ws === ws && !this.#connected) ws.close();
    }, this.#opt.connectTimeoutMs);
    ws.addEventListener("open", () => {
      opened = true;
    });
    ws.addEventListener("message", (event) => {
      if (this.#ws === ws) this.#onMessage(event.data);
    });
    // `ws` (Node) throws on an `error` event nobody listens to.
    ws.addEventListener("error", () => {});
    ws.addEventListener("close", (event) => {
      if (this.#ws !== ws) return;
      this.#ws = null;
      this.#onClose(event, opened);
    });
  }

  async #onClose(event, opened) {
    clearTimeout(this.#connectTimer);
    const wasConnected = this.#connected;
    this.#lost();
    const description = wasConnected || opened ? describeClose(event) : "cannot connect";
    this.#emit("close", { code: event.code, reason: event.reason, opened, wasConnected, description });
    if (this.#stopped) return;
    let reason = description;
    // The server ended this session on purpose (expired token, a
    // backend's disconnect, another user's token): coming straight back
    // with the same token would undo it.
    if (opened && event.code >= 4001 && event.code <= 4003) {
      this.#stopped = true;
      for (const entry of [...this.#outbox]) this.#settle(entry, failure("closed", description));
      this.#emit("fatal", { message: description, status: event.code });
      this.#setState("closed", { reason: description });
      return;
    }
    if (!opened && this.#opt.probe) {
      const verdict = await this.probe();
      if (this.#stopped) return;
      if (verdict.fatal) {
        this.#stopped = true;
        for (const entry of [...this.#outbox]) this.#settle(entry, failure("refused", verdict.message));
        this.#emit("fatal", { message: verdict.message, status: verdict.status });
        this.#setState("closed", { reason: verdict.message });
        return;
      }
      if (verdict.message) reason = verdict.message;
    }
    this.#scheduleReconnect(reason);
  }

  /** Capped exponential backoff with jitter (half fixed, half random). */
  #scheduleReconnect(reason) {
    const { backoffBaseMs, backoffCapMs } = this.#opt;
    const ceiling = Math.min(backoffCapMs, backoffBaseMs * 2 ** this.#attempt);
    const delayMs = Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
    this.#attempt += 1;
    this.#retryTimer = setTimeout(() => this.#connect(), delayMs);
    this.#setState("reconnecting", { reason, delayMs, retryAt: Date.now() + delayMs });
  }

  /** The connection is gone: fail or requeue what waited on it. */
  #lost() {
    this.#connected = false;
    this.#syncing = false;
    const waiting = [...this.#pending.values()];
    this.#pending.clear();
    for (const p of waiting) {
      clearTimeout(p.timer);
      p.onLost();
    }
  }

  /** Sends a frame with a fresh id; returns the id (null: not open). */
  #send(frame, { onReply, onLost, onTimeout, timeoutMs }) {
    const ws = this.#ws;
    if (!ws || ws.readyState !== OPEN) return null;
    const id = this.#nextId++;
    const entry = { onReply, onLost, timer: null };
    if (timeoutMs > 0) {
      entry.timer = setTimeout(() => {
        if (this.#pending.get(id) !== entry) return;
        this.#pending.delete(id);
        onTimeout();
      }, timeoutMs);
    }
    this.#pending.set(id, entry);
    ws.send(JSON.stringify({ ...frame, id }));
    return id;
  }

  // -------------------------------------------------------------------------
  // Frames
  // -------------------------------------------------------------------------

  #onMessage(data) {
    let frame;
    try {
      frame = JSON.parse(typeof data === "string" ? data : new TextDecoder().decode(data));
    } catch {
      return;
    }
    if (!frame || typeof frame !== "object" || Array.isArray(frame)) return;
    this.#emit("frame", frame);
    if (frame.id !== undefined && frame.id !== null && this.#pending.has(frame.id)) {
      const p = this.#pending.get(frame.id);
      this.#pending.delete(frame.id);
      clearTimeout(p.timer);
      p.onReply(frame);
      return;
    }
    switch (frame.type) {
      case "welcome":
        this.#onWelcome(frame);
        break;
      case "dm":
        this.#onDm(frame);
        break;
      case "gap":
      case "delivered":
      case "room":
      case "presence":
      case "presence_event":
      case "member_joined":
      case "member_left":
      case "error":
        this.#emit(frame.type, frame);
        break;
      default:
        break;
    }
  }

  #onWelcome(frame) {
    clearTimeout(this.#connectTimer);
    const since = this.#lastSeq;
    this.#user = String(frame.user);
    this.#instance = String(frame.instance);
    if (this.#lastSeq === null) this.#lastSeq = this.#storedSeq(this.#user);
    this.#connected = true;
    this.#syncing = true;
    this.#replayed = 0;
    this.#emit("welcome", { ...frame, since });
    this.#setState("connected", { instance: this.#instance });
    // The server reads no frame before its replay is queued: this ping's
    // pong comes right after the backlog.
    const endSync = () => {
      if (!this.#syncing) return;
      this.#syncing = false;
      this.#attempt = 0;
      this.#emit("synced", { replayed: this.#replayed });
    };
    this.#send({ type: "ping" }, { onReply: endSync, onLost: () => {}, onTimeout: endSync, timeoutMs: 60000 });
    if (this.#recvSeq) this.flushRecv();
    for (const entry of this.#outbox) if (entry.id === null && entry.retryTimer === null) this.#transmit(entry);
  }

  #onDm(frame) {
    const seq = frame.seq;
    if (!parseSeq(seq)) {
      this.#emit("dm", { ...frame, replayed: false, ephemeral: true });
      return;
    }
    if (this.#lastSeq !== null && compareSeq(seq, this.#lastSeq) <= 0) {
      this.#emit("duplicate", frame);
      return;
    }
    const replayed = this.#syncing;
    if (replayed) this.#replayed += 1;
    this.#emit("dm", { ...frame, replayed, ephemeral: false });
    // Processed: remembered, and acknowledged (debounced).
    this.#lastSeq = seq;
    this.#storeSeq(seq);
    this.#recvSeq = seq;
    if (!this.#recvTimer) {
      this.#recvTimer = setTimeout(() => this.flushRecv(), this.#opt.recvDelayMs);
    }
  }

  // -------------------------------------------------------------------------
  // Sending DMs
  // -------------------------------------------------------------------------

  #transmit(entry) {
    entry.retryTimer = null;
    if (this.#stopped || !this.#outbox.has(entry)) return;
    if (!this.#connected) return; // sent again on the next welcome
    entry.attempts += 1;
    entry.id = this.#send(entry.frame, {
      timeoutMs: this.#opt.replyTimeoutMs,
      onReply: (reply) => this.#onDmReply(entry, reply),
      onLost: () => this.#onDmLost(entry),
      // No answer at all: resend (the key makes it safe), else give up.
      onTimeout: () => {
        entry.id = null;
        if (entry.frame.key) this.#retry(entry, failure("timeout", "no reply in time"));
        else this.#settle(entry, failure("timeout", "no reply in time"));
      },
    });
  }

  #onDmReply(entry, reply) {
    entry.id = null;
    if (reply.type === "ack") {
      this.#settle(entry, null, reply);
      return;
    }
    const code = reply.type === "error" ? String(reply.code) : "bad_reply";
    const error = failure(code, reply.message, reply);
    // Ephemeral DMs have no key: only `unavailable` (reached nobody) is safe.
    const safe = entry.frame.key ? RETRYABLE.has(code) : code === "unavailable" || code === "rate_limited";
    if (safe) this.#retry(entry, error);
    else this.#settle(entry, error);
  }

  #onDmLost(entry) {
    entry.id = null;
    // A keyed DM waits for the next welcome; an ephemeral one may have been
    // delivered already.
    if (!entry.frame.key) this.#settle(entry, failure("disconnected", "the connection closed before the ack"));
  }

  #retry(entry, error) {
    if (entry.attempts >= this.#opt.maxSendAttempts) {
      this.#settle(entry, error);
      return;
    }
    const { retryBaseMs, retryCapMs } = this.#opt;
    const ceiling = Math.min(retryCapMs, retryBaseMs * 2 ** (entry.attempts - 1));
    const delay = Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
    entry.retryTimer = setTimeout(() => this.#transmit(entry), delay);
  }

  #settle(entry, error, ack) {
    if (!this.#outbox.delete(entry)) return;
    clearTimeout(entry.retryTimer);
    if (error) entry.reject(error);
    else entry.resolve(ack);
  }

  // -------------------------------------------------------------------------
  // Storage of the last processed seq
  // -------------------------------------------------------------------------

  #storageKey(user) {
    return `${this.#opt.storagePrefix}${user}`;
  }

  #storedSeq(user) {
    try {
      const value = this.#storage.getItem(this.#storageKey(user));
      return parseSeq(value) ? value : null;
    } catch {
      return null;
    }
  }

  #storeSeq(seq) {
    const user = this.#user ?? this.#creds.user ?? tokenSubject(this.#creds.token ?? "");
    if (!user) return;
    try {
      // Never backwards: another tab of the same user may be further along.
      const stored = this.#storedSeq(user);
      if (stored === null || compareSeq(seq, stored) > 0) this.#storage.setItem(this.#storageKey(user), seq);
    } catch {
      // storage full or disabled: the in-memory seq still works
    }
  }
}
