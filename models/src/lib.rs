//! kith-models: pure inference on tract.
//!
//! Tensors in, scores out. This crate reads model files and nothing else: no
//! sockets, no async runtime, no configuration files, no clocks. Anyone can
//! embed it in another program.
//!
//! Text generation (`llm`) runs decoder-only ONNX models with a KV cache,
//! tokenizes with `tokenizer.json` and streams text token by token.
//!
//! The audio path re-implements openWakeWord's streaming pipeline:
//! 16 kHz mono → 80 ms chunks → mel spectrogram → Google's speech embedding →
//! wake-word heads, with an optional silero VAD gate.
//!
//! Speech to intent (`intent`) reuses that front end: a command's speech
//! embeddings go through a small network kith trains itself from a Rhino
//! context grammar (training lives here too: it is tensors in, tensors out).

mod error;
pub mod intent;
pub mod llm;
mod plan;
mod pulse;
pub mod vad;
pub mod wake;

pub use error::ModelError;
pub use plan::OnnxPlan;
pub use vad::Vad;
pub use wake::{Detection, EmbeddingMode, SpeechFrontEnd, WakeHead, WakeWordPipeline};

/// Sample rate of every audio model here, in Hz.
pub const SAMPLE_RATE: u32 = 16_000;
/// Samples per streaming chunk (80 ms at 16 kHz).
pub const CHUNK_SAMPLES: usize = 1280;
