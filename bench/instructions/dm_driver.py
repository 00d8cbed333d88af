# dm_driver.py PORT N WINDOW: fixed DM workload against one embedded instance.
# Two raw WebSocket clients: "alice" sends N DMs (64-byte JSON body, acks on)
# to "bob", WINDOW frames written at once; the next window starts once every
# ack and every delivery of the current one has arrived. Then both clients
# send a Close, wait for the server's, and leave. N=0 only connects/closes.
import asyncio, json, os, struct, sys, time

port, n, window = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
BODY = "x" * 62  # JSON string "xxx…" is 64 bytes


def client_frame(opcode, payload):
    mask = os.urandom(4)
    head = bytes([0x80 | opcode])
    ln = len(payload)
    if ln < 126:
        head += bytes([0x80 | ln])
    elif ln < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", ln)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", ln)
    masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return head + mask + masked


class Ws:
    async def connect(self, user):
        self.r, self.w = await asyncio.open_connection("127.0.0.1", port)
        self.w.write(
            (f"GET /ws?user={user} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
             "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await self.r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        welcome = await self.frame()
        assert json.loads(welcome[1])["type"] == "welcome"
        return self

    async def frame(self):
        b0, b1 = await self.r.readexactly(2)
        ln = b1 & 127
        if ln == 126:
            ln = struct.unpack(">H", await self.r.readexactly(2))[0]
        elif ln == 127:
            ln = struct.unpack(">Q", await self.r.readexactly(8))[0]
        return b0 & 15, await self.r.readexactly(ln)

    async def close(self):
        self.w.write(client_frame(8, struct.pack(">H", 1000)))
        await self.w.drain()
        while True:
            op, _ = await self.frame()
            if op == 8:
                break
        try:
            await asyncio.wait_for(self.r.read(), 5)
        except Exception:
            pass
        self.w.close()


async def main():
    bob = await Ws().connect("bob")
    alice = await Ws().connect("alice")
    t0 = time.time()
    acks = dms = 0
    sent = 0
    while sent < n:
        k = min(window, n - sent)
        data = b"".join(
            client_frame(1, json.dumps({"type": "dm", "to": "bob", "id": sent + i,
                                         "body": BODY}, separators=(",", ":")).encode())
            for i in range(k))
        alice.w.write(data)
        sent += k

        async def read_acks():
            nonlocal acks
            for _ in range(k):
                op, p = await alice.frame()
                m = json.loads(p)
                assert m["type"] == "ack" and m["status"] == "routed", m
                acks += 1

        async def read_dms():
            nonlocal dms
            for _ in range(k):
                op, p = await bob.frame()
                m = json.loads(p)
                assert m["type"] == "dm" and m["body"] == BODY, m
                dms += 1

        await asyncio.gather(read_acks(), read_dms())
    took = time.time() - t0
    await alice.close()
    await bob.close()
    print(f"n={n} window={window} acks={acks} dms={dms} took={took:.1f}s", flush=True)


asyncio.run(main())
