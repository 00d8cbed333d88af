// Switchboard browser client (issue #6): one ES module, no framework, no build.
//
// It speaks the wire protocol of docs/PROTOCOL.md to the instance that served
// it. Everything that came from the network is put into the page with
// textContent / text nodes only (never innerHTML), and the page's CSP forbids
// inline script and style, so a message body can never become code.
//
// Credentials: a user name (`--auth none` servers) or a pasted token. They are
// kept in memory only and travel only in the `/ws?...` URL to this origin.
//
// The connection is the reference client, client.mjs (protocol v1.1): it
// resumes the inbox with `since` (the last seq, in localStorage under
// `switchboard:last-seq:<user>`), so DMs that came while the page was away
// are replayed — shown after a "while you were away" divider — and it
// acknowledges them (`recv`). The page asks `receipt: true` on its DMs and
// marks them "✓ delivered" when the recipient's `delivered` receipt comes.
//
// Presence (issue #14) is pushed, never polled: the page `watch`es its
// contacts on every connection (watches end with the connection; the reply
// gives the current state) and then follows `presence_event` frames. A room
// shows its members: a `members` query after every join (so after every
// reconnect too), then `member_joined` / `member_left` frames.

import { SwitchboardClient } from "/client.mjs";

const NAME_RE = /^[A-Za-z0-9_.:@-]{1,64}$/;
const NAME_RULE = "1–64 characters of A–Z a–z 0–9 _ . : @ -";
const WATCH_BATCH = 1000; // the server's limit of users per watch frame
const MAX_BODY_CHARS = 16000; // the server checks the real limit (too_large)
const LAST_USER_KEY = "switchboard:last-user";
const HUES = 8;

const $ = (id) => document.getElementById(id);

/** Builds an element. Children that are strings become text nodes. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  el.append(...children.filter((c) => c !== null && c !== undefined));
  return el;
}

function show(el, visible) {
  el.hidden = !visible;
}

function hueOf(name) {
  let hash = 0;
  for (const ch of name) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  return `hue-${hash % HUES}`;
}

function fillAvatar(el, name, kind = "user") {
  el.className = `avatar ${kind === "room" ? "room" : hueOf(name)}`;
  el.textContent = kind === "room" ? "#" : (name[0] || "?").toUpperCase();
}

/** What a message body shows: `body.text` when it is a string, else the JSON. */
function bodyText(body) {
  if (body && typeof body === "object" && typeof body.text === "string") return body.text;
  if (body === undefined) return "";
  return JSON.stringify(body);
}

function clockTime(ts) {
  const date = new Date(typeof ts === "number" ? ts : Date.now());
  return {
    short: date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }),
    full: date.toLocaleString(),
    iso: date.toISOString(),
  };
}

function storageGet(key) {
  try {
    return localStorage.getItem(key);
  } catch {
    return null;
  }
}

