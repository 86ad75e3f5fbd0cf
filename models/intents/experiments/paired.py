#!/usr/bin/env python3
"""Compares two trained intent models on the same test clips, clip by clip.

Two `kith intent train` runs with the same context, seed and test options
hear the very same test clips (`test_clips.jsonl` in each output
directory; `kith intent eval --model DIR --out OUT` writes it for a
model whose run did not keep it). Per condition this prints how many clips each model accepted
(intent and every slot right; for out-of-grammar clips, falsely
accepted), how many only one of them accepted, and the
exact McNemar p-value of those discordant clips: the chance of a split at
least as uneven if the two models were equally good. A paired comparison
sees differences that two separate 95 % intervals hide. Acceptance also
moves with each model's calibrated thresholds, so a second table compares
the best answers alone.

    python3 paired.py A_DIR B_DIR
"""

import json
import sys
from math import comb
from pathlib import Path


def clips(directory):
    path = Path(directory) / "test_clips.jsonl"
    try:
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        sys.exit(f"cannot read {path}: {e.strerror}")
    except json.JSONDecodeError as e:
        sys.exit(f"{path} line {e.lineno}: not JSON ({e.msg})")


def accepted(clip):
    """In-grammar clips: understood and exactly right. Out-of-grammar ones
    (no intent said): understood at all, a false accept."""
    if clip.get("intent") is None:
        return clip.get("understood") is True
    return (
        clip.get("understood") is True
        and clip.get("heard") == clip.get("intent")
        and clip.get("heard_slots") == clip.get("slots")
    )


def mcnemar(only_a, only_b):
    """Two-sided exact McNemar p-value of `only_a` against `only_b`."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)


def top_right(clip):
    """The best answer exactly right, whatever its score (in-grammar clips)."""
    return clip.get("heard") == clip.get("intent") and clip.get("heard_slots") == clip.get("slots")


def table(title, a, b, right, conditions):
    print(title)
    print(f"{'condition':<30} {'clips':>5} {'A':>5} {'B':>5} {'only A':>7} {'only B':>7} {'p':>7}")
    for cond in conditions:
        pairs = [(right(x), right(y)) for x, y in zip(a, b) if x.get("condition") == cond]
        only_a = sum(1 for x, y in pairs if x and not y)
        only_b = sum(1 for x, y in pairs if y and not x)
        print(
            f"{cond:<30} {len(pairs):>5} {sum(x for x, _ in pairs):>5} {sum(y for _, y in pairs):>5}"
            f" {only_a:>7} {only_b:>7} {mcnemar(only_a, only_b):>7.3f}"
        )


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: python3 paired.py A_DIR B_DIR")
    a, b = clips(sys.argv[1]), clips(sys.argv[2])
    key = lambda c: (c.get("condition"), c.get("said"), c.get("voice"), c.get("rate"), c.get("pitch"))
    if len(a) != len(b) or any(key(x) != key(y) for x, y in zip(a, b)):
        sys.exit("the two runs did not hear the same clips (train both with the same context, seed and test options)")
    conditions = list(dict.fromkeys(c.get("condition") for c in a))
    table("accepted (out of grammar: falsely accepted)", a, b, accepted, conditions)
    in_grammar = [c for c in conditions if any(x.get("condition") == c and x.get("intent") is not None for x in a)]
    print()
    table("top choice right, whatever the threshold", a, b, top_right, in_grammar)


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:
        sys.exit(0)
