//! `kith intent train`: a context grammar in, a speech-to-intent model out.
//!
//! 1. Sample sentences from the grammar, balanced over intents and slot
//!    values, plus "not understood" examples: everyday sentences no command
//!    grammar holds, shuffled grammar words, and noise alone (no speech).
//! 2. Speak each with a random training voice, rate and pitch; place it in
//!    a clip with noise (0–30 dB SNR), reverb and a gain change.
//! 3. Compute features with [`CommandFront`], the code inference runs.
//! 4. Train the network, export it to ONNX, load it back on tract, and
//!    measure it on held-out voices, rates and sentences at several SNRs.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use kith_models::intent::embedding_top::{Depth, EmbeddingTop};
use kith_models::intent::grammar::{Grammar, HoldOut, Rng, Utterance};
use kith_models::intent::net::{Example, Net, Shape, TrainOptions as NetOptions};
use kith_models::intent::{
    CommandFront, FRAMES, Front, IntentModel, LABELS_FILE, LABELS_FORMAT, Labels, MODEL_FILE,
    SlotLabels, onnx,
};
use kith_models::wake::EMBEDDING_DIM;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod calibrate;
mod thresholds;

pub use calibrate::{CalibrateOptions, Recalibration, Thresholds, recalibrate};
pub use thresholds::FALSE_ACCEPT_BUDGET;

use thresholds::{
    Answers, INTENT_THRESHOLD_FLOOR, ThresholdClips, calibrate, kind_shares, loudest_negatives,
};

use super::augment::{self, NoiseBank, NoiseKind, Recipe};
use super::voices::{self, Split, Voice, VoiceSet};
use crate::progress::Bar;

/// Everyday sentences for "not understood" examples, in fours: two lines
/// train, one calibrates the threshold, one tests (see [`Part`]).
const OUT_OF_GRAMMAR: &str = include_str!("out_of_grammar.txt");
/// Clips of each calibration sentence, each by another training voice in
/// another training recipe.
const CALIBRATION_CLIPS_PER_SENTENCE: usize = 3;
/// Commands training never spoke, per intent, that the thresholds are set
/// on beside the validation's (see [`calibration_commands`])...
const CALIBRATION_COMMANDS_PER_INTENT: usize = 20;
/// ...each heard this many times, by another training voice in another
/// training recipe.
const CLIPS_PER_CALIBRATION_COMMAND: usize = 2;
/// The test's SNRs (dB), after the clean condition.
pub const TEST_SNRS: [f32; 4] = [24.0, 18.0, 12.0, 6.0];
/// Clips of a slot value in a foreign carrier, per 100 training sentences.
const VALUE_CLIPS_PERCENT: usize = 40;
/// Longest speech kept for training, in samples: the model sees 5.12 s.
const MAX_SPEECH: usize = 4_600 * 16;

/// What to train.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub context: PathBuf,
    pub out: PathBuf,
    /// Directories of WAV noise recordings to mix in.
    pub noise_dirs: Vec<PathBuf>,
    /// In-grammar training sentences.
    pub utterances: usize,
    /// Held-out test sentences (each heard clean and at every test SNR).
    pub test_utterances: usize,
    pub epochs: usize,
    /// Channels of the network's convolutions.
    pub channels: usize,
    /// Dilation of each convolution layer.
    pub dilations: Vec<usize>,
    /// Networks trained on the same clips from different initial weights
    /// and batch orders; the exported model averages their probabilities.
    pub members: usize,
    pub threads: usize,
    pub seed: u64,
    /// Where rendered features are kept for later runs (`None`: nowhere).
    pub cache: Option<PathBuf>,
    /// Train the speech embedding's layers from this depth on with the
    /// network (the model then reads the cut front end's rows there:
    /// [`Front::cut`]); `None`: the embedding stays frozen.
    pub tune_front: Option<Depth>,
    /// With `tune_front`: of the epochs, how many (the last) train the
    /// embedding's layers (`None`: all).
    pub front_epochs: Option<usize>,
    /// The share of out-of-grammar audio the thresholds may accept.
    pub false_accepts: f32,
    /// Shuffled-grammar-word negatives only where no sentence of the
    /// grammar is one word away ([`far_salad`]).
    pub far_salads: bool,
    /// Sentences per intent kept out of training beside the test's, for
    /// setting each intent's threshold ([`calibration_commands`]).
    pub calibration_sentences: usize,
    /// What the test's hold-out keeps in training ([`HoldOut`]).
    pub test_hold_out: HoldOut,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            context: PathBuf::new(),
            out: PathBuf::new(),
            noise_dirs: Vec::new(),
            utterances: 12_000,
            test_utterances: 200,
            epochs: 30,
            channels: 96,
            dilations: kith_models::intent::net::DILATIONS.to_vec(),
            members: 1,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            seed: 1,
            cache: None,
            tune_front: None,
            front_epochs: None,
            false_accepts: FALSE_ACCEPT_BUDGET,
            far_salads: false,
            calibration_sentences: 0,
            test_hold_out: HoldOut::default(),
        }
    }
}

/// The front end's model files.
#[derive(Debug, Clone)]
pub struct FrontFiles {
    pub mel: PathBuf,
    pub embedding: PathBuf,
}

impl FrontFiles {
    /// The installed front end's files (an error says how to fetch them).
    pub fn from_store(store: &crate::store::ModelStore) -> Result<FrontFiles> {
        Ok(FrontFiles {
            mel: store.require("melspectrogram")?,
            embedding: store.require("embedding_model")?,
        })
    }
}

/// One clip to make: what is said, by whom, and how it is spoiled.
#[derive(Debug, Clone)]
struct Job {
    /// Empty: no speech (see [`Kind::Noise`]).
    text: String,
    voice: Voice,
    rate: u32,
    pitch: u32,
    /// Speed perturbation (1.0: none).
    speed: f32,
    recipe: Recipe,
    /// Per head: the target class (`None`: nothing to learn for that head).
    targets: Vec<Option<u16>>,
    /// Test condition: index into [`Report::conditions`].
    condition: usize,
    seed: u64,
    /// What the clip is to the threshold's calibration.
    kind: Kind,
}

impl Job {
    /// `text` said by `speaker` (a voice, rate, pitch and speed:
    /// [`voice_of`]) and spoiled by `recipe`, with the clip's own seed
    /// drawn last from `rng`: a command clip in condition 0.
    fn new(
        text: String,
        (voice, rate, pitch, speed): (Voice, u32, u32, f32),
        recipe: Recipe,
        targets: Vec<Option<u16>>,
        rng: &mut Rng,
    ) -> Job {
        Job {
            text,
            voice,
            rate,
            pitch,
            speed,
            recipe,
            targets,
            condition: 0,
            seed: rng.next_u64(),
            kind: Kind::Command,
        }
    }
}

/// What the heads should answer for a clip that is no command: the
/// intent head "none", the slot heads nothing to learn.
fn none_targets(grammar: &Grammar) -> Vec<Option<u16>> {
    let mut targets = vec![None; 1 + grammar.slots.len()];
    targets[0] = Some(grammar.intents.len() as u16);
    targets
}

/// A clip, as the threshold's calibration counts it: a command (or a
/// slot-value clip), or one kind of speech that must not be understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Command,
    /// An everyday sentence of the training part (in validation: one the
    /// networks heard in other clips).
    Everyday,
    /// Shuffled grammar words ("volume the", "set stop").
    Salad,
    /// An everyday sentence of the calibration part: never trained on,
    /// as what a device overhears is.
    Unheard,
    /// No speech: noise alone (babble, pink, white or the user's), mixed
    /// at a level set against typical speech
    /// ([`augment::REFERENCE_SPEECH_RMS`]), what a false wake in a noisy
    /// room hands the model.
    Noise,
    /// A stretch of the user's own recordings (`kith intent calibrate
    /// --negatives`): what the device overhears where it lives.
    Recorded,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Command => "command",
            Kind::Everyday => "everyday sentence trained on",
            Kind::Salad => "shuffled grammar words",
            Kind::Unheard => "everyday sentence never trained on",
            Kind::Noise => "noise alone",
            Kind::Recorded => "your recording",
        }
    }
}

/// Which part of the everyday sentences a line belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Spoken as "not understood" training examples, and babble for training.
    Train,
    /// Heard only when choosing the threshold.
    Calibration,
    /// The held-out test's out-of-grammar sentences, and its babble.
    Test,
}

/// The order the model card lists the kinds of negative in.
const KIND_ORDER: [Kind; 5] = [
    Kind::Unheard,
    Kind::Recorded,
    Kind::Noise,
    Kind::Everyday,
    Kind::Salad,
];

/// How many clips of one kind of negative the chosen threshold accepts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KindShare {
    pub kind: String,
    pub clips: usize,
    pub accepted: usize,
}

/// One row of the acceptance table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    /// "clean", "babble 12 dB", ...
    pub name: String,
    pub clips: usize,
    /// Intent and every slot right, and understood.
    pub accepted: usize,
    /// Understood, but the intent or a slot wrong.
    pub wrong: usize,
    /// The network's top choice exactly right, whatever its score (what
    /// the threshold costs is `top_right - accepted`).
    pub top_right: usize,
}

impl Condition {
    fn new(name: String) -> Condition {
        Condition {
            name,
            clips: 0,
            accepted: 0,
            wrong: 0,
            top_right: 0,
        }
    }

    pub fn rate(&self) -> f64 {
        self.accepted as f64 / self.clips.max(1) as f64
    }

    fn pct(&self, n: usize) -> f64 {
        100.0 * n as f64 / self.clips.max(1) as f64
    }

    /// The 95 % Wilson interval of the acceptance rate, in percent.
    pub fn accepted_interval(&self) -> (f64, f64) {
        let (lo, hi) = wilson_interval(self.accepted, self.clips);
        (100.0 * lo, 100.0 * hi)
    }
}

/// The 95 % Wilson score interval of a rate of `k` in `n`, counting the
/// `n` as independent draws ((0, 1) when `n` is 0). Unlike the normal
/// approximation it stays inside [0, 1] and is not empty at 0 or `n`.
pub fn wilson_interval(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    const Z: f64 = 1.959_964;
    let (k, n) = (k.min(n) as f64, n as f64);
    let p = k / n;
    let z2 = Z * Z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / (1.0 + z2 / n);
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// What training made and measured (also `metrics.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub grammar_sha256: String,
    pub intents: usize,
    pub slots: usize,
    pub train_clips: usize,
    pub negative_clips: usize,
    pub validation_clips: usize,
    /// Clips of everyday sentences heard only to set the threshold.
    pub calibration_clips: usize,
    /// Clips of commands no network trained on, heard only to set each
    /// intent's threshold (absent: none, as in models older than them).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub calibration_commands: usize,
    /// Per kind of negative (calibration clips and the validation's
    /// negatives): how many the threshold accepts.
    pub calibration: Vec<KindShare>,
    pub test_clips: usize,
    /// Distinct held-out sentences the test clips say.
    pub test_sentences: usize,
    /// Intents with too few distinct sentences (under 3) to hold any out:
    /// not in the test.
    pub untested_intents: Vec<String>,
    pub train_voices: usize,
    pub test_voices: usize,
    /// Voices of the accent no training voice has.
    pub accent_voices: usize,
    pub held_out_accent: String,
    pub mbrola_voices: usize,
    pub train_rates: Vec<u32>,
    pub test_rates: Vec<u32>,
    pub noise_recordings: usize,
    /// Parameters of all the networks.
    pub parameters: usize,
    /// Networks whose probabilities the model averages.
    pub members: usize,
    /// Passes over the training clips, per network (0: not recorded, as
    /// by models older than the field; then not written either).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epochs: usize,
    /// Of those, the last ones that trained the speech embedding's layers
    /// too (0: the model reads the frozen embeddings).
    #[serde(default)]
    pub front_epochs: usize,
    /// With several networks: each one alone, at its own calibrated
    /// threshold, accepted this share of the goal conditions' clips (empty
    /// once `kith intent eval --update` measured the model on another test).
    pub member_goal_accepted: Vec<f64>,
    pub model_bytes: u64,
    /// One threshold for all intents, calibrated on the negatives alone.
    pub threshold: f32,
    /// Each intent's own threshold, in the intents' order (empty: the
    /// model uses `threshold` for all).
    pub intent_thresholds: Vec<(String, f32)>,
    pub validation_accuracy: f32,
    /// The negatives (validation and calibration) that scored highest.
    pub loudest_negatives: Vec<ScoredNegative>,
    pub synthesis_secs: f64,
    pub training_secs: f64,
    pub total_secs: f64,
    /// The seed the data was drawn with: with `test_utterances` and the
    /// context, it makes the test clips again ([`evaluate`]). Older
    /// models did not record them: they used the trainer's defaults.
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_test_utterances")]
    pub test_utterances: usize,
    /// Babble tracks the test's babble clips are cut from (absent in the
    /// metrics of models trained before the test had its own 64: their
    /// test cut 8 tracks drawn from the training stream).
    #[serde(default = "eight_tracks")]
    pub test_babble_tracks: usize,
    /// In-grammar training sentences the run drew (absent in the metrics
    /// of models trained before it was recorded): with the seed, the
    /// context and the same `--noise` directories it draws every training
    /// clip again, as `kith intent calibrate` does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utterances: Option<usize>,
    /// The share of out-of-grammar audio (`NEGATIVE_MIX`) the thresholds
    /// were set to let in at most.
    #[serde(default = "default_budget")]
    pub false_accept_budget: f32,
    /// Whether the shuffled-grammar-word negatives were kept two words or
    /// more from every sentence (`--far-salads`; absent: they were not).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub far_salads: bool,
    /// Sentences per intent the run kept out of training for setting the
    /// thresholds (`--calibration-sentences`; absent: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub calibration_sentences: usize,
    /// What the test's hold-out kept in training (absent: the word rule,
    /// the only one before the word-pair rule).
    #[serde(default = "words_rule")]
    pub test_hold_out: HoldOut,
    /// What the exported model answered on the test.
    #[serde(flatten)]
    pub measured: Measured,
}

