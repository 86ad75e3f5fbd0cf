//! openWakeWord's streaming front end and wake-word heads on tract.
//!
//! Per 1280-sample chunk: the mel model runs on the chunk plus the previous
//! 480 samples (8 new frames; 5 on the very first chunk, as openWakeWord
//! does); the embedding model turns the last 76 frames into one 96-dim
//! embedding, either on the whole window ([`EmbeddingMode::Windowed`]) or as
//! a streaming network fed the 8 new frames ([`EmbeddingMode::Streaming`]);
//! each head scores its last N embeddings. Every buffer is allocated at load
//! time; a chunk allocates nothing in this module (tract allocates inside
//! its runs and frees it all, see `tests/memory.rs`).

use std::path::Path;

use crate::error::ModelError;
use tract_onnx::prelude::{TValue, TVec};

use crate::plan::{OnnxPlan, output_slice};
use crate::pulse::{self, PulsedEmbedding};
use crate::vad::Vad;
use crate::{CHUNK_SAMPLES, SAMPLE_RATE};

/// Mel bins per frame.
pub const MEL_BINS: usize = 32;
/// Mel frames the embedding model looks at.
pub const MEL_WINDOW: usize = 76;
/// Mel frames added per chunk once streaming (hop of 160 samples).
pub const FRAMES_PER_CHUNK: usize = 8;
/// Samples of the previous chunk prepended to each chunk for the mel model.
pub const MEL_CONTEXT: usize = 480;
/// Size of one speech embedding.
pub const EMBEDDING_DIM: usize = 96;
/// VAD chunk scores kept: offsets up to 6 chunks, plus the embedding lag.
const VAD_HISTORY: usize = 8;
/// openWakeWord reports zero for the first scores after a head starts.
const WARMUP_CHUNKS: u32 = 5;

/// Milliseconds per chunk.
const CHUNK_MS: u64 = (CHUNK_SAMPLES as u64) * 1000 / SAMPLE_RATE as u64;
const MEL_INPUT: usize = CHUNK_SAMPLES + MEL_CONTEXT;
const FIRST_FRAMES: usize = (CHUNK_SAMPLES - 512) / 160 + 1;

/// How the speech embedding is computed from the mel frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmbeddingMode {
    /// openWakeWord's way: the model on the last 76 frames at every chunk.
    /// Scores are exactly openWakeWord's, chunk for chunk.
    Windowed,
    /// The model as a streaming network (tract-pulse) that computes only
    /// what 8 new frames add. Several times cheaper; the same scores one
    /// chunk (80 ms) later, because the network's stride-8 pooling sees a
    /// window only when the next 4 frames have arrived.
    #[default]
    Streaming,
}

/// How the embedding model is run.
enum Embedder {
    /// [1, 76, 32, 1] per chunk, fed from the mel ring.
    Windowed(OnnxPlan),
    /// [1, 8, 32, 1] per pulse, state carried.
    Streaming {
        net: PulsedEmbedding,
        /// Mel frames not yet fed (allocated once for the largest backlog).
        pending: Vec<f32>,
        /// Pulses run since the stream began.
        pulses: u64,
        /// One pulse's output as [steps, bands, channels]: the items the
        /// ring keeps (allocated once).
        items: Vec<f32>,
    },
}

/// Streaming mel spectrogram + speech embedding: audio chunks in, one
/// 96-dim embedding per chunk out, kept in a ring for the heads. Cut (see
/// [`SpeechFrontEnd::load_cut`]), the ring keeps an inner layer's rows
/// instead.
pub struct SpeechFrontEnd {
    /// Mel model planned for the first chunk (1280 samples, 5 frames).
    mel_first: OnnxPlan,
    /// Mel model planned for every later chunk (1760 samples, 8 frames).
    mel: OnnxPlan,
    /// The embedding model, windowed or streaming.
    embedder: Embedder,
    /// The last `MEL_CONTEXT` samples of the previous chunk, as f32.
    context: [f32; MEL_CONTEXT],
    /// Whether a chunk has been seen (the first one has no context).
    primed: bool,
    /// Ring of the last 76 mel frames, `MEL_BINS` values each.
    mel_ring: Ring,
    /// Ring of the last embeddings, as many as the widest head needs (or,
    /// cut, of the last rows).
    embeddings: Ring,
    /// Scratch for one mel model output (8 frames).
    mel_out: [f32; FRAMES_PER_CHUNK * MEL_BINS],
    /// The embedding (or row) of silence, openWakeWord's starting history.
    silence: Vec<f32>,
    /// Items added to the ring since the last reset (the rest is silence).
    emitted: u64,
}

