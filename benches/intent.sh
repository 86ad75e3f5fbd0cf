#!/usr/bin/env bash
# Speech-to-intent figures on this machine: trains the shipped smart-home
# context and the coffee context with the default settings (release build),
# then prints each model card (acceptance on held-out voices, rates and
# sentences at 24/18/12/6 dB; false accepts; size; training time) and the
# latency after end-of-speech of `kith listen --intent` on a spoken command.
# Needs what scripts/setup installs.
#   benches/intent.sh [OUT_DIR]     (default: target/intent-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${KITH_MODELS_DIR:?set KITH_MODELS_DIR to a models directory (kith models fetch --all)}"
out="${1:-target/intent-bench}"
mkdir -p "$out"
cargo build --release -p kith --locked
kith=target/release/kith
for context in smart-home coffee; do
  /usr/bin/time -v "$kith" intent train --context "models/intents/$context/context.yaml" \
    --out "$out/$context" 2> >(tee "$out/$context.log" >&2 | grep -E "Maximum resident|Elapsed" >&2)
  cat "$out/$context/MODEL_CARD.md"
done
# Latency after end-of-speech, through `kith listen` (wake word, then the command).
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
espeak-ng -v en-us -s 150 -w "$tmp/wake.wav" "hey jarvis"
espeak-ng -v en-029+m7 -s 150 -w "$tmp/cmd.wav" "set the kitchen lights to fifty percent"
# sox joins files of one sample rate only: both go to 16 kHz first.
sox "$tmp/wake.wav" -r 16000 -c 1 "$tmp/w.wav" pad 0 0.3
sox "$tmp/cmd.wav" -r 16000 -c 1 "$tmp/c.wav"
sox "$tmp/w.wav" "$tmp/c.wav" "$tmp/all.wav" pad 0 1.5
for i in 1 2 3; do
  "$kith" listen --wav "$tmp/all.wav" --wake hey_jarvis --intent models/intents/smart-home --json | grep '"intent"'
done