/// The hold-out rule of models whose metrics do not name one.
fn words_rule() -> HoldOut {
    HoldOut::Words
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn default_seed() -> u64 {
    TrainOptions::default().seed
}

fn default_test_utterances() -> usize {
    TrainOptions::default().test_utterances
}

fn default_budget() -> f32 {
    FALSE_ACCEPT_BUDGET
}

/// Models measured before the test had babble tracks of its own cut 8.
fn eight_tracks() -> usize {
    8
}

/// A validation or calibration clip that must not be understood, and what it was heard as.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoredNegative {
    pub kind: String,
    /// What was said (empty: noise alone).
    pub text: String,
    pub noise: String,
    /// The intent it was heard as, and that answer's score.
    pub heard: String,
    pub score: f32,
}

/// How many of the highest-scoring validation negatives the report keeps.
const LOUDEST_NEGATIVES: usize = 10;

/// Additive noise and its SNR in dB (`None`: clean).
type Noise = Option<(NoiseKind, f32)>;

/// Thresholds the trade-off table shows.
const TRADEOFF_THRESHOLDS: [f32; 6] = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95];

/// One row of the threshold trade-off.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tradeoff {
    pub threshold: f32,
    /// Share of held-out in-grammar clips at 12 dB SNR and above accepted and right.
    pub accepted: f64,
    /// Share of out-of-grammar clips accepted.
    pub false_accepts: f64,
}

/// The grammar file's hash, as `labels.json` records it.
pub fn grammar_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads and parses a context file; errors name the file, line and column.
pub fn read_context(path: &Path) -> Result<(String, Grammar)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the context {}", path.display()))?;
    let grammar = Grammar::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}:{}:{}: {}", path.display(), e.line, e.col, e.message))?;
    Ok((text, grammar))
}

/// The label vocabulary of `grammar`.
pub fn labels_of(grammar: &Grammar, sha256: &str) -> Labels {
    Labels {
        format: LABELS_FORMAT,
        frames: FRAMES,
        intents: grammar.intents.iter().map(|i| i.name.clone()).collect(),
        slots: grammar
            .slots
            .iter()
            .map(|s| SlotLabels {
                name: s.name.clone(),
                values: s.values.clone(),
            })
            .collect(),
        intent_slots: grammar.intents.iter().map(|i| i.slots.clone()).collect(),
        threshold: 0.5,
        intent_thresholds: Default::default(),
        grammar_sha256: sha256.to_string(),
        front: Default::default(),
    }
}

/// Out-of-grammar sentences of one part, minus any the grammar accepts:
/// of every four lines, the first two train, the third calibrates, the
/// fourth tests.
fn out_of_grammar(grammar: &Grammar, part: Part) -> Vec<String> {
    OUT_OF_GRAMMAR
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .enumerate()
        .filter(|(i, _)| {
            part == match i % 4 {
                0 | 1 => Part::Train,
                2 => Part::Calibration,
                _ => Part::Test,
            }
        })
        .map(|(_, l)| l.to_string())
        .filter(|l| grammar.parse_text(l).is_none())
        .collect()
}

/// Words of the grammar shuffled into 2–5-word sequences it does not accept.
fn word_salad(grammar: &Grammar, rng: &mut Rng, sampler_texts: &[String]) -> Option<String> {
    let words: Vec<&str> = sampler_texts
        .iter()
        .flat_map(|t| t.split_whitespace())
        .collect();
    if words.is_empty() {
        return None;
    }
    for _ in 0..20 {
        let n = 2 + rng.below(4);
        let text: Vec<&str> = (0..n).map(|_| words[rng.below(words.len())]).collect();
        let text = text.join(" ");
        if grammar.parse_text(&text).is_none() {
            return Some(text);
        }
    }
    None
}

/// A [`word_salad`] no sentence of `grammar` is one word away from (one
/// word of `vocab` left out, put in or changed). Salads that near a
/// sentence teach the network that whatever it has not heard word for word
/// is not a command, and a held-out sentence is one such word away from the
/// ones training spoke ("forget order" from "forget my order").
fn far_salad(
    grammar: &Grammar,
    rng: &mut Rng,
    sampler_texts: &[String],
    vocab: &[String],
) -> Option<String> {
    (0..50)
        .filter_map(|_| word_salad(grammar, rng, sampler_texts))
        .find(|t| !one_word_from_grammar(grammar, t, vocab))
}

/// The distinct words of `texts`, sorted.
fn vocabulary(texts: &[String]) -> Vec<String> {
    let mut words: Vec<&str> = texts.iter().flat_map(|t| t.split_whitespace()).collect();
    words.sort_unstable();
    words.dedup();
    words.into_iter().map(str::to_string).collect()
}

/// Whether a sentence of `grammar` is one word (of `vocab`) left out, put in
/// or changed away from `text`.
fn one_word_from_grammar(grammar: &Grammar, text: &str, vocab: &[String]) -> bool {
    let words: Vec<&str> = text.split_whitespace().collect();
    let accepts = |w: &[&str]| !w.is_empty() && grammar.parse_text(&w.join(" ")).is_some();
    for i in 0..words.len() {
        let mut w = words.clone();
        w.remove(i);
        if accepts(&w) {
            return true;
        }
    }
    for v in vocab {
        for i in 0..=words.len() {
            let mut w = words.clone();
            w.insert(i, v);
            if accepts(&w) {
                return true;
            }
        }
        for i in 0..words.len() {
            if words[i] != v {
                let mut w = words.clone();
                w[i] = v;
                if accepts(&w) {
                    return true;
                }
            }
        }
    }
    false
}

/// `phrase` after the first 1–5 words of a random everyday sentence and,
/// half the time, before the first 1–3 words of another.
fn foreign_carrier(phrase: &str, sentences: &[String], rng: &mut Rng) -> String {
    let mut words: Vec<&str> = Vec::new();
    let before = pick(sentences, rng);
    words.extend(before.split_whitespace().take(1 + rng.below(5)));
    words.push(phrase);
    if rng.unit() < 0.5 {
        let after = pick(sentences, rng);
        words.extend(after.split_whitespace().take(1 + rng.below(3)));
    }
    words.join(" ")
}

/// Reads every WAV under `dirs` (16 kHz mono after conversion).
fn read_noise(dirs: &[PathBuf]) -> Result<Vec<Vec<i16>>> {
    let mut out = Vec::new();
    for dir in dirs {
        let files = super::wav_files(dir)?;
        if files.is_empty() {
            bail!("--noise {}: no .wav files there", dir.display());
        }
        for f in files {
            let samples = super::read_wav(&f)?;
            if samples.len() >= 1600 {
                out.push(samples);
            }
        }
    }
    Ok(out)
}

/// Babble tracks: three to five voices saying different sentences at once.
fn babble_bank(
    sentences: &[String],
    voices: &VoiceSet,
    rng: &mut Rng,
    tracks: usize,
) -> Result<Vec<Vec<i16>>> {
    let mut bank = Vec::new();
    for _ in 0..tracks {
        let talkers = 3 + rng.below(3);
        let mut mix: Vec<f32> = Vec::new();
        for _ in 0..talkers {
            let mut speech: Vec<i16> = Vec::new();
            // ~4 s of speech per talker, sentence after sentence.
            while speech.len() < 64_000 {
                let voice = &voices.voices[rng.below(voices.voices.len())];
                let text = &sentences[rng.below(sentences.len())];
                let rate = voices.rates[rng.below(voices.rates.len())];
                speech.extend(voices::synthesize(
                    voice,
                    rate,
                    30 + rng.below(40) as u32,
                    1.0,
                    text,
                )?);
            }
            if mix.len() < speech.len() {
                mix.resize(speech.len(), 0.0);
            }
            for (m, s) in mix.iter_mut().zip(&speech) {
                *m += f32::from(*s);
            }
        }
        bank.push(
            mix.iter()
                .map(|v| v.clamp(-32768.0, 32767.0) as i16)
                .collect(),
        );
    }
    Ok(bank)
}

/// The features the trained model reads.
fn front_of(opts: &TrainOptions) -> Front {
    opts.tune_front.map_or(Front::Embeddings, Front::cut)
}

/// How clips become features: which front end, on how many threads, and
/// where they are cached.
struct Rendering<'a> {
    front: Front,
    threads: usize,
    cache: Option<&'a Path>,
    noise_dirs: &'a [PathBuf],
}

impl<'a> Rendering<'a> {
    fn of(opts: &'a TrainOptions) -> Self {
        Rendering {
            front: front_of(opts),
            threads: opts.threads,
            cache: opts.cache.as_deref(),
            noise_dirs: &opts.noise_dirs,
        }
    }
}

/// The name of the cache entry for `jobs`' features: a digest of the jobs
/// (text, voice, rate, pitch, speed, augmentation and seed), of the babble
/// tracks' samples (clips cut from other babble are other clips, whatever
/// their recipe says) and of the noise recordings' paths.
fn cache_key(jobs: &[Job], bank: &NoiseBank, how: &Rendering) -> String {
    let mut babble = Sha256::new();
    for t in &bank.babble {
        babble.update((t.len() as u64).to_le_bytes());
        for v in t {
            babble.update(v.to_le_bytes());
        }
    }
    grammar_hash(&format!(
        "features v2 {}{} {jobs:?} {:?} {} {:x}",
        how.front.features(),
        match how.front.depth() {
            None => String::new(),
            // As before depths could be chosen, so that older caches still match.
            Some(Depth::From15) => " cut".to_string(),
            Some(d) => format!(" cut{}", d.first_layer()),
        },
        how.noise_dirs,
        bank.recorded.len(),
        babble.finalize()
    ))
}

/// What each head should answer for a sentence of the grammar: its intent,
/// and for each slot the intent may fill, the value said (or "absent").
fn targets_of(grammar: &Grammar, u: &Utterance) -> Vec<Option<u16>> {
    let mut targets = vec![None; 1 + grammar.slots.len()];
    targets[0] = Some(u.intent as u16);
    for &s in &grammar.intents[u.intent].slots {
        let v = u
            .slots
            .iter()
            .find(|(si, _)| *si == s)
            .map_or(0, |(_, v)| v + 1);
        targets[1 + s] = Some(v as u16);
    }
    targets
}

/// Gives each clip whose voice cannot say its sentence (`can_say`, which
/// is [`voices::can_say`] outside the tests) one of espeak-ng's own voices
/// of `set` instead, chosen by the clip's seed, so that no other clip's
/// random stream moves. Returns how many clips changed voice.
fn give_unsayable_another_voice(
    jobs: &mut [Job],
    set: &VoiceSet,
    mut can_say: impl FnMut(&Voice, &str) -> Result<bool>,
) -> Result<usize> {
    let own: Vec<&Voice> = set
        .voices
        .iter()
        .filter(|v| !voices::is_mbrola(v))
        .collect();
    let mut known: HashMap<(String, String), bool> = HashMap::new();
    let mut changed = 0;
    for job in jobs.iter_mut() {
        if !voices::is_mbrola(&job.voice) || job.text.is_empty() {
            continue;
        }
        let key = (job.voice.espeak.clone(), job.text.clone());
        let sayable = match known.get(&key) {
            Some(&ok) => ok,
            None => {
                let ok = can_say(&job.voice, &job.text)?;
                known.insert(key, ok);
                ok
            }
        };
        if sayable {
            continue;
        }
        let Some(&voice) = own.get((job.seed % own.len().max(1) as u64) as usize) else {
            bail!(
                "voice {} cannot say {:?} and no espeak-ng voice is left to say it",
                job.voice.espeak,
                job.text
            );
        };
        job.voice = voice.clone();
        changed += 1;
    }
    Ok(changed)
}