impl SpeechFrontEnd {
    /// Loads `melspectrogram.onnx` and `embedding_model.onnx` from `dir` and
    /// keeps `history` embeddings (at least the widest head's window).
    pub fn load(dir: &Path, history: usize, mode: EmbeddingMode) -> Result<Self, ModelError> {
        Self::load_files(
            &dir.join("melspectrogram.onnx"),
            &dir.join("embedding_model.onnx"),
            history,
            mode,
        )
    }

    /// Like [`SpeechFrontEnd::load`] with explicit file paths.
    pub fn load_files(
        mel: &Path,
        embedding: &Path,
        history: usize,
        mode: EmbeddingMode,
    ) -> Result<Self, ModelError> {
        let embedder = match mode {
            EmbeddingMode::Windowed => {
                Embedder::Windowed(OnnxPlan::load(embedding, &[&[1, MEL_WINDOW, MEL_BINS, 1]])?)
            }
            EmbeddingMode::Streaming => {
                Embedder::streaming(pulse::load(embedding, MEL_BINS, FRAMES_PER_CHUNK)?)
            }
        };
        Self::with_embedder(mel, embedder, history)
    }

    /// The streaming front end cut before the embedding model's convolution
    /// named `layer` (e.g. "conv2d_15"): the ring keeps that layer's input,
    /// one row ([bands, channels] values) per time step of the layer, the
    /// newest `history` rows. The rows of silence fill it at the start.
    pub fn load_cut(
        mel: &Path,
        embedding: &Path,
        history: usize,
        layer: &str,
    ) -> Result<Self, ModelError> {
        let net = pulse::load_cut(embedding, MEL_BINS, FRAMES_PER_CHUNK, Some(layer))?;
        Self::with_embedder(mel, Embedder::streaming(net), history)
    }

    fn with_embedder(
        mel: &Path,
        mut embedder: Embedder,
        history: usize,
    ) -> Result<Self, ModelError> {
        let mel_first = OnnxPlan::load(mel, &[&[1, CHUNK_SAMPLES]])?;
        let mut mel = OnnxPlan::load(mel, &[&[1, MEL_INPUT]])?;
        let silence = silence_embedding(&mut mel, &mut embedder)?;
        let mut front = SpeechFrontEnd {
            mel_first,
            mel,
            embedder,
            context: [0.0; MEL_CONTEXT],
            primed: false,
            mel_ring: Ring::new(MEL_WINDOW, MEL_BINS),
            embeddings: Ring::new(history.max(1), silence.len()),
            mel_out: [0.0; FRAMES_PER_CHUNK * MEL_BINS],
            silence,
            emitted: 0,
        };
        front.reset()?;
        Ok(front)
    }

    /// Chunks between a chunk's arrival and its embedding (0 windowed, 1 streaming).
    pub fn lag_chunks(&self) -> u64 {
        match self.embedder {
            Embedder::Windowed(_) => 0,
            Embedder::Streaming { .. } => 1,
        }
    }

