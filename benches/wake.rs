//! Per-chunk cost of the streaming audio path (one 80 ms chunk of audio).
//! A chunk taking T µs means a real-time factor of T / 80 000.
//!
//! Needs the models: `KITH_MODELS_DIR=... cargo bench -p kith-benches`.

use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use kith_models::{CHUNK_SAMPLES, EmbeddingMode, SpeechFrontEnd, Vad, WakeHead, WakeWordPipeline};

const HEADS: [&str; 5] = ["alexa", "hey_jarvis", "hey_mycroft", "timer", "weather"];

fn models_dir() -> PathBuf {
    std::env::var_os("KITH_MODELS_DIR")
        .map(PathBuf::from)
        .expect("set KITH_MODELS_DIR to an installed models directory")
}

/// Deterministic speech-like noise: a few harmonics with a wobbling pitch.
fn audio(chunks: usize) -> Vec<i16> {
    (0..chunks * CHUNK_SAMPLES)
        .map(|i| {
            let t = i as f32 / 16_000.0;
            let f = 140.0 + 30.0 * (t * 3.0).sin();
            let v = (0..5)
                .map(|h| ((h + 1) as f32 * f * t * std::f32::consts::TAU).sin() / (h + 1) as f32)
                .sum::<f32>();
            (v * 6000.0) as i16
        })
        .collect()
}

fn heads(dir: &std::path::Path) -> Vec<WakeHead> {
    HEADS
        .iter()
        .map(|n| WakeHead::load(n, &dir.join(format!("{n}.onnx")), &[]).expect("head"))
        .collect()
}

fn bench(c: &mut Criterion) {
    let dir = models_dir();
    let audio = audio(64);
    let chunks: Vec<&[i16]> = audio.chunks_exact(CHUNK_SAMPLES).collect();

    for mode in [EmbeddingMode::Windowed, EmbeddingMode::Streaming] {
        let mut front = SpeechFrontEnd::load(&dir, 34, mode).expect("front end");
        let mut i = 0;
        c.bench_function(
            &format!("front_end_chunk {mode:?} (mel + embedding)"),
            |b| {
                b.iter(|| {
                    front.push_chunk(chunks[i % chunks.len()]).expect("chunk");
                    i += 1;
                })
            },
        );
        if mode == EmbeddingMode::Streaming {
            for mut head in heads(&dir) {
                let name = format!("head_{}", head.name());
                c.bench_function(&name, |b| b.iter(|| head.score(&front).expect("score")));
            }
        }

        let front = SpeechFrontEnd::load(&dir, 34, mode).expect("front end");
        let mut pipeline = WakeWordPipeline::new(front, heads(&dir), 0.5, 2000).expect("pipeline");
        let mut i = 0;
        c.bench_function(&format!("pipeline_chunk {mode:?} (5 heads)"), |b| {
            b.iter(|| {
                pipeline
                    .process_chunk(chunks[i % chunks.len()], |_| {})
                    .expect("chunk");
                i += 1;
            })
        });

        let front = SpeechFrontEnd::load(&dir, 34, mode).expect("front end");
        let vad = Vad::load(&dir.join("silero_vad_folded.onnx")).expect("vad");
        let mut pipeline = WakeWordPipeline::new(front, heads(&dir), 0.5, 2000)
            .expect("pipeline")
            .with_vad(vad, 0.5);
        let mut i = 0;
        c.bench_function(&format!("pipeline_chunk {mode:?} (5 heads + VAD)"), |b| {
            b.iter(|| {
                pipeline
                    .process_chunk(chunks[i % chunks.len()], |_| {})
                    .expect("chunk");
                i += 1;
            })
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
