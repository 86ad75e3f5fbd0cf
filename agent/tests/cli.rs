//! The `kith` command line as a user meets it: fetching, listing,
//! listening, and every way those go wrong.
//!
//! Tests that listen need the models (`$KITH_MODELS_DIR`, installed by the
//! README's test command); fetch tests use its wheel cache as a local mirror
//! so they never touch the network.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn kith(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kith"))
        .args(args)
        .output()
        .expect("kith runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn installed_models() -> PathBuf {
    let dir = std::env::var_os("KITH_MODELS_DIR")
        .map(PathBuf::from)
        .expect("KITH_MODELS_DIR is not set: run the README's test command");
    assert!(
        dir.join("hey_jarvis.onnx").exists(),
        "no models in {}",
        dir.display()
    );
    dir
}

/// A directory holding the pinned wheel, usable as `--find-links`.
fn mirror() -> PathBuf {
    let wheels = installed_models().join(".wheels");
    assert!(
        wheels.join("openwakeword-0.4.0-py3-none-any.whl").exists(),
        "no cached wheel in {}",
        wheels.display()
    );
    wheels
}

fn utterance() -> PathBuf {
    // "hey jarvis, what's the weather", 16 kHz mono, 1 s of silence around it.
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/tests/fixtures/utterance.wav"
    ))
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn listen_json_prints_one_wake_event_per_phrase_with_time_and_score() {
    let models = installed_models();
    let out = kith(&[
        "--models-dir",
        path_str(&models),
        "listen",
        "--wav",
        path_str(&utterance()),
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let events: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let models_heard: Vec<&str> = events
        .iter()
        .map(|e| e["model"].as_str().expect("model"))
        .collect();
    assert_eq!(models_heard, ["hey_jarvis", "weather"], "{events:?}");
    for e in &events {
        assert_eq!(e["event"], "wake");
        let score = e["score"].as_f64().expect("score");
        assert!((0.5..=1.0).contains(&score), "{e}");
    }
    let t0 = events[0]["t_ms"].as_u64().expect("t_ms");
    let t1 = events[1]["t_ms"].as_u64().expect("t_ms");
    // Speech starts at 1.0 s in the file; "hey jarvis" ends before "weather".
    assert!(
        (1000..2500).contains(&t0) && t1 > t0 + 300 && t1 < 4000,
        "{t0} {t1}"
    );
}

#[test]
fn listen_with_vad_still_hears_speech() {
    let models = installed_models();
    let out = kith(&[
        "--models-dir",
        path_str(&models),
        "listen",
        "--wav",
        path_str(&utterance()),
        "--json",
        "--vad",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("hey_jarvis"), "{}", stdout(&out));
}

#[test]
fn a_truncated_file_keeps_the_events_heard_before_the_cut_and_fails_clearly() {
    let models = installed_models();
    let dir = tempfile::tempdir().expect("tmp");
    let cut = dir.path().join("cut.wav");
    let bytes = std::fs::read(utterance()).expect("fixture");
    // Header + 2.6 s of audio: "hey jarvis" survives, "the weather" does not.
    std::fs::write(&cut, &bytes[..44 + 2 * 16_000 * 26 / 10]).expect("write");
    let out = kith(&[
        "--models-dir",
        path_str(&models),
        "listen",
        "--wav",
        path_str(&cut),
        "--json",
    ]);
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("hey_jarvis"),
        "events before the cut are kept: {}",
        stdout(&out)
    );
    assert!(stderr(&out).contains("truncated"), "{}", stderr(&out));
}

#[test]
fn listening_to_a_file_that_is_not_audio_fails_before_loading_models() {
    let dir = tempfile::tempdir().expect("tmp");
    let notwav = dir.path().join("notes.wav");
    std::fs::write(&notwav, "shopping list: milk").expect("write");
    let empty_models = dir.path().join("none");
    let out = kith(&[
        "--models-dir",
        path_str(&empty_models),
        "listen",
        "--wav",
        path_str(&notwav),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not a WAV file"), "{}", stderr(&out));
}

#[test]
fn listening_without_models_says_how_to_fetch_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = kith(&[
        "--models-dir",
        path_str(dir.path()),
        "listen",
        "--wav",
        path_str(&utterance()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("kith models fetch"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_unknown_wake_word_is_named_with_the_known_ones() {
    let models = installed_models();
    let out = kith(&[
        "--models-dir",
        path_str(&models),
        "listen",
        "--wav",
        path_str(&utterance()),
        "--wake",
        "hey_kith",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("unknown model `hey_kith`") && err.contains("alexa"),
        "{err}"
    );
}

#[test]
fn fetch_from_a_mirror_installs_a_wake_word_with_what_it_needs_and_list_shows_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let models = dir.path().join("models");
    let out = kith(&[
        "--models-dir",
        path_str(&models),
        "models",
        "fetch",
        "alexa",
        "--find-links",
        path_str(&mirror()),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let progress = stderr(&out);
    for step in [
        "[1/3] melspectrogram.onnx",
        "[2/3] embedding_model.onnx",
        "[3/3] alexa.onnx",
    ] {
        assert!(
            progress.contains(step),
            "progress line for {step}: {progress}"
        );
    }
    assert_eq!(
        files_in(&models),
        [
            ".wheels",
            "alexa.onnx",
            "embedding_model.onnx",
            "melspectrogram.onnx"
        ]
    );

    let list = kith(&[
        "--models-dir",
        path_str(&models),
        "models",
        "list",
        "--json",
    ]);
    let rows: Vec<Value> = stdout(&list)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let status = |name: &str| {
        rows.iter()
            .find(|r| r["name"] == name)
            .map(|r| r["status"].clone())
    };
    assert_eq!(status("alexa"), Some(Value::from("ok")));
    assert_eq!(status("hey_jarvis"), Some(Value::from("missing")));
    let alexa = rows
        .iter()
        .find(|r| r["name"] == "alexa")
        .expect("alexa row");
    assert_eq!(alexa["bytes"], 854_246);
    assert_eq!(alexa["license"], "CC-BY-NC-SA-4.0");

    // A second fetch verifies and skips.
    let again = kith(&[
        "--models-dir",
        path_str(&models),
        "models",
        "fetch",
        "alexa",
        "--find-links",
        path_str(&mirror()),
    ]);
    assert!(again.status.success());
    assert!(
        stderr(&again).contains("already installed"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn a_tampered_wheel_is_refused_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("tmp");
    let evil = dir.path().join("mirror");
    std::fs::create_dir(&evil).expect("mkdir");
    let mut bytes =
        std::fs::read(mirror().join("openwakeword-0.4.0-py3-none-any.whl")).expect("wheel");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(evil.join("openwakeword-0.4.0-py3-none-any.whl"), bytes).expect("write");
    let models = dir.path().join("models");
    let out = kith(&[
        "--models-dir",
        path_str(&models),
        "models",
        "fetch",
        "alexa",
        "--find-links",
        path_str(&evil),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("sha256 mismatch for openwakeword-0.4.0-py3-none-any.whl"),
        "{}",
        stderr(&out)
    );
    assert_eq!(files_in(&models), [".wheels"]);
    assert!(
        files_in(&models.join(".wheels")).is_empty(),
        "{:?}",
        files_in(&models.join(".wheels"))
    );
}

#[test]
fn a_model_whose_hash_differs_from_the_catalog_is_not_installed() {
    let dir = tempfile::tempdir().expect("tmp");
    let catalog = dir.path().join("catalog.toml");
    let text = kith::catalog::BUILTIN.replace(
        "6ff566a01d12670e8d9e3c59da32651db1575d17272a601b7f8a39283dfbae3e",
        "0000000000000000000000000000000000000000000000000000000000000000",
    );
    std::fs::write(&catalog, text).expect("write");
    let models = dir.path().join("models");
    let out = kith(&[
        "--catalog",
        path_str(&catalog),
        "--models-dir",
        path_str(&models),
        "models",
        "fetch",
        "alexa",
        "--find-links",
        path_str(&mirror()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("sha256 mismatch for model `alexa`"),
        "{}",
        stderr(&out)
    );
    let files = files_in(&models);
    assert!(
        !files.iter().any(|f| f.starts_with("alexa")),
        "no alexa file, partial or whole: {files:?}"
    );
}

#[test]
fn list_flags_an_installed_file_that_was_modified() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("weather.onnx"), b"not the model").expect("write");
    let out = kith(&["--models-dir", path_str(dir.path()), "models", "list"]);
    assert!(out.status.success());
    let line = stdout(&out)
        .lines()
        .find(|l| l.starts_with("weather"))
        .map(str::to_owned)
        .expect("weather row");
    assert!(line.contains("MISMATCH"), "{line}");
    // And listening refuses it with the fix.
    let out = kith(&[
        "--models-dir",
        path_str(dir.path()),
        "listen",
        "--wav",
        path_str(&utterance()),
        "--wake",
        "weather",
    ]);
    assert!(
        stderr(&out).contains("does not match the catalog's sha256"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn fetching_an_unknown_model_lists_the_known_ones() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = kith(&[
        "--models-dir",
        path_str(dir.path()),
        "models",
        "fetch",
        "gemma-9000",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unknown model `gemma-9000`"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn listening_to_the_microphone_without_a_sound_card_says_so() {
    if std::path::Path::new("/proc/asound/cards").exists() {
        eprintln!(
            "SKIPPED: this machine has ALSA sound cards; the no-card message cannot be checked here"
        );
        return;
    }
    let models = installed_models();
    let out = kith(&["--models-dir", path_str(&models), "listen", "--mic"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no sound card"), "{}", stderr(&out));
}