/// The features of `jobs` from the cache, or rendered (and then cached).
/// A cache entry is named by everything that makes the clips
/// ([`cache_key`]).
fn render_cached(
    jobs: &[Job],
    front: &FrontFiles,
    bank: &NoiseBank,
    how: &Rendering,
    label: &str,
) -> Result<Vec<Vec<f32>>> {
    let kind = how.front;
    let Some(dir) = how.cache else {
        return render(jobs, front, kind, bank, how.threads, label);
    };
    let key = cache_key(jobs, bank, how);
    let path = dir.join(format!("{key}.f32"));
    let size = kind.features();
    if let Ok(bytes) = std::fs::read(&path)
        && bytes.len() == jobs.len() * size * 4
    {
        eprintln!(
            "{label}: {} clips from the cache {}",
            jobs.len(),
            path.display()
        );
        return Ok(bytes.chunks_exact(size * 4).map(floats_of).collect());
    }
    let features = render(jobs, front, kind, bank, how.threads, label)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let bytes: Vec<u8> = features
        .iter()
        .flat_map(|f| f.iter().flat_map(|v| v.to_le_bytes()))
        .collect();
    // Write then rename, so an interrupted run leaves no half entry.
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing the cache entry {}", path.display()))?;
    Ok(features)
}

/// Little-endian f32s, as the cache stores features.
fn floats_of(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Makes the features of every job on `threads` threads, with a progress bar.
fn render(
    jobs: &[Job],
    front: &FrontFiles,
    kind: Front,
    bank: &NoiseBank,
    threads: usize,
    label: &str,
) -> Result<Vec<Vec<f32>>> {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Vec<f32>>>> = Mutex::new(vec![None; jobs.len()]);
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let mut bar = Bar::new(label, jobs.len() as u64);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let run = || -> Result<()> {
                    let mut cf = CommandFront::load_for(kind, &front.mel, &front.embedding)
                        .context("loading the audio front end")?;
                    let mut features = vec![0.0; kind.features()];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= jobs.len() || failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                            return Ok(());
                        }
                        let job = &jobs[i];
                        let mut rng = Rng::new(job.seed);
                        let speech = if job.text.is_empty() {
                            vec![0i16; 16 * (500 + rng.below(2000))]
                        } else {
                            voices::synthesize(
                                &job.voice, job.rate, job.pitch, job.speed, &job.text,
                            )?
                        };
                        let speech = &speech[speech.len().saturating_sub(MAX_SPEECH)..];
                        let clip = augment::apply(speech, &job.recipe, bank, &mut rng);
                        cf.features_of(&clip, &mut features)?;
                        if let Ok(mut r) = results.lock() {
                            r[i] = Some(features.clone());
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                };
                if let Err(e) = run()
                    && let Ok(mut f) = failure.lock()
                {
                    f.get_or_insert(e);
                }
            });
        }
        // The calling thread draws the bar until the workers are done.
        loop {
            let d = done.load(Ordering::Relaxed);
            bar.set(d as u64, "");
            let failed = failure.lock().map(|f| f.is_some()).unwrap_or(true);
            if d >= jobs.len() || failed {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    let results = results
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a synthesis thread panicked"))?;
    bar.finish(&format!("{} clips", jobs.len()));
    results
        .into_iter()
        .map(|r| r.context("a clip was not rendered"))
        .collect()
}

/// A voice, rate, pitch and speed from `set`: training perturbs the speed,
/// the test hears voices as they are.
fn voice_of(rng: &mut Rng, set: &VoiceSet) -> (Voice, u32, u32, f32) {
    let (lo, hi) = voices::TRAIN_SPEED;
    let speed = if set.split == Split::Train {
        rng.range(lo, hi)
    } else {
        1.0
    };
    (
        pick(&set.voices, rng).clone(),
        *pick(&set.rates, rng),
        25 + rng.below(50) as u32,
        speed,
    )
}

/// Babble tracks training mixes in: cuts of so many tracks, from training
/// voices and out-of-grammar sentences.
const TRAINING_BABBLE_TRACKS: usize = 16;

/// Babble tracks the held-out test mixes in. A test clip in babble is a
/// cut of one of them, so tracks must be many for the clips of a babble
/// row to be near independent draws: with 8, the row moved 3 to 6 points
/// when the 8 were drawn again, as much as a change of model.
pub const TEST_BABBLE_TRACKS: usize = 64;

/// The test's babble has its own random stream, drawn from the seed alone:
/// neither the training data nor its options move it, and the training
/// data do not move with it.
const TEST_BABBLE_STREAM: u64 = 0x7e57_babb_1e00_0001;

/// The babble (and recorded noise) training mixes in: babble from training
/// voices and out-of-grammar sentences, drawn from `rng`.
fn training_noise(
    oog_train: &[String],
    train_voices: &VoiceSet,
    noise_dirs: &[PathBuf],
    rng: &mut Rng,
) -> Result<NoiseBank> {
    Ok(NoiseBank {
        babble: babble_bank(oog_train, train_voices, rng, TRAINING_BABBLE_TRACKS)?,
        recorded: read_noise(noise_dirs)?,
    })
}

/// The test's babble: from test voices and the test's out-of-grammar
/// sentences, on the seed's own stream for it.
fn test_noise(oog_test: &[String], test_voices: &VoiceSet, seed: u64) -> Result<NoiseBank> {
    let mut rng = Rng::new(seed ^ TEST_BABBLE_STREAM);
    Ok(NoiseBank {
        babble: babble_bank(oog_test, test_voices, &mut rng, TEST_BABBLE_TRACKS)?,
        recorded: Vec::new(),
    })
}

/// Held-out sentences, per intent: chosen first and never trained on, so
/// that training still hears every intent, word and slot value (see
/// [`Grammar::hold_out`]).
struct HeldOut {
    sentences: Vec<Vec<Utterance>>,
    /// The intents that have any (an intent with under 3 distinct
    /// sentences has none).
    tested: Vec<usize>,
}

impl HeldOut {
    fn of(grammar: &Grammar, seed: u64, test_utterances: usize, rule: HoldOut) -> HeldOut {
        let n_intents = grammar.intents.len();
        let sentences = grammar.hold_out(
            seed,
            test_utterances.div_ceil(n_intents.max(1)).max(1),
            rule,
        );
        let tested = (0..n_intents)
            .filter(|&i| sentences.get(i).is_some_and(|s| !s.is_empty()))
            .collect();
        HeldOut { sentences, tested }
    }

    fn texts(&self) -> HashSet<String> {
        self.sentences
            .iter()
            .flatten()
            .map(|u| u.text.clone())
            .collect()
    }
}

/// The held-out test: its clips, the conditions they are heard in, and
/// which of those the goal speaks of. It follows from the grammar, the
/// seed and the number of test sentences alone, so a model can be
/// measured again on the very clips its training run measured it on
/// ([`evaluate`]).
struct TestSet {
    jobs: Vec<Job>,
    /// The in-grammar conditions (clean, each noise at each SNR, the
    /// accent); out-of-grammar clips have condition `oog_condition`.
    conditions: Vec<Condition>,
    /// Per condition: held-out voices at 12 dB SNR and above.
    goal: Vec<bool>,
    oog_condition: usize,
}

impl TestSet {
    fn new(
        grammar: &Grammar,
        held_out: &HeldOut,
        oog_test: &[String],
        test_voices: &VoiceSet,
        accent_voices: &VoiceSet,
        seed: u64,
        test_utterances: usize,
    ) -> Result<TestSet> {
        let tested = &held_out.tested;
        // Test jobs: sentences never trained on, test voices and rates, each
        // clean and at every SNR in babble and in pink noise; and the accent
        // no training voice has, clean and in babble at 12 dB.
        let mut specs: Vec<(Condition, Split, Noise)> =
            vec![(Condition::new("clean".into()), Split::Test, None)];
        for kind in [NoiseKind::Babble, NoiseKind::Pink] {
            for snr in TEST_SNRS {
                specs.push((
                    Condition::new(format!("{} {snr:.0} dB", kind.name())),
                    Split::Test,
                    Some((kind, snr)),
                ));
            }
        }
        let accent = voices::HELD_OUT_ACCENT;
        specs.push((
            Condition::new(format!("accent {accent}, clean")),
            Split::Accent,
            None,
        ));
        specs.push((
            Condition::new(format!("accent {accent}, babble 12 dB")),
            Split::Accent,
            Some((NoiseKind::Babble, 12.0)),
        ));
        if tested.is_empty() {
            bail!(
                "no intent of the grammar has 3 or more distinct sentences: nothing can be held out of training for the test"
            );
        }
        // The test's own random stream: its voices, rates and noise are the
        // same whatever the training data's size, so runs with other
        // `--utterances` are measured on the very same clips.
        let mut test_rng = Rng::new(seed ^ 0x7465_7374_5f63_6c69);
        let mut test_jobs = Vec::new();
        for k in 0..test_utterances.max(1) {
            // Intents in turn, each one's held-out sentences in turn, each time
            // by a random voice of each test split (the same one under every
            // noise).
            let sentences = &held_out.sentences[tested[k % tested.len()]];
            let u = &sentences[(k / tested.len()) % sentences.len()];
            let targets = targets_of(grammar, u);
            let test_voice = voice_of(&mut test_rng, test_voices);
            let accent_voice = voice_of(&mut test_rng, accent_voices);
            for (ci, (_, split, noise)) in specs.iter().enumerate() {
                let speaker = if *split == Split::Accent {
                    accent_voice.clone()
                } else {
                    test_voice.clone()
                };
                let recipe = Recipe {
                    lead_ms: 300,
                    tail_ms: 300,
                    noise: *noise,
                    reverb: None,
                    gain_db: 0.0,
                };
                let job = Job::new(
                    u.text.clone(),
                    speaker,
                    recipe,
                    targets.clone(),
                    &mut test_rng,
                );
                test_jobs.push(Job {
                    condition: ci,
                    ..job
                });
            }
        }
        // The conditions the goal speaks of: held-out voices at 12 dB SNR and above.
        let goal: Vec<bool> = specs
            .iter()
            .map(|(_, split, noise)| {
                *split == Split::Test && noise.is_none_or(|(_, snr)| snr >= 12.0)
            })
            .collect();
        let conditions: Vec<Condition> = specs.into_iter().map(|(c, _, _)| c).collect();
        let oog_condition = conditions.len();
        for (i, text) in oog_test.iter().enumerate() {
            for noisy in [false, true] {
                let speaker = voice_of(&mut test_rng, test_voices);
                let noise = if i % 2 == 0 {
                    NoiseKind::Babble
                } else {
                    NoiseKind::Pink
                };
                let recipe = Recipe {
                    noise: noisy.then_some((noise, 12.0)),
                    ..Recipe::clean()
                };
                let job = Job::new(
                    text.clone(),
                    speaker,
                    recipe,
                    none_targets(grammar),
                    &mut test_rng,
                );
                test_jobs.push(Job {
                    condition: oog_condition,
                    kind: Kind::Everyday,
                    ..job
                });
            }
        }
        Ok(TestSet {
            jobs: test_jobs,
            conditions,
            goal,
            oog_condition,
        })
    }
}

fn pick<'a, T>(v: &'a [T], rng: &mut Rng) -> &'a T {
    &v[rng.below(v.len())]
}

/// Every clip a training run makes and how it splits them, drawn from the
/// context, the seed and the data options alone (`utterances`,
/// `test_utterances`, `noise_dirs`): [`train`] renders and learns from
/// them, and [`recalibrate`] draws them again to hear the very validation
/// and calibration clips the run heard.
struct Plan {
    train_voices: VoiceSet,
    test_voices: VoiceSet,
    accent_voices: VoiceSet,
    train_bank: NoiseBank,
    test_bank: NoiseBank,
    held_out: HeldOut,
    /// Training clips: commands, negatives, slot values in foreign carriers.
    jobs: Vec<Job>,
    /// Of them, "not understood" examples.
    negatives: usize,
    /// Everyday sentences no network trains on, heard to set the thresholds.
    calibration_jobs: Vec<Job>,
    /// Commands of the grammar no network trains on (nor the test holds),
    /// heard to set each intent's threshold beside the validation's.
    calibration_commands: Vec<Job>,
    test: TestSet,
    /// Indices into `jobs` in the order training takes them; the last
    /// tenth is `validation`, held back to choose the epoch and the
    /// thresholds.
    training: Vec<usize>,
    validation: Vec<usize>,
}

/// Each clip's features, in the clips' order.
type Features = Vec<Vec<f32>>;

