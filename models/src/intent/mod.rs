//! Speech to intent with no transcript: a command's speech embeddings in,
//! an intent with slot values out.
//!
//! - [`grammar`]: contexts in Picovoice Rhino's YAML format, sampled for
//!   training and matched against text.
//! - [`CommandFront`]: the streaming front end (mel + speech embedding, the
//!   wake-word path's own code) reset at the start of a command, fed chunk
//!   by chunk, read at its end. Training computes its features through the
//!   same type, so the model never sees features inference would not make.
//! - [`net`]: the network and its training; [`onnx`] writes it as ONNX.
//! - [`IntentModel`]: the exported model on tract, with its labels.

pub mod embedding_top;
pub mod grammar;
pub mod net;
pub mod onnx;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::CHUNK_SAMPLES;
use crate::error::ModelError;
use crate::plan::OnnxPlan;
use crate::wake::{EMBEDDING_DIM, EmbeddingMode, SpeechFrontEnd};
use embedding_top::Depth;

/// Embeddings an intent model looks at: 64 × 80 ms = 5.12 s of audio, the
/// newest at the end.
pub const FRAMES: usize = 64;
/// Chunks of silence pushed after a command so the streaming embedder has
/// emitted the embeddings of its last words (one chunk of lag, plus the
/// 76-frame window reaching past the end).
pub const TAIL_CHUNKS: usize = 3;
/// File names in a model directory.
pub const MODEL_FILE: &str = "intent.onnx";
pub const LABELS_FILE: &str = "labels.json";
/// Version of `labels.json`.
pub const LABELS_FORMAT: u32 = 1;

/// The label vocabulary of a trained model (`labels.json`).
///
/// Head 0 has one class per intent, then "none" (out of grammar). Head
/// `1 + s` has "absent" (class 0), then slot `s`'s values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Labels {
    pub format: u32,
    /// Embeddings per input.
    pub frames: usize,
    pub intents: Vec<String>,
    pub slots: Vec<SlotLabels>,
    /// Per intent: the slot heads it may fill.
    pub intent_slots: Vec<Vec<usize>>,
    /// Score below which a command is reported as not understood.
    pub threshold: f32,
    /// Per intent (by name), a threshold of its own that replaces
    /// `threshold` for that intent: what the trainer calibrated where
    /// one threshold for all would refuse commands of an intent that no
    /// negative comes near. Intents not listed use `threshold`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub intent_thresholds: BTreeMap<String, f32>,
    /// sha256 of the context file the model was trained on.
    pub grammar_sha256: String,
    /// Which features the model reads (absent in older files: embeddings).
    #[serde(default, skip_serializing_if = "Front::is_plain")]
    pub front: Front,
}

/// The features an intent model reads, and so the front end it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Front {
    /// The newest [`FRAMES`] speech embeddings ([`FEATURES`] values):
    /// [`CommandFront::load`].
    #[default]
    Embeddings,
    /// The rows before conv2d_15 and the real-window mask
    /// ([`Front::features`] values): [`CommandFront::load_cut`]. The model
    /// holds its own trained copy of the embedding's top from there.
    Cut,
    /// As `Cut`, the rows before conv2d_13.
    Cut13,
    /// As `Cut`, the rows before conv2d_11.
    Cut11,
}

impl Front {
    fn is_plain(&self) -> bool {
        *self == Front::Embeddings
    }

    /// The front of a model holding the embedding's top from `depth`.
    pub fn cut(depth: Depth) -> Front {
        match depth {
            Depth::From15 => Front::Cut,
            Depth::From13 => Front::Cut13,
            Depth::From11 => Front::Cut11,
        }
    }

    /// Where the embedding model is cut (`None`: it is not).
    pub fn depth(self) -> Option<Depth> {
        match self {
            Front::Embeddings => None,
            Front::Cut => Some(Depth::From15),
            Front::Cut13 => Some(Depth::From13),
            Front::Cut11 => Some(Depth::From11),
        }
    }

    /// Rows of the cut embedding model in one input: the ones the
    /// [`FRAMES`] windows span (0 when not cut).
    pub fn rows(self) -> usize {
        self.depth().map_or(0, |d| d.rows_for(FRAMES))
    }

