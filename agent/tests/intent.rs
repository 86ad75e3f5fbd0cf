//! Speech to intent as a user meets it: `kith intent check`, `train`,
//! `infer` and `listen --intent`, with speech synthesized by espeak-ng in
//! voices the models never trained on.
//!
//! A small context is trained once per run of this file (about a minute);
//! the shipped smart-home model is tested as shipped. Needs the models
//! (`$KITH_MODELS_DIR`) and espeak-ng, installed by the README's test command.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::{Value, json};

fn kith(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kith"))
        .args(args)
        .output()
        .expect("kith runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn models_dir() -> PathBuf {
    let dir = std::env::var_os("KITH_MODELS_DIR")
        .map(PathBuf::from)
        .expect("KITH_MODELS_DIR is not set: run the README's test command");
    assert!(
        dir.join("embedding_model.onnx").exists(),
        "no models in {}",
        dir.display()
    );
    dir
}

/// Speaks `text` into `path` (16 kHz mono) with a held-out voice and rate.
fn say(path: &Path, voice: &str, rate: u32, text: &str) {
    let ok = Command::new("espeak-ng")
        .args(["-v", voice, "-s", &rate.to_string(), "-w"])
        .arg(path)
        .arg(text)
        .status()
        .expect("espeak-ng runs (apt-get install espeak-ng)")
        .success();
    assert!(ok, "espeak-ng failed for {voice}");
}

/// The test context: lights and a fan in three rooms.
const SMALL_CONTEXT: &str = r#"
context:
  expressions:
    lightsOn:
      - "turn on the $room:room light"
      - "switch on the $room:room light"
    lightsOff:
      - "turn off the $room:room light"
      - "switch off the $room:room light"
    fanSpeed:
      - "set the fan to $speed:speed"
  slots:
    room: ["kitchen", "bedroom", "garden"]
    speed: ["low", "medium", "high"]
"#;

/// Trains the small context (64 channels) in `dir` with `args` added;
/// returns the model directory and what training printed.
fn train_small_context(dir: &Path, args: &[&str]) -> (PathBuf, String) {
    let context = dir.join("lights.yaml");
    std::fs::write(&context, SMALL_CONTEXT).expect("write context");
    let out = dir.join("model");
    let mut all = vec![
        "--models-dir",
        p(&models_dir()),
        "intent",
        "train",
        "--context",
        p(&context),
        "--out",
        p(&out),
        "--channels",
        "64",
    ]
    .into_iter()
    .map(str::to_string)
    .collect::<Vec<_>>();
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let o = kith(&all);
    assert!(o.status.success(), "training failed: {}", text(&o.stderr));
    (out, text(&o.stderr))
}

/// Trains the small context on 300 sentences (10 for the test): the
/// quickest run that still exercises an option end to end.
fn train_tiny(dir: &Path, args: &[&str]) -> (PathBuf, String) {
    let mut all = vec!["--utterances", "300", "--test-utterances", "10"];
    all.extend_from_slice(args);
    train_small_context(dir, &all)
}

/// Trains the small context once for every test of this file.
fn small_model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("intent-small-context");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let (out, _) = train_small_context(
            &dir,
            &[
                "--utterances",
                "1500",
                "--test-utterances",
                "30",
                "--epochs",
                "40",
            ],
        );
        out
    })
}

/// Asserts that `o` failed saying `says`, before any clip was made.
fn refused_before_any_clip(o: &std::process::Output, says: &str) {
    let err = text(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains(says), "{err}");
    assert!(!err.contains("synthesizing"), "{err}");
}

fn metrics(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).expect("metrics.json"))
        .expect("metrics json")
}

#[test]
fn a_bad_grammar_is_refused_with_file_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "context:\n  expressions:\n    on:\n      - \"turn on the $room:room light\"\n",
    )
    .expect("write");
    for args in [
        vec!["intent", "check", p(&bad)],
        vec![
            "intent",
            "train",
            "--context",
            p(&bad),
            "--out",
            p(dir.path()),
        ],
    ] {
        let o = kith(&args);
        assert!(!o.status.success());
        let err = text(&o.stderr);
        assert!(
            err.contains(&format!("{}:4:22: unknown slot type `room`", bad.display())),
            "{err}"
        );
    }
    let o = kith(&[
        "intent",
        "check",
        p(&repo("models/intents/smart-home/context.yaml")),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("intent changeBrightness: location (6 values), level (10 values)")
    );
}

