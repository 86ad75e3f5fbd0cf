#!/usr/bin/env python3
"""Figures of `kith up`: idle resident memory (no model loaded, and with the
audio pipeline's models loaded), stripped binary size, and the request
overhead of the API path at 1 and 16 concurrent clients, measured with wrk
(Debian's `wrk` package) on loopback:

- the `echo` pseudo-model (models.echo): HTTP, JSON, routing, the bounded
  queue, a worker thread round trip and the response; no inference.
- a 1-token chat request on smollm2-135m: the same plus tokenizing and one
  decode step over a cached prompt prefix.

Usage: benches/api_overhead.py --kith target/release/kith [--models-dir DIR] [--seconds 10]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import wave


def start(kith, models_dir, extra_args=(), env=None):
    e = dict(os.environ)
    e.update(env or {})
    e["KITH_LOG"] = "warn"
    e.pop("NOTIFY_SOCKET", None)
    args = [kith]
    if models_dir:
        args += ["--models-dir", models_dir]
    args += ["up", "--api", "127.0.0.1:0", *extra_args]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=e, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        line = p.stdout.readline()
        m = re.search(r"API on http://(\S+)", line)
        if m:
            return p, m.group(1)
    p.kill()
    sys.exit("kith up did not start")


def stop(p):
    p.terminate()
    p.wait(timeout=30)


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def wrk(addr, body, clients, seconds):
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write('wrk.method = "POST"\n')
        f.write('wrk.headers["Content-Type"] = "application/json"\n')
        f.write(f"wrk.body = {json.dumps(json.dumps(body))}\n")
        script = f.name
    out = subprocess.run(
        ["wrk", "-t", str(min(clients, 2)), "-c", str(clients), "-d", f"{seconds}s", "--latency", "-s", script,
         f"http://{addr}/v1/chat/completions"],
        capture_output=True, text=True, check=True).stdout
    os.unlink(script)

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {"p50_ms": pct(50), "p99_ms": pct(99), "rps": float(rps.group(1)) if rps else float("nan"),
            "non_2xx": int(non2xx.group(1)) if non2xx else 0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kith", required=True)
    ap.add_argument("--models-dir")
    ap.add_argument("--seconds", type=int, default=10)
    a = ap.parse_args()

    size = os.path.getsize(a.kith)
    print(f"binary: {a.kith}: {size / 2**20:.1f} MiB")

    p, addr = start(a.kith, a.models_dir, env={"KITH_MODELS_ECHO": "1", "KITH_MODELS_QUEUE_DEPTH": "32"})
    time.sleep(2)
    print(f"idle RSS, no model loaded: {rss_mb(p.pid):.1f} MB")
    echo = {"model": "echo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}
    lm = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1,
          "temperature": 0}
    rows = []
    for name, body in (("echo", echo), ("smollm2-135m, 1 token", lm)):
        wrk(addr, body, 1, 2)  # warm up (loads the model)
        for clients in (1, 16):
            r = wrk(addr, body, clients, a.seconds)
            rows.append((name, clients, r))
    print(f"RSS after the runs (smollm2 loaded): {rss_mb(p.pid):.1f} MB")
    stop(p)

    print("| request | clients | p50 | p99 | requests/s | non-2xx |")
    print("|---|---|---|---|---|---|")
    for name, clients, r in rows:
        print(f"| {name} | {clients} | {r['p50_ms']:.3f} ms | {r['p99_ms']:.3f} ms | {r['rps']:.0f} | {r['non_2xx']} |")

    # The audio pipeline's models: listen to two minutes of silence at real time.
    with tempfile.TemporaryDirectory() as d:
        silent = os.path.join(d, "silence.wav")
        with wave.open(silent, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes(b"\0\0" * 16000 * 120)
        p, addr = start(a.kith, a.models_dir, ["--listen-wav", silent])
        time.sleep(5)
        print(f"idle RSS, audio models loaded (listening): {rss_mb(p.pid):.1f} MB")
        stop(p)


if __name__ == "__main__":
    main()