    /// Returns to the state after loading: mel ring of ones, embedding ring
    /// filled with the embedding of silence (as openWakeWord starts).
    pub fn reset(&mut self) -> Result<(), ModelError> {
        self.primed = false;
        self.emitted = 0;
        self.context = [0.0; MEL_CONTEXT];
        for _ in 0..self.embeddings.capacity() {
            self.embeddings.push(&self.silence);
        }
        self.mel_ring.fill(1.0);
        if let Embedder::Streaming {
            net,
            pending,
            pulses,
            ..
        } = &mut self.embedder
        {
            net.plan.reset_state()?;
            *pulses = 0;
            // The stream starts with the ones openWakeWord's first window
            // holds, so that window k of the network is the window of chunk k.
            pending.clear();
            pending.resize((MEL_WINDOW - FIRST_FRAMES) * MEL_BINS, 1.0);
        }
        Ok(())
    }

    /// Feeds one chunk of exactly [`CHUNK_SAMPLES`] 16 kHz samples. Returns
    /// whether a new embedding was added (always when windowed; streaming
    /// adds the previous chunk's).
    pub fn push_chunk(&mut self, chunk: &[i16]) -> Result<bool, ModelError> {
        if chunk.len() != CHUNK_SAMPLES {
            return Err(ModelError::Input(format!(
                "a chunk is {CHUNK_SAMPLES} samples at {SAMPLE_RATE} Hz, got {}",
                chunk.len()
            )));
        }
        let (plan, frames) = if self.primed {
            let input = self.mel.input_mut(0)?;
            input[..MEL_CONTEXT].copy_from_slice(&self.context);
            for (dst, s) in input[MEL_CONTEXT..].iter_mut().zip(chunk) {
                *dst = f32::from(*s);
            }
            (&mut self.mel, FRAMES_PER_CHUNK)
        } else {
            let input = self.mel_first.input_mut(0)?;
            for (dst, s) in input.iter_mut().zip(chunk) {
                *dst = f32::from(*s);
            }
            (&mut self.mel_first, FIRST_FRAMES)
        };
        let values = frames * MEL_BINS;
        let outputs = plan.run()?;
        plan.read_output(&outputs, 0, &mut self.mel_out[..values])?;
        drop(outputs);
        for (dst, s) in self
            .context
            .iter_mut()
            .zip(&chunk[CHUNK_SAMPLES - MEL_CONTEXT..])
        {
            *dst = f32::from(*s);
        }
        self.primed = true;
        for v in &mut self.mel_out[..values] {
            *v = *v / 10.0 + 2.0;
        }
        match &mut self.embedder {
            Embedder::Windowed(plan) => {
                for frame in self.mel_out[..values].chunks_exact(MEL_BINS) {
                    self.mel_ring.push(frame);
                }
                self.mel_ring.copy_last(MEL_WINDOW, plan.input_mut(0)?);
                let outputs = plan.run()?;
                let embedding = embedding_of(plan.name(), &outputs)?;
                self.embeddings.push(embedding);
                self.emitted += 1;
                Ok(true)
            }
            Embedder::Streaming {
                net,
                pending,
                pulses,
                items,
            } => {
                pending.extend_from_slice(&self.mel_out[..values]);
                let pulse = FRAMES_PER_CHUNK * MEL_BINS;
                let steps = net.shape[2];
                let width = items.len() / steps;
                let mut fed = 0;
                let mut added = false;
                while pending.len() - fed >= pulse {
                    net.plan
                        .input_mut(0)?
                        .copy_from_slice(&pending[fed..fed + pulse]);
                    fed += pulse;
                    let outputs = net.plan.run()?;
                    rearrange(net, &outputs, items)?;
                    drop(outputs);
                    for (s, item) in items.chunks_exact(width).enumerate() {
                        // This item's place in the stream, counting from its first real step.
                        if *pulses * steps as u64 + s as u64 >= net.delay as u64 {
                            self.embeddings.push(item);
                            self.emitted += 1;
                            added = true;
                        }
                    }
                    *pulses += 1;
                }
                pending.drain(..fed);
                Ok(added)
            }
        }
    }

    /// The newest embedding.
    pub fn latest_embedding(&self) -> &[f32] {
        self.embeddings.last()
    }

