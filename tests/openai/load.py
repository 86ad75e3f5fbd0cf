"""A bounded load on a running `kith up`: more concurrent requests than the
model's queue holds.

Usage: load.py BASE_URL MODEL PID CONCURRENCY ROUNDS. Prints one JSON line:
statuses per round, Retry-After values, resident memory after each round,
and the statuses of requests sent one at a time afterwards.
"""
import json
import sys
import threading

import urllib.error
import urllib.request

base, model, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
concurrency, rounds = int(sys.argv[4]), int(sys.argv[5])
body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 12, "temperature": 0}


def rss_kb():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def post():
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, None, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Retry-After"), json.load(e)


def one(results, i):
    try:
        status, retry, answer = post()
        results[i] = (status, retry, answer.get("error", {}).get("code"))
    except Exception as e:  # a crash or a reset connection shows up here
        results[i] = (0, None, repr(e))


report = {"rounds": [], "rss_kb": [], "after": []}
for _ in range(rounds):
    results = [None] * concurrency
    threads = [threading.Thread(target=one, args=(results, i)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    report["rounds"].append(results)
    report["rss_kb"].append(rss_kb())
for _ in range(4):
    report["after"].append(post()[0])
print(json.dumps(report))