function storageSet(key, value) {
  try {
    localStorage.setItem(key, value);
  } catch {
    // storage disabled: the page works without it
  }
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

const state = {
  creds: null, // { user } or { token }: memory only
  me: null, // the user id from `welcome`
  instance: null,
  client: null, // the SwitchboardClient while signed in
  connected: false, // true between `welcome` and close
  epoch: 0, // connections so far (one "while you were away" divider each)
  countdownTimer: null,
  sent: new Map(), // msg_id -> node of a DM this page sent (for receipts)
  early: new Set(), // msg_ids delivered before their ack came (rare)
  contacts: new Map(), // name -> { name, presence, unread, row, dot, badge, watch }
  rooms: new Map(), // name -> { name, joined, unread, row, badge, members }
  convs: new Map(), // "dm:bob" | "room:lobby" -> { kind, peer, nodes }
  active: null, // key of the shown conversation
};

const ui = {
  signin: $("signin"),
  signinForm: $("signin-form"),
  signinUser: $("signin-user"),
  signinToken: $("signin-token"),
  signinError: $("signin-error"),
  signinSubmit: $("signin-submit"),
  app: $("app"),
  meAvatar: $("me-avatar"),
  meName: $("me-name"),
  connState: $("conn-state"),
  instance: $("instance-label"),
  banner: $("banner"),
  bannerText: $("banner-text"),
  contactForm: $("contact-form"),
  contactInput: $("contact-input"),
  contactError: $("contact-error"),
  contactList: $("contact-list"),
  contactEmpty: $("contact-empty"),
  roomForm: $("room-form"),
  roomInput: $("room-input"),
  roomError: $("room-error"),
  roomList: $("room-list"),
  roomEmpty: $("room-empty"),
  convAvatar: $("conv-avatar"),
  convTitle: $("conv-title"),
  convSub: $("conv-sub"),
  convEmpty: $("conv-empty"),
  dmMessages: $("dm-messages"),
  roomMessages: $("room-messages"),
  composer: $("composer"),
  composerInput: $("composer-input"),
  composerSend: $("composer-send"),
  memberBar: $("member-bar"),
  memberCount: $("member-count"),
  memberList: $("member-list"),
};

// ---------------------------------------------------------------------------
// Connection: the reference client (client.mjs) keeps it up, resumes the
// inbox with `since`, de-duplicates, acknowledges (`recv`) and retries DMs.
// ---------------------------------------------------------------------------

function newClient(creds) {
  const client = new SwitchboardClient({ ...creds });
  client.on("state", onClientState);
  client.on("welcome", onWelcome);
  client.on("close", onClosed);
  client.on("fatal", ({ message }) => signOut(message));
  client.on("dm", onDirect);
  client.on("room", onRoom);
  client.on("delivered", onDelivered);
  client.on("presence_event", onPresenceEvent);
  client.on("member_joined", (frame) => onMemberEvent(frame, true));
  client.on("member_left", (frame) => onMemberEvent(frame, false));
  client.on("gap", onGap);
  client.on("error", (frame) => notice(`${frame.code}: ${frame.message}`));
  return client;
}

function onClientState({ state: name, reason, retryAt, attempt }) {
  if (!state.client) return;
  clearInterval(state.countdownTimer);
  if (name === "connecting") {
    setConnState("connecting", attempt ? `connecting (attempt ${attempt + 1})…` : "connecting…");
  } else if (name === "reconnecting") {
    const tick = () => {
      const seconds = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
      setConnState("reconnecting", `${reason} — reconnecting in ${seconds} s`);
    };
    tick();
    state.countdownTimer = setInterval(tick, 1000);
  }
}

function onClosed() {
  state.connected = false;
  // Watches and memberships end with the connection: what the page shows is
  // unknown until the next connection watches and asks again.
  for (const contact of state.contacts.values()) {
    contact.watch = null;
    setPresence(contact, "unknown");
  }
  for (const room of state.rooms.values()) {
    room.query = null;
    setMembersStale(room);
    setRoomJoined(room, false);
  }
  updateComposer();
}

function reconnectNow() {
  if (state.client) state.client.reconnectNow();
}

function setConnState(name, detail) {
  ui.connState.dataset.state = name;
  ui.connState.textContent = name;
  ui.connState.title = detail || name;
  ui.instance.classList.toggle("stale", name !== "connected");
  const banner = name !== "connected";
  show(ui.banner, banner);
  ui.banner.dataset.state = name;
  ui.bannerText.textContent = detail || "";
  show($("reconnect-now"), name === "reconnecting");
  updateTitle();
}

/** Sends a request frame; `onReply` gets the reply frame, or null if lost. */
function request(frame, onReply = () => {}) {
  if (!state.connected || !state.client) return null;
  const client = state.client;
  client.request(frame).then(
    (reply) => state.client === client && onReply(reply),
    () => state.client === client && onReply(null),
  );
  return true;
}

function onWelcome(frame) {
  const first = state.me === null;
  state.me = String(frame.user);
  state.instance = String(frame.instance);
  state.connected = true;
  state.epoch += 1; // a new connection: a new "while you were away" divider
  clearInterval(state.countdownTimer);
  if (first) {
    if (state.creds.user) storageSet(LAST_USER_KEY, state.creds.user);
    restoreSaved();
  }
  ui.meName.textContent = state.me;
  fillAvatar(ui.meAvatar, state.me);
  ui.instance.textContent = state.instance;
  ui.instance.title = `instance ${state.instance}, connection ${frame.conn}`;
  setConnState("connected", `connected to ${state.instance}`);
  // Room membership and watches belong to the connection: join and watch
  // again after a reconnect (each join then asks for the members).
  for (const room of state.rooms.values()) joinRoom(room.name, { rejoin: true });
  watchContacts([...state.contacts.keys()]);
  updateComposer();
}

// ---------------------------------------------------------------------------
// Saved contacts and rooms (names only, per user; never credentials)
// ---------------------------------------------------------------------------

function savedKey() {
  return `switchboard:v1:${state.me}`;
}

function save() {
  if (!state.me) return;
  storageSet(
    savedKey(),
    JSON.stringify({ contacts: [...state.contacts.keys()], rooms: [...state.rooms.keys()] }),
  );
}

function restoreSaved() {
  let saved;
  try {
    saved = JSON.parse(storageGet(savedKey()) || "{}");
  } catch {
    saved = {};
  }
  for (const name of Array.isArray(saved.contacts) ? saved.contacts : []) {
    if (typeof name === "string" && NAME_RE.test(name)) addContact(name, { quiet: true });
  }
  for (const name of Array.isArray(saved.rooms) ? saved.rooms : []) {
    if (typeof name === "string" && NAME_RE.test(name) && !state.rooms.has(name)) addRoom(name);
  }
}

// ---------------------------------------------------------------------------
// Contacts and presence
// ---------------------------------------------------------------------------

function addContact(name, { quiet = false } = {}) {
  if (state.contacts.has(name)) return state.contacts.get(name);
  const dot = h("span", { class: "dot", "data-testid": "presence-dot", "data-presence": "unknown" });
  const avatar = h("span", { class: "avatar small", "aria-hidden": "true" });
  fillAvatar(avatar, name);
  avatar.append(dot);
  const badge = h("span", { class: "badge", "data-testid": "unread", hidden: true });
  const presenceText = h("span", { class: "row-sub" }, "unknown");
  const row = h(
    "li",
    { class: "row", "data-testid": "contact-row", "data-user": name, "data-presence": "unknown" },
    h(
      "button",
      { type: "button", class: "row-main", onclick: () => select(`dm:${name}`) },
      avatar,
      h("span", { class: "row-text" }, h("span", { class: "row-name" }, name), presenceText),
      badge,
    ),
    h(
      "button",
      {
        type: "button",
        class: "row-action",
        title: `Remove ${name}`,
        "aria-label": `Remove ${name}`,
        "data-testid": "contact-remove",
        onclick: () => removeContact(name),
      },
      "×",
    ),
  );
  // watch: null, or the watch request in flight ({ held }: the last event
  // that came before its reply).
  const contact = { name, presence: "unknown", unread: 0, row, dot, badge, presenceText, watch: null };
  state.contacts.set(name, contact);
  insertSorted(ui.contactList, row, name);
  show(ui.contactEmpty, false);
  save();
  if (!quiet) watchContacts([name]);
  return contact;
}

function removeContact(name) {
  const contact = state.contacts.get(name);
  if (!contact) return;
  contact.row.remove();
  state.contacts.delete(name);
  request({ type: "unwatch", users: [name] });
  state.convs.delete(`dm:${name}`);
  show(ui.contactEmpty, state.contacts.size === 0);
  if (state.active === `dm:${name}`) select(null);
  save();
}

function insertSorted(list, row, name) {
  const after = [...list.children].find((other) => (other.dataset.user || other.dataset.room) > name);
  list.insertBefore(row, after || null);
}

function setPresence(contact, presence, problem) {
  contact.presenceText.title = problem || "";
  if (contact.presence === presence) return;
  contact.presence = presence;
  contact.row.dataset.presence = presence;
  contact.dot.dataset.presence = presence;
  contact.presenceText.textContent = presence;
  if (state.active === `dm:${contact.name}`) renderHeader();
}

/**
 * Watches these contacts on the current connection: the reply is their
 * current state, then each transition comes as a `presence_event`. Called for
 * every contact on every `welcome` and for each contact added while connected.
 */
function watchContacts(names) {
  if (!state.connected) return;
  const users = names.filter((name) => state.contacts.has(name));
  for (let i = 0; i < users.length; i += WATCH_BATCH) {
    const batch = users.slice(i, i + WATCH_BATCH);
    const pending = { held: new Map() };
    for (const name of batch) state.contacts.get(name).watch = pending;
    const sent = request({ type: "watch", users: batch }, (reply) => {
      const mine = batch.map((name) => state.contacts.get(name)).filter((c) => c && c.watch === pending);
      for (const contact of mine) contact.watch = null;
      if (!reply) return; // the connection closed: the next welcome watches again
      if (reply.type === "error") {
        for (const contact of mine) setPresence(contact, "unknown", `${reply.code}: ${reply.message}`);
        notice(`Presence: ${reply.code}: ${reply.message}`);
        return;
      }
      if (reply.type !== "presence" || !reply.online) return;
      for (const contact of mine) {
        if (Object.hasOwn(reply.online, contact.name)) {
          setPresence(contact, reply.online[contact.name] ? "online" : "offline");
        }
        // An event that overtook the reply is newer than what the reply read
        // or equal to it: it wins.
        const held = pending.held.get(contact.name);
        if (held !== undefined) setPresence(contact, held ? "online" : "offline");
      }
    });
    if (sent === null) for (const name of batch) state.contacts.get(name).watch = null;
  }
}

/** `{ type: "presence_event", user, online, ts }`: a watched user's transition. */
function onPresenceEvent(frame) {
  const contact = typeof frame.user === "string" && state.contacts.get(frame.user);
  if (!contact || typeof frame.online !== "boolean") return;
  // The server tells each connection transitions in order, never the same
  // state twice: the page applies them as they come (their ts is for show).
  if (contact.watch) contact.watch.held.set(contact.name, frame.online);
  setPresence(contact, frame.online ? "online" : "offline");
}

// ---------------------------------------------------------------------------
// Rooms
// ---------------------------------------------------------------------------

function addRoom(name) {
  const badge = h("span", { class: "badge", "data-testid": "unread", hidden: true });
  const avatar = h("span", { class: "avatar small", "aria-hidden": "true" });
  fillAvatar(avatar, name, "room");
  const sub = h("span", { class: "row-sub" }, "joining…");
  const row = h(
    "li",
    { class: "row", "data-testid": "room-row", "data-room": name, "data-joined": "no" },
    h(
      "button",
      { type: "button", class: "row-main", onclick: () => select(`room:${name}`) },
      avatar,
      h("span", { class: "row-text" }, h("span", { class: "row-name" }, name), sub),
      badge,
    ),
    h(
      "button",
      {
        type: "button",
        class: "row-action",
        title: `Leave ${name}`,
        "aria-label": `Leave ${name}`,
        "data-testid": "room-leave",
        onclick: () => leaveRoom(name),
      },
      "×",
    ),
  );
  // members: the room's members (user-level, cluster-wide) as last known, or
  // null before the first `members` reply; stale: the connection closed since;
  // query: the `members` request in flight ({ held }: events that overtook it).
  const room = { name, joined: false, unread: 0, row, badge, sub, members: null, truncated: false, stale: false, query: null };
  state.rooms.set(name, room);
  insertSorted(ui.roomList, row, name);
  show(ui.roomEmpty, false);
  save();
  return room;
}

function setRoomJoined(room, joined, problem) {
  room.joined = joined;
  room.row.dataset.joined = joined ? "yes" : "no";
  room.problem = problem || null;
  room.row.classList.toggle("problem", Boolean(problem));
  renderRoomSub(room);
  if (state.active === `room:${room.name}`) {
    renderHeader();
    updateComposer();
  }
}

function memberCountText(room) {
  if (!room.members) return "";
  const n = room.members.size;
  return `${n}${room.truncated ? "+" : ""} member${n === 1 && !room.truncated ? "" : "s"}`;
}

function renderRoomSub(room) {
  if (!room.joined) room.sub.textContent = room.problem || "not joined";
  else room.sub.textContent = room.members ? `joined · ${memberCountText(room)}` : "joined";
  room.row.dataset.members = room.members ? String(room.members.size) : "";
}

/** The member bar under the header of the shown room (textContent only). */
function renderMembers() {
  const conv = state.active && conversation(state.active);
  const room = conv && conv.kind === "room" ? state.rooms.get(conv.peer) : null;
  show(ui.memberBar, Boolean(room));
  if (!room) {
    ui.memberList.replaceChildren();
    return;
  }
  ui.memberBar.dataset.room = room.name;
  ui.memberBar.dataset.state = !room.members ? "loading" : room.stale ? "stale" : "live";
  ui.memberBar.title = room.stale ? "not connected: the last known members" : "";
  ui.memberCount.textContent = room.members ? memberCountText(room) : room.problem || "members…";
  const names = room.members ? [...room.members].sort() : [];
  ui.memberList.replaceChildren(
    ...names.map((name) => {
      const avatar = h("span", { "aria-hidden": "true" });
      fillAvatar(avatar, name);
      avatar.classList.add("tiny");
      return h(
        "li",
        { class: "member", "data-testid": "member", "data-user": name, title: name },
        avatar,
        h("span", { class: "member-name" }, name === state.me ? `${name} (you)` : name),
      );
    }),
  );
}

function membersChanged(room) {
  renderRoomSub(room);
  if (state.active === `room:${room.name}`) renderMembers();
}

function setMembersStale(room) {
  if (!room.members || room.stale) return;
  room.stale = true;
  membersChanged(room);
}

/**
 * Asks for the room's members (after each successful join, so after every
 * reconnect too); member_joined / member_left keep the list from there.
 */
function queryMembers(name) {
  const room = state.rooms.get(name);
  if (!room) return;
  const pending = { held: new Map() };
  room.query = pending;
  request({ type: "members", room: name }, (reply) => {
    const now = state.rooms.get(name);
    if (!now || now.query !== pending) return;
    now.query = null;
    if (!reply) return; // the connection closed: the next join asks again
    if (reply.type === "error") {
      now.problem = `members: ${reply.code}`;
      membersChanged(now);
      return;
    }
    if (reply.type !== "members" || !Array.isArray(reply.users)) return;
    const members = new Set(reply.users.filter((user) => typeof user === "string"));
    // Events that overtook the reply are as new as what it read, or newer.
    for (const [user, joined] of pending.held) {
      if (joined) members.add(user);
      else members.delete(user);
    }
    now.members = members;
    now.truncated = reply.truncated === true;
    now.stale = false;
    now.problem = null;
    membersChanged(now);
  });
}

/** `member_joined` / `member_left` `{ room, user, ts }`. */
function onMemberEvent(frame, joined) {
  const room = typeof frame.room === "string" && state.rooms.get(frame.room);
  if (!room || typeof frame.user !== "string") return;
  if (room.query) room.query.held.set(frame.user, joined);
  if (!room.members) return; // the members reply (with the held events) comes next
  if (joined) room.members.add(frame.user);
  else room.members.delete(frame.user);
  membersChanged(room);
}

function joinRoom(name, { rejoin = false } = {}) {
  const sent = request({ type: "join", room: name }, (reply) => {
    const room = state.rooms.get(name);
    if (!reply) return;
    if (reply.type === "ack" && reply.status === "ok") {
      const fresh = !room;
      const joined = room || addRoom(name);
      setRoomJoined(joined, true);
      queryMembers(name);
      if (fresh) select(`room:${name}`);
    } else if (reply.type === "error") {
      if (room) setRoomJoined(room, false, reply.code);
      if (!rejoin) setError(ui.roomError, `${reply.code}: ${reply.message}`);
    }
  });
  if (sent === null && !rejoin) setError(ui.roomError, "Not connected: try again once connected.");
}

function leaveRoom(name) {
  const room = state.rooms.get(name);
  if (!room) return;
  if (room.joined) request({ type: "leave", room: name });
  room.row.remove();
  state.rooms.delete(name);
  state.convs.delete(`room:${name}`);
  show(ui.roomEmpty, state.rooms.size === 0);
  if (state.active === `room:${name}`) select(null);
  save();
}

// ---------------------------------------------------------------------------
// Conversations and messages
// ---------------------------------------------------------------------------

function conversation(key) {
  let conv = state.convs.get(key);
  if (!conv) {
    const [kind, ...rest] = key.split(":");
    conv = { kind, peer: rest.join(":"), nodes: [] };
    state.convs.set(key, conv);
  }
  return conv;
}

function messageNode({ dir, from, body, ts, msgId }) {
  const time = clockTime(ts);
  const node = h(
    "li",
    {
      class: `msg ${dir}`,
      "data-testid": "message",
      "data-dir": dir,
      "data-from": from,
      "data-msg-id": msgId,
      "data-ts": typeof ts === "number" ? ts : Date.now(),
    },
    h(
      "div",
      { class: "meta" },
      h("span", { class: "from", "data-testid": "message-from" }, from),
      h("time", { class: "time", "data-testid": "message-time", datetime: time.iso, title: time.full }, time.short),
    ),
    h("div", { class: "bubble", "data-testid": "message-body" }, bodyText(body)),
  );
  return node;
}

/** The ack label under an outgoing message; `.line` holds it (and a receipt). */
function ackLabel(node) {
  const label = h("span", { class: "ack", "data-testid": "message-ack", "data-status": "pending" }, "sending");
  const line = h("div", { class: "status-line" }, label);
  node.append(line);
  const setAck = (status, title) => {
    label.dataset.status = status;
    label.textContent = status;
    label.title = title || "";
    node.dataset.status = status;
  };
  setAck.line = line;
  return setAck;
}

const GROUP_MS = 5 * 60 * 1000;

function appendMessage(key, node) {
  const conv = conversation(key);
  const prev = conv.nodes[conv.nodes.length - 1];
  // Consecutive messages of one sender share one name/time line.
  if (
    prev &&
    prev.dataset.dir === node.dataset.dir &&
    prev.dataset.from === node.dataset.from &&
    Math.abs(Number(node.dataset.ts) - Number(prev.dataset.ts)) < GROUP_MS
  ) {
    node.classList.add("cont");
  }
  conv.nodes.push(node);
  if (state.active === key) {
    const list = listFor(conv);
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
    list.append(node);
    if (atBottom || node.dataset.dir === "out") list.scrollTop = list.scrollHeight;
  } else {
    const owner = conv.kind === "dm" ? state.contacts.get(conv.peer) : state.rooms.get(conv.peer);
    if (owner) {
      owner.unread += 1;
      owner.badge.textContent = String(owner.unread);
      show(owner.badge, true);
      updateTitle();
    }
  }
}

/** The "while you were away" divider, once per conversation and connection. */
function awayDivider(key) {
  const conv = conversation(key);
  if (conv.awayEpoch === state.epoch) return;
  conv.awayEpoch = state.epoch;
  const node = h(
    "li",
    { class: "divider", "data-testid": "away-divider", role: "separator" },
    h("span", {}, "While you were away"),
  );
  conv.nodes.push(node);
  if (state.active === key) listFor(conv).append(node);
}

function onDirect(frame) {
  if (typeof frame.from !== "string") return;
  addContact(frame.from, { quiet: !state.connected });
  const key = `dm:${frame.from}`;
  // A DM of the replayed backlog: it came while this page was not connected.
  if (frame.replayed) awayDivider(key);
  const node = messageNode({ dir: "in", from: frame.from, body: frame.body, ts: frame.ts, msgId: frame.msg_id });
  if (frame.replayed) {
    node.dataset.replayed = "yes";
    node.classList.add("away");
  }
  if (frame.seq) node.dataset.seq = frame.seq;
  appendMessage(key, node);
}

/** A recipient acknowledged one of this page's DMs (asked with receipt). */
function onDelivered(frame) {
  const node = state.sent.get(frame.msg_id);
  if (!node) {
    // The receipt overtook the ack: remembered (bounded) until the ack.
    if (state.early.size > 1000) state.early.clear();
    state.early.add(frame.msg_id);
    return;
  }
  markDelivered(node, frame);
}

function markDelivered(node, frame) {
  node.dataset.delivered = "yes";
  const tick = node.querySelector('[data-testid="message-receipt"]');
  if (tick) {
    tick.hidden = false;
    tick.title = `delivered to ${frame.to ?? "the recipient"}${frame.seq ? ` (seq ${frame.seq})` : ""}`;
  }
}

function onGap(frame) {
  notice(
    frame.first
      ? "Some older direct messages were no longer kept by the server (inbox retention)."
      : "Older direct messages were no longer kept by the server (inbox retention).",
  );
}

function onRoom(frame) {
  if (typeof frame.room !== "string" || !state.rooms.has(frame.room)) return;
  appendMessage(
    `room:${frame.room}`,
    messageNode({ dir: "in", from: String(frame.from), body: frame.body, ts: frame.ts, msgId: frame.msg_id }),
  );
}

function sendMessage(text) {
  const conv = state.active && conversation(state.active);
  if (!conv || !state.connected) return false;
  const body = { text };
  const node = messageNode({ dir: "out", from: state.me, body, ts: Date.now() });
  const setAck = ackLabel(node);
  if (conv.kind === "dm") {
    // Stored with an idempotency key and retried by the client until acked;
    // `receipt`: a `delivered` frame comes once the recipient has it.
    const client = state.client;
    setAck.line.append(h("span", { class: "receipt", "data-testid": "message-receipt", hidden: true }, "✓ delivered"));
    client.sendDm(conv.peer, body, { receipt: true }).then(
      (ack) => {
        if (state.client !== client) return;
        setAck(String(ack.status), ackTitle(conv.peer, ack));
        if (typeof ack.stored === "boolean") node.dataset.stored = ack.stored ? "yes" : "no";
        if (!ack.msg_id) return;
        node.dataset.msgId = ack.msg_id;
        if (ack.seq) node.dataset.seq = ack.seq;
        state.sent.set(ack.msg_id, node);
        if (state.early.delete(ack.msg_id)) markDelivered(node, { to: conv.peer, seq: ack.seq });
      },
      (error) => state.client === client && setAck(String(error.code || "lost"), error.message),
    );
    appendMessage(state.active, node);
    return true;
  }
  const id = request({ type: "room", room: conv.peer, body }, (reply) => {
    if (!reply) setAck("lost", "the connection closed before the server answered");
    else if (reply.type === "ack") {
      setAck(String(reply.status), reply.msg_id ? `msg_id ${reply.msg_id}` : "");
      if (reply.msg_id) node.dataset.msgId = reply.msg_id;
    } else if (reply.type === "error") setAck(String(reply.code), String(reply.message));
  });
  if (id === null) return false;
  appendMessage(state.active, node);
  return true;
}

function ackTitle(peer, ack) {
  const id = ack.msg_id ? `msg_id ${ack.msg_id}` : "";
  if (ack.status !== "offline") return id;
  return ack.stored
    ? `${peer} is offline: stored, delivered when they connect (${id})`
    : `${peer} is offline and was not stored: not seen recently (${id})`;
}

function listFor(conv) {
  return conv.kind === "room" ? ui.roomMessages : ui.dmMessages;
}

function select(key) {
  state.active = key;
  for (const list of [ui.dmMessages, ui.roomMessages]) {
    list.replaceChildren();
    show(list, false);
  }
  for (const row of document.querySelectorAll(".row")) row.classList.remove("selected");
  show(ui.convEmpty, !key);
  show(ui.composer, Boolean(key));
  if (key) {
    const conv = conversation(key);
    const owner = conv.kind === "dm" ? state.contacts.get(conv.peer) : state.rooms.get(conv.peer);
    if (owner) {
      owner.row.classList.add("selected");
      owner.unread = 0;
      show(owner.badge, false);
    }
    const list = listFor(conv);
    list.append(...conv.nodes);
    show(list, true);
    list.scrollTop = list.scrollHeight;
    ui.composerInput.focus();
  }
  renderHeader();
  renderMembers();
  updateComposer();
  updateTitle();
}

function renderHeader() {
  const conv = state.active && conversation(state.active);
  show(ui.convAvatar, Boolean(conv));
  if (!conv) {
    ui.convTitle.textContent = "Switchboard";
    ui.convSub.textContent = "";
    ui.convSub.dataset.presence = "";
    return;
  }
  fillAvatar(ui.convAvatar, conv.peer, conv.kind);
  ui.convTitle.textContent = conv.peer;
  if (conv.kind === "dm") {
    const presence = state.contacts.get(conv.peer)?.presence || "unknown";
    ui.convSub.textContent =
      presence === "online"
        ? "online"
        : presence === "offline"
          ? "offline — messages wait for their next visit"
          : "presence unknown";
    ui.convSub.dataset.presence = presence;
  } else {
    const room = state.rooms.get(conv.peer);
    ui.convSub.textContent = room?.joined ? "room · joined" : "room · not joined";
    ui.convSub.dataset.presence = "";
  }
}

function updateComposer() {
  const conv = state.active && conversation(state.active);
  const roomReady = !conv || conv.kind !== "room" || state.rooms.get(conv.peer)?.joined;
  const ready = Boolean(conv) && state.connected && roomReady;
  ui.composerSend.disabled = !ready;
  ui.composerInput.placeholder = !state.connected
    ? "Not connected — reconnecting…"
    : !conv
      ? "Message"
      : conv.kind === "dm"
        ? `Message ${conv.peer}`
        : roomReady
          ? `Message #${conv.peer}`
          : "Joining the room…";
}

function updateTitle() {
  let unread = 0;
  for (const owner of [...state.contacts.values(), ...state.rooms.values()]) unread += owner.unread;
  const who = state.me ? `${state.me}${state.instance ? ` @ ${state.instance}` : ""} — ` : "";
  document.title = `${unread ? `(${unread}) ` : ""}${who}Switchboard`;
}

function notice(text) {
  setError(ui.contactError, text);
}

function setError(el, text) {
  el.textContent = text || "";
  show(el, Boolean(text));
}

// ---------------------------------------------------------------------------
// Sign-in and sign-out
// ---------------------------------------------------------------------------

async function signIn() {
  setError(ui.signinError, "");
  const token = ui.signinToken.value.trim();
  const user = ui.signinUser.value.trim();
  if (!token && !user) {
    setError(ui.signinError, "Enter a user name or paste a token.");
    return;
  }
  if (!token && !NAME_RE.test(user)) {
    setError(ui.signinError, `A user name is ${NAME_RULE}.`);
    return;
  }
  state.creds = token ? { token } : { user };
  const client = newClient(state.creds);
  ui.signinSubmit.disabled = true;
  ui.signinSubmit.textContent = "Signing in…";
  const verdict = await client.probe();
  ui.signinSubmit.disabled = false;
  ui.signinSubmit.textContent = "Sign in";
  if (!verdict.ok) {
    state.creds = null;
    setError(ui.signinError, verdict.fatal ? verdict.message : `Cannot connect: ${verdict.message}.`);
    return;
  }
  ui.signinToken.value = "";
  show(ui.signin, false);
  show(ui.app, true);
  ui.meName.textContent = user || "…";
  fillAvatar(ui.meAvatar, user || "?");
  state.client = client;
  client.start();
}

function signOut(error) {
  clearInterval(state.countdownTimer);
  const client = state.client;
  state.client = null;
  state.connected = false;
  // Sends the last `recv`; the last seq stays in localStorage for next time.
  if (client) client.close("signed out");
  Object.assign(state, { creds: null, me: null, instance: null, active: null });
  state.sent.clear();
  state.early.clear();
  state.contacts.clear();
  state.rooms.clear();
  state.convs.clear();
  ui.contactList.replaceChildren();
  ui.roomList.replaceChildren();
  show(ui.contactEmpty, true);
  show(ui.roomEmpty, true);
  for (const el of [ui.contactError, ui.roomError]) setError(el, "");
  ui.instance.textContent = "–";
  select(null);
  show(ui.app, false);
  show(ui.signin, true);
  setError(ui.signinError, error || "");
  ui.signinUser.focus();
}

// ---------------------------------------------------------------------------
// Wiring
// ---------------------------------------------------------------------------

function onSubmit(form, handler) {
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    handler();
  });
}

