#!/usr/bin/env node
// One node of the Socket.IO peer: Switchboard's benchmark drives N of these
// (joined by @socket.io/redis-adapter) with the same load generator it uses
// for Switchboard, `switchboard-load --protocol socketio`.
//
//   node server.js --port 3001 --redis redis://127.0.0.1:6379 [--adapter classic|sharded] [--name n1]
//                  [--ping-interval-ms 25000 --ping-timeout-ms 20000]   (Socket.IO's defaults)
//
// What a client sees (Socket.IO 5 over Engine.IO 4, WebSocket transport):
// - connect with `auth: {user: "u7"}` (or `?user=u7`); the node joins the
//   socket to room `user:u7`, waits until the adapter's subscription for that
//   room is in place, then emits `welcome {user}`;
// - `dm {to, body}` is emitted to room `user:<to>` as `dm {from, body}`;
// - `join {room}` joins room `room:<room>`; `room {room, body}` is emitted to
//   the other sockets of `room:<room>` as `room {from, room, body}`;
// - a client that passes an ack callback gets `{status: "ok"}` once the emit
//   is handed to the adapter (or `{status: "error", code}`); one that does
//   not gets nothing back (fire-and-forget).
//
// The adapter: `classic` (createAdapter) publishes every emit on
// `socket.io#/#<room>#` and every node PSUBSCRIBEs `socket.io#/#*`, so every
// node receives every DM; `sharded` (createShardedAdapter, subscription mode
// "dynamic") SPUBLISHes on a channel per room and a node SSUBSCRIBEs only the
// rooms it holds, so only the recipient's node receives a DM.
//
// GET /healthz answers 200 once Redis is connected; GET /stats answers the
// counters as JSON (see `counters` below). SIGTERM or SIGINT: disconnect the
// clients, close Redis and HTTP, print the counters, exit 0.
"use strict";