    /// Values in one input: [`FEATURES`], or cut the rows, then one value
    /// per window (1: the window holds the command's stream; 0: the
    /// embedding of silence stands there).
    pub fn features(self) -> usize {
        match self.depth() {
            None => FEATURES,
            Some(d) => self.rows() * d.row() + FRAMES,
        }
    }
}

/// One slot head's classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotLabels {
    pub name: String,
    pub values: Vec<String>,
}

impl Labels {
    /// Classes of each head, in the network's order.
    pub fn head_sizes(&self) -> Vec<usize> {
        std::iter::once(self.intents.len() + 1)
            .chain(self.slots.iter().map(|s| s.values.len() + 1))
            .collect()
    }

    /// The threshold of intent `intent` (an index into `intents`).
    pub fn threshold_of(&self, intent: usize) -> f32 {
        self.intents
            .get(intent)
            .and_then(|name| self.intent_thresholds.get(name))
            .copied()
            .unwrap_or(self.threshold)
    }

    /// Reads what every head's probabilities mean.
    pub fn decode(&self, probs: &[Vec<f32>]) -> Understanding {
        let intent_probs = &probs[0];
        let best = net::argmax(intent_probs);
        let mut score = intent_probs[best];
        if best >= self.intents.len() {
            return Understanding {
                understood: false,
                intent: None,
                slots: Vec::new(),
                score,
            };
        }
        let mut slots = Vec::new();
        for &s in &self.intent_slots[best] {
            let p = &probs[1 + s];
            let v = net::argmax(p);
            score *= p[v];
            if v > 0 {
                slots.push((
                    self.slots[s].name.clone(),
                    self.slots[s].values[v - 1].clone(),
                ));
            }
        }
        Understanding {
            understood: score >= self.threshold_of(best),
            intent: Some(self.intents[best].clone()),
            slots,
            score,
        }
    }
}

/// What a command meant.
#[derive(Debug, Clone, PartialEq)]
pub struct Understanding {
    /// An intent of the grammar scored at or above its threshold.
    pub understood: bool,
    /// The most likely intent (`None` when "out of grammar" won).
    pub intent: Option<String>,
    /// Slot name and value (the grammar's phrase), in the grammar's order.
    pub slots: Vec<(String, String)>,
    /// Probability of the intent times that of each slot's choice.
    pub score: f32,
}

/// The front end for commands: reset when a command starts, fed chunks as
/// they arrive, read once when it ends.
pub struct CommandFront {
    front: SpeechFrontEnd,
    silence: [i16; CHUNK_SAMPLES],
    partial: Vec<i16>,
    /// Cut: where, and the newest rows, one more than the features hold
    /// (allocated once).
    rows: Option<(Depth, Vec<f32>)>,
}

/// Rows the cut stream runs ahead of the embeddings: the newest row belongs
/// to a window whose embedding has not come out yet.
const LEAD_ROWS: usize = 1;

impl CommandFront {
    /// Loads the mel and embedding models (streaming embedding): the
    /// features are the newest [`FRAMES`] embeddings ([`FEATURES`] values).
    pub fn load(mel: &Path, embedding: &Path) -> Result<Self, ModelError> {
        Ok(CommandFront {
            front: SpeechFrontEnd::load_files(mel, embedding, FRAMES, EmbeddingMode::Streaming)?,
            silence: [0; CHUNK_SAMPLES],
            partial: Vec::with_capacity(CHUNK_SAMPLES),
            rows: None,
        })
    }

    /// The item the history starts with: the embedding of silence (cut:
    /// the row of silence).
    pub fn silence(&self) -> &[f32] {
        self.front.silence()
    }

    /// The front end a model reading `front` needs.
    pub fn load_for(front: Front, mel: &Path, embedding: &Path) -> Result<Self, ModelError> {
        match front.depth() {
            None => Self::load(mel, embedding),
            Some(depth) => Self::load_cut(mel, embedding, depth),
        }
    }

    /// The front end cut before `depth`'s first layer: the features are
    /// the rows the newest [`FRAMES`] windows span, from which
    /// [`embedding_top::EmbeddingTop`] makes those windows' embeddings,
    /// then which windows are real ([`Front::features`] values).
    pub fn load_cut(mel: &Path, embedding: &Path, depth: Depth) -> Result<Self, ModelError> {
        let keep = Front::cut(depth).rows() + LEAD_ROWS;
        let front = SpeechFrontEnd::load_cut(mel, embedding, keep, &depth.cut_layer())?;
        if front.width() != depth.row() {
            return Err(ModelError::Shape {
                model: embedding.display().to_string(),
                reason: format!(
                    "the input of {} has {} values per row, not {}",
                    depth.cut_layer(),
                    front.width(),
                    depth.row()
                ),
            });
        }
        Ok(CommandFront {
            front,
            silence: [0; CHUNK_SAMPLES],
            partial: Vec::with_capacity(CHUNK_SAMPLES),
            rows: Some((depth, vec![0.0; keep * depth.row()])),
        })
    }