impl Plan {
    /// The features of the clips heard only to set the thresholds: the
    /// calibration clips and the calibration commands.
    fn threshold_features(
        &self,
        front: &FrontFiles,
        how: &Rendering,
    ) -> Result<(Features, Features)> {
        let calibration = render_cached(
            &self.calibration_jobs,
            front,
            &self.train_bank,
            how,
            "synthesizing calibration clips",
        )?;
        let commands = render_cached(
            &self.calibration_commands,
            front,
            &self.train_bank,
            how,
            "synthesizing calibration commands",
        )?;
        Ok((calibration, commands))
    }
}

/// Draws the [`Plan`] of a training run of `grammar` (whose slot phrases
/// `labels` holds) with `opts`' data options.
fn plan(grammar: &Grammar, labels: &Labels, opts: &TrainOptions) -> Result<Plan> {
    let train_voices = voices::voices(Split::Train)?;
    let test_voices = voices::voices(Split::Test)?;
    let accent_voices = voices::voices(Split::Accent)?;
    let mut rng = Rng::new(opts.seed);

    // Noise banks: training babble from training voices and sentences, test
    // babble from test ones.
    let oog_train = out_of_grammar(grammar, Part::Train);
    let oog_calibration = out_of_grammar(grammar, Part::Calibration);
    let oog_test = out_of_grammar(grammar, Part::Test);
    if oog_train.is_empty() || oog_calibration.is_empty() || oog_test.is_empty() {
        bail!("every built-in out-of-grammar sentence is in this grammar: it accepts too much");
    }
    let train_bank = training_noise(&oog_train, &train_voices, &opts.noise_dirs, &mut rng)?;
    let test_bank = test_noise(&oog_test, &test_voices, opts.seed)?;
    let held_out = HeldOut::of(grammar, opts.seed, opts.test_utterances, opts.test_hold_out);
    // Sentences kept out for the thresholds alone, beside the test's.
    let reserved: Vec<Utterance> = if opts.calibration_sentences > 0 {
        let reserved: Vec<Utterance> = grammar
            .hold_out_beside(
                opts.seed ^ 0x6361_6c5f_686f_6c64,
                opts.calibration_sentences,
                &held_out.sentences,
                opts.test_hold_out,
            )
            .into_iter()
            .flatten()
            .collect();
        eprintln!(
            "{} sentences kept out of training for the thresholds ({} asked per intent; an intent gives at most a fifth of its sentences, with the test's)",
            reserved.len(),
            opts.calibration_sentences
        );
        reserved
    } else {
        Vec::new()
    };
    let held_texts: HashSet<String> = held_out.texts();
    let not_trained: HashSet<String> = held_texts
        .iter()
        .cloned()
        .chain(reserved.iter().map(|u| u.text.clone()))
        .collect();

    // Training jobs.
    let mut sampler = grammar.sampler(opts.seed);
    let mut jobs = Vec::new();
    let mut said = Vec::new();
    // A training clip of `text`: a random training voice, rate, pitch and
    // speed, then a training recipe, then the clip's own seed (in that order).
    let training_job = |text: String, targets: Vec<Option<u16>>, rng: &mut Rng| {
        let speaker = voice_of(rng, &train_voices);
        let recipe = augment::training_recipe(rng, &train_bank);
        Job::new(text, speaker, recipe, targets, rng)
    };
    for _ in 0..opts.utterances {
        let Some(u) = (0..100)
            .map(|_| sampler.next_utterance())
            .find(|u| !not_trained.contains(&u.text))
        else {
            continue;
        };
        let targets = targets_of(grammar, &u);
        said.push(u.text.clone());
        jobs.push(training_job(u.text, targets, &mut rng));
    }
    // Negatives, 3 per 10 sentences: half everyday sentences, a third
    // shuffled grammar words, a sixth noise alone (babble when the recipe
    // drew no noise).
    let negatives = opts.utterances * 3 / 10;
    // With `far_salads`, a salad one word from a sentence is drawn again
    // from a stream of its own, so every other clip stays the one it was.
    let mut salad_rng = Rng::new(opts.seed ^ 0x7361_6c61_6466_6172);
    let vocab = if opts.far_salads {
        vocabulary(&said)
    } else {
        Vec::new()
    };
    let (mut near, mut salads) = (0usize, 0usize);
    for k in 0..negatives {
        let (kind, text) = match k % 6 {
            0..=2 => (Kind::Everyday, pick(&oog_train, &mut rng).clone()),
            3 | 4 => match word_salad(grammar, &mut rng, &said) {
                Some(text) if opts.far_salads => {
                    salads += 1;
                    if one_word_from_grammar(grammar, &text, &vocab) {
                        near += 1;
                        match far_salad(grammar, &mut salad_rng, &said, &vocab) {
                            Some(text) => (Kind::Salad, text),
                            None => (Kind::Noise, String::new()),
                        }
                    } else {
                        (Kind::Salad, text)
                    }
                }
                Some(text) => (Kind::Salad, text),
                None => (Kind::Noise, String::new()),
            },
            _ => (Kind::Noise, String::new()),
        };
        let speaker = voice_of(&mut rng, &train_voices);
        let mut recipe = augment::training_recipe(&mut rng, &train_bank);
        if text.is_empty() && recipe.noise.is_none() {
            recipe.noise = Some((NoiseKind::Babble, rng.range(-5.0, 20.0)));
        }
        let job = Job::new(text, speaker, recipe, none_targets(grammar), &mut rng);
        jobs.push(Job { kind, ..job });
    }

    if opts.far_salads {
        eprintln!(
            "{near} of {salads} shuffled-grammar-word negatives were one word from a sentence of the grammar: drawn again"
        );
    }
    // Slot values in foreign carriers: a value phrase between words of
    // everyday sentences ("I'd like to visit nine my friends"), teaching
    // the slot heads to hear a value whatever comes before it. The
    // grammar's own carriers put a value after only one or two phrases,
    // so a held-out command that puts it after another is otherwise new
    // to the network. Only the heads whose slot has that phrase learn from
    // these clips; the intent head does not.
    let value_clips = opts.utterances * VALUE_CLIPS_PERCENT / 100;
    let values: Vec<(usize, usize)> = labels
        .slots
        .iter()
        .enumerate()
        .flat_map(|(s, slot)| (0..slot.values.len()).map(move |v| (s, v)))
        .collect();
    for _ in 0..value_clips {
        let Some(text) = (0..20).find_map(|_| {
            let (s, v) = *pick(&values, &mut rng);
            let phrase = labels.slots[s].values[v].as_str();
            let text = foreign_carrier(phrase, &oog_train, &mut rng);
            grammar
                .parse_text(&text)
                .is_none()
                .then_some((phrase, text))
        }) else {
            continue;
        };
        let (phrase, text) = text;
        let mut targets = vec![None; 1 + grammar.slots.len()];
        for (s, slot) in labels.slots.iter().enumerate() {
            if let Some(v) = slot.values.iter().position(|p| p == phrase) {
                targets[1 + s] = Some(v as u16 + 1);
            }
        }
        jobs.push(training_job(text, targets, &mut rng));
    }

    let mut test = TestSet::new(
        grammar,
        &held_out,
        &oog_test,
        &test_voices,
        &accent_voices,
        opts.seed,
        opts.test_utterances,
    )?;

    // Calibration jobs: everyday sentences no network trains on, by
    // training voices in training recipes (the test's voices stay unheard
    // until the test), from a stream of their own like the test's.
    let mut calibration_rng = Rng::new(opts.seed ^ 0x6361_6c69_6272_6174);
    let mut calibration_jobs = Vec::new();
    for text in &oog_calibration {
        for _ in 0..CALIBRATION_CLIPS_PER_SENTENCE {
            let speaker = voice_of(&mut calibration_rng, &train_voices);
            let recipe = augment::training_recipe(&mut calibration_rng, &train_bank);
            let job = Job::new(
                text.clone(),
                speaker,
                recipe,
                none_targets(grammar),
                &mut calibration_rng,
            );
            calibration_jobs.push(Job {
                kind: Kind::Unheard,
                ..job
            });
        }
    }

    let mut calibration_commands = calibration_commands(
        grammar,
        &reserved,
        &said,
        &held_texts,
        &train_voices,
        &train_bank,
        opts.seed,
    );

    // A clip whose MBROLA voice cannot say its sentence is given one of
    // espeak-ng's own voices of the same split instead.
    let respoken = give_unsayable_another_voice(&mut jobs, &train_voices, voices::can_say)?
        + give_unsayable_another_voice(&mut calibration_jobs, &train_voices, voices::can_say)?
        + give_unsayable_another_voice(&mut calibration_commands, &train_voices, voices::can_say)?
        + give_unsayable_another_voice(&mut test.jobs, &test_voices, voices::can_say)?;
    if respoken > 0 {
        eprintln!(
            "{respoken} clips were given another voice: their MBROLA voice cannot say every sound of the sentence"
        );
    }

    // A tenth held back for choosing the epoch and the threshold.
    let mut training: Vec<usize> = (0..jobs.len()).collect();
    rng.shuffle(&mut training);
    let n_val = (training.len() / 10).max(1);
    let validation = training.split_off(training.len().saturating_sub(n_val));
    Ok(Plan {
        train_voices,
        test_voices,
        accent_voices,
        train_bank,
        test_bank,
        held_out,
        jobs,
        negatives,
        calibration_jobs,
        calibration_commands,
        test,
        training,
        validation,
    })
}

/// Commands for setting each intent's threshold that no network trains
/// on: the sentences training kept out for them (`reserved`:
/// `--calibration-sentences`), then, up to
/// [`CALIBRATION_COMMANDS_PER_INTENT`] per intent, sentences that are
/// neither among the training sentences (`said`) nor held out for the
/// test (`held`); each heard [`CLIPS_PER_CALIBRATION_COMMAND`]
/// times by training voices in training recipes (the test's voices stay
/// unheard), from a stream of their own.
///
/// The validation's commands are sentences training spoke, which score
/// near 1 whoever says them; a user says sentences training never spoke
/// as well, and these show where such sentences score. They are drawn
/// after training's sentences, never instead of them: an intent whose
/// every sentence training spoke has none (and needs none: every command
/// of it was heard in training).
fn calibration_commands(
    grammar: &Grammar,
    reserved: &[Utterance],
    said: &[String],
    held: &HashSet<String>,
    voices: &VoiceSet,
    bank: &NoiseBank,
    seed: u64,
) -> Vec<Job> {
    let said: HashSet<&str> = said.iter().map(String::as_str).collect();
    let n = grammar.intents.len();
    let mut sampler = grammar.sampler(seed ^ 0x6e65_775f_636d_6473);
    let mut rng = Rng::new(seed ^ 0x6361_6c5f_636d_6473);
    let mut chosen: Vec<HashSet<String>> = vec![HashSet::new(); n];
    let mut jobs = Vec::new();
    let mut hear = |u: &Utterance, jobs: &mut Vec<Job>| {
        let targets = targets_of(grammar, u);
        for _ in 0..CLIPS_PER_CALIBRATION_COMMAND {
            let speaker = voice_of(&mut rng, voices);
            let recipe = augment::training_recipe(&mut rng, bank);
            jobs.push(Job::new(
                u.text.clone(),
                speaker,
                recipe,
                targets.clone(),
                &mut rng,
            ));
        }
    };
    for u in reserved {
        if let Some(mine) = chosen.get_mut(u.intent)
            && mine.insert(u.text.clone())
        {
            hear(u, &mut jobs);
        }
    }
    // Bounded: the sampler takes intents in turn, so each gets this many tries.
    for _ in 0..n * CALIBRATION_COMMANDS_PER_INTENT * 20 {
        if chosen
            .iter()
            .all(|c| c.len() >= CALIBRATION_COMMANDS_PER_INTENT)
        {
            break;
        }
        let u = sampler.next_utterance();
        let Some(mine) = chosen.get_mut(u.intent) else {
            continue;
        };
        if mine.len() >= CALIBRATION_COMMANDS_PER_INTENT
            || said.contains(u.text.as_str())
            || held.contains(&u.text)
            || !mine.insert(u.text.clone())
        {
            continue;
        }
        hear(&u, &mut jobs);
    }
    jobs
}

