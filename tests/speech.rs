//! Real speech: phrases spoken by espeak-ng in several voices and rates go
//! through the WAV source (22.05 kHz, resampled), the streaming front end and
//! every wake-word head, exactly as `kith listen --wav` runs them.
//!
//! Needs espeak-ng (Debian) and the models (`kith models fetch --all`) in
//! `$KITH_MODELS_DIR`; the README's test command installs both.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use kith::catalog::Catalog;
use kith::listen::{self, ListenEvent, ListenOptions};
use kith::store::ModelStore;
use kith_hal::WavSource;

/// Voice and words-per-minute variants each phrase is spoken in.
const VOICES: [(&str, u32); 4] = [
    ("en-us", 140),
    ("en-us", 170),
    ("en-gb", 140),
    ("en-gb", 170),
];

fn store() -> ModelStore {
    let dir = std::env::var_os("KITH_MODELS_DIR")
        .map(PathBuf::from)
        .expect("KITH_MODELS_DIR is not set: run the README's test command, or `kith models fetch --all` and export it");
    ModelStore::new(dir, Catalog::builtin().expect("catalog"))
}

fn speak(dir: &Path, text: &str, voice: &str, wpm: u32) -> PathBuf {
    let path = dir.join(format!(
        "{voice}-{wpm}-{}.wav",
        text.replace(|c: char| !c.is_alphanumeric(), "_")
    ));
    let status = Command::new("espeak-ng")
        .args(["-v", voice, "-s", &wpm.to_string(), "-w"])
        .arg(&path)
        .arg(text)
        .status()
        .expect("espeak-ng is not installed: `apt-get install espeak-ng` (the README's test command does)");
    assert!(status.success(), "espeak-ng failed on {text:?}");
    path
}

/// The wake words (with class label for timer) that fire on `text` in each voice variant.
fn heard(text: &str) -> Vec<BTreeSet<String>> {
    let store = store();
    let (mut pipeline, _) =
        listen::load_pipeline(&store, &ListenOptions::default()).expect("pipeline");
    let dir = tempfile::tempdir().expect("tmp");
    VOICES
        .iter()
        .map(|(voice, wpm)| {
            let wav = speak(dir.path(), text, voice, *wpm);
            let mut source = WavSource::open(&wav).expect("espeak wav opens");
            pipeline.reset().expect("reset");
            let mut fired = BTreeSet::new();
            listen::run(&mut pipeline, None, &mut source, 1000, &mut |e| {
                if let ListenEvent::Wake(e) = e {
                    fired.insert(match e.label {
                        Some(l) => format!("{}:{l}", e.model),
                        None => e.model,
                    });
                }
            })
            .expect("listen");
            fired
        })
        .collect()
}

/// `expected` fires in at least `min_hits` of the voice variants, and nothing else ever fires.
fn assert_detected(text: &str, expected: &str, min_hits: usize) {
    let results = heard(text);
    let hits = results.iter().filter(|f| f.contains(expected)).count();
    let wrong: BTreeSet<&String> = results
        .iter()
        .flatten()
        .filter(|m| *m != expected)
        .collect();
    assert!(
        hits >= min_hits,
        "{text:?}: {expected} fired in {hits} of {} voices (want ≥ {min_hits}): {results:?}",
        results.len()
    );
    assert!(
        wrong.is_empty(),
        "{text:?}: wrong wake words fired: {wrong:?}"
    );
}

#[test]
fn alexa_is_heard_by_the_alexa_model() {
    assert_detected("alexa", "alexa", 3);
}

#[test]
fn hey_jarvis_is_heard_by_the_hey_jarvis_model() {
    assert_detected("hey jarvis", "hey_jarvis", 4);
}

#[test]
fn hey_mycroft_is_heard_by_the_hey_mycroft_model() {
    // espeak-ng mispronounces "mycroft"; this spelling makes it say the word.
    assert_detected("hey my croft", "hey_mycroft", 4);
}

#[test]
fn whats_the_weather_is_heard_by_the_weather_model() {
    assert_detected("what's the weather", "weather", 4);
}

#[test]
fn a_five_minute_timer_is_heard_as_the_five_minute_class() {
    assert_detected("set a timer for five minutes", "timer:5_minute_timer", 4);
}

#[test]
fn ordinary_sentences_fire_nothing() {
    for text in [
        "the quick brown fox jumps over the lazy dog",
        "turn on the kitchen lights",
        "please call my mother tomorrow morning",
    ] {
        let results = heard(text);
        assert!(
            results.iter().all(BTreeSet::is_empty),
            "{text:?} fired {results:?}"
        );
    }
}

#[test]
fn a_timer_command_after_other_phrases_is_labelled_by_its_duration() {
    // The timer head crosses the threshold on "set a timer" (as a 1-minute
    // timer) before "five minutes" is said; the pipeline holds the
    // detection until the duration is heard.
    let store = store();
    let (mut pipeline, _) =
        listen::load_pipeline(&store, &ListenOptions::default()).expect("pipeline");
    let dir = tempfile::tempdir().expect("tmp");
    let wav = speak(
        dir.path(),
        "hey jarvis. what's the weather. set a timer for five minutes.",
        "en-gb",
        160,
    );
    let mut source = WavSource::open(&wav).expect("wav");
    let mut heard = Vec::new();
    listen::run(&mut pipeline, None, &mut source, 1000, &mut |e| {
        if let ListenEvent::Wake(e) = e {
            heard.push((e.model, e.label))
        }
    })
    .expect("listen");
    let expected = [
        ("hey_jarvis".to_string(), None),
        ("weather".to_string(), None),
        ("timer".to_string(), Some("5_minute_timer".to_string())),
    ];
    assert_eq!(heard, expected);
}