#[test]
fn a_small_context_trained_in_the_suite_understands_held_out_voices() {
    let dir = small_model();
    for f in [
        "intent.onnx",
        "labels.json",
        "context.yaml",
        "MODEL_CARD.md",
        "metrics.json",
        "test_clips.jsonl",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    // One line per test clip, each saying what was said and what was heard.
    let clips = std::fs::read_to_string(dir.join("test_clips.jsonl")).expect("test clips");
    let lines: Vec<Value> = clips
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert!(!lines.is_empty());
    assert!(
        lines
            .iter()
            .all(|l| l["said"].is_string() && l["understood"].is_boolean())
    );
    assert!(lines.iter().any(|l| l["condition"] == "babble 12 dB"));
    let labels: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("labels.json")).expect("labels"))
            .expect("json");
    assert_eq!(
        labels["intents"],
        serde_json::json!(["lightsOn", "lightsOff", "fanSpeed"])
    );
    assert_eq!(
        labels["slots"][0]["values"],
        serde_json::json!(["kitchen", "bedroom", "garden"])
    );
    let m = metrics(dir);
    let condition = |name: &str| -> &Value {
        m["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no condition {name}"))
    };
    let rate = |name: &str| {
        let c = condition(name);
        c["accepted"].as_f64().expect("n") / c["clips"].as_f64().expect("n")
    };
    // Stated accuracy for this small context on its held-out sentences
    // (one each of lightsOn and lightsOff: fanSpeed's 3 sentences each say
    // a speed no other says, so none can be spared), voices and rates:
    // measured 96.7 % clean and 90.0 % in pink noise at 18 dB (seeds 2 and 3:
    // 100/100 % and 93.3/100 %), at a threshold calibrated on everyday
    // sentences never trained on. Training that learned nothing accepts
    // none, since out-of-grammar speech stays rejected.
    assert!(rate("clean") >= 0.8, "clean acceptance {}", rate("clean"));
    assert!(
        rate("pink 18 dB") >= 0.8,
        "pink 18 dB acceptance {}",
        rate("pink 18 dB")
    );
    assert_eq!(m["untested_intents"], serde_json::json!(["fanSpeed"]));
    let fa =
        m["false_accepts"].as_f64().expect("n") / m["out_of_grammar_clips"].as_f64().expect("n");
    assert!(fa <= 0.05, "false accept rate {fa}");
    // Per held-out voice variant, the goal conditions' clips: every clip
    // of those conditions is some voice's, and so is every accepted one.
    let voices = m["voices"].as_array().expect("voices");
    assert!(voices.len() >= 2, "{voices:?}");
    let goal: Vec<&Value> = voices[0]["cells"]
        .as_array()
        .expect("cells")
        .iter()
        .map(|c| &c[0])
        .collect();
    assert!(
        goal.contains(&&serde_json::json!("babble 12 dB")),
        "{goal:?}"
    );
    for (k, name) in goal.iter().enumerate() {
        let name = name.as_str().expect("a condition");
        let sum = |field: usize| -> u64 {
            voices
                .iter()
                .map(|v| v["cells"][k][field].as_u64().expect("n"))
                .sum()
        };
        let c = condition(name);
        assert_eq!(Some(sum(1)), c["clips"].as_u64(), "{name}");
        assert_eq!(Some(sum(2)), c["accepted"].as_u64(), "{name}");
    }
    let card = std::fs::read_to_string(dir.join("MODEL_CARD.md")).expect("card");
    assert!(card.contains("| babble 12 dB |"), "{card}");
    for v in voices {
        let voice = v["voice"].as_str().expect("a voice");
        assert!(!voice.contains('+'), "{voice}");
        let cells = v["cells"].as_array().expect("cells");
        let row = format!("| {voice} | {} / {} |", cells[0][2], cells[0][1]);
        assert!(card.contains(&row), "no {row} in {card}");
    }
    // Each condition's acceptance with its interval, which holds it.
    let row = card
        .lines()
        .find(|l| l.starts_with("| clean |"))
        .expect("a clean row");
    let cells: Vec<f64> = row
        .split('|')
        .flat_map(|c| c.split('–'))
        .filter_map(|c| c.trim().trim_end_matches('%').trim().parse().ok())
        .collect();
    assert!(
        cells.len() == 6 && cells[2] <= cells[1] && cells[1] <= cells[3],
        "{row}"
    );
}

#[test]
fn members_train_an_ensemble_that_infer_runs_as_one_model() {
    let single = metrics(small_model());
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, err) = train_tiny(dir.path(), &["--epochs", "6", "--members", "2"]);
    assert!(err.contains("training network 2/2"), "{err}");
    let m = metrics(&out);
    assert_eq!(m["members"], 2);
    assert_eq!(
        m["parameters"].as_u64().expect("n"),
        2 * single["parameters"].as_u64().expect("n"),
        "two networks of the small model's shape"
    );
    let alone = m["member_goal_accepted"].as_array().expect("array");
    assert_eq!(alone.len(), 2);
    assert!(
        alone
            .iter()
            .all(|a| (0.0..=1.0).contains(&a.as_f64().expect("n")))
    );
    let card = std::fs::read_to_string(out.join("MODEL_CARD.md")).expect("card");
    assert!(card.contains("an ensemble of 2 such networks"), "{card}");
    // The ensemble is one ONNX file: infer loads and answers it as any model.
    answer_of(&out, "turn on the kitchen light");
    let context = dir.path().join("lights.yaml");
    let o = kith(&[
        "intent",
        "train",
        "--members",
        "0",
        "--context",
        p(&context),
        "--out",
        p(&out),
    ]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("--members"), "{}", text(&o.stderr));
}

