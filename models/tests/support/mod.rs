//! What several test files of `kith-models` share: where the models are,
//! the fixture utterance, finite differences of a network's loss.
#![allow(dead_code)] // each test file uses its own part

use std::path::PathBuf;

use kith_models::intent::net::{Example, Net};

/// `$KITH_MODELS_DIR`, checked to hold the models.
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("KITH_MODELS_DIR")
        .map(PathBuf::from)
        .expect("KITH_MODELS_DIR is not set: run the README's test command, or `kith models fetch --all` and export KITH_MODELS_DIR");
    assert!(
        dir.join("embedding_model.onnx").exists(),
        "no models in {}: run `kith models fetch --all --models-dir {}`",
        dir.display(),
        dir.display()
    );
    dir
}

/// The fixture utterance: 1 s of (dithered) silence, "hey jarvis, what's the
/// weather", 1 s of silence; 16 kHz mono.
pub fn utterance() -> Vec<i16> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/utterance.wav");
    hound::WavReader::open(path)
        .expect("wav")
        .samples::<i16>()
        .map(|s| s.expect("sample"))
        .collect()
}

/// The loss's derivative with respect to parameter `i` by central
/// differences of `eps`.
pub fn numeric_gradient(net: &Net, batch: &[&Example], i: usize, eps: f32) -> f32 {
    let mut plus = net.clone();
    plus.nudge(i, eps);
    let mut minus = net.clone();
    minus.nudge(i, -eps);
    (plus.loss_and_grads(batch).0 - minus.loss_and_grads(batch).0) / (2.0 * eps)
}