    /// How many of the newest [`FRAMES`] windows hold the command's stream
    /// (the older ones are the silence the history starts with). Cut, the
    /// rows of the others are silence's and the stream's start mixed, so a
    /// model on rows uses the embedding of silence for them instead.
    pub fn real_windows(&self) -> usize {
        let emitted = self.front.emitted() as usize;
        let windows = match &self.rows {
            Some((depth, _)) => {
                emitted.saturating_sub(depth.extra_rows() + LEAD_ROWS)
                    / embedding_top::ROWS_PER_STEP
            }
            None => emitted,
        };
        windows.min(FRAMES)
    }

    /// The features `finish` writes.
    pub fn front(&self) -> Front {
        match &self.rows {
            Some((depth, _)) => Front::cut(*depth),
            None => Front::Embeddings,
        }
    }

    /// Values `finish` writes ([`Front::features`]).
    pub fn features(&self) -> usize {
        self.front().features()
    }

    /// Starts a command: the history is silence again.
    pub fn begin(&mut self) -> Result<(), ModelError> {
        self.partial.clear();
        self.front.reset()
    }

    /// Feeds audio of any length (16 kHz mono); whole chunks go through at once.
    pub fn push(&mut self, samples: &[i16]) -> Result<(), ModelError> {
        let mut rest = samples;
        if !self.partial.is_empty() {
            let take = (CHUNK_SAMPLES - self.partial.len()).min(rest.len());
            self.partial.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.partial.len() < CHUNK_SAMPLES {
                return Ok(());
            }
            let chunk = std::mem::take(&mut self.partial);
            self.front.push_chunk(&chunk)?;
            self.partial = chunk;
            self.partial.clear();
        }
        let mut chunks = rest.chunks_exact(CHUNK_SAMPLES);
        for chunk in &mut chunks {
            self.front.push_chunk(chunk)?;
        }
        self.partial.extend_from_slice(chunks.remainder());
        Ok(())
    }

    /// Ends the command: pads the last chunk and [`TAIL_CHUNKS`] of
    /// silence, then copies the newest [`FRAMES`] embeddings (or their
    /// rows) into `out` ([`CommandFront::features`] values).
    pub fn finish(&mut self, out: &mut [f32]) -> Result<(), ModelError> {
        if !self.partial.is_empty() {
            self.partial.resize(CHUNK_SAMPLES, 0);
            let chunk = std::mem::take(&mut self.partial);
            self.front.push_chunk(&chunk)?;
            self.partial = chunk;
            self.partial.clear();
        }
        for _ in 0..TAIL_CHUNKS {
            self.front.push_chunk(&self.silence)?;
        }
        let front = self.front();
        match &mut self.rows {
            None => self.front.copy_history(FRAMES, out),
            Some((depth, rows)) => {
                if out.len() != front.features() {
                    return Err(ModelError::Input(format!(
                        "the cut features are {} values, got room for {}",
                        front.features(),
                        out.len()
                    )));
                }
                let values = front.rows() * depth.row();
                self.front.copy_history(front.rows() + LEAD_ROWS, rows)?;
                let (out_rows, mask) = out.split_at_mut(values);
                out_rows.copy_from_slice(&rows[..values]);
                let real = self.real_windows();
                for (w, m) in mask.iter_mut().enumerate() {
                    *m = if w >= FRAMES - real { 1.0 } else { 0.0 };
                }
                Ok(())
            }
        }
    }

    /// `begin`, `push(samples)`, `finish`: the features of a whole clip.
    pub fn features_of(&mut self, samples: &[i16], out: &mut [f32]) -> Result<(), ModelError> {
        self.begin()?;
        self.push(samples)?;
        self.finish(out)
    }
}

/// Values in one feature matrix.
pub const FEATURES: usize = FRAMES * EMBEDDING_DIM;