#[test]
fn tune_front_trains_the_embeddings_top_into_a_model_that_infer_runs() {
    let single = metrics(small_model());
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, err) = train_tiny(
        dir.path(),
        &[
            "--epochs",
            "4",
            "--members",
            "2",
            "--tune-front",
            "--front-epochs",
            "2",
        ],
    );
    assert!(err.contains("training network 2/2"), "{err}");
    let m = metrics(&out);
    assert_eq!(
        (m["epochs"].as_u64(), m["front_epochs"].as_u64()),
        (Some(4), Some(2))
    );
    assert_eq!(metrics(small_model())["front_epochs"].as_u64(), Some(0));
    // Each member carries its own copy of conv2d_15–19 (five 96×96×3
    // kernels, four biases) on top of the small model's network.
    let top = 5 * 3 * 96 * 96 + 4 * 96;
    assert_eq!(
        metrics(&out)["parameters"].as_u64().expect("n"),
        2 * (single["parameters"].as_u64().expect("n") + top)
    );
    let labels = std::fs::read_to_string(out.join("labels.json")).expect("labels");
    assert!(labels.contains(r#""front": "cut""#), "{labels}");
    let plain = std::fs::read_to_string(small_model().join("labels.json")).expect("labels");
    assert!(!plain.contains("front"), "plain labels stay as they were");
    let card = std::fs::read_to_string(out.join("MODEL_CARD.md")).expect("card");
    assert!(
        card.contains("(conv2d_15–19) trained with the network")
            && card.contains("in the last 2 of 4 epochs"),
        "{card}"
    );
    answer_of(&out, "turn off the bedroom light");
    // The front's epochs are some of the epochs, and only with --tune-front.
    let context = dir.path().join("lights.yaml");
    for (args, says) in [
        (
            &["--tune-front", "--front-epochs", "5"][..],
            "--front-epochs must be between 1 and --epochs (4)",
        ),
        (
            &["--tune-front", "--front-epochs", "0"][..],
            "--front-epochs must be between 1",
        ),
        (&["--front-epochs", "2"][..], "--tune-front"),
        (
            &["--tune-front", "12"][..],
            "15 (five layers), 13 (seven) or 11 (nine)",
        ),
    ] {
        let mut all = vec![
            "intent",
            "train",
            "--epochs",
            "4",
            "--context",
            p(&context),
            "--out",
            p(&out),
        ];
        all.extend_from_slice(args);
        let o = kith(&all);
        assert!(!o.status.success(), "{args:?}");
        assert!(
            text(&o.stderr).contains(says),
            "{args:?}: {}",
            text(&o.stderr)
        );
    }
}

#[test]
fn tune_front_from_conv2d_11_trains_the_nine_layers_into_a_model_that_infer_runs() {
    let single = metrics(small_model());
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, _) = train_tiny(
        dir.path(),
        &["--epochs", "3", "--tune-front", "11", "--front-epochs", "1"],
    );
    // conv2d_11 (72 channels in) to conv2d_19: one 72×96×3 kernel, eight
    // 96×96×3, eight biases, on top of the small model's network.
    let top = 3 * 72 * 96 + 8 * 3 * 96 * 96 + 8 * 96;
    assert_eq!(
        metrics(&out)["parameters"].as_u64().expect("n"),
        single["parameters"].as_u64().expect("n") + top
    );
    let labels = std::fs::read_to_string(out.join("labels.json")).expect("labels");
    assert!(labels.contains(r#""front": "cut11""#), "{labels}");
    let card = std::fs::read_to_string(out.join("MODEL_CARD.md")).expect("card");
    assert!(
        card.contains("last 9 layers (conv2d_11–19) trained with the network")
            && card.contains("reads the rows before conv2d_11"),
        "{card}"
    );
    answer_of(&out, "turn off the bedroom light");
}

#[test]
fn a_run_is_reproducible_from_its_seed() {
    // Runs are compared clip by clip (models/intents/EXPERIMENTS.md): the
    // same seed and options must train the same networks, byte for byte,
    // the embedding's tuned layers and an ensemble included; another seed
    // other ones.
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    let onnx = |name: &str, seed: &str| {
        let run = dir.path().join(name);
        std::fs::create_dir_all(&run).expect("dir");
        let (out, _) = train_tiny(
            &run,
            &[
                "--seed",
                seed,
                "--epochs",
                "2",
                "--members",
                "2",
                "--tune-front",
                "11",
                "--front-epochs",
                "1",
                "--cache",
                p(&cache),
            ],
        );
        std::fs::read(out.join("intent.onnx")).expect("model")
    };
    let first = onnx("first", "7");
    let again = onnx("again", "7");
    let other = onnx("other", "8");
    assert!(first == again, "seed 7 trained two different models");
    assert!(first != other, "seeds 7 and 8 trained the same model");
}

/// `kith intent infer --json` on `sentence` said by a held-out voice: its
/// one JSON line, checked to say whether it understood.
fn answer_of(model: &Path, sentence: &str) -> Value {
    let wavs = tempfile::tempdir().expect("tempdir");
    say(&wavs.path().join("a.wav"), "en-029+f4", 150, sentence);
    let o = infer_json(model, wavs.path());
    assert!(o.status.success(), "{}", text(&o.stderr));
    let line: Value = serde_json::from_str(text(&o.stdout).trim()).expect("one JSON line");
    assert!(line["understood"].is_boolean(), "{line}");
    line
}

#[test]
fn infer_json_follows_the_contract_and_out_of_grammar_speech_is_not_understood() {
    let model = small_model();
    let wavs = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "a.wav",
            "turn on the kitchen light",
            Some(("lightsOn", "room", "kitchen")),
        ),
        (
            "b.wav",
            "switch off the garden light",
            Some(("lightsOff", "room", "garden")),
        ),
        (
            "c.wav",
            "set the fan to high",
            Some(("fanSpeed", "speed", "high")),
        ),
        ("d.wav", "what is the capital of france", None),
        ("e.wav", "i would like a cup of coffee", None),
    ];
    for (name, sentence, _) in &cases {
        say(&wavs.path().join(name), "en-029+f4", 150, sentence);
    }
    let o = infer_json(model, wavs.path());
    assert!(o.status.success(), "{}", text(&o.stderr));
    let lines: Vec<Value> = text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), cases.len(), "one line per file");
    let mut right = 0;
    for (line, (name, sentence, want)) in lines.iter().zip(&cases) {
        let obj = line.as_object().expect("object");
        assert!(
            line["file"].as_str().is_some_and(|f| f.ends_with(name)),
            "{line}"
        );
        let understood = line["understood"].as_bool().expect("understood is a bool");
        if understood {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            assert_eq!(keys.len(), 5, "{line}");
            for k in ["file", "understood", "intent", "slots", "score"] {
                assert!(obj.contains_key(k), "{k} missing: {line}");
            }
            let score = line["score"].as_f64().expect("score");
            assert!((0.0..=1.0).contains(&score), "{line}");
        } else {
            assert_eq!(
                obj.len(),
                2,
                "not understood has only file and understood: {line}"
            );
        }
        match want {
            Some((intent, slot, value)) => {
                if understood && line["intent"] == *intent && line["slots"][slot] == *value {
                    right += 1;
                } else {
                    eprintln!("`{sentence}` -> {line}");
                }
            }
            None => assert!(!understood, "`{sentence}` is out of grammar: {line}"),
        }
    }
    assert!(right >= 2, "only {right} of 3 commands understood");
}