    /// Copies the newest `rows` embeddings, oldest first, into `out`
    /// (`rows * EMBEDDING_DIM` values, or rows of [`Self::width`] when cut;
    /// `rows` at most [`Self::history`]).
    pub fn copy_history(&self, rows: usize, out: &mut [f32]) -> Result<(), ModelError> {
        if rows > self.history() || out.len() != rows * self.width() {
            return Err(ModelError::Input(format!(
                "asked for {rows} embeddings into {} values; {} are kept",
                out.len(),
                self.history()
            )));
        }
        self.embeddings.copy_last(rows, out);
        Ok(())
    }

    /// How many embeddings are kept for the heads.
    pub fn history(&self) -> usize {
        self.embeddings.capacity()
    }

    /// Items (embeddings, or rows when cut) the stream has made since the
    /// last reset; older places in the history hold silence's.
    pub fn emitted(&self) -> u64 {
        self.emitted
    }

    /// The item the history starts with: the embedding of silence (cut:
    /// the row of silence).
    pub fn silence(&self) -> &[f32] {
        &self.silence
    }

    /// Values per kept item: [`EMBEDDING_DIM`], or a cut layer's row.
    pub fn width(&self) -> usize {
        self.embeddings.width
    }
}

impl Embedder {
    fn streaming(net: PulsedEmbedding) -> Self {
        let [_, channels, steps, bands] = net.shape;
        Embedder::Streaming {
            net,
            pending: Vec::with_capacity((MEL_WINDOW + FRAMES_PER_CHUNK) * MEL_BINS),
            pulses: 0,
            items: vec![0.0; channels * steps * bands],
        }
    }
}

/// A pulse's output [1, channels, steps, bands] as [steps, bands, channels].
fn rearrange(
    net: &PulsedEmbedding,
    outputs: &TVec<TValue>,
    items: &mut [f32],
) -> Result<(), ModelError> {
    let [_, channels, steps, bands] = net.shape;
    let out = output_slice(net.plan.name(), outputs, 0)?;
    if out.len() != items.len() {
        return Err(ModelError::Shape {
            model: net.plan.name().to_string(),
            reason: format!(
                "expected {} values per pulse, got {}",
                items.len(),
                out.len()
            ),
        });
    }
    for c in 0..channels {
        for s in 0..steps {
            for b in 0..bands {
                items[(s * bands + b) * channels + c] = out[(c * steps + s) * bands + b];
            }
        }
    }
    Ok(())
}

/// The embedding (or row) of silence, computed by the embedder in use: the
/// mel of zeros is the same frame everywhere, so a window (or a stream) of
/// that frame. A streaming embedder's state is reset afterwards by `reset`.
fn silence_embedding(mel: &mut OnnxPlan, embedder: &mut Embedder) -> Result<Vec<f32>, ModelError> {
    mel.input_mut(0)?.fill(0.0);
    let outputs = mel.run()?;
    let frames = output_slice(mel.name(), &outputs, 0)?;
    if frames.len() != FRAMES_PER_CHUNK * MEL_BINS {
        return Err(ModelError::Shape {
            model: mel.name().to_string(),
            reason: format!(
                "expected {} values, got {}",
                FRAMES_PER_CHUNK * MEL_BINS,
                frames.len()
            ),
        });
    }
    let mut frame = [0.0f32; MEL_BINS];
    for (dst, src) in frame.iter_mut().zip(&frames[..MEL_BINS]) {
        *dst = src / 10.0 + 2.0;
    }
    drop(outputs);
    let fill = |input: &mut [f32]| {
        input
            .chunks_exact_mut(MEL_BINS)
            .for_each(|row| row.copy_from_slice(&frame))
    };
    match embedder {
        Embedder::Windowed(plan) => {
            fill(plan.input_mut(0)?);
            let outputs = plan.run()?;
            Ok(embedding_of(plan.name(), &outputs)?.to_vec())
        }
        Embedder::Streaming { net, items, .. } => {
            // The first output step that sees only real input is step `delay`.
            let steps = net.shape[2];
            fill(net.plan.input_mut(0)?);
            for _ in 0..net.delay / steps {
                net.plan.run()?;
            }
            let outputs = net.plan.run()?;
            rearrange(net, &outputs, items)?;
            let width = items.len() / steps;
            let at = net.delay % steps * width;
            Ok(items[at..at + width].to_vec())
        }
    }
}

