#!/usr/bin/env python3
"""Redis memory per stored DM (protocol v1.1 inbox), measured.

Starts its own redis-server (a free loopback port, no persistence) and one
`switchboard` instance (routed, --auth none, --threads 1), then runs
target/release/switchboard-load three times against it:

  0. a short pass that connects every user (so every user is "seen" and has
     a mailbox hash; only recipients seen within the inbox TTL get stored DMs),
  1. --dm-store true: about --dms stored DMs over --users users,
  2. --dm-store false (control): as many ephemeral DMs, nothing stored.

`INFO memory` used_memory and the total inbox length (XLEN over every
sb:inbox:* key) are read after each pass, once the loader has disconnected;
bytes per stored DM = delta used_memory / delta entries. `MEMORY USAGE` of a
few inbox keys is printed beside it. The defaults (500 users x 200 DMs) keep
every inbox far below --inbox-max-len (1000), so no entry is trimmed.

Everything it starts is stopped by pid, also on error and Ctrl-C. Python 3.11
stdlib + redis-cli.

  scripts/inbox_memory.py                       # 500 users, 100,000 DMs of 64 B
  scripts/inbox_memory.py --out bench/results/inbox-memory.json
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Processes this script started, stopped by pid."""

    def __init__(self):
        self.procs = []

    def start(self, name, argv, log):
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append((name, p))
        return p

    def stop_all(self):
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()


def redis_cli(port, *args):
    out = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout


def info_field(port, section, field):
    for line in redis_cli(port, "INFO", section).splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise KeyError(field)


def inbox_keys(port):
    return [k for k in redis_cli(port, "--scan", "--pattern", "sb:inbox:*").split() if k]


def reading(port):
    keys = inbox_keys(port)
    entries = 0
    for k in keys:
        entries += int(redis_cli(port, "XLEN", k).strip())
    return {
        "used_memory": int(info_field(port, "memory", "used_memory")),
        "dbsize": int(redis_cli(port, "DBSIZE").strip()),
        "inbox_keys": len(keys),
        "inbox_entries": entries,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--dms", type=int, default=100_000, help="DMs per measured pass")
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--body-bytes", type=int, default=64)
    ap.add_argument("--bin-dir", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release"))
    ap.add_argument("--out", help="also write the readings as JSON here")
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="sb-inbox-mem-")
    procs = Procs()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        rport, sport = free_port(), free_port()
        redis_log = open(os.path.join(work, "redis.log"), "w")
        procs.start("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", work], redis_log)
        for _ in range(100):
            try:
                if redis_cli(rport, "PING").strip() == "PONG":
                    break
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.1)
        sb_log = open(os.path.join(work, "switchboard.log"), "w")
        server = [os.path.join(a.bin_dir, "switchboard"), "--listen", f"127.0.0.1:{sport}",
                  "--redis-url", f"redis://127.0.0.1:{rport}", "--routing", "routed",
                  "--instance-id", "n1", "--auth", "none", "--rate-limit", "0",
                  "--threads", "1"]
        procs.start("switchboard", server, sb_log)
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{sport}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise SystemExit("switchboard did not become ready; see " + work)

        def load(tag, rate, duration, store):
            out = os.path.join(work, f"loader-{tag}.json")
            argv = [os.path.join(a.bin_dir, "switchboard-load"),
                    "--targets", f"ws://127.0.0.1:{sport}", "--users", str(a.users),
                    "--rate", str(rate), "--duration", str(duration),
                    "--body-bytes", str(a.body_bytes), "--dm-store", store,
                    "--threads", "1", "--quiet", "--out", out]
            subprocess.run(argv, check=False, timeout=duration + 120,
                           stdout=subprocess.DEVNULL)
            with open(out) as f:
                doc = json.load(f)
            time.sleep(1.0)  # disconnects settle (presence removed)
            return {"sent": doc.get("sent"), "delivered": doc.get("delivered"),
                    "p99_ms": (doc.get("latency_ms") or {}).get("p99"), "argv": argv}

        duration = a.dms / a.rate
        r = {"command": sys.argv, "server": server, "users": a.users,
             "body_bytes": a.body_bytes}
        r["connect_pass"] = load("connect", 100, 1, "true")
        r["before"] = reading(rport)
        r["stored_pass"] = load("stored", a.rate, duration, "true")
        r["after_stored"] = reading(rport)
        r["ephemeral_pass"] = load("ephemeral", a.rate, duration, "false")
        r["after_ephemeral"] = reading(rport)
        keys = sorted(inbox_keys(rport))[:5]
        r["memory_usage"] = {
            k: {"bytes": int(redis_cli(rport, "MEMORY", "USAGE", k, "SAMPLES", "0").strip()),
                "xlen": int(redis_cli(rport, "XLEN", k).strip())}
            for k in keys
        }
        b, s, e = r["before"], r["after_stored"], r["after_ephemeral"]
        stored = s["inbox_entries"] - b["inbox_entries"]
        r["stored_entries"] = stored
        r["bytes_per_stored_dm"] = (s["used_memory"] - b["used_memory"]) / stored
        r["ephemeral_bytes_delta"] = e["used_memory"] - s["used_memory"]
        r["ephemeral_entries_delta"] = e["inbox_entries"] - s["inbox_entries"]
        r["memory_usage_bytes_per_entry"] = (
            sum(v["bytes"] for v in r["memory_usage"].values())
            / sum(v["xlen"] for v in r["memory_usage"].values()))
        text = json.dumps(r, indent=2)
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text + "\n")
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