#[test]
fn a_truncated_wav_gets_an_error_line_and_the_other_files_still_their_answer() {
    let model = small_model();
    let wavs = tempfile::tempdir().expect("tempdir");
    say(
        &wavs.path().join("good.wav"),
        "en-gb-x-gbcwmd+m7",
        150,
        "set the fan to low",
    );
    let bytes = std::fs::read(wavs.path().join("good.wav")).expect("read");
    std::fs::write(wavs.path().join("cut.wav"), &bytes[..30]).expect("write");
    std::fs::write(
        wavs.path().join("text.wav"),
        b"this is not a wav file at all",
    )
    .expect("write");
    let o = infer_json(model, wavs.path());
    assert!(
        !o.status.success(),
        "unreadable files make the exit status fail"
    );
    assert!(
        text(&o.stderr).contains("2 file(s) could not be read"),
        "{}",
        text(&o.stderr)
    );
    let lines: Vec<Value> = text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 3, "{}", text(&o.stdout));
    let by_name = |n: &str| {
        lines
            .iter()
            .find(|l| l["file"].as_str().is_some_and(|f| f.ends_with(n)))
            .unwrap_or_else(|| panic!("no line for {n}"))
    };
    assert!(
        by_name("cut.wav")["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty())
    );
    assert!(
        by_name("text.wav")["error"]
            .as_str()
            .is_some_and(|e| e.contains("text.wav"))
    );
    assert!(by_name("good.wav")["understood"].is_boolean());
}

#[test]
fn a_missing_model_directory_says_how_to_make_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wav = dir.path().join("a.wav");
    say(&wav, "en-us", 160, "hello");
    let o = kith(&[
        "--models-dir",
        p(&models_dir()),
        "intent",
        "infer",
        "--model",
        p(&dir.path().join("nope")),
        p(&wav),
    ]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("kith intent train") && err.contains("labels.json"),
        "{err}"
    );
}

#[test]
fn the_shipped_smart_home_model_matches_its_context_and_understands_commands() {
    let dir = repo("models/intents/smart-home");
    let context = std::fs::read(dir.join("context.yaml")).expect("context");
    let labels: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("labels.json")).expect("labels"))
            .expect("json");
    let o = Command::new("sha256sum")
        .arg(dir.join("context.yaml"))
        .output()
        .expect("sha256sum");
    let hash = text(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        labels["grammar_sha256"],
        hash.as_str(),
        "retrain after editing context.yaml"
    );
    assert!(!context.is_empty());
    let wavs = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "turn on the kitchen lights",
            "changeLightState",
            vec![("state", "on"), ("location", "kitchen")],
        ),
        (
            "set the bedroom lights to fifty percent",
            "changeBrightness",
            vec![("location", "bedroom"), ("level", "fifty")],
        ),
        (
            "set a timer for ten minutes",
            "setTimer",
            vec![("duration", "ten minutes")],
        ),
        (
            "what's the weather like tomorrow",
            "getWeather",
            vec![("day", "tomorrow")],
        ),
    ];
    for (i, (sentence, ..)) in cases.iter().enumerate() {
        say(
            &wavs.path().join(format!("{i}.wav")),
            "en-029+m7",
            150,
            sentence,
        );
    }
    let o = infer_json(&dir, wavs.path());
    assert!(o.status.success(), "{}", text(&o.stderr));
    // The shipped model's card (its `accent en-029, clean` row): 97 % of
    // clean commands in this held-out accent are accepted, 0.5 % wrong; the
    // rest are "not understood".
    let (mut right, mut wrong) = (0, 0);
    for (line, (sentence, intent, slots)) in text(&o.stdout).lines().zip(&cases) {
        let v: Value = serde_json::from_str(line).expect("json");
        let ok = v["understood"] == true
            && v["intent"] == *intent
            && slots.iter().all(|(k, val)| v["slots"][k] == *val)
            && v["slots"]
                .as_object()
                .is_some_and(|o| o.len() == slots.len());
        if ok {
            right += 1;
        } else if v["understood"] == true {
            wrong += 1;
            eprintln!("`{sentence}` -> {v}");
        }
    }
    assert!(
        right >= 2,
        "{right} of {} shipped-model commands right",
        cases.len()
    );
    assert_eq!(wrong, 0, "a command was understood as something else");
}