onSubmit(ui.signinForm, signIn);

onSubmit(ui.contactForm, () => {
  const name = ui.contactInput.value.trim();
  if (!NAME_RE.test(name)) {
    setError(ui.contactError, `A user name is ${NAME_RULE}.`);
    return;
  }
  setError(ui.contactError, "");
  ui.contactInput.value = "";
  addContact(name);
  select(`dm:${name}`);
});

onSubmit(ui.roomForm, () => {
  const name = ui.roomInput.value.trim();
  if (!NAME_RE.test(name)) {
    setError(ui.roomError, `A room name is ${NAME_RULE}.`);
    return;
  }
  setError(ui.roomError, "");
  ui.roomInput.value = "";
  if (state.rooms.has(name)) select(`room:${name}`);
  else joinRoom(name);
});

onSubmit(ui.composer, () => {
  const text = ui.composerInput.value;
  if (!text.trim()) return;
  if (text.length > MAX_BODY_CHARS) {
    ui.composerInput.setCustomValidity("Message too long");
    ui.composerInput.reportValidity();
    return;
  }
  ui.composerInput.setCustomValidity("");
  if (sendMessage(text)) ui.composerInput.value = "";
});

$("signout").addEventListener("click", () => signOut());
// Leaving the page: acknowledge what was shown (recv is otherwise debounced).
window.addEventListener("pagehide", () => state.client?.flushRecv());
$("reconnect-now").addEventListener("click", reconnectNow);
window.addEventListener("online", reconnectNow);

$("signin-host").textContent = location.host;
ui.signinUser.value = storageGet(LAST_USER_KEY) || "";
(ui.signinUser.value ? ui.signinSubmit : ui.signinUser).focus();
