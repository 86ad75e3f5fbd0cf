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
    python3 paired.py --shared A_DIR B_DIR

With `--shared` the two runs may have heard different clips (another
grammar, so another draw of test sentences): only the clips both heard are
compared, matched on condition, sentence, voice, rate and pitch, and only
where both grammars give the sentence the same meaning (a sentence whose
intent or slots the grammars write differently is a change of meaning,
counted apart, not a right or wrong of either model).
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


def row(name, pairs):
    only_a = sum(1 for x, y in pairs if x and not y)
    only_b = sum(1 for x, y in pairs if y and not x)
    print(
        f"{name:<30} {len(pairs):>5} {sum(x for x, _ in pairs):>5} {sum(y for _, y in pairs):>5}"
        f" {only_a:>7} {only_b:>7} {mcnemar(only_a, only_b):>7.3f}"
    )


def table(title, a, b, right, conditions, goal):
    print(title)
    print(f"{'condition':<30} {'clips':>5} {'A':>5} {'B':>5} {'only A':>7} {'only B':>7} {'p':>7}")
    for cond in conditions:
        row(cond, [(right(x), right(y)) for x, y in zip(a, b) if x.get("condition") == cond])
    if len(goal) > 1:
        row("goal (clean, 24/18/12 dB)", [(right(x), right(y)) for x, y in zip(a, b) if x.get("condition") in goal])


GOAL = ("clean", "babble 24 dB", "babble 18 dB", "babble 12 dB", "pink 24 dB", "pink 18 dB", "pink 12 dB")


def key(clip):
    return (clip.get("condition"), clip.get("said"), clip.get("voice"), clip.get("rate"), clip.get("pitch"))


def shared_clips(a, b):
    """The clips both runs heard with the same meaning, as two lists in the
    same order, and how many shared clips the grammars gave other meanings."""
    by_key = {}
    for clip in b:
        by_key.setdefault(key(clip), clip)
    pairs, other_meaning = [], 0
    for clip in a:
        twin = by_key.get(key(clip))
        if twin is None:
            continue
        if (clip.get("intent"), clip.get("slots")) != (twin.get("intent"), twin.get("slots")):
            other_meaning += 1
            continue
        pairs.append((clip, twin))
    return [x for x, _ in pairs], [y for _, y in pairs], other_meaning


def main():
    args = sys.argv[1:]
    shared = "--shared" in args
    args = [x for x in args if x != "--shared"]
    if len(args) != 2:
        sys.exit("usage: python3 paired.py [--shared] A_DIR B_DIR")
    a, b = clips(args[0]), clips(args[1])
    if shared:
        total_a, total_b = len(a), len(b)
        a, b, other_meaning = shared_clips(a, b)
        print(
            f"shared clips: {len(a)} (of {total_a} in A, {total_b} in B);"
            f" {other_meaning} more shared but with another meaning in the two grammars"
        )
        print()
    elif len(a) != len(b) or any(key(x) != key(y) for x, y in zip(a, b)):
        sys.exit(
            "the two runs did not hear the same clips (train both with the same context, seed and test options,"
            " or compare the clips they share with --shared)"
        )
    conditions = list(dict.fromkeys(c.get("condition") for c in a))
    goal = [c for c in GOAL if c in conditions]
    table("accepted (out of grammar: falsely accepted)", a, b, accepted, conditions, goal)
    in_grammar = [c for c in conditions if any(x.get("condition") == c and x.get("intent") is not None for x in a)]
    print()
    table("top choice right, whatever the threshold", a, b, top_right, in_grammar, goal)


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:
        sys.exit(0)