/// Runs sox with `args`; panics if it fails.
fn sox(args: &[&str]) {
    let ok = Command::new("sox")
        .args(args)
        .status()
        .expect("sox")
        .success();
    assert!(ok, "sox {args:?}");
}

#[test]
fn noise_alone_is_not_understood_by_the_shipped_smart_home_model() {
    // What a false wake in a noisy room hands the intent model: no command,
    // only noise (soft to loud) or a room of people talking.
    let dir = repo("models/intents/smart-home");
    let wavs = tempfile::tempdir().expect("tempdir");
    let w = |name: &str| wavs.path().join(name);
    for kind in ["pinknoise", "whitenoise"] {
        for vol in ["0.02", "0.1", "0.5"] {
            let out = w(&format!("{kind}-{vol}.wav"));
            sox(&[
                "-n",
                "-r",
                "16000",
                "-b",
                "16",
                "-c",
                "1",
                p(&out),
                "synth",
                "3",
                kind,
                "vol",
                vol,
            ]);
        }
    }
    let talkers = [
        (
            "en-us+f2",
            "we watched a documentary about whales last night",
        ),
        (
            "en-gb+m3",
            "my brother is flying back from Chicago on Sunday",
        ),
        (
            "en-us+m5",
            "the restaurant on the corner closed down last year",
        ),
        (
            "en-029+f4",
            "can you believe how expensive groceries have become",
        ),
    ];
    // The talkers apart: only the rooms are inferred.
    let alone = tempfile::tempdir().expect("tempdir");
    let mut voices = Vec::new();
    for (i, (voice, sentence)) in talkers.iter().enumerate() {
        let path = alone.path().join(format!("talker{i}.wav"));
        say(&path, voice, 150 + 10 * i as u32, sentence);
        voices.push(path);
    }
    // Two rooms: three talkers and four.
    for n in [3, 4] {
        let out = w(&format!("babble-{n}.wav"));
        let mut args = vec!["-m"];
        args.extend(voices[..n].iter().map(|v| p(v)));
        args.extend([
            "-t",
            "wav",
            "-r",
            "16000",
            "-c",
            "1",
            "-b",
            "16",
            p(&out),
            "norm",
            "-6",
        ]);
        sox(&args);
    }
    let o = infer_json(&dir, wavs.path());
    assert!(o.status.success(), "{}", text(&o.stderr));
    let lines: Vec<Value> = text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 8, "{lines:?}");
    for line in &lines {
        assert_eq!(line["understood"], false, "noise alone understood: {line}");
    }
}

#[test]
fn listen_hears_the_wake_word_then_understands_the_command_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wake = dir.path().join("wake.wav");
    let command = dir.path().join("command.wav");
    say(&wake, "en-us", 150, "hey jarvis");
    say(&command, "en-us+m3", 150, "turn off the bedroom lights");
    // wake word, 0.3 s pause, command, 1.5 s of silence; all at 16 kHz.
    let to16k = |src: &Path, dst: &Path, pad: &str| {
        sox(&[p(src), "-r", "16000", "-c", "1", p(dst), "pad", "0", pad]);
    };
    let (w16, c16) = (dir.path().join("w16.wav"), dir.path().join("c16.wav"));
    to16k(&wake, &w16, "0.3");
    to16k(&command, &c16, "1.5");
    let joined = dir.path().join("joined.wav");
    sox(&[p(&w16), p(&c16), p(&joined)]);
    let events = listen_with_smart_home(&joined, &["--wake", "hey_jarvis"]);
    assert_eq!(
        events.len(),
        2,
        "a wake event then an intent event: {events:?}"
    );
    assert_eq!(events[0]["event"], "wake");
    let i = &events[1];
    assert_eq!(i["event"], "intent");
    assert_eq!(i["wake"], "hey_jarvis");
    assert_eq!(i["ended_by"], "silence", "{i}");
    assert!(i["t_ms"].as_u64() > events[0]["t_ms"].as_u64());
    assert_eq!(i["understood"], true, "{i}");
    assert_eq!(i["intent"], "changeLightState", "{i}");
    assert_eq!(i["slots"]["state"], "off", "{i}");
    assert_eq!(i["slots"]["location"], "bedroom", "{i}");
}

