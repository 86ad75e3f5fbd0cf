#!/usr/bin/env python3
"""kith on tract against openWakeWord's own pipeline on onnxruntime, same audio, same run.

Usage (from the repository root, after scripts/setup):
    .venv/bin/pip install -r scripts/requirements-reference.txt
    cargo build --release -p kith
    .venv/bin/python benches/compare_openwakeword.py [--seconds 120] [--kith target/release/kith]

Builds one long 16 kHz WAV of espeak-ng speech (wake phrases among ordinary
sentences), then, pinned to one core with one thread each:
  - kith listen --wav --stats (all five heads; then with --vad), best of 3;
  - openWakeWord Model.predict chunk by chunk (all five heads; then with
    vad_threshold), best of 3.
Prints the real-time factors and the ratio, kith's model load time and peak RSS.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import wave

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
HEADS = ["alexa", "hey_jarvis", "hey_mycroft", "timer", "weather"]
PHRASES = [
    "hey jarvis", "the quick brown fox jumps over the lazy dog", "what's the weather",
    "turn on the kitchen lights", "alexa", "set a timer for five minutes",
    "please call my mother tomorrow morning", "hey my croft",
]


def build_audio(path, seconds):
    with tempfile.TemporaryDirectory() as tmp:
        parts = []
        total = 0
        i = 0
        while total < seconds * 16000:
            raw = os.path.join(tmp, f"{i}.wav")
            voice = ["en-us", "en-gb"][i % 2]
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(140 + 10 * (i % 4)), "-w", raw, PHRASES[i % len(PHRASES)]], check=True)
            out = os.path.join(tmp, f"{i}-16k.wav")
            subprocess.run(["sox", raw, "-r", "16000", "-c", "1", "-b", "16", out, "pad", "0.5", "0.5"], check=True)
            with wave.open(out) as w:
                parts.append(np.frombuffer(w.readframes(w.getnframes()), np.int16))
            total += parts[-1].shape[0]
            i += 1
        audio = np.concatenate(parts)[: seconds * 16000]
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(audio.tobytes())
    return audio


def run_kith(kith, wav, extra):
    cmd = ["taskset", "-c", "0", kith, "listen", "--wav", wav, "--json", "--stats", "--pad-ms", "0"] + extra
    best = None
    for _ in range(3):
        p = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M"] + cmd, capture_output=True, text=True, check=True)
        stats = next(json.loads(line) for line in p.stderr.splitlines() if line.startswith("{"))
        stats["max_rss_mb"] = int(next(line.split()[1] for line in p.stderr.splitlines() if line.startswith("MAXRSS_KB"))) / 1024
        stats["events"] = len(p.stdout.splitlines())
        if best is None or stats["rtf"] < best["rtf"]:
            best = stats
    return best


def run_openwakeword(models, audio, vad):
    os.sched_setaffinity(0, {0})
    from openwakeword.model import Model
    best = None
    for _ in range(3):
        # openWakeWord's VAD loads silero_vad.onnx from its own wheel: the same file kith folds.
        kwargs = {"vad_threshold": 0.5} if vad else {}
        m = Model(wakeword_model_paths=[os.path.join(models, n + ".onnx") for n in HEADS], **kwargs)
        events = 0
        start = time.perf_counter()
        for i in range(0, audio.shape[0] - 1279, 1280):
            pred = m.predict(audio[i:i + 1280])
            events += sum(1 for v in pred.values() if v >= 0.5)
        elapsed = time.perf_counter() - start
        rtf = elapsed / (audio.shape[0] / 16000)
        if best is None or rtf < best["rtf"]:
            best = {"rtf": rtf, "process_ms": elapsed * 1e3, "chunks_over_threshold": events}
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=120)
    ap.add_argument("--kith", default="target/release/kith")
    ap.add_argument("--models", default=os.environ.get("KITH_MODELS_DIR", os.path.expanduser("~/.local/share/kith/models")))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "bench.wav")
        audio = build_audio(wav, args.seconds)
        env_models = ["--models-dir", args.models]
        rows = []
        cases = [
            ("5 heads", [], False),
            ("5 heads + VAD", ["--vad"], True),
            ("5 heads, windowed", ["--embedding", "windowed"], False),
        ]
        for label, kith_extra, vad in cases:
            k = run_kith(args.kith, wav, env_models + kith_extra)
            o = run_openwakeword(args.models, audio, vad)
            rows.append((label, k, o))
    print(f"audio: {args.seconds} s of espeak-ng speech, 16 kHz; one core, one thread each; best of 3")
    print(f"{'pipeline':<18} {'kith/tract RTF':>15} {'openWakeWord/ORT RTF':>21} {'ratio':>7}")
    for label, k, o in rows:
        print(f"{label:<18} {k['rtf']:>15.4f} {o['rtf']:>21.4f} {k['rtf'] / o['rtf']:>7.2f}")
    print("(kith's default embedding is streaming; 'windowed' runs the same algorithm as openWakeWord)")
    k = rows[0][1]
    print(f"kith: model load {k['load_ms']:.0f} ms, peak RSS {k['max_rss_mb']:.1f} MB, {k['events']} wake events")
    print(f"(ORT peak RSS of this Python process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