/// Trains a model for `opts.context` into `opts.out`.
pub fn train(front: &FrontFiles, opts: &TrainOptions) -> Result<Report> {
    let started = Instant::now();
    let (text, grammar) = read_context(&opts.context)?;
    let sha = grammar_hash(&text);
    let mut labels = labels_of(&grammar, &sha);
    labels.front = front_of(opts);
    // The embedding's top and the embedding of silence, when tuned.
    let tuned = if let Some(depth) = opts.tune_front {
        let top =
            EmbeddingTop::load(&front.embedding, depth).context("reading the embedding's top")?;
        let plain = CommandFront::load(&front.mel, &front.embedding)
            .context("loading the audio front end")?;
        Some((top, plain.silence().to_vec()))
    } else {
        None
    };
    let n_intents = grammar.intents.len();
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let synth_started = Instant::now();
    let plan = plan(&grammar, &labels, opts)?;
    let (train_voices, test_voices) = (&plan.train_voices, &plan.test_voices);
    eprintln!(
        "context {}: {} intents, {} slots; {} training voices ({} MBROLA), {} test voices",
        opts.context.display(),
        n_intents,
        grammar.slots.len(),
        train_voices.voices.len(),
        train_voices.mbrola,
        test_voices.voices.len()
    );
    let (jobs, calibration_jobs, test) = (&plan.jobs, &plan.calibration_jobs, &plan.test);
    let held_texts = plan.held_out.texts();

    let how = Rendering::of(opts);
    let train_features = render_cached(
        jobs,
        front,
        &plan.train_bank,
        &how,
        "synthesizing training clips",
    )?;
    let (calibration_features, command_features) = plan.threshold_features(front, &how)?;
    let test_features = render_cached(
        &test.jobs,
        front,
        &plan.test_bank,
        &how,
        "synthesizing test clips",
    )?;
    let synthesis_secs = synth_started.elapsed().as_secs_f64();

    // Train on the plan's training clips; its validation tenth chooses the
    // epoch and the threshold. (Each clip's features move, not copy: they
    // are most of the run's memory.)
    let mut features: Vec<Option<Vec<f32>>> = train_features.into_iter().map(Some).collect();
    let mut example = |i: usize| Example {
        features: features[i].take().unwrap_or_default(),
        targets: jobs[i].targets.clone(),
    };
    let examples: Vec<Example> = plan.training.iter().map(|&i| example(i)).collect();
    let validation: Vec<Example> = plan.validation.iter().map(|&i| example(i)).collect();
    let validation_jobs: Vec<&Job> = plan.validation.iter().map(|&i| &jobs[i]).collect();
    let shape = Shape {
        frames: FRAMES,
        dim: EMBEDDING_DIM,
        channels: opts.channels,
        dilations: opts.dilations.clone(),
        heads: labels.head_sizes(),
    };
    // Member k starts from seed + k: member 0 is the single network a
    // one-member run trains.
    let members = opts.members.max(1);
    let mut nets: Vec<Net> = Vec::with_capacity(members);
    let train_started = Instant::now();
    let mut validation_accuracy = 0.0f32;
    for m in 0..members {
        let seed = opts.seed.wrapping_add(m as u64);
        let mut net = Net::new(shape.clone(), seed);
        if let Some((top, silence)) = &tuned {
            net = net.with_front(top.clone(), silence.clone());
        }
        net.fit_normalization(&examples);
        let label = if members == 1 {
            "training".to_string()
        } else {
            format!("training network {}/{members}", m + 1)
        };
        let mut bar = Bar::new(&label, opts.epochs as u64);
        let net_opts = NetOptions {
            epochs: opts.epochs,
            threads: opts.threads,
            seed,
            front_epochs: opts.front_epochs,
            ..NetOptions::default()
        };
        let mut best = 0.0f32;
        net.train(&examples, &validation, &net_opts, |r| {
            best = best.max(r.validation_accuracy);
            bar.set(
                r.epoch as u64,
                &format!(
                    "loss {:.3}, validation {:.1}%",
                    r.loss,
                    100.0 * r.validation_accuracy
                ),
            );
        });
        bar.finish(&format!("best validation accuracy {:.1}%", 100.0 * best));
        validation_accuracy = best;
        nets.push(net);
    }
    if members > 1 {
        validation_accuracy = ensemble_accuracy(&nets, &validation);
        eprintln!(
            "{members} networks together: validation accuracy {:.1}%",
            100.0 * validation_accuracy
        );
    }
    let training_secs = train_started.elapsed().as_secs_f64();
    // What the thresholds are set on: every clip that must not be
    // understood (the validation's negatives and the calibration clips)
    // and the validation's commands, to spend the 1 % on.
    let clips = ThresholdClips::of(
        validation_jobs
            .iter()
            .copied()
            .zip(validation.iter().map(|e| e.features.as_slice())),
        calibration_jobs
            .iter()
            .zip(calibration_features.iter().map(Vec::as_slice)),
        plan.calibration_commands
            .iter()
            .zip(command_features.iter().map(Vec::as_slice)),
        n_intents,
    );
    let answers = clips.answered(|f| Ok(Net::predict_mean(&nets, f)))?;
    let heard = calibrate(&mut labels, &answers, opts.false_accepts);
    let calibration = kind_shares(&heard, &labels);
    let loudest_negatives = loudest_negatives(&heard);
    // Each member alone, on the goal conditions at its own threshold: what
    // the ensemble adds.
    let member_goal_accepted: Vec<f64> = if members > 1 {
        let goal_jobs: Vec<(&Job, &Vec<f32>)> = test
            .jobs
            .iter()
            .zip(&test_features)
            .filter(|(j, _)| test.goal.get(j.condition).copied().unwrap_or(false))
            .collect();
        let mut shares = Vec::with_capacity(nets.len());
        for net in &nets {
            let one = std::slice::from_ref(net);
            let mut alone = labels.clone();
            let answers = clips.answered(|f| Ok(Net::predict_mean(one, f)))?;
            calibrate(&mut alone, &answers, opts.false_accepts);
            let right = goal_jobs
                .iter()
                .filter(|(j, f)| {
                    accepted(
                        &alone,
                        &j.targets,
                        &alone.decode(&Net::predict_mean(one, f)),
                    )
                })
                .count();
            shares.push(right as f64 / goal_jobs.len().max(1) as f64);
        }
        shares
    } else {
        Vec::new()
    };

    // Export, load back on tract, evaluate there: the figures are the shipped model's.
    let model_path = opts.out.join(MODEL_FILE);
    let doc = format!("kith intent model for context sha256 {sha}");
    std::fs::write(&model_path, onnx::to_onnx_ensemble(&nets, &doc))
        .with_context(|| format!("writing {}", model_path.display()))?;
    std::fs::write(
        opts.out.join(LABELS_FILE),
        serde_json::to_string_pretty(&labels)?,
    )
    .with_context(|| format!("writing {}", opts.out.join(LABELS_FILE).display()))?;
    std::fs::write(opts.out.join("context.yaml"), &text)?;
    let mut model = IntentModel::load(&opts.out).context("loading the exported model on tract")?;
    let measured = measure(&mut model, test, &test_features)?;
    let report = Report {
        grammar_sha256: sha,
        intents: n_intents,
        slots: grammar.slots.len(),
        train_clips: examples.len(),
        negative_clips: plan.negatives,
        validation_clips: validation.len(),
        calibration_clips: calibration_jobs.len(),
        calibration_commands: plan.calibration_commands.len(),
        calibration,
        test_clips: test.jobs.len(),
        test_sentences: held_texts.len(),
        untested_intents: (0..n_intents)
            .filter(|i| !plan.held_out.tested.contains(i))
            .map(|i| labels.intents[i].clone())
            .collect(),
        train_voices: train_voices.voices.len(),
        test_voices: test_voices.voices.len(),
        accent_voices: plan.accent_voices.voices.len(),
        held_out_accent: voices::HELD_OUT_ACCENT.to_string(),
        mbrola_voices: train_voices.mbrola + test_voices.mbrola,
        train_rates: train_voices.rates.clone(),
        test_rates: test_voices.rates.clone(),
        noise_recordings: plan.train_bank.recorded.len(),
        parameters: nets.iter().map(Net::parameters).sum(),
        members,
        epochs: opts.epochs,
        front_epochs: if opts.tune_front.is_some() {
            kith_models::intent::net::tuned_epochs(opts.epochs, opts.front_epochs)
        } else {
            0
        },
        member_goal_accepted,
        model_bytes: std::fs::metadata(&model_path).map(|m| m.len()).unwrap_or(0),
        threshold: labels.threshold,
        intent_thresholds: Thresholds::of(&labels).own,
        validation_accuracy,
        loudest_negatives,
        synthesis_secs,
        training_secs,
        total_secs: started.elapsed().as_secs_f64(),
        seed: opts.seed,
        test_utterances: opts.test_utterances,
        test_babble_tracks: plan.test_bank.babble.len(),
        utterances: Some(opts.utterances),
        false_accept_budget: opts.false_accepts,
        far_salads: opts.far_salads,
        calibration_sentences: opts.calibration_sentences,
        test_hold_out: opts.test_hold_out,
        measured,
    };
    std::fs::write(opts.out.join(TEST_CLIPS_FILE), &report.measured.clip_lines)
        .with_context(|| format!("writing {}", opts.out.join(TEST_CLIPS_FILE).display()))?;
    std::fs::write(
        opts.out.join("metrics.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(
        opts.out.join("MODEL_CARD.md"),
        card(&opts.context, &labels, &report),
    )?;
    Ok(report)
}

/// What to measure again: a trained model on its own test clips.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// A directory `kith intent train` wrote.
    pub model: PathBuf,
    /// The training run's seed and test sentences (`None`: what the
    /// model's `metrics.json` records, else the trainer's defaults).
    pub seed: Option<u64>,
    pub test_utterances: Option<usize>,
    pub threads: usize,
    pub cache: Option<PathBuf>,
}

/// What [`evaluate`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub grammar_sha256: String,
    pub seed: u64,
    pub test_utterances: usize,
    pub test_babble_tracks: usize,
    pub test_clips: usize,
    pub test_sentences: usize,
    pub synthesis_secs: f64,
    #[serde(flatten)]
    pub measured: Measured,
    /// The model's label vocabulary, as loaded to measure it.
    #[serde(skip)]
    pub labels: Labels,
}

/// Measures a trained model again on the held-out test its training run
/// measured it on: the same sentences, voices and noise, made again from
/// the model's context, the seed and the number of test sentences. Two
/// models trained from one context and seed are so measured on the very
/// same clips, whenever each was trained, and their
/// [`TEST_CLIPS_FILE`]s compare clip by clip.
pub fn evaluate(front: &FrontFiles, opts: &EvalOptions) -> Result<Evaluation> {
    let mut model = IntentModel::load(&opts.model)
        .with_context(|| format!("loading the intent model {}", opts.model.display()))?;
    evaluate_model(front, &mut model, opts)
}

/// The grammar of the model in `dir` (whose labels are `labels`) from its
/// `context.yaml`, and that file's hash; refused if it is not the context
/// the model was trained on.
fn model_grammar(dir: &Path, labels: &Labels) -> Result<(Grammar, String)> {
    let context = dir.join("context.yaml");
    let (text, grammar) = read_context(&context)?;
    let sha = grammar_hash(&text);
    if sha != labels.grammar_sha256 {
        bail!(
            "{} is not the context the model was trained on (sha256 {sha}, the model's labels say {})",
            context.display(),
            labels.grammar_sha256
        );
    }
    Ok((grammar, sha))
}

/// What a model's `metrics.json` says its test was drawn with: older
/// models recorded neither, and a model copied without its metrics has none.
#[derive(Debug, Default, Deserialize)]
struct TestRecord {
    seed: Option<u64>,
    test_utterances: Option<usize>,
    /// Absent from a `metrics.json`: the word rule, the only one then;
    /// without a `metrics.json`: the trainer's default.
    #[serde(default = "words_rule")]
    test_hold_out: HoldOut,
}

impl TestRecord {
    /// `dir`'s record (empty without a `metrics.json`); a `metrics.json`
    /// that cannot be read as one is an error, not the defaults.
    fn of(dir: &Path) -> Result<TestRecord> {
        let path = dir.join("metrics.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TestRecord::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a kith model's metrics (move it away to measure the model on the default test)",
                path.display()
            )
        })
    }
}