#[test]
fn a_wake_head_that_fires_on_the_commands_own_words_opens_no_second_command() {
    // openWakeWord's timer head hears "set a timer for five minutes" too,
    // and fires after the command has ended: that is an echo, not a wake.
    let dir = tempfile::tempdir().expect("tempdir");
    let wav = dir.path().join("two.wav");
    let ok = Command::new("espeak-ng")
        .args(["-m", "-v", "en-us", "-s", "150", "-w"])
        .arg(&wav)
        .arg(
            "hey jarvis. <break time='300ms'/> turn on the kitchen lights. <break time='1500ms'/> \
             hey jarvis. <break time='300ms'/> set a timer for five minutes.",
        )
        .status()
        .expect("espeak-ng runs")
        .success();
    assert!(ok, "espeak-ng");
    let events = listen_with_smart_home(&wav, &[]);
    let kinds: Vec<String> = events
        .iter()
        .map(|e| match e["event"].as_str() {
            Some("wake") => format!("wake {}", e["model"].as_str().unwrap_or("")),
            _ => format!("intent {}", e["intent"].as_str().unwrap_or("-")),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "wake hey_jarvis",
            "intent changeLightState",
            "wake hey_jarvis",
            "intent setTimer"
        ],
        "{events:?}"
    );
}

#[test]
fn a_command_said_with_barely_a_pause_after_the_wake_word_is_heard_from_its_first_sound() {
    // The wake word fires a few chunks after "jarvis" ends; a speaker who
    // pauses only 100 ms has begun the command by then. The capture starts
    // with the audio before the decision, so "turn" is not cut to "urn".
    let dir = tempfile::tempdir().expect("tempdir");
    let mut heard = Vec::new();
    for rate in ["130", "150"] {
        let wav = dir.path().join(format!("quick{rate}.wav"));
        let ok = Command::new("espeak-ng")
            .args(["-m", "-v", "en-us+f3", "-s", rate, "-w"])
            .arg(&wav)
            .arg("hey jarvis. <break time='100ms'/> turn on the kitchen lights.")
            .status()
            .expect("espeak-ng runs")
            .success();
        assert!(ok, "espeak-ng");
        let events = listen_with_smart_home(&wav, &["--wake", "hey_jarvis"]);
        let intent = events
            .iter()
            .find(|e| e["event"] == "intent")
            .unwrap_or_else(|| panic!("no intent event at {rate} wpm: {events:?}"));
        heard.push((rate, intent.clone()));
    }
    for (rate, i) in &heard {
        assert_eq!(i["understood"], true, "{rate} wpm: {i}");
        assert_eq!(i["intent"], "changeLightState", "{rate} wpm: {i}");
        assert_eq!(
            i["slots"],
            json!({"state": "on", "location": "kitchen"}),
            "{rate} wpm: {i}"
        );
    }
}

