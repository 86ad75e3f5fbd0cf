//! `kith listen`: an audio source through the wake-word pipeline, one event
//! per detection.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use kith_hal::AudioSource;
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
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            wake: Vec::new(),
            threshold: 0.5,
            refractory_ms: 2000,
            vad_threshold: None,
            embedding: EmbeddingMode::default(),
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

/// Runs `source` through `pipeline`, with `pad_ms` of silence before and
/// after (openWakeWord pads clips the same way: heads need context on both
/// sides of a word). Events are passed to `on_event` as they happen, so an
/// error late in the stream loses none of the earlier ones.
pub fn run(
    pipeline: &mut WakeWordPipeline,
    source: &mut dyn AudioSource,
    pad_ms: u32,
    on_event: &mut dyn FnMut(WakeEvent),
) -> Result<ListenStats> {
    let pad = pad_ms as usize * kith_models::SAMPLE_RATE as usize / 1000;
    let lead_ms = pipeline.elapsed_ms() + u64::from(pad_ms);
    let mut chunk = [0i16; CHUNK_SAMPLES];
    let started = Instant::now();
    let start_ms = pipeline.elapsed_ms();
    let mut emit = |d: Detection| on_event(WakeEvent::from_detection(d, lead_ms));
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
        pipeline.process_chunk(&chunk, &mut emit)?;
    }
    pipeline.flush(&mut emit);
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
