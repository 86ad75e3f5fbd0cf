//! The speech embedding's top layers as kith trains them
//! (`intent::embedding_top`): hand-written gradients against finite
//! differences, and the pretrained layers over the streamed rows of the cut
//! embedding model against the whole embedding model.
//!
//! The parity tests need the models installed (the README's test command
//! does it) in `$KITH_MODELS_DIR`.

use std::path::PathBuf;

use kith_models::CHUNK_SAMPLES;
use kith_models::intent::embedding_top::{Axis, CHANNELS, EmbeddingTop, ROW, TopConv, rows_for};
use kith_models::intent::grammar::Rng;
use kith_models::intent::{CUT_FEATURES, CommandFront, FEATURES, FRAMES};

fn models_dir() -> PathBuf {
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
fn utterance() -> Vec<i16> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/utterance.wav");
    hound::WavReader::open(path)
        .expect("wav")
        .samples::<i16>()
        .map(|s| s.expect("sample"))
        .collect()
}

/// A top with random weights at the real sizes (He-normal, small biases).
fn random_top(seed: u64) -> EmbeddingTop {
    let mut rng = Rng::new(seed);
    let scale = (2.0 / (3.0 * CHANNELS as f32)).sqrt();
    let axes = [Axis::Bands, Axis::Time, Axis::Bands, Axis::Time, Axis::Time];
    let convs = axes
        .iter()
        .enumerate()
        .map(|(i, &axis)| TopConv {
            axis,
            w: (0..3 * CHANNELS * CHANNELS)
                .map(|_| rng.normal() * scale)
                .collect(),
            b: if i < 4 {
                (0..CHANNELS).map(|_| rng.normal() * 0.1).collect()
            } else {
                Vec::new()
            },
        })
        .collect();
    EmbeddingTop { convs, floor: -0.4 }
}

/// Σ embeddings ⊙ g: a loss whose gradient with respect to the embeddings is g.
fn weighted_sum(top: &EmbeddingTop, rows: &[f32], g: &[f32]) -> f64 {
    let e = top.embed(rows).expect("embed");
    e.iter().zip(g).map(|(a, b)| f64::from(a * b)).sum()
}

#[test]
fn gradients_of_the_top_match_finite_differences() {
    let top = random_top(5);
    let mut rng = Rng::new(6);
    let n = 3;
    let rows: Vec<f32> = (0..rows_for(n) * ROW).map(|_| rng.normal()).collect();
    let g: Vec<f32> = (0..n * CHANNELS).map(|_| rng.normal()).collect();
    let trace = top.forward(&rows).expect("forward");
    assert_eq!(trace.embeddings.len(), n * CHANNELS);
    let mut grads = top.zero_grads();
    top.backward(&trace, &g, &mut grads);
    let analytic = grads.flatten();
    assert_eq!(analytic.len(), top.parameters());
    let eps = 1e-3;
    let mut checked = 0;
    let mut nonzero = 0;
    let mut bad = Vec::new();
    // Every 211th parameter: a few hundred, spread over all five layers.
    for i in (0..analytic.len()).step_by(211) {
        let mut plus = top.clone();
        plus.nudge(i, eps);
        let mut minus = top.clone();
        minus.nudge(i, -eps);
        let numeric = ((weighted_sum(&plus, &rows, &g) - weighted_sum(&minus, &rows, &g))
            / (2.0 * f64::from(eps))) as f32;
        let a = analytic[i];
        if (a - numeric).abs() > 2e-2 + 0.02 * numeric.abs() {
            bad.push((i, a, numeric));
        }
        nonzero += usize::from(a.abs() > 1e-3);
        checked += 1;
    }
    // A nudge can cross a kink of the activation or switch a pooling's
    // maximum; with these sizes that happens for at most a handful.
    assert!(
        bad.len() <= checked / 50,
        "{} of {checked} gradients differ: {bad:?}",
        bad.len()
    );
    assert!(
        checked > 600 && nonzero > checked / 2,
        "{nonzero} of {checked}"
    );
}