/// `kith listen --json --intent` with the shipped smart-home model on `wav`:
/// its events.
fn listen_with_smart_home(wav: &Path, extra: &[&str]) -> Vec<Value> {
    let models = models_dir();
    let model = repo("models/intents/smart-home");
    let mut args = vec![
        "--models-dir",
        p(&models),
        "listen",
        "--wav",
        p(wav),
        "--json",
        "--intent",
        p(&model),
    ];
    args.extend_from_slice(extra);
    let o = kith(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

/// `kith intent infer --json` with the model in `model` on `path`.
fn infer_json(model: &Path, path: &Path) -> Output {
    kith(&[
        "--models-dir",
        p(&models_dir()),
        "intent",
        "infer",
        "--model",
        p(model),
        "--json",
        p(path),
    ])
}

#[test]
fn eval_measures_a_model_again_on_the_very_test_clips_of_its_training_run() {
    let model = small_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("eval");
    let o = kith(&["intent", "eval", "--model", p(model), "--out", p(&out)]);
    let log = text(&o.stderr);
    assert!(o.status.success(), "{log}");
    // The seed and test size come from the model's metrics.json.
    assert!(log.contains("seed 1, 30 test sentences asked"), "{log}");
    assert!(log.contains("babble 12 dB"), "{log}");
    // Clip by clip: the same sentences, voices and noise, and the same
    // model on tract, give the same answers.
    let trained = std::fs::read_to_string(model.join("test_clips.jsonl")).expect("clips");
    let again = std::fs::read_to_string(out.join("test_clips.jsonl")).expect("eval clips");
    assert!(!trained.is_empty());
    assert_eq!(trained.lines().count(), again.lines().count());
    for (a, b) in trained.lines().zip(again.lines()) {
        let (a, b): (Value, Value) = (
            serde_json::from_str(a).expect("json"),
            serde_json::from_str(b).expect("json"),
        );
        for key in [
            "condition",
            "said",
            "voice",
            "rate",
            "pitch",
            "heard",
            "understood",
        ] {
            assert_eq!(a[key], b[key], "{key}: {a} against {b}");
        }
        let (sa, sb) = (a["score"].as_f64(), b["score"].as_f64());
        assert!(
            matches!((sa, sb), (Some(x), Some(y)) if (x - y).abs() < 1e-4),
            "{a} against {b}"
        );
    }
    let (m, e) = (metrics(model), metrics(&out));
    // The test was held out by the word-pair rule, and eval read it so.
    assert_eq!(m["test_hold_out"], "word-pairs");
    assert_eq!(m["conditions"], e["conditions"]);
    assert_eq!(m["voices"], e["voices"]);
    assert_eq!(m["false_accepts"], e["false_accepts"]);
    // Babble clips are cut from many tracks, so that they are near
    // independent draws.
    assert_eq!(m["test_babble_tracks"].as_u64(), Some(64));
    assert_eq!(m["test_babble_tracks"], e["test_babble_tracks"]);

    // --update writes the figures into the model's own metrics.json and
    // card, keeping what training recorded: a copy whose metrics are of an
    // older test (no test_babble_tracks, other babble rows) gets this
    // test's.
    let copy = dir.path().join("copy");
    std::fs::create_dir_all(&copy).expect("dir");
    for f in ["intent.onnx", "labels.json", "context.yaml"] {
        std::fs::copy(model.join(f), copy.join(f)).expect("copy");
    }
    let mut older = m.clone();
    let fields = older.as_object_mut().expect("object");
    fields.remove("test_babble_tracks");
    fields.remove("voices");
    // Figures of each network alone, measured on that older test.
    fields.insert(
        "member_goal_accepted".into(),
        serde_json::json!([0.5, 0.25]),
    );
    for c in fields["conditions"].as_array_mut().expect("conditions") {
        c["accepted"] = serde_json::json!(0);
    }
    std::fs::write(copy.join("metrics.json"), older.to_string()).expect("write");
    let o = kith(&["intent", "eval", "--model", p(&copy), "--update"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let u = metrics(&copy);
    assert_eq!(u["conditions"], m["conditions"]);
    assert_eq!(u["voices"], m["voices"]);
    assert_eq!(u["test_babble_tracks"].as_u64(), Some(64));
    for key in ["train_clips", "threshold", "calibration", "training_secs"] {
        assert_eq!(u[key], m[key], "{key}");
    }
    // The networks' own figures were of another test: gone.
    assert_eq!(u["member_goal_accepted"], serde_json::json!([]));
    // Measured again on the same test (the same answers), they stay.
    let mut same = u.clone();
    same["member_goal_accepted"] = serde_json::json!([0.5, 0.25]);
    std::fs::write(copy.join("metrics.json"), same.to_string()).expect("write");
    let o = kith(&["intent", "eval", "--model", p(&copy), "--update"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        metrics(&copy)["member_goal_accepted"],
        serde_json::json!([0.5, 0.25])
    );
    let card = std::fs::read_to_string(copy.join("MODEL_CARD.md")).expect("card");
    assert!(card.contains("Babble: cuts of 64 tracks"), "{card}");
    let clean = m["conditions"][0]["accepted"].as_f64().expect("n")
        / m["conditions"][0]["clips"].as_f64().expect("n");
    assert!(
        card.contains(&format!(
            "| clean | {} | {:.1} % |",
            m["conditions"][0]["clips"],
            100.0 * clean
        )),
        "{card}"
    );
    // Another seed holds out other sentences, some trained on: refused
    // before any clip is made.
    let o = kith(&[
        "intent",
        "eval",
        "--model",
        p(&copy),
        "--update",
        "--seed",
        "7",
    ]);
    refused_before_any_clip(&o, "figures of the model's own test only");
    // A metrics.json cut short is not read as "no record" (which would
    // measure another test): refused by name, before any clip is made.
    let whole = std::fs::read_to_string(copy.join("metrics.json")).expect("metrics");
    std::fs::write(copy.join("metrics.json"), &whole[..whole.len() / 2]).expect("write");
    let o = kith(&["intent", "eval", "--model", p(&copy)]);
    refused_before_any_clip(&o, "metrics.json is not a kith model's metrics");
    // Without a training run's metrics there is nothing to update: said
    // before any clip is made.
    std::fs::remove_file(copy.join("metrics.json")).expect("rm");
    let o = kith(&["intent", "eval", "--model", p(&copy), "--update"]);
    refused_before_any_clip(&o, "needs its training run's");

    // A context that is not the model's own is refused: its test would be
    // another test.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).expect("dir");
    for f in ["intent.onnx", "labels.json", "context.yaml"] {
        std::fs::copy(model.join(f), other.join(f)).expect("copy");
    }
    let yaml = std::fs::read_to_string(other.join("context.yaml")).expect("yaml");
    std::fs::write(other.join("context.yaml"), yaml.replace("garden", "garage")).expect("write");
    let o = kith(&["intent", "eval", "--model", p(&other)]);
    let err = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("is not the context the model was trained on"),
        "{err}"
    );
}

/// `labels.json` of a model directory.
fn labels(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("labels.json")).expect("labels.json"))
        .expect("labels json")
}

/// The threshold `labels` gives `intent`: its own, else the one for all.
fn threshold_of(labels: &Value, intent: &str) -> f64 {
    labels["intent_thresholds"][intent]
        .as_f64()
        .or_else(|| labels["threshold"].as_f64())
        .expect("a threshold")
}

/// A copy of a model directory, to rewrite.
fn copy_model(model: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("dir");
    for f in [
        "intent.onnx",
        "labels.json",
        "context.yaml",
        "metrics.json",
        "MODEL_CARD.md",
    ] {
        std::fs::copy(model.join(f), to.join(f)).expect("copy");
    }
}

#[test]
fn calibrate_sets_the_thresholds_again_without_training_the_model_again() {
    let model = small_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    let copy = dir.path().join("copy");
    copy_model(model, &copy);
    let calibrate = |model: &Path, args: &[&str]| {
        let mut all = vec![
            "intent",
            "calibrate",
            "--model",
            p(model),
            "--cache",
            p(&cache),
        ];
        all.extend_from_slice(args);
        kith(&all)
    };

    // On the training run's own clips (drawn again from its context, seed
    // and sentences) at its own budget: the very thresholds training set,
    // and the same test figures.
    let o = calibrate(&copy, &[]);
    let log = text(&o.stderr);
    assert!(o.status.success(), "{log}");
    let (trained, again) = (labels(model), labels(&copy));
    assert_eq!(again["threshold"], trained["threshold"], "{log}");
    assert_eq!(
        again["intent_thresholds"], trained["intent_thresholds"],
        "{log}"
    );
    let (m, c) = (metrics(model), metrics(&copy));
    for key in ["calibration", "conditions", "false_accepts", "train_clips"] {
        assert_eq!(c[key], m[key], "{key}");
    }

    // Recordings of what the device overhears: here a television saying a
    // command. The model understands it as it is...
    let recordings = dir.path().join("recordings");
    std::fs::create_dir_all(&recordings).expect("dir");
    let tv = recordings.join("tv.wav");
    say(&tv, "en-us", 150, "turn on the kitchen light");
    let o = infer_json(&copy, &tv);
    let answer: Value = serde_json::from_str(text(&o.stdout).trim()).expect("json");
    assert_eq!(answer["intent"], "lightsOn", "{answer}");
    assert_eq!(answer["understood"], true, "{answer}");
    // ...and a truncated recording beside it is refused, named, before any
    // clip is made, and nothing of the model changes.
    let bytes = std::fs::read(&tv).expect("read");
    let cut = recordings.join("cut.wav");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).expect("write");
    let files = ["labels.json", "metrics.json", "MODEL_CARD.md"];
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(copy.join(f)).expect("read"))
        .collect();
    let o = calibrate(&copy, &["--negatives", p(&recordings)]);
    refused_before_any_clip(&o, "cut.wav");
    for (f, b) in files.iter().zip(&before) {
        assert_eq!(
            &std::fs::read(copy.join(f)).expect("read"),
            b,
            "{f} changed"
        );
    }
    // Without it, the television's command raises lightsOn's threshold
    // as far as the 1 % allows: its one stretch alone is three parts in
    // seven of the clips that must not be understood.
    std::fs::remove_file(&cut).expect("rm");
    let o = calibrate(&copy, &["--negatives", p(&recordings)]);
    let log = text(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("your recording"), "{log}");
    let now = labels(&copy);
    assert!(
        threshold_of(&now, "lightsOn") > threshold_of(&trained, "lightsOn"),
        "{now} against {trained}"
    );
    let c = metrics(&copy);
    let recorded = c["calibration"]
        .as_array()
        .expect("calibration")
        .iter()
        .find(|k| k["kind"] == "your recording")
        .unwrap_or_else(|| panic!("no recordings in {}", c["calibration"]));
    assert_eq!(
        recorded["clips"].as_u64(),
        Some(1),
        "a 2 s file is one stretch"
    );
    let card = std::fs::read_to_string(copy.join("MODEL_CARD.md")).expect("card");
    assert!(card.contains("the user's recordings"), "{card}");

    // A larger false-accept budget: the threshold for all is no higher.
    let loose = dir.path().join("loose");
    copy_model(model, &loose);
    let o = calibrate(&loose, &["--false-accepts", "20"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let l = labels(&loose);
    assert!(
        l["threshold"].as_f64() <= trained["threshold"].as_f64(),
        "{l} against {trained}"
    );
    assert_eq!(metrics(&loose)["false_accept_budget"].as_f64(), Some(0.2));
    let card = std::fs::read_to_string(loose.join("MODEL_CARD.md")).expect("card");
    assert!(card.contains("at most 20 %"), "{card}");

    // Other sentences than the training run's draw other clips: refused.
    let o = calibrate(&loose, &["--utterances", "77"]);
    let err = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("not the clips the model was trained on"),
        "{err}"
    );
    // A budget is a percentage; training takes the same option.
    let never = dir.path().join("never");
    let context = loose.join("context.yaml");
    for args in [
        vec![
            "intent",
            "calibrate",
            "--model",
            p(&loose),
            "--false-accepts",
            "0",
        ],
        vec![
            "intent",
            "train",
            "--context",
            p(&context),
            "--out",
            p(&never),
            "--false-accepts",
            "100",
        ],
    ] {
        let o = kith(&args);
        refused_before_any_clip(&o, "--false-accepts is a percentage");
    }
    assert!(!never.exists());
}

#[test]
fn the_test_clips_are_the_same_whatever_the_training_data_size() {
    // Two runs with the same seed and cache but other --utterances: the
    // second finds the first's test clips in the cache, so figures of runs
    // with more or less data are measured on the very same audio.
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    let run = |utterances: &str| {
        train_small_context(
            dir.path(),
            &[
                "--utterances",
                utterances,
                "--test-utterances",
                "6",
                "--epochs",
                "1",
                "--cache",
                p(&cache),
            ],
        )
        .1
    };
    let from_cache = |log: &str, what: &str| {
        log.lines().any(|l| {
            l.starts_with(&format!("synthesizing {what} clips:")) && l.contains("from the cache")
        })
    };
    let first = run("60");
    assert!(!from_cache(&first, "test"), "{first}");
    let second = run("90");
    assert!(
        from_cache(&second, "test"),
        "the second run rendered its test clips anew:\n{second}"
    );
    assert!(
        !from_cache(&second, "training"),
        "other training data cannot come from the cache:\n{second}"
    );
}
