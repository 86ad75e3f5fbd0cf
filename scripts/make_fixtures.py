#!/usr/bin/env python3
"""Make the parity fixtures of the models crate with onnxruntime.

Reference values for each audio model, computed by onnxruntime (and by
openWakeWord's own streaming pipeline) on real synthesized speech, so the
tract implementation can be checked against them. Run from the repository
root after `kith models fetch --all`:

    .venv/bin/python scripts/make_fixtures.py MODELS_DIR

Needs: numpy, onnxruntime (scripts/requirements.txt), openwakeword and its
dependencies (scripts/requirements-reference.txt), espeak-ng and sox.
Writes models/tests/fixtures/{utterance.wav,parity.json}.
"""

import json
import os
import subprocess
import sys
import tempfile
import wave

import numpy as np
import onnxruntime as ort

OUT = os.path.join(os.path.dirname(__file__), "..", "models", "tests", "fixtures")
HEADS = ["alexa", "hey_jarvis", "hey_mycroft", "timer", "weather"]


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def utterance(path):
    """1 s silence + "hey jarvis, what's the weather" + 1 s silence, 16 kHz mono."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.wav")
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", raw, "hey jarvis, what's the weather"], check=True)
        subprocess.run(["sox", raw, "-r", "16000", "-c", "1", "-b", "16", path, "pad", "1", "1"], check=True)
    with wave.open(path) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16)


def rounded(a):
    return [float(f"{v:.7g}") for v in np.asarray(a, np.float64).reshape(-1)]


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    models = sys.argv[1]
    os.makedirs(OUT, exist_ok=True)
    audio = utterance(os.path.join(OUT, "utterance.wav"))
    mel = session(os.path.join(models, "melspectrogram.onnx"))
    emb = session(os.path.join(models, "embedding_model.onnx"))
    fixture = {"audio_samples": int(audio.shape[0])}

    # Mel on 1760 samples of speech (the streaming size) and on 1280 (the first chunk).
    start = 16000 + 4000
    x = audio[start:start + 1760].astype(np.float32)[None]
    fixture["mel"] = {"input": rounded(x), "output": rounded(mel.run(None, {"input": x})[0])}
    x = audio[start:start + 1280].astype(np.float32)[None]
    fixture["mel_first"] = {"input": rounded(x), "output": rounded(mel.run(None, {"input": x})[0])}

    # Embedding of 76 mel frames of speech (after openWakeWord's x/10 + 2).
    spec = mel.run(None, {"input": audio.astype(np.float32)[None]})[0].squeeze() / 10 + 2
    window = spec[100:176][None, :, :, None].astype(np.float32)
    fixture["embedding"] = {"input": rounded(window), "output": rounded(emb.run(None, {"input_1": window})[0])}

    # Heads on the embeddings of the whole utterance.
    windows = np.stack([spec[i:i + 76] for i in range(0, spec.shape[0] - 75, 8)])[..., None].astype(np.float32)
    embeddings = emb.run(None, {"input_1": windows})[0].squeeze()
    fixture["heads"] = {}
    for name in HEADS:
        s = session(os.path.join(models, name + ".onnx"))
        n = s.get_inputs()[0].shape[1]
        best = None
        for end in range(n, embeddings.shape[0] + 1):
            inp = embeddings[end - n:end][None].astype(np.float32)
            out = s.run(None, {s.get_inputs()[0].name: inp})[0]
            score = float(out.reshape(-1)[0] if out.size == 1 else out.reshape(-1)[1:].max())
            if best is None or score > best[0]:
                best = (score, inp, out)
        fixture["heads"][name] = {"window": int(n), "input": rounded(best[1]), "output": rounded(best[2])}

    # Silero VAD as shipped, on onnxruntime, state carried over 8 frames of speech.
    vad = session(os.path.join(models, "silero_vad.onnx"))
    h = np.zeros((2, 1, 64), np.float32)
    c = np.zeros((2, 1, 64), np.float32)
    frames, probs = [], []
    for i in range(8):
        f = (audio[16000 + i * 640:16000 + (i + 1) * 640] / 32767).astype(np.float32)[None]
        out, h, c = vad.run(None, {"input": f, "sr": np.array(16000, np.int64), "h": h, "c": c})
        frames.append(rounded(f))
        probs.append(float(out.reshape(-1)[0]))
    fixture["vad"] = {"frames": frames, "probabilities": probs, "h": rounded(h), "c": rounded(c)}

    # openWakeWord's own streaming pipeline, chunk by chunk, on the same audio.
    from openwakeword.model import Model

    model = Model(wakeword_model_paths=[os.path.join(models, n + ".onnx") for n in HEADS])
    stream = {n: [] for n in HEADS}
    for i in range(0, audio.shape[0] - 1279, 1280):
        pred = model.predict(audio[i:i + 1280])
        for n in HEADS:
            if n == "timer":
                stream[n].append(max(v for k, v in pred.items() if k.endswith("_timer")))
            else:
                stream[n].append(float(pred[n]))
    fixture["stream"] = {n: rounded(v) for n, v in stream.items()}

    with open(os.path.join(OUT, "parity.json"), "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
    peaks = {n: round(float(max(v)), 4) for n, v in stream.items()}
    print(f"wrote {OUT}/parity.json; openWakeWord peaks on the utterance: {peaks}")


if __name__ == "__main__":
    main()