/// A trained intent model on tract.
pub struct IntentModel {
    labels: Labels,
    plan: OnnxPlan,
}

impl IntentModel {
    /// Loads `intent.onnx` and `labels.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let labels_path = dir.join(LABELS_FILE);
        let load_err = |path: PathBuf, reason: String| ModelError::Load { path, reason };
        let text = std::fs::read_to_string(&labels_path)
            .map_err(|e| load_err(labels_path.clone(), e.to_string()))?;
        let labels: Labels = serde_json::from_str(&text)
            .map_err(|e| load_err(labels_path.clone(), format!("not a kith labels file: {e}")))?;
        if labels.format != LABELS_FORMAT {
            return Err(load_err(
                labels_path,
                format!(
                    "labels format {} (this kith reads {LABELS_FORMAT}): retrain with `kith intent train`",
                    labels.format
                ),
            ));
        }
        if labels.frames != FRAMES
            || labels.intent_slots.len() != labels.intents.len()
            || labels
                .intent_slots
                .iter()
                .flatten()
                .any(|&s| s >= labels.slots.len())
        {
            return Err(load_err(labels_path, "inconsistent labels".to_string()));
        }
        let thresholds = std::iter::once(("threshold", &labels.threshold)).chain(
            labels
                .intent_thresholds
                .iter()
                .map(|(name, t)| (name.as_str(), t)),
        );
        for (name, t) in thresholds {
            if !(0.0..=1.0).contains(t) {
                return Err(load_err(
                    labels_path,
                    format!("the threshold of {name} is {t}: thresholds are within 0..=1"),
                ));
            }
        }
        if let Some(name) = labels
            .intent_thresholds
            .keys()
            .find(|name| !labels.intents.contains(name))
        {
            return Err(load_err(
                labels_path,
                format!("intent_thresholds names {name:?}, not an intent of this model"),
            ));
        }
        let model_path = dir.join(MODEL_FILE);
        let front = labels.front;
        let mut plan = match front.depth() {
            None => OnnxPlan::load(&model_path, &[&[1, FRAMES, EMBEDDING_DIM]])?,
            Some(d) => OnnxPlan::load(&model_path, &[&[1, front.rows(), d.row()], &[1, FRAMES]])?,
        };
        // Check the outputs against the labels once, on silence.
        plan.input_mut(0)?.fill(0.0);
        if front.depth().is_some() {
            plan.input_mut(1)?.fill(0.0);
        }
        let outs = plan.run_to_vecs()?;
        let sizes = labels.head_sizes();
        if outs.len() != sizes.len() || outs.iter().zip(&sizes).any(|(o, &k)| o.len() != k) {
            return Err(ModelError::Shape {
                model: model_path.display().to_string(),
                reason: format!(
                    "outputs {:?} do not match labels.json's heads {sizes:?}",
                    outs.iter().map(Vec::len).collect::<Vec<_>>()
                ),
            });
        }
        Ok(IntentModel { labels, plan })
    }

    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    /// The features this model reads.
    pub fn front(&self) -> Front {
        self.labels.front
    }

    /// Takes `from`'s thresholds (for all, and each intent's own) in place
    /// of its own.
    pub fn set_thresholds(&mut self, from: &Labels) {
        self.labels.threshold = from.threshold;
        self.labels.intent_thresholds = from.intent_thresholds.clone();
    }

    /// Every head's probabilities for one input ([`Front::features`] values).
    pub fn probabilities(&mut self, features: &[f32]) -> Result<Vec<Vec<f32>>, ModelError> {
        let expected = self.labels.front.features();
        if features.len() != expected {
            return Err(ModelError::Input(format!(
                "intent features are {expected} values, got {}",
                features.len()
            )));
        }
        match self.labels.front.depth() {
            None => self.plan.input_mut(0)?.copy_from_slice(features),
            Some(_) => {
                let (rows, mask) = features.split_at(features.len() - FRAMES);
                self.plan.input_mut(0)?.copy_from_slice(rows);
                self.plan.input_mut(1)?.copy_from_slice(mask);
            }
        }
        self.plan.run_to_vecs()
    }

    /// What a command's features mean.
    pub fn infer(&mut self, features: &[f32]) -> Result<Understanding, ModelError> {
        let probs = self.probabilities(features)?;
        Ok(self.labels.decode(&probs))
    }
}