/// [`evaluate`] for `model` as loaded (or given other thresholds) from
/// `opts.model`.
fn evaluate_model(
    front: &FrontFiles,
    model: &mut IntentModel,
    opts: &EvalOptions,
) -> Result<Evaluation> {
    let (grammar, sha) = model_grammar(&opts.model, model.labels())?;
    let recorded = TestRecord::of(&opts.model)?;
    let defaults = TrainOptions::default();
    let seed = opts.seed.or(recorded.seed).unwrap_or(defaults.seed);
    let test_utterances = opts
        .test_utterances
        .or(recorded.test_utterances)
        .unwrap_or(defaults.test_utterances);

    let test_voices = voices::voices(Split::Test)?;
    let accent_voices = voices::voices(Split::Accent)?;
    let oog_test = out_of_grammar(&grammar, Part::Test);
    if oog_test.is_empty() {
        bail!("every built-in out-of-grammar sentence is in this grammar: it accepts too much");
    }
    let started = Instant::now();
    let test_bank = test_noise(&oog_test, &test_voices, seed)?;
    // The rule is always the model's own: there is no test of another.
    let held_out = HeldOut::of(&grammar, seed, test_utterances, recorded.test_hold_out);
    let mut test = TestSet::new(
        &grammar,
        &held_out,
        &oog_test,
        &test_voices,
        &accent_voices,
        seed,
        test_utterances,
    )?;
    give_unsayable_another_voice(&mut test.jobs, &test_voices, voices::can_say)?;
    let how = Rendering {
        front: model.labels().front,
        threads: opts.threads,
        cache: opts.cache.as_deref(),
        noise_dirs: &[],
    };
    let features = render_cached(
        &test.jobs,
        front,
        &test_bank,
        &how,
        "synthesizing test clips",
    )?;
    let synthesis_secs = started.elapsed().as_secs_f64();
    let measured = measure(model, &test, &features)?;
    Ok(Evaluation {
        grammar_sha256: sha,
        seed,
        test_utterances,
        test_babble_tracks: test_bank.babble.len(),
        test_clips: test.jobs.len(),
        test_sentences: held_out.texts().len(),
        synthesis_secs,
        measured,
        labels: model.labels().clone(),
    })
}

/// What a model's training run recorded (its `metrics.json`).
pub fn read_report(model: &Path) -> Result<Report> {
    let path = model.join("metrics.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {}: updating a model's figures needs its training run's",
            path.display()
        )
    })?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is no metrics.json of kith intent train", path.display()))
}

/// Refuses a seed or test size other than the training run's: another
/// seed holds out other sentences, some of which training heard, so its
/// figures must never stand on the model's card.
pub fn same_test(report: &Report, seed: Option<u64>, test_utterances: Option<usize>) -> Result<()> {
    if seed.is_some_and(|s| s != report.seed)
        || test_utterances.is_some_and(|n| n != report.test_utterances)
    {
        bail!(
            "--update writes figures of the model's own test only: it was trained with seed {} and {} test sentences",
            report.seed,
            report.test_utterances
        );
    }
    Ok(())
}

/// Writes what [`evaluate`] measured into the model's own `metrics.json`
/// and `MODEL_CARD.md`, keeping what its training run recorded (data,
/// voices, threshold, time): for a model measured again on a test that
/// has changed since it was trained. Returns the updated report.
pub fn update_figures(model: &Path, e: &Evaluation) -> Result<Report> {
    let path = model.join("metrics.json");
    let mut report = read_report(model)?;
    if report.grammar_sha256 != e.grammar_sha256 {
        bail!(
            "{} is of another context (sha256 {}, measured {})",
            path.display(),
            report.grammar_sha256,
            e.grammar_sha256
        );
    }
    same_test(&report, Some(e.seed), Some(e.test_utterances))?;
    apply_figures(&mut report, e);
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::write(
        model.join("MODEL_CARD.md"),
        card(&model.join("context.yaml"), &e.labels, &report),
    )
    .with_context(|| format!("writing into {}", model.display()))?;
    Ok(report)
}

/// Puts what [`evaluate`] measured into `report`, keeping what its
/// training run recorded.
fn apply_figures(report: &mut Report, e: &Evaluation) {
    // Each network alone was measured on the training run's test, which
    // eval cannot do again (the model is their average): their figures
    // stay only if this is that test, which the model's answers show
    // (the same answers in every condition, on as many babble tracks).
    let same_answers = report.test_babble_tracks == e.test_babble_tracks
        && report.test_clips == e.test_clips
        && report.measured.conditions == e.measured.conditions
        && report.measured.false_accepts == e.measured.false_accepts;
    if !same_answers {
        report.member_goal_accepted.clear();
    }
    report.test_babble_tracks = e.test_babble_tracks;
    report.test_clips = e.test_clips;
    report.test_sentences = e.test_sentences;
    report.measured = e.measured.clone();
}

/// What the model answered on the held-out test (part of `metrics.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    /// Share of the goal conditions' clips (held-out voices, clean and at
    /// 12 dB and above) the model accepted, right.
    pub goal_accepted: f64,
    /// Acceptance per test condition: held-out voices clean, then each
    /// noise at each SNR; then the held-out accent.
    pub conditions: Vec<Condition>,
    /// Held-out in-grammar test clips (every condition) whose top choice
    /// was wrong, per head: `intent`, then each slot by name. Shows which
    /// slot's phrases the model confuses.
    pub head_errors: Vec<(String, usize)>,
    /// Acceptance at 12 dB and above and false accepts, were the threshold
    /// another: what moving `threshold` in `labels.json` would do.
    pub tradeoff: Vec<Tradeoff>,
    /// The most frequent intent mistakes on those clips: (said, heard,
    /// clips), where heard `none` means "not a command".
    pub intent_confusions: Vec<(String, String, usize)>,
    /// Per held-out voice variant, its clips in each goal condition: one
    /// voice far under the others is one the model hears badly, which the
    /// per-condition rows average away (empty in the metrics of models
    /// measured before this was kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub voices: Vec<VoiceRow>,
    /// Out-of-grammar test clips reported understood.
    pub false_accepts: usize,
    pub out_of_grammar_clips: usize,
    /// Mean time of the intent network on tract per command, ms.
    pub infer_ms: f64,
    /// [`TEST_CLIPS_FILE`]'s lines.
    #[serde(skip)]
    pub clip_lines: String,
}

/// One held-out voice variant's clips in the goal conditions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VoiceRow {
    /// The variant after `+` (`steph` of `en-us+steph`), or the whole
    /// name of a voice without one (`mb-us3`).
    pub voice: String,
    /// Per goal condition, in the conditions' order: its name, the
    /// voice's clips in it and how many of them were accepted.
    pub cells: Vec<(String, usize, usize)>,
}

/// The card's per-voice table (empty when no rows were measured).
fn voice_table(voices: &[VoiceRow]) -> String {
    let Some(first) = voices.first() else {
        return String::new();
    };
    let mut s = String::from(
        "\nPer held-out voice variant, clips accepted of its clips in each goal condition (one voice far under the others is one the model hears badly):\n\n| voice |",
    );
    for (name, _, _) in &first.cells {
        s.push_str(&format!(" {name} |"));
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(first.cells.len()));
    s.push('\n');
    for v in voices {
        s.push_str(&format!("| {} |", v.voice));
        for (_, clips, accepted) in &v.cells {
            s.push_str(&format!(" {accepted} / {clips} |"));
        }
        s.push('\n');
    }
    s
}

impl Measured {
    pub fn false_accept_rate(&self) -> f64 {
        self.false_accepts as f64 / self.out_of_grammar_clips.max(1) as f64
    }
}

/// Runs `model` on tract over the test's clips (`features`, in the test's
/// order) and counts what it answered.
fn measure(model: &mut IntentModel, test: &TestSet, features: &[Vec<f32>]) -> Result<Measured> {
    let mut false_accepts = 0;
    let mut oog_clips = 0;
    let infer_started = Instant::now();
    let labels = model.labels().clone();
    let mut any_score = labels.clone();
    any_score.threshold = 0.0;
    any_score.intent_thresholds.clear();
    let mut conditions = test.conditions.clone();
    let mut head_errors: Vec<(String, usize)> = std::iter::once("intent".to_string())
        .chain(labels.slots.iter().map(|s| s.name.clone()))
        .map(|n| (n, 0))
        .collect();
    let mut confusions: std::collections::HashMap<(usize, usize), usize> = Default::default();
    // (top choice exactly right, its score) of goal clips; the score of out-of-grammar clips.
    let mut goal_scores: Vec<(bool, f32)> = Vec::new();
    let mut oog_scores: Vec<f32> = Vec::new();
    let mut goal_accepted = 0usize;
    let goal_conditions: Vec<usize> = (0..conditions.len())
        .filter(|&i| test.goal.get(i).copied().unwrap_or(false))
        .collect();
    let mut voices: Vec<VoiceRow> = Vec::new();
    let mut clip_lines = String::new();
    for (job, features) in test.jobs.iter().zip(features) {
        let probs = model.probabilities(features)?;
        let u = labels.decode(&probs);
        let top = any_score.decode(&probs);
        let top_score = if top.intent.is_some() { top.score } else { 0.0 };
        clip_lines.push_str(&clip_line(
            &labels,
            job,
            &test.conditions,
            &top,
            u.understood,
        ));
        if job.condition == test.oog_condition {
            oog_clips += 1;
            false_accepts += usize::from(u.understood);
            oog_scores.push(top_score);
            continue;
        }
        let Some(c) = conditions.get_mut(job.condition) else {
            continue;
        };
        c.clips += 1;
        let right = accepted(&labels, &job.targets, &u);
        c.accepted += usize::from(right);
        c.wrong += usize::from(u.understood && !right);
        let top_right = accepted(&any_score, &job.targets, &top);
        c.top_right += usize::from(top_right);
        if let Some(column) = goal_conditions.iter().position(|&i| i == job.condition) {
            goal_scores.push((top_right, top_score));
            goal_accepted += usize::from(right);
            let variant = job.voice.variant();
            let row = match voices.iter().position(|v| v.voice == variant) {
                Some(r) => r,
                None => {
                    voices.push(VoiceRow {
                        voice: variant.to_string(),
                        cells: goal_conditions
                            .iter()
                            .map(|&i| (test.conditions[i].name.clone(), 0, 0))
                            .collect(),
                    });
                    voices.len() - 1
                }
            };
            let cell = &mut voices[row].cells[column];
            cell.1 += 1;
            cell.2 += usize::from(right);
        }
        if let (Some(Some(t)), Some(p)) = (job.targets.first(), probs.first()) {
            let heard = kith_models::intent::net::argmax(p);
            if heard != usize::from(*t) {
                *confusions.entry((usize::from(*t), heard)).or_insert(0usize) += 1;
            }
        }
        for ((t, p), e) in job.targets.iter().zip(&probs).zip(&mut head_errors) {
            if let Some(t) = t {
                e.1 += usize::from(kith_models::intent::net::argmax(p) != usize::from(*t));
            }
        }
    }
    let infer_ms = infer_started.elapsed().as_secs_f64() * 1e3 / test.jobs.len().max(1) as f64;
    voices.sort_by(|a, b| a.voice.cmp(&b.voice));
    Ok(Measured {
        goal_accepted: goal_accepted as f64 / goal_scores.len().max(1) as f64,
        conditions,
        head_errors,
        tradeoff: TRADEOFF_THRESHOLDS
            .iter()
            .map(|&t| Tradeoff {
                threshold: t,
                accepted: goal_scores.iter().filter(|(r, s)| *r && *s >= t).count() as f64
                    / goal_scores.len().max(1) as f64,
                false_accepts: oog_scores.iter().filter(|&&s| s >= t).count() as f64
                    / oog_scores.len().max(1) as f64,
            })
            .collect(),
        intent_confusions: {
            let name = |i: usize| {
                labels
                    .intents
                    .get(i)
                    .map_or("none", String::as_str)
                    .to_string()
            };
            let mut v: Vec<_> = confusions
                .into_iter()
                .map(|((t, h), n)| (name(t), name(h), n))
                .collect();
            v.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.cmp(b)));
            v.truncate(8);
            v
        },
        voices,
        false_accepts,
        out_of_grammar_clips: oog_clips,
        infer_ms,
        clip_lines,
    })
}

/// Every test clip, one JSON object per line: its condition, what was
/// said and by whom, the answer it should get and the network's top
/// choice (whatever its score).
pub const TEST_CLIPS_FILE: &str = "test_clips.jsonl";

/// One line of [`TEST_CLIPS_FILE`].
fn clip_line(
    labels: &Labels,
    job: &Job,
    conditions: &[Condition],
    top: &kith_models::intent::Understanding,
    understood: bool,
) -> String {
    let slots = |pairs: &[(String, String)]| -> serde_json::Map<String, serde_json::Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
            .collect()
    };
    let intent = job
        .targets
        .first()
        .copied()
        .flatten()
        .and_then(|t| labels.intents.get(usize::from(t)));
    let mut want: Vec<(String, String)> = Vec::new();
    for (s, slot) in labels.slots.iter().enumerate() {
        if let Some(Some(v)) = job.targets.get(1 + s)
            && *v > 0
            && let Some(value) = slot.values.get(usize::from(*v) - 1)
        {
            want.push((slot.name.clone(), value.clone()));
        }
    }
    let line = serde_json::json!({
        "condition": conditions.get(job.condition).map_or("out of grammar", |c| c.name.as_str()),
        "said": job.text,
        "voice": job.voice.espeak,
        "rate": job.rate,
        "pitch": job.pitch,
        "intent": intent,
        "slots": slots(&want),
        "heard": top.intent,
        "heard_slots": slots(&top.slots),
        "score": top.score,
        "understood": understood,
    });
    format!("{line}\n")
}

