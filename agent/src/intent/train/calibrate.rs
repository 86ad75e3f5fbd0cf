//! `kith intent calibrate`: sets a trained model's thresholds again,
//! without training it again.
//!
//! The thresholds decide what a model reports understood. Training sets
//! them on clips it draws from the context and the seed; here those very
//! clips are drawn again (their features mostly from the training run's
//! cache), the model answers them on tract, and the thresholds are set
//! again, at another false-accept budget or with the user's own
//! recordings of what the device overhears (television, talk in the
//! room) among the clips that must not be understood. The model is then
//! measured again on its held-out test, so its card stays true.

use std::io::{Read, Seek, SeekFrom};

use super::thresholds::{NegativeClip, hear};
use super::*;

/// Recordings are heard in stretches of this many samples (4 s: what a
/// false wake hands the model, a command's length)...
const STRETCH: usize = 4 * 16_000;
/// ...one every 2 s.
const STRETCH_HOP: usize = 2 * 16_000;
/// A file's last stretch is heard if it holds at least this much (0.5 s).
const SHORTEST_STRETCH: usize = 8_000;

/// What to calibrate, and on what.
#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    /// A directory `kith intent train` wrote; its thresholds are rewritten.
    pub model: PathBuf,
    /// WAV files, or directories of them, that the model must not
    /// understand (heard in 4 s stretches every 2 s).
    pub negatives: Vec<PathBuf>,
    /// The share of out-of-grammar audio the thresholds may accept.
    pub budget: f32,
    /// The training run's sentences (`None`: as its `metrics.json` says).
    pub utterances: Option<usize>,
    /// The training run's `--noise` directories.
    pub noise_dirs: Vec<PathBuf>,
    pub threads: usize,
    pub cache: Option<PathBuf>,
}

/// The thresholds of a model: for all, and each intent's own.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    pub all: f32,
    pub own: Vec<(String, f32)>,
}

impl Thresholds {
    /// `labels`' thresholds, each intent's own in the intents' order.
    pub(super) fn of(labels: &Labels) -> Thresholds {
        Thresholds {
            all: labels.threshold,
            own: labels
                .intents
                .iter()
                .filter_map(|n| Some((n.clone(), *labels.intent_thresholds.get(n)?)))
                .collect(),
        }
    }
}

/// What [`recalibrate`] changed.
#[derive(Debug, Clone)]
pub struct Recalibration {
    pub before: Thresholds,
    pub after: Thresholds,
    /// Per kind of negative: clips, and how many the old thresholds accept.
    pub accepted_before: Vec<KindShare>,
    /// The same with the new thresholds.
    pub accepted_after: Vec<KindShare>,
    /// Stretches of the user's recordings heard.
    pub stretches: usize,
    /// The held-out test as the model's card had it, and measured again.
    pub test_before: Measured,
    pub test_after: Measured,
}

