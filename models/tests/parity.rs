//! tract against onnxruntime: every audio model, and the whole streaming
//! pipeline against openWakeWord's own, on fixtures made by
//! `scripts/make_fixtures.py` from synthesized speech.
//!
//! Needs the models installed (`kith models fetch --all`; the test command
//! does it) in `$KITH_MODELS_DIR`.

mod support;

use std::path::PathBuf;

use kith_models::{
    CHUNK_SAMPLES, EmbeddingMode, OnnxPlan, SpeechFrontEnd, Vad, WakeHead, WakeWordPipeline,
};
use serde_json::Value;
use support::{models_dir, utterance};

fn model(name: &str) -> PathBuf {
    models_dir().join(format!("{name}.onnx"))
}

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/parity.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture json")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length differs");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs a single-input model on the fixture's input and compares to its output.
fn check_single(file: &str, shape: &[usize], case: &Value, tolerance: f32) {
    let mut plan = OnnxPlan::load(&model(file), &[shape]).expect("load");
    plan.input_mut(0)
        .expect("input")
        .copy_from_slice(&floats(&case["input"]));
    let got = plan.run_to_vecs().expect("run");
    let want = floats(&case["output"]);
    let diff = max_abs_diff(&got[0], &want);
    assert!(
        diff <= tolerance,
        "{file}: max |tract - onnxruntime| = {diff} > {tolerance}"
    );
}

#[test]
fn mel_spectrogram_matches_onnxruntime_on_the_streaming_and_the_first_chunk_sizes() {
    let f = fixture();
    check_single("melspectrogram", &[1, 1760], &f["mel"], 2e-3);
    check_single("melspectrogram", &[1, 1280], &f["mel_first"], 2e-3);
}

#[test]
fn speech_embedding_matches_onnxruntime() {
    check_single(
        "embedding_model",
        &[1, 76, 32, 1],
        &fixture()["embedding"],
        1e-3,
    );
}

#[test]
fn every_wake_word_head_matches_onnxruntime_at_its_peak() {
    let f = fixture();
    for (name, case) in f["heads"].as_object().expect("heads") {
        let window = case["window"].as_u64().expect("window") as usize;
        let head = WakeHead::load(name, &model(name), &[]).expect("head loads");
        assert_eq!(head.window(), window, "{name}: window read from the model");
        check_single(name, &[1, window, 96], case, 1e-4);
    }
}

#[test]
fn folded_silero_vad_on_tract_matches_the_original_on_onnxruntime_with_state_carried() {
    let f = fixture();
    let mut vad = Vad::load(&model("silero_vad_folded")).expect("folded VAD loads in tract");
    let want = floats(&f["vad"]["probabilities"]);
    for (i, frame) in f["vad"]["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .enumerate()
    {
        let p = vad.frame_probability(&floats(frame)).expect("run");
        assert!(
            (p - want[i]).abs() < 1e-4,
            "frame {i}: tract {p} vs onnxruntime {}",
            want[i]
        );
    }
}

#[test]
fn the_shipped_silero_vad_is_the_one_tract_cannot_load() {
    // Documents why the fold exists; if tract learns to load it, the fold can go.
    assert!(Vad::load(&model("silero_vad")).is_err());
}

/// Runs the fixture utterance through the pipeline in `mode` and compares
/// every head's score with openWakeWord's, allowing for the mode's lag.
fn check_stream_against_openwakeword(mode: EmbeddingMode) {
    let f = fixture();
    let audio = utterance();
    let reference = f["stream"].as_object().expect("stream");
    let names: Vec<&String> = reference.keys().collect();
    let heads: Vec<WakeHead> = names
        .iter()
        .map(|n| WakeHead::load(n, &model(n), &[]).expect("head"))
        .collect();
    let front = SpeechFrontEnd::load(&models_dir(), 34, mode).expect("front end");
    let lag = front.lag_chunks() as usize;
    let mut pipeline = WakeWordPipeline::new(front, heads, 0.5, 0).expect("pipeline");
    let mut worst = 0.0f32;
    let mut compared = 0;
    for (ix, chunk) in audio.chunks_exact(CHUNK_SAMPLES).enumerate() {
        pipeline.process_chunk(chunk, |_| {}).expect("chunk");
        let Some(at) = ix.checked_sub(lag) else {
            continue;
        };
        for (h, name) in pipeline.heads().iter().zip(&names) {
            let want = reference[*name][at].as_f64().expect("score") as f32;
            let got = h.scores().iter().copied().fold(0.0, f32::max);
            worst = worst.max((got - want).abs());
            assert!(
                (got - want).abs() < 2e-3,
                "{mode:?}, chunk {at}, {name}: tract {got} vs openWakeWord {want}"
            );
            compared += 1;
        }
    }
    assert!(compared >= 5 * 50, "compared {compared} scores");
    // The fixture utterance says "hey jarvis, what's the weather".
    let peak = |n: &str| {
        reference[n]
            .as_array()
            .expect("scores")
            .iter()
            .filter_map(Value::as_f64)
            .fold(0.0, f64::max)
    };
    assert!(
        peak("hey_jarvis") > 0.5 && peak("weather") > 0.5,
        "fixture should contain both phrases"
    );
    eprintln!("{mode:?}: max |tract - openWakeWord| over {compared} scores: {worst}");
}

#[test]
fn windowed_pipeline_scores_match_openwakeword_chunk_by_chunk() {
    check_stream_against_openwakeword(EmbeddingMode::Windowed);
}

#[test]
fn streaming_pipeline_scores_match_openwakeword_one_chunk_later() {
    check_stream_against_openwakeword(EmbeddingMode::Streaming);
}

#[test]
fn a_recurrent_head_scores_the_same_input_the_same_way_every_run() {
    // tract's LSTM kernels carry state between runs of one plan state unless
    // told not to; ONNX semantics (and onnxruntime) start every run afresh.
    let mut plan = OnnxPlan::load(&model("hey_mycroft"), &[&[1, 16, 96]]).expect("load");
    for (i, v) in plan.input_mut(0).expect("input").iter_mut().enumerate() {
        *v = (i % 17) as f32 - 8.0;
    }
    let first = plan.run_to_vecs().expect("run")[0][0];
    for _ in 0..3 {
        assert_eq!(plan.run_to_vecs().expect("run")[0][0], first);
    }
}

#[test]
fn the_vad_tells_speech_from_silence_in_the_fixture() {
    // utterance.wav: 1 s of (dithered) silence, then speech from 1.0 s on.
    let audio = utterance();
    let mut vad = Vad::load(&model("silero_vad_folded")).expect("vad");
    let scores: Vec<f32> = audio
        .chunks_exact(CHUNK_SAMPLES)
        .map(|c| vad.chunk_probability(c).expect("vad chunk"))
        .collect();
    let silence = scores[..11].iter().copied().fold(0.0, f32::max);
    let speech = scores[13..30].iter().copied().fold(0.0, f32::max);
    assert!(silence < 0.2, "silence scored {silence}: {scores:?}");
    assert!(speech > 0.8, "speech scored {speech}: {scores:?}");
}
