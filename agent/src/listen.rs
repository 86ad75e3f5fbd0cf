//! `kith listen`: an audio source through the wake-word pipeline, one event
//! per detection; with an intent model, the command after each wake word
//! is captured until the speaker stops (VAD) and understood: one `intent`
//! event per command.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use kith_hal::AudioSource;
use kith_models::intent::{CommandFront, IntentModel};
use kith_models::{
    CHUNK_SAMPLES, Detection, EmbeddingMode, SpeechFrontEnd, Vad, WakeHead, WakeWordPipeline,
};
use serde::Serialize;

use crate::store::{ModelStore, Status};

/// How to listen.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    /// Wake-word heads to run; empty means every installed one.
    pub wake: Vec<String>,
    /// Score at or above which a head fires.
    pub threshold: f32,
    /// After firing, a head stays quiet this long.
    pub refractory_ms: u32,
    /// Gate detections on the silero VAD at this score.
    pub vad_threshold: Option<f32>,
    /// Streaming (cheaper, 80 ms later) or windowed (openWakeWord's) embedding.
    pub embedding: EmbeddingMode,
    /// After a wake word, understand the command with this intent model.
    pub intent: Option<PathBuf>,
    /// How a command is cut.
    pub command: CommandOptions,
}

/// How the command after a wake word is captured.
#[derive(Debug, Clone, Copy)]
pub struct CommandOptions {
    /// VAD score at or above which a chunk is speech.
    pub vad_threshold: f32,
    /// Silence after speech that ends the command.
    pub end_silence_ms: u32,
    /// A command is cut after this long, speech or not.
    pub max_ms: u32,
    /// Give up if no speech starts within this long of the wake word.
    pub no_speech_ms: u32,
}

impl Default for CommandOptions {
    fn default() -> Self {
        CommandOptions {
            vad_threshold: 0.5,
            end_silence_ms: 640,
            max_ms: 6000,
            no_speech_ms: 3000,
        }
    }
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            wake: Vec::new(),
            threshold: 0.5,
            refractory_ms: 2000,
            vad_threshold: None,
            embedding: EmbeddingMode::default(),
            intent: None,
            command: CommandOptions::default(),
        }
    }
}

/// One line of `kith listen --json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WakeEvent {
    pub t_ms: u64,
    pub event: &'static str,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub score: f32,
}

impl WakeEvent {
    fn from_detection(d: Detection, lead_ms: u64) -> Self {
        let label = (d.label != d.model).then_some(d.label);
        // Scores rounded to 4 decimals for readable output.
        let score = (d.score * 10_000.0).round() / 10_000.0;
        WakeEvent {
            t_ms: d.t_ms.saturating_sub(lead_ms),
            event: "wake",
            model: d.model,
            label,
            score,
        }
    }
}

/// One `intent` event: what the command after a wake word meant.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IntentEvent {
    /// When the command ended (ms into the stream).
    pub t_ms: u64,
    pub event: &'static str,
    /// The wake word that opened the command.
    pub wake: String,
    pub understood: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    /// What ended the capture: `silence`, `timeout`, `no speech`, `end of audio`.
    pub ended_by: &'static str,
    /// From the end of the command to this event: the intent network and
    /// the last chunks of features.
    pub latency_ms: f64,
}

/// An event of `kith listen`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum ListenEvent {
    Wake(WakeEvent),
    Intent(IntentEvent),
}

/// A command being captured.
struct Capture {
    wake: String,
    /// Audio since the wake word, ms.
    elapsed_ms: u32,
    speech_seen: bool,
    /// Non-speech since the last speech, ms.
    silence_ms: u32,
}

/// Audio from before the wake word's decision that a command starts with
/// (ms). The wake word fires a few chunks after its last syllable (and the
/// streaming embedding decides 80 ms later still), by which time a speaker
/// who barely pauses has begun the command: without it, the command's first
/// sound is cut, which the intent model never heard in training (its clips
/// start with 50–800 ms before the speech).
pub const PRE_ROLL_MS: u32 = 240;
/// The pre-roll in chunks.
const PRE_ROLL_CHUNKS: usize = (PRE_ROLL_MS / CHUNK_MS) as usize;

/// Captures and understands the command after a wake word.
pub struct CommandListener {
    front: CommandFront,
    model: IntentModel,
    vad: Vad,
    opts: CommandOptions,
    capture: Option<Capture>,
    features: Vec<f32>,
    /// The last chunks heard while no command was captured, oldest first.
    recent: VecDeque<[i16; CHUNK_SAMPLES]>,
}

/// Milliseconds per chunk.
const CHUNK_MS: u32 = (CHUNK_SAMPLES as u32) * 1000 / kith_models::SAMPLE_RATE;

