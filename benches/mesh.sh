#!/usr/bin/env bash
# The mesh's figures on this machine: time to first peer, delegation
# overhead (delegated minus local, same model, nodes in network namespaces
# on one bridge), dead-peer detection, and a 200-request run with a node
# killed. Needs root and what scripts/setup installs.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${KITH_MODELS_DIR:?set KITH_MODELS_DIR to a models directory with smollm2-135m}"
cargo test --release -p kith --test mesh -- --ignored --nocapture --test-threads 1 mesh_figures