#[test]
fn the_top_refuses_rows_it_cannot_use() {
    let top = random_top(1);
    for values in [0, ROW * 9, ROW * 11, ROW * 12 + 1] {
        let err = top.embed(&vec![0.0; values]).expect_err("bad length");
        assert!(err.to_string().contains("rows of"), "{err}");
    }
    assert_eq!(
        top.embed(&vec![0.0; ROW * 12]).expect("12 rows").len(),
        2 * CHANNELS
    );
}

#[test]
fn the_shipped_embedding_model_loads_as_a_top() {
    let top = EmbeddingTop::load(&models_dir().join("embedding_model.onnx")).expect("top");
    assert_eq!(top.convs.len(), 5);
    assert_eq!(top.floor, -0.4);
    assert_eq!(top.parameters(), 5 * 3 * 96 * 96 + 4 * 96);
    let missing = EmbeddingTop::load(&models_dir().join("melspectrogram.onnx"))
        .expect_err("not an embedding model");
    assert!(missing.to_string().contains("conv2d_15"), "{missing}");
}

/// The features of `audio` from the command front end and from the
/// command front end cut before conv2d_15, with each one's count of real
/// windows.
fn both_fronts(audio: &[i16]) -> ((Vec<f32>, usize), (Vec<f32>, usize)) {
    let dir = models_dir();
    let mel = dir.join("melspectrogram.onnx");
    let emb = dir.join("embedding_model.onnx");
    let mut whole = CommandFront::load(&mel, &emb).expect("front");
    let mut cut = CommandFront::load_cut(&mel, &emb).expect("cut front");
    assert_eq!((whole.features(), cut.features()), (FEATURES, CUT_FEATURES));
    let mut e = vec![0.0; FEATURES];
    whole.features_of(audio, &mut e).expect("embeddings");
    let mut r = vec![0.0; CUT_FEATURES];
    cut.features_of(audio, &mut r).expect("rows");
    ((e, whole.real_windows()), (r, cut.real_windows()))
}

/// Checks that the pretrained top over the cut features gives the command
/// front end's embeddings for every real window; returns how many.
fn check_top_against_the_front_end(audio: &[i16]) -> usize {
    let top = EmbeddingTop::load(&models_dir().join("embedding_model.onnx")).expect("top");
    let ((embeddings, real), (rows, real_cut)) = both_fronts(audio);
    assert_eq!(real, real_cut, "the fronts count different real windows");
    assert_eq!(rows.len(), rows_for(FRAMES) * ROW);
    let made = top.embed(&rows).expect("embed");
    let from = (FRAMES - real) * CHANNELS;
    let scale = embeddings[from..]
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = made[from..]
        .iter()
        .zip(&embeddings[from..])
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(scale > 1.0, "the embeddings are not of speech: {scale}");
    assert!(
        worst < 1e-4 * scale,
        "largest difference {worst} (embeddings up to {scale})"
    );
    // Just before the real windows, the cut features are not the stream's:
    // that is why the count matters.
    if real < FRAMES {
        let before = &made[from - CHANNELS..from];
        let silence = &embeddings[from - CHANNELS..from];
        let gap = before
            .iter()
            .zip(silence)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            gap > 1e-2 * scale,
            "window {} matches too",
            FRAMES - real - 1
        );
    }
    real
}

#[test]
fn the_pretrained_top_over_the_cut_front_end_gives_the_command_front_ends_embeddings() {
    let audio = utterance();
    let real = check_top_against_the_front_end(&audio);
    // 4 s of audio and the tail: every window but a few is real.
    assert!((45..FRAMES).contains(&real), "{real} real windows");
}

#[test]
fn a_short_command_has_few_real_windows_and_they_match_too() {
    let audio = utterance();
    // 1.2 s from the middle of the utterance (the words).
    let words = &audio[16_000..16_000 + 15 * CHUNK_SAMPLES];
    let real = check_top_against_the_front_end(words);
    assert!((15..25).contains(&real), "{real} real windows");
    // A clip longer than the history: all 64 are real.
    let long: Vec<i16> = audio.iter().chain(&audio).copied().collect();
    assert_eq!(check_top_against_the_front_end(&long), FRAMES);
}