/// Share of examples whose every targeted head's top class, averaged over
/// the networks, is the target (as [`Net::accuracy`] for one network).
fn ensemble_accuracy(nets: &[Net], examples: &[Example]) -> f32 {
    let right = examples
        .iter()
        .filter(|e| {
            let probs = Net::predict_mean(nets, &e.features);
            e.targets.iter().zip(&probs).all(|(t, p)| {
                t.is_none_or(|t| kith_models::intent::net::argmax(p) == usize::from(t))
            })
        })
        .count();
    right as f32 / examples.len().max(1) as f32
}

/// Whether an understanding is exactly the target: understood, the intent
/// and every slot (and no extra slot).
fn accepted(
    labels: &Labels,
    targets: &[Option<u16>],
    u: &kith_models::intent::Understanding,
) -> bool {
    let Some(Some(intent)) = targets.first() else {
        return false;
    };
    let intent = usize::from(*intent);
    if !u.understood || u.intent.as_deref() != labels.intents.get(intent).map(String::as_str) {
        return false;
    }
    let mut want: Vec<(String, String)> = Vec::new();
    for &s in &labels.intent_slots[intent] {
        if let Some(Some(v)) = targets.get(1 + s)
            && *v > 0
        {
            want.push((
                labels.slots[s].name.clone(),
                labels.slots[s].values[usize::from(*v) - 1].clone(),
            ));
        }
    }
    let mut got = u.slots.clone();
    got.sort();
    want.sort();
    got == want
}

