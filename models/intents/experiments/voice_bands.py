#!/usr/bin/env python3
"""How an espeak-ng voice variant spreads its energy over frequency.

Speaks ten short smart-home commands with each variant (accent `en-us`,
145 wpm, the test's slower rate) and prints the share of the whole
level that falls under 300 Hz, in 300-1000 Hz, 1-4 kHz and 4-8 kHz,
in dB, averaged over the sentences.

The test mixes noise at an SNR against the speech's whole level. Babble
has a speech spectrum, so it masks a voice where that voice's formants
and consonants are, 1-4 kHz above all. A voice that keeps less of its
level there than the others is heard at a lower SNR where it matters
than its nominal one: the 1-4 kHz figure of one voice minus another's is
about how many dB lower.

    .venv/bin/python3 voice_bands.py [VARIANT...]

Needs espeak-ng and numpy (the project's `.venv` has numpy).
"""

import io
import subprocess
import sys
import wave

import numpy as np

SENTENCES = [
    "turn up the heat",
    "set a timer for three minutes",
    "cancel the timer",
    "volume six",
    "resume",
    "turn off the kitchen lights",
    "what is the weather on saturday",
    "make the bedroom lights blue",
    "set the thermostat to twenty degrees",
    "dim the living room lights to fifty percent",
]
BANDS = [(0, 300), (300, 1000), (1000, 4000), (4000, 8000)]
# The test's five held-out variants, then two training variants with
# espeak-ng's same `tone` line as `steph`.
DEFAULT = ["m7", "f4", "klatt4", "michel", "steph", "anika", "m8"]
FRAME = 1024


def spoken(variant, text):
    try:
        out = subprocess.run(
            ["espeak-ng", "-v", f"en-us+{variant}", "-s", "145", "--stdout", text],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"espeak-ng could not speak with {variant}: {e}")
    with wave.open(io.BytesIO(out)) as w:
        rate = w.getframerate()
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    return rate, samples.astype(np.float64)


def shares(variant):
    """Per band, its share of the level in dB, averaged over SENTENCES."""
    total = np.zeros(len(BANDS))
    for text in SENTENCES:
        rate, x = spoken(variant, text)
        window = np.hanning(FRAME)
        frames = [x[i : i + FRAME] * window for i in range(0, len(x) - FRAME, FRAME // 2)]
        if not frames:
            sys.exit(f"{variant} said {text!r} in under {FRAME} samples")
        power = np.sum([np.abs(np.fft.rfft(f)) ** 2 for f in frames], axis=0)
        power /= power.sum()
        hz = np.fft.rfftfreq(FRAME, 1 / rate)
        total += [power[(hz >= lo) & (hz < hi)].sum() for lo, hi in BANDS]
    return 10 * np.log10(total / len(SENTENCES))


def main():
    variants = sys.argv[1:] or DEFAULT
    head = "  ".join(f"{lo}-{hi} Hz" for lo, hi in BANDS)
    print(f"{'variant':10} {head}")
    for v in variants:
        print(f"{v:10} " + "  ".join(f"{s:{len(f'{lo}-{hi} Hz')}.1f}" for s, (lo, hi) in zip(shares(v), BANDS)))


if __name__ == "__main__":
    main()
