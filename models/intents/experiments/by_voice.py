#!/usr/bin/env python3
"""Counts a trained intent model's test clips per held-out voice.

Reads `test_clips.jsonl` of each directory (written by `kith intent train`,
or by `kith intent eval --model DIR --out OUT`) and prints, for the goal
conditions (clean, babble and pink at 24, 18 and 12 dB), for babble at
12 dB alone, and for the held-out accent clean and in babble at 12 dB:
per voice variant (the part of the voice after `+`, or the whole name of
an MBROLA voice) the clips, how many were accepted (understood, intent and
every slot right) and how many had the right best answer whatever its
score. Then the out-of-grammar clips falsely accepted.

One voice that the model hears badly shows here as one row far under the
others; the model card's per-condition table cannot show it.

    python3 by_voice.py DIR [DIR...]
"""

import sys
from collections import defaultdict

from paired import clips

GOAL = [
    "clean",
    "babble 24 dB",
    "babble 18 dB",
    "babble 12 dB",
    "pink 24 dB",
    "pink 18 dB",
    "pink 12 dB",
]
ROWS = [
    ("goal conditions", GOAL),
    ("babble 12 dB", ["babble 12 dB"]),
    ("accent, clean", None),
    ("accent, babble 12 dB", None),
]


def right(clip):
    return clip.get("heard") == clip.get("intent") and (
        clip.get("heard_slots") or {}
    ) == (clip.get("slots") or {})


def variant(clip):
    voice = clip.get("voice", "?")
    return voice.rsplit("+", 1)[-1]


def in_row(clip, name, conditions):
    condition = clip.get("condition", "")
    if conditions is not None:
        return condition in conditions
    # The accent rows are named "accent <voice>, clean" and
    # "accent <voice>, babble 12 dB".
    wanted = name.split(", ", 1)[1]
    return condition.startswith("accent ") and condition.endswith(", " + wanted)


def report(directory):
    rows = clips(directory)
    print(directory)
    for name, conditions in ROWS:
        counts = defaultdict(lambda: [0, 0, 0])
        for clip in rows:
            if clip.get("intent") is None or not in_row(clip, name, conditions):
                continue
            c = counts[variant(clip)]
            c[0] += 1
            c[1] += clip.get("understood") is True and right(clip)
            c[2] += right(clip)
        if not counts:
            continue
        print(f"  {name}: voice, clips, accepted, right first")
        for voice, (n, accepted, first) in sorted(counts.items()):
            print(f"    {voice:10} {n:4} {accepted:4} ({100 * accepted / n:5.1f} %) {first:4}")
    oog = [c for c in rows if c.get("condition") == "out of grammar"]
    false = sum(c.get("understood") is True for c in oog)
    print(f"  out of grammar: {false} of {len(oog)} accepted")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for directory in sys.argv[1:]:
        report(directory)


if __name__ == "__main__":
    main()
