#!/usr/bin/env python3
"""Compares two runs of train.py clip by clip (see README.md).

Each run writes right-first-MODE-seedSEED.npy: per test clip of the dump,
in the dump's order, whether the network's best answer was exactly right.
Runs on the same dump heard the very same clips, so per condition this
prints how many clips each got right, how many only one of them did, and
the exact McNemar p-value of that split (`../paired.py`'s).

    python3 compare.py DUMP_DIR A.npy B.npy
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from paired import mcnemar  # noqa: E402

from conditions import CONDITIONS, GOAL  # noqa: E402


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    dump, a_path, b_path = sys.argv[1:]
    idx = Path(dump) / 'synthesizing_test_clips.idx'
    try:
        condition = np.array([int(line.split('\t')[2]) for line in idx.open()])
        a, b = np.load(a_path), np.load(b_path)
    except (OSError, ValueError, IndexError) as e:
        sys.exit(f'cannot read the runs: {e}')
    if not (len(a) == len(b) == len(condition)):
        sys.exit(f'the runs did not hear the same clips: {len(a)}, {len(b)} and {len(condition)} clips')
    rows = [(name, condition == c) for c, name in enumerate(CONDITIONS)]
    rows.append(('goal clips', np.isin(condition, GOAL)))
    print(f"{'right first':<30} {'clips':>5} {'A':>5} {'B':>5} {'only A':>7} {'only B':>7} {'p':>7}")
    for name, sel in rows:
        x, y = a[sel], b[sel]
        only_a, only_b = int(np.sum(x & ~y)), int(np.sum(y & ~x))
        print(f'{name:<30} {int(sel.sum()):>5} {int(x.sum()):>5} {int(y.sum()):>5}'
              f' {only_a:>7} {only_b:>7} {mcnemar(only_a, only_b):>7.3f}')


if __name__ == '__main__':
    main()