/// The model card: what the model was trained on and how it did.
pub fn card(context: &Path, labels: &Labels, r: &Report) -> String {
    let name = context
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut s = String::new();
    s.push_str(&format!("# Intent model for `{name}`\n\n"));
    s.push_str("Trained by `kith intent train` from the context grammar alone: synthetic speech, no recordings, no transcripts.\n\n");
    s.push_str(&format!(
        "- Grammar sha256: `{}`\n- Intents ({}): {}\n- Slots ({}): {}\n",
        r.grammar_sha256,
        labels.intents.len(),
        labels.intents.join(", "),
        labels.slots.len(),
        labels
            .slots
            .iter()
            .map(|s| format!("{} ({} values)", s.name, s.values.len()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let ensemble = if r.members > 1 {
        format!(
            "; an ensemble of {} such networks trained from different starts, whose probabilities the model averages{}",
            r.members,
            if r.member_goal_accepted.is_empty() {
                String::new()
            } else {
                format!(
                    " (each alone accepts {} of the goal conditions' clips)",
                    r.member_goal_accepted
                        .iter()
                        .map(|a| format!("{:.1} %", 100.0 * a))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        )
    } else {
        String::new()
    };
    s.push_str(&format!(
        "- Network: dilated 1-D convolutions over {} speech embeddings (5.12 s), attention-pooled heads{ensemble}; {} parameters, {} bytes of ONNX\n",
        FRAMES, r.parameters, r.model_bytes
    ));
    if let Some(depth) = labels.front.depth() {
        let when = if r.front_epochs < r.epochs {
            format!(
                "in the last {} of {} epochs (the first {} train the network alone on the pretrained layers' embeddings)",
                r.front_epochs,
                r.epochs,
                r.epochs - r.front_epochs
            )
        } else {
            format!("in all {} epochs", r.epochs)
        };
        s.push_str(&format!(
            "- Front end: the speech embedding's last {} layers (conv2d_{}–19) trained with the network from their pretrained weights, {when} (`--tune-front {}`); the model holds its copy of them and reads the rows before conv2d_{1}\n",
            depth.layers(),
            depth.first_layer(),
            depth.first_layer(),
        ));
    }

    let salads = if r.far_salads {
        " two words or more from any sentence of the grammar (`--far-salads`)"
    } else {
        ""
    };
    s.push_str(&format!(
        "- Data: {} training clips ({} of them \"not understood\": everyday sentences, shuffled grammar words{salads}, noise), {} validation, {} calibration (everyday sentences never trained on), {} test\n",
        r.train_clips + r.validation_clips, r.negative_clips, r.validation_clips, r.calibration_clips, r.test_clips
    ));
    s.push_str(&format!(
        "- Voices: {} for training, {} held out for the test ({} MBROLA voices in all); rates {:?} wpm for training, {:?} for the test\n",
        r.train_voices, r.test_voices, r.mbrola_voices, r.train_rates, r.test_rates
    ));
    s.push_str(&format!(
        "- Augmentation: noise at 0–30 dB SNR (white, pink, babble{}), reverb, ±gain, random placement\n",
        if r.noise_recordings > 0 {
            format!(", {} recordings", r.noise_recordings)
        } else {
            String::new()
        }
    ));
    let budget = format!("{} %", 100.0 * r.false_accept_budget);
    let mix = if r
        .calibration
        .iter()
        .any(|k| k.kind == Kind::Recorded.name())
    {
        "three parts everyday sentences never trained on, three parts the user's recordings and one part noise alone"
    } else {
        "three parts everyday sentences never trained on and one part noise alone"
    };
    let own = if r.intent_thresholds.is_empty() {
        String::new()
    } else {
        format!(
            " That {budget} is spent where it buys most: each intent has a threshold of its own (`intent_thresholds` in `labels.json`), lowered in hundredths, never under {:.2}, while it gains {} more right answers than wrong ones per negative let in, and then, where it stopped over the threshold for all, as far down to it as the budget has left: {}. Where one threshold for all would refuse commands that no negative comes near, these accept them; and the validation's commands, sentences training spoke, never hold an intent's over it on their own.",
            INTENT_THRESHOLD_FLOOR as f32 / 100.0,
            if r.calibration_commands > 0 {
                format!(
                    "the validation's commands and {} clips of commands training never spoke",
                    r.calibration_commands
                )
            } else {
                "the validation's commands".to_string()
            },
            r.intent_thresholds
                .iter()
                .map(|(n, t)| format!("{n} {t:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    s.push_str(&format!(
        "- Score threshold: {:.2}, the lowest at which at most {budget} of {mix} is accepted.{own} At {}: {}; validation accuracy {:.1}%\n- Time: {:.0} s synthesis and features, {:.0} s training, {:.0} s in all\n\n",
        r.threshold,
        if r.intent_thresholds.is_empty() { "it" } else { "them" },
        r.calibration
            .iter()
            .map(|k| format!("{} {} of {} accepted", k.kind, k.accepted, k.clips))
            .collect::<Vec<_>>()
            .join(", "),
        100.0 * r.validation_accuracy,
        r.synthesis_secs,
        r.training_secs,
        r.total_secs
    ));
    s.push_str("## Held-out test: command acceptance (intent and every slot right)\n\n");
    s.push_str(&format!(
        "{} sentences never trained on, spoken by voices and at rates never trained on; intents in turn. Holding them out left training at least half of the grammar's sentences that say each {} of them.{}\n\n",
        r.test_sentences,
        match r.test_hold_out {
            HoldOut::Words => "word and slot value",
            HoldOut::WordPairs => "word, slot value and pair of neighbouring words",
        },
        if r.untested_intents.is_empty() {
            String::new()
        } else {
            format!(
                " Not in the test (under 3 distinct sentences, none can be spared): {}.",
                r.untested_intents.join(", ")
            )
        }
    ));
    s.push_str(&format!(
        "The rows before the accent rows use {} voices: held-out espeak-ng variants of the training accents and a held-out MBROLA voice. The accent rows use {} variants of `{}`, an accent no training voice has. Babble: cuts of {} tracks, each three to five test voices saying out-of-grammar test sentences at once. *Wrong*: understood, but the intent or a slot wrong (the rest were answered \"not understood\"). *Top choice right*: the network's best answer was exactly right, whatever its score. *95 % interval*: where the acceptance rate lies, from the clips' count alone (Wilson); the clips share {} sentences and their voices, so the real spread is wider.\n\n",
        r.test_voices, r.accent_voices, r.held_out_accent, r.test_babble_tracks, r.test_sentences
    ));
    s.push_str(
        "| condition | clips | accepted | 95 % interval | wrong | top choice right |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for c in &r.measured.conditions {
        let (lo, hi) = c.accepted_interval();
        s.push_str(&format!(
            "| {} | {} | {:.1} % | {lo:.1}–{hi:.1} % | {:.1} % | {:.1} % |\n",
            c.name,
            c.clips,
            c.pct(c.accepted),
            c.pct(c.wrong),
            c.pct(c.top_right)
        ));
    }
    s.push_str(&voice_table(&r.measured.voices));
    s.push_str(&format!(
        "\nTop-choice errors per head over all {} in-grammar test clips: {}.\n",
        r.measured.conditions.iter().map(|c| c.clips).sum::<usize>(),
        r.measured
            .head_errors
            .iter()
            .map(|(h, n)| format!("{h} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    s.push_str(&format!(
        "\nThe score threshold trades acceptance for false accepts (held-out voices at 12 dB and above; out-of-grammar clips); {}:\n\n| threshold | accepted | false accepts |\n|---:|---:|---:|\n",
        if r.intent_thresholds.is_empty() {
            format!("this model uses {:.2}, calibrated on clips never tested, and `threshold` in `labels.json` changes it", r.threshold)
        } else {
            format!("this table is one threshold for all intents, which `threshold` in `labels.json` sets once `intent_thresholds` is removed (the model's own thresholds, calibrated on clips never tested, accept {:.1} % with {:.1} % false accepts)", 100.0 * r.measured.goal_accepted, 100.0 * r.measured.false_accept_rate())
        }
    ));
    for t in &r.measured.tradeoff {
        s.push_str(&format!(
            "| {:.2} | {:.1} % | {:.1} % |\n",
            t.threshold,
            100.0 * t.accepted,
            100.0 * t.false_accepts
        ));
    }
    s.push('\n');
    if !r.measured.intent_confusions.is_empty() {
        s.push_str(&format!(
            "Most frequent intent mistakes (said → heard, clips): {}.\n",
            r.measured
                .intent_confusions
                .iter()
                .map(|(a, b, n)| format!("{a} → {b} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !r.loudest_negatives.is_empty() {
        s.push_str("\nThe validation and calibration clips that must not be understood and scored highest:\n\n| kind | said | noise | heard as | score |\n|---|---|---|---|---:|\n");
        for n in &r.loudest_negatives {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {:.3} |\n",
                n.kind,
                if n.text.is_empty() { "—" } else { &n.text },
                n.noise,
                n.heard,
                n.score
            ));
        }
    }
    s.push_str(&format!(
        "\nOut-of-grammar sentences (held out, clean and at 12 dB): {} of {} accepted ({:.1} % false accepts).\n",
        r.measured.false_accepts,
        r.measured.out_of_grammar_clips,
        100.0 * r.measured.false_accept_rate()
    ));
    s.push_str(&format!(
        "\nThe training run writes each test clip's answer (what was said, by which voice, in which noise, and what was heard) to `{TEST_CLIPS_FILE}`; `kith intent eval --model DIR --out OUT` makes the same test clips again and writes it for this model.\n"
    ));
    s.push_str(&format!(
        "\nInference on tract: {:.2} ms per command for the network (features stream as the command is spoken).\n",
        r.measured.infer_ms
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wilson_interval_holds_the_rate_and_narrows_with_more_clips() {
        // At 0 of n and n of n the bounds have closed forms: z²/(n+z²)
        // and n/(n+z²).
        let z2 = 1.959_964f64.powi(2);
        let (lo, hi) = wilson_interval(0, 10);
        assert_eq!(lo, 0.0);
        assert!((hi - z2 / (10.0 + z2)).abs() < 1e-9, "{hi}");
        let (lo, hi) = wilson_interval(10, 10);
        assert!((lo - 10.0 / (10.0 + z2)).abs() < 1e-9, "{lo}");
        assert!(hi <= 1.0 && hi > 0.999_999, "{hi}");
        // 174 of 200 (the shipped model at babble 12 dB): 81.6–91.0 %.
        let (lo, hi) = wilson_interval(174, 200);
        assert!(
            (lo - 0.8163).abs() < 1e-4 && (hi - 0.9097).abs() < 1e-4,
            "{lo} {hi}"
        );
        // Mirror image: k of n failures is n − k of n successes.
        let (a, b) = wilson_interval(31, 200);
        let (c, d) = wilson_interval(169, 200);
        assert!((a - (1.0 - d)).abs() < 1e-12 && (b - (1.0 - c)).abs() < 1e-12);
        // Ten times the clips at the same rate: a narrower interval around it.
        let (lo10, hi10) = wilson_interval(1740, 2000);
        assert!(lo10 > lo && hi10 < hi && lo10 < 0.87 && hi10 > 0.87);
        assert_eq!(wilson_interval(0, 0), (0.0, 1.0));
        let cond = Condition {
            name: "babble 12 dB".into(),
            clips: 200,
            accepted: 174,
            wrong: 6,
            top_right: 187,
        };
        let (lo, hi) = cond.accepted_interval();
        assert!(
            (lo - 81.63).abs() < 0.01 && (hi - 90.97).abs() < 0.01,
            "{lo} {hi}"
        );
    }

    #[test]
    fn a_model_whose_metrics_name_no_hold_out_rule_is_measured_by_the_word_rule() {
        // Models trained before the word-pair rule were tested on sentences
        // the word rule held out, and their metrics do not name it.
        let record: TestRecord =
            serde_json::from_str(r#"{"seed": 3, "test_utterances": 50}"#).expect("json");
        assert_eq!(record.test_hold_out, HoldOut::Words);
        let record: TestRecord =
            serde_json::from_str(r#"{"seed": 3, "test_hold_out": "word-pairs"}"#).expect("json");
        assert_eq!(record.test_hold_out, HoldOut::WordPairs);
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/intents");
        for name in ["smart-home", "coffee"] {
            let record = TestRecord::of(&shipped.join(name)).expect("the shipped metrics");
            assert_eq!(record.test_hold_out, HoldOut::Words, "{name}");
        }
        // Without a metrics.json: what the trainer does now.
        let dir = tempfile::tempdir().expect("tempdir");
        let record = TestRecord::of(dir.path()).expect("no record");
        assert_eq!(record.test_hold_out, TrainOptions::default().test_hold_out);
        assert_eq!(record.test_hold_out, HoldOut::WordPairs);
        // What a training run writes names its rule.
        let json = serde_json::to_value(HoldOut::WordPairs).expect("json");
        assert_eq!(json, serde_json::json!("word-pairs"));
    }

    #[test]
    fn far_salads_are_two_words_or_more_from_every_sentence() {
        let grammar = Grammar::parse(
            "context:\n  expressions:\n    cancel:\n      - \"[cancel, forget] (my, the) order\"\n    order:\n      - \"(a) $drink:drink (please)\"\n  slots:\n    drink: [\"latte\", \"green tea\"]\n",
        )
        .expect("a good grammar");
        let said: Vec<String> = [
            "forget my order",
            "cancel the order",
            "a latte please",
            "green tea",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let vocab = vocabulary(&said);
        // One word left out, put in or changed makes a sentence.
        for near in [
            "forget my my order",
            "order",
            "cancel order please",
            "a latte cancel",
            "tea please",
        ] {
            assert!(one_word_from_grammar(&grammar, near, &vocab), "{near}");
        }
        // Two changes away: a word put in is only one word of a phrase.
        for far in [
            "order forget",
            "my the cancel",
            "please please order",
            "order green",
            "tea latte a a",
        ] {
            assert!(!one_word_from_grammar(&grammar, far, &vocab), "{far}");
        }
        let mut rng = Rng::new(3);
        let mut drawn = HashSet::new();
        for _ in 0..100 {
            let text = far_salad(&grammar, &mut rng, &said, &vocab).expect("far salads exist");
            assert!(grammar.parse_text(&text).is_none(), "{text}");
            assert!(!one_word_from_grammar(&grammar, &text, &vocab), "{text}");
            drawn.insert(text);
        }
        assert!(drawn.len() > 50, "{} different salads", drawn.len());
    }

    /// cancel has 4 sentences; order has 3 x 30.
    fn orders_grammar() -> Grammar {
        let values: Vec<String> = (0..30).map(|k| format!("\"drink {k}\"")).collect();
        Grammar::parse(&format!(
            "context:\n  expressions:\n    cancel:\n      - \"[cancel, forget] (the) order\"\n    order:\n      - \"[a, one, my] $drink:drink\"\n  slots:\n    drink: [{}]\n",
            values.join(", ")
        ))
        .expect("a good grammar")
    }

    #[test]
    fn calibration_commands_are_sentences_neither_trained_on_nor_tested() {
        // cancel has 4 sentences, all trained on; order has 3 x 30.
        let grammar = orders_grammar();
        let mut said: Vec<String> = ["cancel order", "forget order", "cancel the order"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        said.push("forget the order".into());
        said.extend((0..30).map(|k| format!("a drink {k}")));
        let held: HashSet<String> = (0..10).map(|k| format!("one drink {k}")).collect();
        let voices = VoiceSet {
            split: Split::Train,
            voices: vec![Voice {
                espeak: "en-us".into(),
            }],
            rates: vec![160],
            mbrola: 0,
        };
        let bank = NoiseBank {
            babble: vec![vec![0; 32_000]],
            recorded: Vec::new(),
        };
        let jobs = calibration_commands(&grammar, &[], &said, &held, &voices, &bank, 7);
        let texts: HashSet<&str> = jobs.iter().map(|j| j.text.as_str()).collect();
        assert_eq!(jobs.len(), texts.len() * CLIPS_PER_CALIBRATION_COMMAND);
        assert_eq!(texts.len(), CALIBRATION_COMMANDS_PER_INTENT, "{texts:?}");
        for job in &jobs {
            assert!(
                !said.contains(&job.text) && !held.contains(&job.text),
                "{}",
                job.text
            );
            let (intent, slots) = grammar
                .parse_text(&job.text)
                .expect("a sentence of the grammar");
            assert_eq!(intent, 1, "{}", job.text);
            let u = Utterance {
                text: job.text.clone(),
                intent,
                slots,
            };
            assert_eq!(job.targets, targets_of(&grammar, &u));
            assert_eq!(job.kind, Kind::Command);
        }
        // The same seed draws the same clips; another, others.
        let again = calibration_commands(&grammar, &[], &said, &held, &voices, &bank, 7);
        assert_eq!(format!("{again:?}"), format!("{jobs:?}"));
        let other = calibration_commands(&grammar, &[], &said, &held, &voices, &bank, 8);
        assert_ne!(format!("{other:?}"), format!("{jobs:?}"));
    }

    #[test]
    fn sentences_kept_for_the_thresholds_are_neither_trained_on_nor_tested() {
        // order has 3 x 30 sentences: enough to keep some for the test and
        // some for the thresholds; cancel's 4 give none to the thresholds.
        let grammar = orders_grammar();
        let labels = labels_of(&grammar, "sha");
        let draw = |calibration_sentences| TrainOptions {
            utterances: 300,
            test_utterances: 10,
            calibration_sentences,
            seed: 11,
            ..TrainOptions::default()
        };
        let texts = |jobs: &[Job]| -> HashSet<String> {
            jobs.iter()
                .filter(|j| j.kind == Kind::Command)
                .map(|j| j.text.clone())
                .collect()
        };
        let kept = plan(&grammar, &labels, &draw(4)).expect("a plan");
        let plain = plan(&grammar, &labels, &draw(0)).expect("a plan");
        let trained = texts(&kept.jobs);
        let tested = texts(&kept.test.jobs);
        let for_thresholds = texts(&kept.calibration_commands);
        // Without sentences kept, the thresholds hear only what neither
        // training nor the test says of this grammar; with them, more.
        assert!(
            for_thresholds.len() > texts(&plain.calibration_commands).len(),
            "{for_thresholds:?}"
        );
        for text in &for_thresholds {
            assert!(!trained.contains(text), "trained on {text}");
            assert!(!tested.contains(text), "tested on {text}");
            assert!(text.ends_with(char::is_numeric), "not an order: {text}");
        }
        assert_eq!(tested, texts(&plain.test.jobs), "the test is the same");
    }

    #[test]
    fn a_foreign_carrier_puts_the_value_after_the_start_of_one_sentence_and_before_another() {
        let sentences: Vec<String> = ["what time is it now", "the dog sleeps all day long"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut rng = Rng::new(5);
        let mut with_tail = 0;
        for _ in 0..200 {
            let text = foreign_carrier("forty five minutes", &sentences, &mut rng);
            let (before, after) = text
                .split_once(" forty five minutes")
                .expect("the phrase is in the carrier");
            assert!(
                sentences.iter().any(|s| s.starts_with(before)),
                "{before:?} does not start a sentence"
            );
            let words = before.split_whitespace().count();
            assert!((1..=5).contains(&words), "{text}");
            let after = after.trim();
            if !after.is_empty() {
                with_tail += 1;
                assert!(sentences.iter().any(|s| s.starts_with(after)), "{text}");
                assert!(after.split_whitespace().count() <= 3, "{text}");
            }
        }
        assert!(
            (60..140).contains(&with_tail),
            "{with_tail} of 200 had words after"
        );
    }

    #[test]
    fn a_clip_whose_voice_cannot_say_its_sentence_gets_an_espeak_voice_of_the_same_set() {
        let set = VoiceSet {
            split: Split::Test,
            voices: ["en-us+m7", "en-gb+f4", "mb-us3"]
                .iter()
                .map(|v| Voice {
                    espeak: v.to_string(),
                })
                .collect(),
            rates: vec![145],
            mbrola: 1,
        };
        let job = |text: &str, voice: &str, seed: u64| Job {
            text: text.into(),
            voice: Voice {
                espeak: voice.into(),
            },
            rate: 145,
            pitch: 50,
            speed: 1.0,
            recipe: Recipe::clean(),
            targets: vec![Some(0)],
            condition: 0,
            seed,
            kind: Kind::Command,
        };
        let mut jobs = vec![
            job("turn the lights on", "mb-us3", 3),
            job("turn the lights on", "mb-us3", 4),
            job("will it rain today", "mb-us3", 5),
            job("turn the lights on", "en-us+m7", 6),
        ];
        let before = jobs.clone();
        let mut asked = Vec::new();
        let changed = give_unsayable_another_voice(&mut jobs, &set, |v, text| {
            asked.push((v.espeak.clone(), text.to_string()));
            Ok(!(voices::is_mbrola(v) && text.ends_with(" on")))
        })
        .expect("every clip has a voice");
        assert_eq!(changed, 2);
        // The seed picks among espeak-ng's voices: 3 % 2 and 4 % 2.
        assert_eq!(jobs[0].voice.espeak, "en-gb+f4");
        assert_eq!(jobs[1].voice.espeak, "en-us+m7");
        // Everything else about the clips, and the other clips, is as it was.
        assert_eq!(
            format!("{:?}", jobs[0].recipe),
            format!("{:?}", before[0].recipe)
        );
        assert_eq!(
            (jobs[0].seed, jobs[0].rate, &jobs[0].text),
            (3, 145, &before[0].text)
        );
        assert_eq!(jobs[2].voice, before[2].voice);
        assert_eq!(jobs[3].voice, before[3].voice);
        // Each (voice, sentence) is asked once; espeak-ng's voices never.
        assert_eq!(asked.len(), 2);

        // A set with no espeak-ng voice left says so rather than keep the clip.
        let only_mbrola = VoiceSet {
            voices: vec![Voice {
                espeak: "mb-us3".into(),
            }],
            ..set
        };
        let mut jobs = vec![job("turn the lights on", "mb-us3", 3)];
        let err = give_unsayable_another_voice(&mut jobs, &only_mbrola, |_, _| Ok(false))
            .expect_err("no voice can say it");
        assert!(err.to_string().contains("cannot say"), "{err}");
    }

    #[test]
    fn clips_cut_from_other_babble_are_cached_under_another_name() {
        let jobs = vec![Job {
            text: "turn on the lights".into(),
            voice: Voice {
                espeak: "en-us".into(),
            },
            rate: 155,
            pitch: 50,
            speed: 1.0,
            recipe: Recipe {
                noise: Some((NoiseKind::Babble, 12.0)),
                ..Recipe::clean()
            },
            targets: vec![Some(0)],
            condition: 0,
            seed: 7,
            kind: Kind::Command,
        }];
        let opts = TrainOptions::default();
        let opts = Rendering::of(&opts);
        let bank = |tracks: Vec<Vec<i16>>| NoiseBank {
            babble: tracks,
            recorded: Vec::new(),
        };
        let key = cache_key(&jobs, &bank(vec![vec![1, 2, 3], vec![4, 5]]), &opts);
        assert_eq!(
            key,
            cache_key(&jobs, &bank(vec![vec![1, 2, 3], vec![4, 5]]), &opts),
            "the same clips must find their cache entry"
        );
        for other in [
            vec![vec![1, 2, 3], vec![4, 6]],
            vec![vec![1, 2], vec![3, 4, 5]],
            vec![vec![1, 2, 3]],
        ] {
            assert_ne!(
                key,
                cache_key(&jobs, &bank(other.clone()), &opts),
                "{other:?}"
            );
        }
    }
}