const http = require("node:http");
const { parseArgs } = require("node:util");
const { Server } = require("socket.io");
const { createAdapter, createShardedAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const USER_ROOM = "user:";
const ROOM_ROOM = "room:";
// How long shutdown may take before the process exits anyway.
const STOP_GRACE_MS = 3000;

const options = readOptions();

// Every counter is cumulative except `connections`. Counting costs one
// increment per event; nothing is decoded for it.
const counters = {
  // Sockets that got their welcome and are still connected.
  connections: 0,
  // Sockets welcomed since start.
  connects_total: 0,
  // `dm` events received from local clients.
  dm_in: 0,
  // ... of which the recipient's room had a socket on this node.
  dm_local: 0,
  // `room` events received from local clients.
  room_in: 0,
  // Acks written (only to clients that asked for one).
  acks_sent: 0,
  // Error answers (malformed events).
  errors: 0,
  // Engine.IO packets written to local sockets: events, acks, connect
  // packets, pings; the peer's `switchboard_delivered_total`.
  packets_out: 0,
  // `dm` and `room` events written to local sockets (deliveries).
  events_out: 0,
  // PUBLISH / SPUBLISH calls of this node (the adapter's requests included).
  bus_published: 0,
  // Messages Redis delivered to this node's subscriber connection, on every
  // channel and pattern the adapter subscribed. Redis 7.0 counts no pub/sub
  // deliveries itself, so this is where "bus messages received per node"
  // comes from.
  bus_received: 0,
};

function readOptions() {
  const { values } = parseArgs({
    options: {
      port: { type: "string", default: "3000" },
      host: { type: "string", default: "127.0.0.1" },
      redis: { type: "string", default: "redis://127.0.0.1:6379" },
      adapter: { type: "string", default: "classic" },
      name: { type: "string" },
      "ping-interval-ms": { type: "string", default: "25000" },
      "ping-timeout-ms": { type: "string", default: "20000" },
    },
    strict: true,
  });
  const port = Number(values.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    fail(`--port ${values.port}: not a port number`);
  }
  if (values.adapter !== "classic" && values.adapter !== "sharded") {
    fail(`--adapter ${values.adapter}: classic or sharded`);
  }
  const millis = (flag) => {
    const v = Number(values[flag]);
    if (!Number.isInteger(v) || v <= 0) fail(`--${flag} ${values[flag]}: a positive integer`);
    return v;
  };
  return {
    pingInterval: millis("ping-interval-ms"),
    pingTimeout: millis("ping-timeout-ms"),
    port,
    host: values.host,
    redis: values.redis,
    adapter: values.adapter,
    name: values.name || `socketio@${port}`,
  };
}

function fail(message) {
  console.error(`server.js: ${message}`);
  process.exit(2);
}

// Counts the messages handed to every listener the adapter registers on the
// subscriber client, and remembers the subscriptions still in flight (the
// sharded adapter subscribes a room's channel when the room is created, and
// `socket.join` does not wait for it).
function instrumentSubscriber(client, inflight) {
  for (const method of ["subscribe", "pSubscribe", "sSubscribe"]) {
    const original = client[method].bind(client);
    client[method] = (channels, listener, bufferMode) => {
      const counted = (message, channel) => {
        counters.bus_received++;
        listener(message, channel);
      };
      const done = Promise.resolve(original(channels, counted, bufferMode));
      inflight.add(done);
      done.then(
        () => inflight.delete(done),
        (e) => {
          inflight.delete(done);
          console.error(`${options.name}: ${method} ${channels}: ${e.message}`);
        },
      );
      return done;
    };
  }
}

// Counts PUBLISH and SPUBLISH calls.
function instrumentPublisher(client) {
  for (const method of ["publish", "sPublish"]) {
    const original = client[method].bind(client);
    client[method] = (...args) => {
      counters.bus_published++;
      return original(...args);
    };
  }
}

// Counts what Engine.IO writes to one client socket.
function countOutgoing(engineSocket) {
  engineSocket.on("packetCreate", (packet) => {
    counters.packets_out++;
    // A Socket.IO event is Engine.IO message `2["name",...]`.
    const data = packet.data;
    if (
      packet.type === "message" &&
      typeof data === "string" &&
      (data.startsWith('2["dm"') || data.startsWith('2["room"'))
    ) {
      counters.events_out++;
    }
  });
}

function userOf(handshake) {
  const user = (handshake.auth && handshake.auth.user) || handshake.query.user;
  return typeof user === "string" && user.length > 0 && user.length <= 128 ? user : null;
}

function answer(ack, reply) {
  if (typeof ack !== "function") return;
  if (reply.status === "ok") counters.acks_sent++;
  ack(reply);
}

function refuse(ack, code) {
  counters.errors++;
  answer(ack, { status: "error", code });
}

async function main() {
  const pubClient = createClient({ url: options.redis });
  const subClient = pubClient.duplicate();
  for (const [what, client] of [
    ["publisher", pubClient],
    ["subscriber", subClient],
  ]) {
    client.on("error", (e) => console.error(`${options.name}: redis ${what}: ${e.message}`));
  }
  await Promise.all([pubClient.connect(), subClient.connect()]);
  const inflight = new Set();
  instrumentSubscriber(subClient, inflight);
  instrumentPublisher(pubClient);

  const adapter =
    options.adapter === "sharded"
      ? createShardedAdapter(pubClient, subClient, { subscriptionMode: "dynamic" })
      : createAdapter(pubClient, subClient);

  const httpServer = http.createServer((req, res) => {
    if (req.method === "GET" && req.url === "/healthz") {
      res.writeHead(200, { "content-type": "text/plain" });
      res.end("ok\n");
    } else if (req.method === "GET" && req.url === "/stats") {
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify(stats()));
    } else {
      res.writeHead(404);
      res.end();
    }
  });
  const io = new Server(httpServer, {
    adapter,
    serveClient: false,
    transports: ["websocket"],
    pingInterval: options.pingInterval,
    pingTimeout: options.pingTimeout,
  });
  io.engine.on("connection", countOutgoing);

  io.use((socket, next) => {
    if (userOf(socket.handshake) === null) {
      next(new Error("auth.user (or ?user=) must name the user"));
    } else {
      next();
    }
  });

  io.on("connection", async (socket) => {
    const user = userOf(socket.handshake);
    let welcomed = false;
    socket.on("disconnect", () => {
      if (welcomed) counters.connections--;
    });
    socket.on("dm", (msg, ack) => {
      counters.dm_in++;
      if (!msg || typeof msg.to !== "string" || typeof msg.body !== "string") {
        refuse(ack, "bad_request");
        return;
      }
      const room = USER_ROOM + msg.to;
      if (io.of("/").adapter.rooms.has(room)) counters.dm_local++;
      io.to(room).emit("dm", { from: user, body: msg.body });
      answer(ack, { status: "ok" });
    });
    socket.on("room", (msg, ack) => {
      counters.room_in++;
      if (!msg || typeof msg.room !== "string" || typeof msg.body !== "string") {
        refuse(ack, "bad_request");
        return;
      }
      socket.to(ROOM_ROOM + msg.room).emit("room", { from: user, room: msg.room, body: msg.body });
      answer(ack, { status: "ok" });
    });
    socket.on("join", async (msg, ack) => {
      if (!msg || typeof msg.room !== "string") {
        refuse(ack, "bad_request");
        return;
      }
      socket.join(ROOM_ROOM + msg.room);
      await Promise.all([...inflight]);
      answer(ack, { status: "ok" });
    });

    socket.join(USER_ROOM + user);
    // Ready means routable: the room's subscription (sharded) is in place.
    await Promise.all([...inflight]);
    if (!socket.connected) return;
    welcomed = true;
    counters.connections++;
    counters.connects_total++;
    socket.emit("welcome", { user });
  });

  function stats() {
    return {
      name: options.name,
      pid: process.pid,
      adapter: options.adapter,
      counters: { ...counters },
    };
  }

  let stopping = false;
  const stop = (signal) => {
    if (stopping) return;
    stopping = true;
    setTimeout(() => {
      console.error(`${options.name}: shutdown took over ${STOP_GRACE_MS} ms; exiting`);
      process.exit(0);
    }, STOP_GRACE_MS).unref();
    io.close(() => {
      Promise.allSettled([pubClient.quit(), subClient.quit()]).then(() => {
        process.stdout.write(`STATS ${JSON.stringify(stats())}\n`);
        console.error(`${options.name}: stopped (${signal})`);
        process.exit(0);
      });
    });
  };
  process.on("SIGTERM", () => stop("SIGTERM"));
  process.on("SIGINT", () => stop("SIGINT"));

  httpServer.listen(options.port, options.host, () => {
    const { port } = httpServer.address();
    console.log(
      `${options.name}: listening on ${options.host}:${port}, adapter ${options.adapter}, redis ${options.redis}, pid ${process.pid}`,
    );
  });
}

main().catch((e) => {
  console.error(`${options.name}: ${e.stack || e}`);
  process.exit(1);
});