impl CommandListener {
    /// Loads the intent model in `dir` with its front end and a VAD.
    pub fn load(store: &ModelStore, dir: &std::path::Path, opts: CommandOptions) -> Result<Self> {
        let (front, model) = crate::intent::load_model(store, dir)?;
        let vad = Vad::load(&store.require("silero_vad_folded")?)
            .context("loading the VAD (it finds the end of a command)")?;
        Ok(CommandListener {
            front,
            features: vec![0.0; model.front().features()],
            model,
            vad,
            opts,
            capture: None,
            recent: VecDeque::with_capacity(PRE_ROLL_CHUNKS + 1),
        })
    }

    /// A chunk heard while no command is captured: kept for the pre-roll.
    pub fn hear(&mut self, chunk: &[i16; CHUNK_SAMPLES]) {
        if self.recent.len() == PRE_ROLL_CHUNKS {
            self.recent.pop_front();
        }
        if PRE_ROLL_CHUNKS > 0 {
            self.recent.push_back(*chunk);
        }
    }

    /// Whether a command is being captured.
    pub fn capturing(&self) -> bool {
        self.capture.is_some()
    }

    /// A wake word fired: the command is the pre-roll (the last chunks
    /// [`hear`](Self::hear) kept), then the next chunks.
    pub fn begin(&mut self, wake: &str) -> Result<()> {
        self.front.begin()?;
        self.vad.reset();
        for chunk in self.recent.drain(..) {
            self.front.push(&chunk)?;
        }
        self.capture = Some(Capture {
            wake: wake.to_string(),
            elapsed_ms: 0,
            speech_seen: false,
            silence_ms: 0,
        });
        Ok(())
    }

    /// Feeds one chunk of the command; returns the event when it ended.
    pub fn push(&mut self, chunk: &[i16], t_ms: u64) -> Result<Option<IntentEvent>> {
        let Some(capture) = self.capture.as_mut() else {
            return Ok(None);
        };
        self.front.push(chunk)?;
        let speech = self.vad.chunk_probability(chunk)? >= self.opts.vad_threshold;
        capture.elapsed_ms += CHUNK_MS;
        if speech {
            capture.speech_seen = true;
            capture.silence_ms = 0;
        } else if capture.speech_seen {
            capture.silence_ms += CHUNK_MS;
        }
        let ended_by = if capture.speech_seen && capture.silence_ms >= self.opts.end_silence_ms {
            Some("silence")
        } else if capture.elapsed_ms >= self.opts.max_ms {
            Some("timeout")
        } else if !capture.speech_seen && capture.elapsed_ms >= self.opts.no_speech_ms {
            Some("no speech")
        } else {
            None
        };
        match ended_by {
            Some(why) => self.finish(why, t_ms).map(Some),
            None => Ok(None),
        }
    }

    /// Ends the capture (also at the end of the audio) and understands it.
    pub fn finish(&mut self, ended_by: &'static str, t_ms: u64) -> Result<IntentEvent> {
        let started = Instant::now();
        let capture = self
            .capture
            .take()
            .context("no command is being captured")?;
        let understood = if capture.speech_seen {
            self.front.finish(&mut self.features)?;
            Some(self.model.infer(&self.features)?)
        } else {
            None
        };
        let latency_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut event = IntentEvent {
            t_ms,
            event: "intent",
            wake: capture.wake,
            understood: false,
            intent: None,
            slots: None,
            score: None,
            ended_by: if capture.speech_seen {
                ended_by
            } else {
                "no speech"
            },
            latency_ms: (latency_ms * 100.0).round() / 100.0,
        };
        if let Some(u) = understood
            && u.understood
        {
            event.understood = true;
            event.intent = u.intent;
            event.slots = Some(
                u.slots
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::String(v)))
                    .collect(),
            );
            event.score = Some((u.score * 10_000.0).round() / 10_000.0);
        }
        Ok(event)
    }
}

/// Figures of one run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ListenStats {
    /// Time to load and plan every model.
    pub load_ms: f64,
    /// Audio processed, padding included.
    pub audio_ms: u64,
    /// Wall time spent in the pipeline.
    pub process_ms: f64,
    /// process / audio: below 1 is faster than real time.
    pub rtf: f64,
}

/// Loads the front end, the chosen heads and optionally the VAD.
pub fn load_pipeline(store: &ModelStore, opts: &ListenOptions) -> Result<(WakeWordPipeline, f64)> {
    let started = Instant::now();
    let catalog = store.catalog();
    let names: Vec<String> = if opts.wake.is_empty() {
        let mut installed = Vec::new();
        for m in catalog.wake_words() {
            if let Status::Ok { .. } = store.status(m)? {
                installed.push(m.name.clone());
            }
        }
        if installed.is_empty() {
            bail!(
                "no wake-word model is installed in {} (run `kith models fetch --all`)",
                store.dir().display()
            );
        }
        installed
    } else {
        opts.wake.clone()
    };
    let mut heads = Vec::with_capacity(names.len());
    for name in &names {
        let entry = catalog.model(name)?;
        if entry.task != "wake-word" {
            bail!("model `{name}` is a {} model, not a wake word", entry.task);
        }
        let path = store.require(name)?;
        heads.push(
            WakeHead::load(name, &path, &entry.labels)
                .with_context(|| format!("loading wake word `{name}`"))?,
        );
    }
    let history = heads.iter().map(WakeHead::window).max().unwrap_or(1);
    let front = SpeechFrontEnd::load_files(
        &store.require("melspectrogram")?,
        &store.require("embedding_model")?,
        history,
        opts.embedding,
    )
    .context("loading the audio front end")?;
    let mut pipeline = WakeWordPipeline::new(front, heads, opts.threshold, opts.refractory_ms)?;
    if let Some(t) = opts.vad_threshold {
        let vad = Vad::load(&store.require("silero_vad_folded")?).context("loading the VAD")?;
        pipeline = pipeline.with_vad(vad, t);
    }
    Ok((pipeline, started.elapsed().as_secs_f64() * 1e3))
}