/// Sets the thresholds of the model in `opts.model` again (see the
/// module's documentation) and writes them, the figures of its test and
/// its card into it. Nothing is written unless every step succeeded.
pub fn recalibrate(front: &FrontFiles, opts: &CalibrateOptions) -> Result<Recalibration> {
    if !(opts.budget > 0.0 && opts.budget < 1.0) {
        bail!(
            "the false-accept budget must be a share between 0 and 1 (got {})",
            opts.budget
        );
    }
    let dir = &opts.model;
    let mut report = read_report(dir)?;
    let mut model = IntentModel::load(dir)
        .with_context(|| format!("loading the intent model {}", dir.display()))?;
    let (grammar, sha) = model_grammar(dir, model.labels())?;
    if sha != report.grammar_sha256 {
        bail!(
            "{} is of another context than the model (sha256 {}, the context {sha})",
            dir.join("metrics.json").display(),
            report.grammar_sha256
        );
    }
    let Some(utterances) = opts.utterances.or(report.utterances) else {
        bail!(
            "{}'s metrics.json does not say how many sentences the model was trained on (it is older than the record): pass the training run's --utterances",
            dir.display()
        );
    };
    // The recordings are read once before minutes of synthesis: one that
    // cannot be read fails the run now, naming it.
    let mut recordings = Vec::new();
    for p in &opts.negatives {
        let files = crate::intent::wav_files(p)?;
        if files.is_empty() {
            bail!("no .wav files in {}", p.display());
        }
        for f in &files {
            crate::intent::read_samples(f, None)?;
        }
        recordings.extend(files);
    }

    // The training run's clips, drawn again.
    let drawn = TrainOptions {
        noise_dirs: opts.noise_dirs.clone(),
        utterances,
        test_utterances: report.test_utterances,
        seed: report.seed,
        far_salads: report.far_salads,
        calibration_sentences: report.calibration_sentences,
        test_hold_out: report.test_hold_out,
        ..TrainOptions::default()
    };
    let labels = model.labels().clone();
    let plan = plan(&grammar, &labels, &drawn)?;
    if plan.training.len() != report.train_clips
        || plan.validation.len() != report.validation_clips
        || plan.calibration_jobs.len() != report.calibration_clips
        || plan.train_bank.recorded.len() != report.noise_recordings
    {
        bail!(
            "these are not the clips the model was trained on ({} training, {} validation and {} calibration clips and {} noise recordings drawn; the training run had {}, {}, {} and {}): give the training run's --utterances and --noise",
            plan.training.len(),
            plan.validation.len(),
            plan.calibration_jobs.len(),
            plan.train_bank.recorded.len(),
            report.train_clips,
            report.validation_clips,
            report.calibration_clips,
            report.noise_recordings
        );
    }
    let how = Rendering {
        front: labels.front,
        threads: opts.threads,
        cache: opts.cache.as_deref(),
        noise_dirs: &opts.noise_dirs,
    };
    let validation_features = render_some(
        &plan.jobs,
        &plan.validation,
        front,
        &plan.train_bank,
        &how,
        "synthesizing validation clips",
    )?;
    let (calibration_features, command_features) = plan.threshold_features(front, &how)?;
    let clips = ThresholdClips::of(
        plan.validation
            .iter()
            .map(|&i| &plan.jobs[i])
            .zip(validation_features.iter().map(Vec::as_slice)),
        plan.calibration_jobs
            .iter()
            .zip(calibration_features.iter().map(Vec::as_slice)),
        plan.calibration_commands
            .iter()
            .zip(command_features.iter().map(Vec::as_slice)),
        labels.intents.len(),
    );
    let mut answers = clips.answered(|f| Ok(model.probabilities(f)?))?;
    let stretches = hear_recordings(front, &mut model, &recordings, &mut answers)?;

    let accepted_before = kind_shares(&hear(&labels, &answers.negatives), &labels);
    let mut calibrated = labels.clone();
    let heard = calibrate(&mut calibrated, &answers, opts.budget);
    let accepted_after = kind_shares(&heard, &calibrated);
    let loudest = loudest_negatives(&heard);

    // The test, measured with the new thresholds.
    model.set_thresholds(&calibrated);
    let eval = EvalOptions {
        model: dir.clone(),
        seed: Some(report.seed),
        test_utterances: Some(report.test_utterances),
        threads: opts.threads,
        cache: opts.cache.clone(),
    };
    let e = evaluate_model(front, &mut model, &eval)?;

    let test_before = report.measured.clone();
    if opts.budget != report.false_accept_budget || stretches > 0 {
        // Each network alone was calibrated on training's terms.
        report.member_goal_accepted.clear();
    }
    report.threshold = calibrated.threshold;
    report.intent_thresholds = Thresholds::of(&calibrated).own;
    report.calibration = accepted_after.clone();
    report.calibration_commands = plan.calibration_commands.len();
    report.loudest_negatives = loudest;
    report.false_accept_budget = opts.budget;
    report.utterances = Some(utterances);
    apply_figures(&mut report, &e);

    // Everything is known: write it, each file whole or not at all.
    write_whole(
        &dir.join(LABELS_FILE),
        &serde_json::to_string_pretty(&calibrated)?,
    )?;
    write_whole(
        &dir.join("metrics.json"),
        &serde_json::to_string_pretty(&report)?,
    )?;
    write_whole(
        &dir.join("MODEL_CARD.md"),
        &card(&dir.join("context.yaml"), &calibrated, &report),
    )?;
    if dir.join(TEST_CLIPS_FILE).exists() {
        write_whole(&dir.join(TEST_CLIPS_FILE), &e.measured.clip_lines)?;
    }
    Ok(Recalibration {
        before: Thresholds::of(&labels),
        after: Thresholds::of(&calibrated),
        accepted_before,
        accepted_after,
        stretches,
        test_before,
        test_after: e.measured,
    })
}

