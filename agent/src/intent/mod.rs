//! Speech to intent in the agent: training a model from a context grammar
//! (`kith intent train`), running one on WAV files (`kith intent infer`),
//! and the JSON every caller gets.

pub mod augment;
pub mod train;
pub mod voices;

use std::path::{Path, PathBuf};

use std::sync::Mutex;

use anyhow::{Context, Result};
use kith_hal::{AudioSource, WavSource};
use kith_models::intent::{CommandFront, IntentModel, Understanding};
use serde_json::{Map, Value, json};

use crate::store::ModelStore;

/// Longest file `kith intent infer` reads, in samples (a command is a few
/// seconds; the model looks at the last 5.12 s).
const MAX_SAMPLES: usize = 16_000 * 60;

/// Every `.wav` file under `path` (itself if it is a file), sorted.
pub fn wav_files(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut dirs = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let p = entry?.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("wav")) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A whole WAV file as 16 kHz mono (up to a minute).
pub fn read_wav(path: &Path) -> Result<Vec<i16>> {
    read_samples(path, Some(MAX_SAMPLES))
}

/// A whole WAV file as 16 kHz mono, of at most `max` samples if given
/// (longer is an error naming the file, as is a truncated file).
pub fn read_samples(path: &Path, max: Option<usize>) -> Result<Vec<i16>> {
    let mut source = WavSource::open(path)?;
    let mut out = Vec::new();
    let mut buf = [0i16; 4096];
    loop {
        let n = source
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
        if let Some(max) = max
            && out.len() > max
        {
            anyhow::bail!(
                "{} is longer than {} s: a command is a few seconds (cut the file)",
                path.display(),
                max / 16_000
            );
        }
    }
}

/// A speech-to-intent model with its audio front end, for whole commands
/// (`POST /v1/audio/intents`). Blocking: run it off the async runtime. One
/// command at a time; callers queue on the lock.
pub struct IntentEngine {
    /// The model's directory name (`smart-home`): what API callers ask for.
    pub name: String,
    pub dir: PathBuf,
    inner: Mutex<(CommandFront, IntentModel, Vec<f32>)>,
}

/// The intent model in `dir` and the audio front end its features come from.
pub fn load_model(store: &ModelStore, dir: &Path) -> Result<(CommandFront, IntentModel)> {
    let model = IntentModel::load(dir).with_context(|| {
        format!(
            "loading the intent model in {} (train one with `kith intent train`)",
            dir.display()
        )
    })?;
    let front = CommandFront::load_for(
        model.front(),
        &store.require("melspectrogram")?,
        &store.require("embedding_model")?,
    )
    .context("loading the audio front end for commands")?;
    Ok((front, model))
}

impl IntentEngine {
    /// Loads the model in `dir` and the front end from `store`.
    pub fn load(store: &ModelStore, dir: &Path) -> Result<IntentEngine> {
        let (front, model) = load_model(store, dir)?;
        let features = model.front().features();
        let name = dir
            .canonicalize()
            .unwrap_or_else(|_| dir.to_path_buf())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "intent".into());
        Ok(IntentEngine {
            name,
            dir: dir.to_path_buf(),
            inner: Mutex::new((front, model, vec![0.0; features])),
        })
    }

    /// What a whole command (16 kHz mono) means.
    pub fn understand(&self, samples: &[i16]) -> Result<Understanding> {
        let mut guard = self
            .inner
            .lock()
            .map_err(|_| anyhow::anyhow!("the intent engine failed earlier (a panic)"))?;
        let (front, model, features) = &mut *guard;
        front.features_of(samples, features)?;
        Ok(model.infer(features)?)
    }
}

/// Rounds a score to 4 decimals for output.
fn round4(x: f32) -> f64 {
    (f64::from(x) * 10_000.0).round() / 10_000.0
}

/// The JSON of one understanding: `{"understood": true, "intent", "slots",
/// "score"}` or `{"understood": false}`, after the given leading fields.
pub fn understanding_json(mut fields: Map<String, Value>, u: &Understanding) -> Value {
    fields.insert("understood".into(), json!(u.understood));
    if u.understood {
        if let Some(intent) = &u.intent {
            fields.insert("intent".into(), json!(intent));
        }
        let slots: Map<String, Value> =
            u.slots.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        fields.insert("slots".into(), Value::Object(slots));
        fields.insert("score".into(), json!(round4(u.score)));
    }
    Value::Object(fields)
}

/// One line of human output.
pub fn understanding_text(u: &Understanding) -> String {
    if !u.understood {
        return "not understood".to_string();
    }
    let mut s = u.intent.clone().unwrap_or_default();
    for (k, v) in &u.slots {
        s.push_str(&format!(" {k}=\"{v}\""));
    }
    s.push_str(&format!(" (score {:.2})", u.score));
    s
}