/// Output 0 of an embedding run, checked to be one embedding.
fn embedding_of<'a>(model: &str, outputs: &'a TVec<TValue>) -> Result<&'a [f32], ModelError> {
    let embedding = output_slice(model, outputs, 0)?;
    if embedding.len() != EMBEDDING_DIM {
        return Err(ModelError::Shape {
            model: model.to_string(),
            reason: format!(
                "expected a {EMBEDDING_DIM}-dim embedding, got {}",
                embedding.len()
            ),
        });
    }
    Ok(embedding)
}

/// One wake-word head: scores its last N embeddings.
pub struct WakeHead {
    /// Name reported in detections ("alexa", "hey_jarvis", ...).
    name: String,
    /// Plan with input fixed to [1, N, 96].
    plan: OnnxPlan,
    /// N: the number of embeddings the head reads, taken from the model.
    window: usize,
    /// Labels of the positive classes (one for binary heads; timer has six).
    labels: Vec<String>,
    /// Scores of the last run, one per label.
    scores: Vec<f32>,
    /// Runs left before scores count (openWakeWord zeroes the first five).
    warmup: u32,
}

impl WakeHead {
    /// Loads a head, reading its window N from the model's input shape.
    /// `labels` names the positive classes of a multi-class head (class 0 is
    /// "nothing"); pass an empty slice for a binary head.
    pub fn load(name: &str, path: &Path, labels: &[String]) -> Result<Self, ModelError> {
        let window = head_window(path)?;
        let plan = OnnxPlan::load(path, &[&[1, window, EMBEDDING_DIM]])?;
        let mut probe = plan;
        let outputs = probe.run()?;
        let classes = output_slice(probe.name(), &outputs, 0)?.len();
        drop(outputs);
        let labels: Vec<String> = if classes == 1 {
            vec![name.to_string()]
        } else if labels.len() == classes - 1 {
            labels.to_vec()
        } else if labels.is_empty() {
            (1..classes).map(|c| c.to_string()).collect()
        } else {
            return Err(ModelError::Shape {
                model: name.to_string(),
                reason: format!("{classes} output classes but {} labels given", labels.len()),
            });
        };
        Ok(WakeHead {
            name: name.to_string(),
            plan: probe,
            window,
            scores: vec![0.0; labels.len()],
            labels,
            warmup: WARMUP_CHUNKS,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// N, the number of embeddings this head reads.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Positive class labels, parallel to [`WakeHead::scores`].
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Scores of the last [`WakeHead::score`] call.
    pub fn scores(&self) -> &[f32] {
        &self.scores
    }

    /// Scores the newest embeddings of `front`; returns the best positive
    /// class (index into labels) and its score.
    pub fn score(&mut self, front: &SpeechFrontEnd) -> Result<(usize, f32), ModelError> {
        front
            .embeddings
            .copy_last(self.window, self.plan.input_mut(0)?);
        let outputs = self.plan.run()?;
        let out = output_slice(self.plan.name(), &outputs, 0)?;
        let positive = if out.len() == 1 { out } else { &out[1..] };
        if positive.len() != self.scores.len() {
            return Err(ModelError::Shape {
                model: self.name.clone(),
                reason: format!(
                    "output has {} values, expected {}",
                    out.len(),
                    self.scores.len()
                ),
            });
        }
        if self.warmup > 0 {
            self.warmup -= 1;
            self.scores.fill(0.0);
        } else {
            self.scores.copy_from_slice(positive);
        }
        let mut best = (0, self.scores[0]);
        for (ix, s) in self.scores.iter().enumerate() {
            if *s > best.1 {
                best = (ix, *s);
            }
        }
        Ok(best)
    }

    fn reset(&mut self) {
        self.warmup = WARMUP_CHUNKS;
        self.scores.fill(0.0);
    }
}

/// Reads N from a head's input shape [batch, N, 96].
fn head_window(path: &Path) -> Result<usize, ModelError> {
    use tract_onnx::prelude::*;
    use tract_onnx::tract_hir::infer::Factoid;
    let fail = |e: TractError| ModelError::Load {
        path: path.to_path_buf(),
        reason: crate::error::reason(&e),
    };
    let model = tract_onnx::onnx().model_for_path(path).map_err(fail)?;
    let fact = model.input_fact(0).map_err(fail)?;
    let dims: Vec<Option<usize>> = fact
        .shape
        .dims()
        .map(|d| {
            d.concretize()
                .and_then(|d| d.as_i64())
                .and_then(|n| usize::try_from(n).ok())
        })
        .collect();
    match dims.as_slice() {
        [_, Some(n), Some(EMBEDDING_DIM)] if *n > 0 => Ok(*n),
        _ => Err(ModelError::Shape {
            model: path.display().to_string(),
            reason: format!(
                "a wake-word head takes [batch, N, {EMBEDDING_DIM}] embeddings, this one takes {:?}",
                dims
            ),
        }),
    }
}

/// A head crossing its threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// Milliseconds of audio from the start of the stream to the end of the chunk that fired.
    pub t_ms: u64,
    /// Head name.
    pub model: String,
    /// Class label for multi-class heads (timer), else the head name.
    pub label: String,
    /// The score that crossed the threshold.
    pub score: f32,
}

/// The whole wake-word path: front end, heads, thresholds and a refractory
/// period so one utterance fires once.
pub struct WakeWordPipeline {
    /// Mel + embedding, shared by all heads.
    front: SpeechFrontEnd,
    /// The heads to score on every chunk.
    heads: Vec<WakeHead>,
    /// Score at or above which a head fires.
    threshold: f32,
    /// Chunks during which a head that fired stays quiet.
    refractory_chunks: u32,
    /// Per head: refractory period and a held multi-class detection.
    triggers: Vec<Trigger>,
    /// Chunks processed since start or reset.
    chunks: u64,
    /// Optional voice-activity gate: no detection without recent speech.
    vad: Option<VadGate>,
}

/// openWakeWord's VAD gate: a detection counts only if the VAD saw speech
/// 4 to 6 chunks (0.32–0.48 s) before the chunk being scored.
struct VadGate {
    /// The streaming VAD.
    vad: Vad,
    /// Minimum VAD score for detections to pass.
    threshold: f32,
    /// Chunk scores, a ring; the newest is just before `next`.
    recent: [f32; VAD_HISTORY],
    /// Where the next score goes.
    next: usize,
    /// Scores seen so far (capped at 7).
    seen: usize,
}

impl VadGate {
    /// Scores `chunk`; returns the gate value for the chunk `lag` chunks back.
    fn push(&mut self, chunk: &[i16], lag: usize) -> Result<f32, ModelError> {
        let p = self.vad.chunk_probability(chunk)?;
        self.recent[self.next] = p;
        self.next = (self.next + 1) % self.recent.len();
        self.seen = (self.seen + 1).min(self.recent.len());
        // Offsets 4..=6 chunks back from the scored chunk.
        let mut best: Option<f32> = None;
        for back in (4 + lag)..=(6 + lag).min(VAD_HISTORY - 1) {
            if back < self.seen {
                let ix = (self.next + self.recent.len() - 1 - back) % self.recent.len();
                best = Some(best.map_or(self.recent[ix], |b: f32| b.max(self.recent[ix])));
            }
        }
        Ok(best.unwrap_or(0.0))
    }

    fn reset(&mut self) {
        self.vad.reset();
        self.recent = [0.0; VAD_HISTORY];
        self.next = 0;
        self.seen = 0;
    }
}

impl WakeWordPipeline {
    /// Builds a pipeline over loaded heads.
    pub fn new(
        front: SpeechFrontEnd,
        heads: Vec<WakeHead>,
        threshold: f32,
        refractory_ms: u32,
    ) -> Result<Self, ModelError> {
        if let Some(h) = heads.iter().find(|h| h.window() > front.history()) {
            return Err(ModelError::Input(format!(
                "head {} reads {} embeddings but the front end keeps {}",
                h.name(),
                h.window(),
                front.history()
            )));
        }
        if !(0.0..=1.0).contains(&threshold) {
            return Err(ModelError::Input(format!(
                "threshold must be within 0..=1, got {threshold}"
            )));
        }
        let chunk_ms = (CHUNK_SAMPLES as u32 * 1000) / SAMPLE_RATE;
        Ok(WakeWordPipeline {
            triggers: vec![Trigger::default(); heads.len()],
            front,
            heads,
            threshold,
            refractory_chunks: refractory_ms.div_ceil(chunk_ms),
            chunks: 0,
            vad: None,
        })
    }

    /// Gates detections on voice activity: a head fires only if the VAD
    /// scored at least `threshold` shortly before.
    pub fn with_vad(mut self, vad: Vad, threshold: f32) -> Self {
        self.vad = Some(VadGate {
            vad,
            threshold,
            recent: [0.0; VAD_HISTORY],
            next: 0,
            seen: 0,
        });
        self
    }

    /// The latest VAD gate score, if a VAD is attached.
    pub fn vad_score(&self) -> Option<f32> {
        self.vad.as_ref().map(|g| {
            let ix = (g.next + g.recent.len() - 1) % g.recent.len();
            g.recent[ix]
        })
    }

    /// The heads, with the scores of the last chunk.
    pub fn heads(&self) -> &[WakeHead] {
        &self.heads
    }

    /// The front end (for its embeddings).
    pub fn front(&self) -> &SpeechFrontEnd {
        &self.front
    }

    /// Milliseconds of audio processed so far.
    pub fn elapsed_ms(&self) -> u64 {
        self.chunks * CHUNK_MS
    }

    /// Processes one chunk and calls `on_detection` for each head that fires.
    pub fn process_chunk(
        &mut self,
        chunk: &[i16],
        mut on_detection: impl FnMut(Detection),
    ) -> Result<(), ModelError> {
        let fresh = self.front.push_chunk(chunk)?;
        self.chunks += 1;
        let lag = self.front.lag_chunks();
        let speech = match &mut self.vad {
            Some(gate) => gate.push(chunk, lag as usize)? >= gate.threshold,
            None => true,
        };
        if !fresh {
            return Ok(());
        }
        // The time of the chunk the new embedding belongs to.
        let t_ms = self.chunks.saturating_sub(lag) * CHUNK_MS;
        for (head, trigger) in self.heads.iter_mut().zip(self.triggers.iter_mut()) {
            let (class, score) = head.score(&self.front)?;
            if trigger.quiet > 0 {
                trigger.quiet -= 1;
                continue;
            }
            let over = speech && score >= self.threshold;
            let multi_class = head.labels.len() > 1;
            match &mut trigger.held {
                // A multi-class head (timer) crosses the threshold on "set a
                // timer" before the words that decide its class ("... for
                // five minutes"): hold the detection for a while and report
                // the best class seen.
                Some(held) if held.left > 0 => {
                    held.left -= 1;
                    if speech && score > held.score {
                        (held.class, held.score) = (class, score);
                    }
                }
                Some(_) => trigger.fire(head, self.refractory_chunks, &mut on_detection),
                None if over && multi_class => {
                    trigger.held = Some(Held {
                        t_ms,
                        class,
                        score,
                        left: MAX_HOLD_CHUNKS,
                    });
                }
                None if over => {
                    trigger.held = Some(Held {
                        t_ms,
                        class,
                        score,
                        left: 0,
                    });
                    trigger.fire(head, self.refractory_chunks, &mut on_detection);
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Reports detections still held at the end of a stream.
    pub fn flush(&mut self, mut on_detection: impl FnMut(Detection)) {
        for (head, trigger) in self.heads.iter().zip(self.triggers.iter_mut()) {
            trigger.fire(head, self.refractory_chunks, &mut on_detection);
        }
    }

    /// Forgets all audio: back to the state after loading.
    pub fn reset(&mut self) -> Result<(), ModelError> {
        self.front.reset()?;
        self.heads.iter_mut().for_each(WakeHead::reset);
        self.triggers.fill(Trigger::default());
        self.chunks = 0;
        if let Some(gate) = &mut self.vad {
            gate.reset();
        }
        Ok(())
    }
}

/// How long a multi-class detection is held for its class to settle (1.2 s).
const MAX_HOLD_CHUNKS: u32 = 15;

/// Per-head firing state.
#[derive(Debug, Clone, Default)]
struct Trigger {
    /// Chunks left in the refractory period after firing.
    quiet: u32,
    /// A detection not reported yet.
    held: Option<Held>,
}

/// A detection being held: where it started and the best class so far.
#[derive(Debug, Clone)]
struct Held {
    t_ms: u64,
    class: usize,
    score: f32,
    /// Chunks it may still be held.
    left: u32,
}

impl Trigger {
    /// Reports the held detection, if any, and starts the refractory period.
    fn fire(&mut self, head: &WakeHead, refractory: u32, on_detection: &mut impl FnMut(Detection)) {
        if let Some(held) = self.held.take() {
            self.quiet = refractory;
            on_detection(Detection {
                t_ms: held.t_ms,
                model: head.name.clone(),
                label: head.labels[held.class].clone(),
                score: held.score,
            });
        }
    }
}

/// A fixed-capacity ring of fixed-width rows.
struct Ring {
    /// Row storage, `capacity * width` values.
    data: Vec<f32>,
    /// Values per row.
    width: usize,
    /// Index of the row the next push overwrites.
    next: usize,
}

impl Ring {
    fn new(capacity: usize, width: usize) -> Self {
        Ring {
            data: vec![0.0; capacity * width],
            width,
            next: 0,
        }
    }

    fn capacity(&self) -> usize {
        self.data.len() / self.width
    }

    fn fill(&mut self, v: f32) {
        self.data.fill(v);
        self.next = 0;
    }

    fn push(&mut self, row: &[f32]) {
        let at = self.next * self.width;
        self.data[at..at + self.width].copy_from_slice(&row[..self.width]);
        self.next = (self.next + 1) % self.capacity();
    }

    fn last(&self) -> &[f32] {
        let ix = (self.next + self.capacity() - 1) % self.capacity();
        &self.data[ix * self.width..(ix + 1) * self.width]
    }

    /// Copies the newest `rows` rows, oldest first, into `out`.
    fn copy_last(&self, rows: usize, out: &mut [f32]) {
        let cap = self.capacity();
        let rows = rows.min(cap);
        let start = (self.next + cap - rows) % cap;
        let first = rows.min(cap - start);
        let w = self.width;
        out[..first * w].copy_from_slice(&self.data[start * w..(start + first) * w]);
        out[first * w..rows * w].copy_from_slice(&self.data[..(rows - first) * w]);
    }
}

#[cfg(test)]
mod tests {
    use super::Ring;

    #[test]
    fn ring_returns_newest_rows_oldest_first_across_the_wrap() {
        let mut ring = Ring::new(3, 2);
        for i in 0..5 {
            ring.push(&[i as f32, -(i as f32)]);
        }
        let mut out = [0.0; 6];
        ring.copy_last(3, &mut out);
        assert_eq!(out, [2.0, -2.0, 3.0, -3.0, 4.0, -4.0]);
        let mut two = [0.0; 4];
        ring.copy_last(2, &mut two);
        assert_eq!(two, [3.0, -3.0, 4.0, -4.0]);
        assert_eq!(ring.last(), &[4.0, -4.0]);
    }
}