/// After a command ends, wake words are ignored this long (ms).
const AFTER_COMMAND_QUIET_MS: u64 = 500;

/// Runs `source` through `pipeline`, with `pad_ms` of silence before and
/// after (openWakeWord pads clips the same way: heads need context on both
/// sides of a word). Events are passed to `on_event` as they happen, so an
/// error late in the stream loses none of the earlier ones.
pub fn run(
    pipeline: &mut WakeWordPipeline,
    mut commands: Option<&mut CommandListener>,
    source: &mut dyn AudioSource,
    pad_ms: u32,
    on_event: &mut dyn FnMut(ListenEvent),
) -> Result<ListenStats> {
    let pad = pad_ms as usize * kith_models::SAMPLE_RATE as usize / 1000;
    let lead_ms = pipeline.elapsed_ms() + u64::from(pad_ms);
    let mut chunk = [0i16; CHUNK_SAMPLES];
    let started = Instant::now();
    let start_ms = pipeline.elapsed_ms();
    let mut woke: Option<String> = None;
    // Stream time (ms, as detections count it) before which a wake word is
    // an echo of the command just understood: heads that hear a long
    // window (timer, weather) fire on a command's own words after it ends.
    let mut quiet_until_ms = 0u64;
    // The stream is `pad` zeros, the source, `pad` zeros, cut into chunks
    // exactly as openWakeWord cuts a padded clip.
    let mut lead = pad;
    let mut trail = pad;
    let mut failure = None;
    let mut source_done = false;
    loop {
        let mut filled = 0;
        while filled < CHUNK_SAMPLES {
            if lead > 0 {
                let n = lead.min(CHUNK_SAMPLES - filled);
                chunk[filled..filled + n].fill(0);
                filled += n;
                lead -= n;
            } else if !source_done {
                match source.read(&mut chunk[filled..]) {
                    Ok(0) => source_done = true,
                    Ok(n) => filled += n,
                    Err(e) => {
                        failure = Some(e);
                        source_done = true;
                    }
                }
            } else if trail > 0 {
                let n = trail.min(CHUNK_SAMPLES - filled);
                chunk[filled..filled + n].fill(0);
                filled += n;
                trail -= n;
            } else {
                break;
            }
        }
        if filled == 0 {
            break;
        }
        chunk[filled..].fill(0);
        let capturing = commands.as_ref().is_some_and(|c| c.capturing());
        pipeline.process_chunk(&chunk, &mut |d: Detection| {
            // A wake word heard while a command is captured, or just after
            // it, is part of it.
            if !capturing && d.t_ms >= quiet_until_ms {
                woke.get_or_insert_with(|| d.model.clone());
                on_event(ListenEvent::Wake(WakeEvent::from_detection(d, lead_ms)));
            }
        })?;
        if let Some(c) = commands.as_deref_mut() {
            let t_ms = pipeline.elapsed_ms().saturating_sub(lead_ms);
            if capturing {
                if let Some(event) = c.push(&chunk, t_ms)? {
                    quiet_until_ms = pipeline.elapsed_ms() + AFTER_COMMAND_QUIET_MS;
                    on_event(ListenEvent::Intent(event));
                }
            } else {
                c.hear(&chunk);
            }
            if let Some(wake) = woke.take() {
                c.begin(&wake)?;
            }
        }
    }
    pipeline.flush(&mut |d: Detection| {
        on_event(ListenEvent::Wake(WakeEvent::from_detection(d, lead_ms)))
    });
    if let Some(c) = commands
        && c.capturing()
    {
        let t_ms = pipeline.elapsed_ms().saturating_sub(lead_ms);
        on_event(ListenEvent::Intent(c.finish("end of audio", t_ms)?));
    }
    let process_ms = started.elapsed().as_secs_f64() * 1e3;
    let audio_ms = pipeline.elapsed_ms() - start_ms;
    if let Some(e) = failure {
        return Err(e).context(format!("reading {}", source.describe()));
    }
    Ok(ListenStats {
        load_ms: 0.0,
        audio_ms,
        process_ms,
        rtf: process_ms / audio_ms.max(1) as f64,
    })
}
