#!/usr/bin/env python3
"""Per-component costs and a projection to many instances, from benchmark results.

    scripts/scale_model.py RESULTS.json [RESULTS.json ...]

Reads switchboard-bench result files (each run: a mode and an instance count
N, with instance CPU, Redis CPU and Redis output bytes per DM), and for each
mode and body size fits

    cost(N) = a + b * (N - 1) / N + c * N

to instance CPU and to Redis CPU per DM: `a` is what every DM costs, `b`
what a DM whose recipient is on another instance adds (the share of remote
recipients is (N - 1)/N for uniform recipients), `c` what every instance
adds per DM (a broadcast copy received and dropped, or a Redis delivery;
and, at a fixed total rate, each instance's fixed upkeep spread over fewer
DMs). Redis output bytes per DM are fitted the same way. The fit from the
smaller N is checked against the largest measured N, then the fit from all
points projects N = 64 and 256. Prints Markdown. Pure Python, no
dependencies: the benchmark's own results are its only input.
"""

import json
import sys
from collections import defaultdict

PROJECT = [64, 256]


def solve3(rows):
    """Least squares for y = a*x0 + b*x1 + c*x2 over rows (x0, x1, x2, y)."""
    m = [[0.0] * 3 for _ in range(3)]
    v = [0.0] * 3
    for x0, x1, x2, y in rows:
        xs = (x0, x1, x2)
        for i in range(3):
            v[i] += xs[i] * y
            for j in range(3):
                m[i][j] += xs[i] * xs[j]
    # Gaussian elimination with partial pivoting.
    n = 3
    aug = [m[i] + [v[i]] for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(aug[r][col]))
        aug[col], aug[pivot] = aug[pivot], aug[col]
        if abs(aug[col][col]) < 1e-12:
            raise ValueError("degenerate fit")
        for r in range(n):
            if r != col:
                f = aug[r][col] / aug[col][col]
                for k in range(col, n + 1):
                    aug[r][k] -= f * aug[col][k]
    return [aug[i][n] / aug[i][i] for i in range(n)]


def features(n):
    return (1.0, (n - 1) / n, float(n))


def fit(points):
    return solve3([features(n) + (y,) for n, y in points])


def predict(coef, n):
    return sum(c * x for c, x in zip(coef, features(n)))


def main(paths):
    series = defaultdict(dict)  # (body, mode) -> N -> derived
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        body = doc["config"].get("body_bytes")
        for run in doc["runs"]:
            d = run.get("derived")
            if not d or not d.get("pass"):
                continue
            series[(body, run["mode"])][run["nodes"]] = d
    metrics = [
        ("instance µs/DM", "instance_cpu_us_per_msg"),
        ("Redis µs/DM", "redis_cpu_us_per_msg"),
        ("Redis out B/DM", "redis_out_bytes_per_msg"),
    ]
    print("| body B | mode | quantity | a | b (remote) | c (per instance) | fit from smaller N → largest N: predicted / measured | N = 64 | N = 256 |")
    print("|---|---|---|---|---|---|---|---|---|")
    totals = defaultdict(dict)
    for (body, mode), by_n in sorted(series.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
        ns = sorted(by_n)
        if len(ns) < 4:
            continue
        for label, key in metrics:
            pts = [(n, by_n[n][key]) for n in ns]
            check = fit(pts[:-1])
            coef = fit(pts)
            last = ns[-1]
            proj = {n: predict(coef, n) for n in PROJECT}
            if key != "redis_out_bytes_per_msg":
                for n in PROJECT:
                    totals[(body, n)][mode] = totals[(body, n)].get(mode, 0.0) + proj[n]
            print(
                f"| {body} | {mode} | {label} | {coef[0]:.1f} | {coef[1]:.1f} | {coef[2]:.2f} | "
                f"{predict(check, last):.1f} / {by_n[last][key]:.1f} (N = {last}) | "
                f"{proj[64]:.0f} | {proj[256]:.0f} |"
            )
    print()
    print("| body B | N | projected total CPU µs/DM (instances + Redis), by mode | routed / broadcast |")
    print("|---|---|---|---|")
    for (body, n), by_mode in sorted(totals.items(), key=lambda kv: ((kv[0][0] or 0), kv[0][1])):
        modes = ", ".join(f"{m} {v:.0f}" for m, v in sorted(by_mode.items()))
        ratio = by_mode.get("routed", 0) / by_mode["broadcast"] if by_mode.get("broadcast") else float("nan")
        print(f"| {body} | {n} | {modes} | {ratio:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