/// Hears each recording in stretches ([`STRETCH`] every [`STRETCH_HOP`])
/// and adds what `model` answered to `answers` as negatives; returns the
/// stretches heard.
fn hear_recordings(
    front: &FrontFiles,
    model: &mut IntentModel,
    files: &[PathBuf],
    answers: &mut Answers,
) -> Result<usize> {
    if files.is_empty() {
        return Ok(0);
    }
    let mut cf = CommandFront::load_for(model.front(), &front.mel, &front.embedding)
        .context("loading the audio front end")?;
    let mut features = vec![0.0; model.front().features()];
    let mut bar = Bar::new("hearing your recordings", files.len() as u64);
    let mut heard = 0;
    for (k, file) in files.iter().enumerate() {
        let samples = crate::intent::read_samples(file, None)?;
        let name = file.display().to_string();
        let mut start = 0;
        loop {
            let end = (start + STRETCH).min(samples.len());
            if end - start >= SHORTEST_STRETCH || (start == 0 && end > 0) {
                cf.features_of(&samples[start..end], &mut features)
                    .with_context(|| format!("hearing {name}"))?;
                let probs = model.probabilities(&features)?;
                let clip = NegativeClip {
                    kind: Kind::Recorded,
                    text: format!(
                        "{name} {:.0}–{:.0} s",
                        start as f32 / 16_000.0,
                        end as f32 / 16_000.0
                    ),
                    noise: None,
                };
                answers.negatives.push((clip, probs));
                heard += 1;
            }
            if end == samples.len() {
                break;
            }
            start += STRETCH_HOP;
        }
        bar.set(k as u64 + 1, &format!("{heard} stretches"));
    }
    bar.finish(&format!("{heard} stretches of {} files", files.len()));
    Ok(heard)
}

/// The features of the jobs at `indices`: read from the cache entry of
/// all `jobs` (as [`render_cached`] wrote it) when there is one, else
/// rendered (and cached as an entry of their own).
fn render_some(
    jobs: &[Job],
    indices: &[usize],
    front: &FrontFiles,
    bank: &NoiseBank,
    how: &Rendering,
    label: &str,
) -> Result<Vec<Vec<f32>>> {
    if let Some(dir) = how.cache {
        let path = dir.join(format!("{}.f32", cache_key(jobs, bank, how)));
        let size = how.front.features() * 4;
        if let Ok(mut file) = std::fs::File::open(&path)
            && file
                .metadata()
                .is_ok_and(|m| m.len() == (jobs.len() * size) as u64)
        {
            let mut bytes = vec![0u8; size];
            let mut features = Vec::with_capacity(indices.len());
            for &i in indices {
                file.seek(SeekFrom::Start((i * size) as u64))
                    .and_then(|_| file.read_exact(&mut bytes))
                    .with_context(|| format!("reading the cache entry {}", path.display()))?;
                features.push(floats_of(&bytes));
            }
            eprintln!(
                "{label}: {} clips from the cache {}",
                indices.len(),
                path.display()
            );
            return Ok(features);
        }
    }
    let some: Vec<Job> = indices.iter().map(|&i| jobs[i].clone()).collect();
    render_cached(&some, front, bank, how, label)
}

/// Writes `text` to `path` through a temporary file renamed over it, so
/// that an interrupted write leaves the old file whole.
fn write_whole(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn some_clips_are_read_out_of_the_cache_entry_of_all_of_them() {
        let job = |seed: u64| Job {
            text: "turn on the lights".into(),
            voice: Voice {
                espeak: "en-us".into(),
            },
            rate: 155,
            pitch: 50,
            speed: 1.0,
            recipe: Recipe::clean(),
            targets: vec![Some(0)],
            condition: 0,
            seed,
            kind: Kind::Command,
        };
        let jobs: Vec<Job> = (0..5).map(job).collect();
        let bank = NoiseBank::default();
        let cache = tempfile::tempdir().expect("tempdir");
        let opts = TrainOptions {
            cache: Some(cache.path().to_path_buf()),
            ..TrainOptions::default()
        };
        let how = Rendering::of(&opts);
        // An entry as render_cached writes it: clip k holds k, k + 0.5, ...
        let size = how.front.features();
        let all: Vec<u8> = (0..jobs.len())
            .flat_map(|k| (0..size).map(move |v| k as f32 + v as f32 / 2.0))
            .flat_map(f32::to_le_bytes)
            .collect();
        let key = cache_key(&jobs, &bank, &how);
        std::fs::write(cache.path().join(format!("{key}.f32")), all).expect("write");
        // No front end files: anything not read from the entry would fail.
        let front = FrontFiles {
            mel: cache.path().join("none.onnx"),
            embedding: cache.path().join("none.onnx"),
        };
        let some = render_some(&jobs, &[3, 0, 4], &front, &bank, &how, "test").expect("cached");
        assert_eq!(some.len(), 3);
        for (features, k) in some.iter().zip([3.0f32, 0.0, 4.0]) {
            assert_eq!(features.len(), size);
            assert_eq!(features[0], k);
            assert_eq!(features[size - 1], k + (size - 1) as f32 / 2.0);
        }
        // An entry of other clips is not theirs: they are made, which here
        // fails for want of a front end.
        let other: Vec<Job> = (5..10).map(job).collect();
        assert!(render_some(&other, &[0], &front, &bank, &how, "test").is_err());
    }
}
