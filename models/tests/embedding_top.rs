//! The speech embedding's top layers as kith trains them
//! (`intent::embedding_top`): hand-written gradients against finite
//! differences, and the pretrained layers over the streamed rows of the cut
//! embedding model against the whole embedding model.
//!
//! The parity tests need the models installed (the README's test command
//! does it) in `$KITH_MODELS_DIR`.

mod support;

use kith_models::CHUNK_SAMPLES;
use kith_models::intent::embedding_top::{CHANNELS, EmbeddingTop, ROW, rows_for};
use kith_models::intent::grammar::Rng;
use kith_models::intent::net::{DILATIONS, Example, Net, Shape, TrainOptions};
use support::{models_dir, numeric_gradient, utterance};

use kith_models::intent::{
    CUT_FEATURES, CommandFront, FEATURES, FRAMES, Front, IntentModel, LABELS_FORMAT, Labels,
    SlotLabels, onnx,
};

/// Σ embeddings ⊙ g: a loss whose gradient with respect to the embeddings is g.
fn weighted_sum(top: &EmbeddingTop, rows: &[f32], g: &[f32]) -> f64 {
    let e = top.embed(rows).expect("embed");
    e.iter().zip(g).map(|(a, b)| f64::from(a * b)).sum()
}

#[test]
fn gradients_of_the_top_match_finite_differences() {
    let top = EmbeddingTop::random(5);
    let mut rng = Rng::new(6);
    let n = 3;
    let rows: Vec<f32> = (0..rows_for(n) * ROW).map(|_| rng.normal()).collect();
    let g: Vec<f32> = (0..n * CHANNELS).map(|_| rng.normal()).collect();
    let trace = top.forward(&rows).expect("forward");
    assert_eq!(trace.embeddings.len(), n * CHANNELS);
    let mut grads = top.zero_grads();
    top.backward(&trace, &g, &mut grads);
    let analytic = grads.flatten();
    assert_eq!(analytic.len(), top.parameters());
    let eps = 1e-3;
    let mut checked = 0;
    let mut nonzero = 0;
    let mut bad = Vec::new();
    // Every 211th parameter: a few hundred, spread over all five layers.
    for i in (0..analytic.len()).step_by(211) {
        let mut plus = top.clone();
        plus.nudge(i, eps);
        let mut minus = top.clone();
        minus.nudge(i, -eps);
        let numeric = ((weighted_sum(&plus, &rows, &g) - weighted_sum(&minus, &rows, &g))
            / (2.0 * f64::from(eps))) as f32;
        let a = analytic[i];
        if (a - numeric).abs() > 2e-2 + 0.02 * numeric.abs() {
            bad.push((i, a, numeric));
        }
        nonzero += usize::from(a.abs() > 1e-3);
        checked += 1;
    }
    // A nudge can cross a kink of the activation or switch a pooling's
    // maximum; with these sizes that happens for at most a handful.
    assert!(
        bad.len() <= checked / 50,
        "{} of {checked} gradients differ: {bad:?}",
        bad.len()
    );
    assert!(
        checked > 600 && nonzero > checked / 2,
        "{nonzero} of {checked}"
    );
}

#[test]
fn the_top_refuses_rows_it_cannot_use() {
    let top = EmbeddingTop::random(1);
    for values in [0, ROW * 9, ROW * 11, ROW * 12 + 1] {
        let err = top.embed(&vec![0.0; values]).expect_err("bad length");
        assert!(err.to_string().contains("rows of"), "{err}");
    }
    assert_eq!(
        top.embed(&vec![0.0; ROW * 12]).expect("12 rows").len(),
        2 * CHANNELS
    );
}

#[test]
fn the_shipped_embedding_model_loads_as_a_top() {
    let top = EmbeddingTop::load(&models_dir().join("embedding_model.onnx")).expect("top");
    assert_eq!(top.convs.len(), 5);
    assert_eq!(top.floor, -0.4);
    assert_eq!(top.parameters(), 5 * 3 * 96 * 96 + 4 * 96);
    let missing = EmbeddingTop::load(&models_dir().join("melspectrogram.onnx"))
        .expect_err("not an embedding model");
    assert!(missing.to_string().contains("conv2d_15"), "{missing}");
}

/// The features of `audio` from the command front end and from the
/// command front end cut before conv2d_15, with each one's count of real
/// windows.
fn both_fronts(audio: &[i16]) -> ((Vec<f32>, usize), (Vec<f32>, usize)) {
    let dir = models_dir();
    let mel = dir.join("melspectrogram.onnx");
    let emb = dir.join("embedding_model.onnx");
    let mut whole = CommandFront::load(&mel, &emb).expect("front");
    let mut cut = CommandFront::load_cut(&mel, &emb).expect("cut front");
    assert_eq!((whole.features(), cut.features()), (FEATURES, CUT_FEATURES));
    let mut e = vec![0.0; FEATURES];
    whole.features_of(audio, &mut e).expect("embeddings");
    let mut r = vec![0.0; CUT_FEATURES];
    cut.features_of(audio, &mut r).expect("rows");
    ((e, whole.real_windows()), (r, cut.real_windows()))
}

/// Checks that the pretrained top over the cut features gives the command
/// front end's embeddings for every real window; returns how many.
fn check_top_against_the_front_end(audio: &[i16]) -> usize {
    let top = EmbeddingTop::load(&models_dir().join("embedding_model.onnx")).expect("top");
    let ((embeddings, real), (rows, real_cut)) = both_fronts(audio);
    assert_eq!(real, real_cut, "the fronts count different real windows");
    let (rows, mask) = rows.split_at(rows_for(FRAMES) * ROW);
    let marked: Vec<f32> = (0..FRAMES)
        .map(|w| if w >= FRAMES - real { 1.0 } else { 0.0 })
        .collect();
    assert_eq!(mask, marked.as_slice(), "the mask marks the real windows");
    let made = top.embed(rows).expect("embed");
    let from = (FRAMES - real) * CHANNELS;
    let scale = embeddings[from..]
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = made[from..]
        .iter()
        .zip(&embeddings[from..])
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(scale > 1.0, "the embeddings are not of speech: {scale}");
    assert!(
        worst < 1e-4 * scale,
        "largest difference {worst} (embeddings up to {scale})"
    );
    // Just before the real windows, the cut features are not the stream's:
    // that is why the count matters.
    if real < FRAMES {
        let before = &made[from - CHANNELS..from];
        let silence = &embeddings[from - CHANNELS..from];
        let gap = before
            .iter()
            .zip(silence)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            gap > 1e-2 * scale,
            "window {} matches too",
            FRAMES - real - 1
        );
    }
    real
}

#[test]
fn the_pretrained_top_over_the_cut_front_end_gives_the_command_front_ends_embeddings() {
    let audio = utterance();
    let real = check_top_against_the_front_end(&audio);
    // 4 s of audio and the tail: every window but a few is real.
    assert!((45..FRAMES).contains(&real), "{real} real windows");
}

#[test]
fn a_short_command_has_few_real_windows_and_they_match_too() {
    let audio = utterance();
    // 1.2 s from the middle of the utterance (the words).
    let words = &audio[16_000..16_000 + 15 * CHUNK_SAMPLES];
    let real = check_top_against_the_front_end(words);
    assert!((15..25).contains(&real), "{real} real windows");
    // A clip longer than the history: all 64 are real.
    let long: Vec<i16> = audio.iter().chain(&audio).copied().collect();
    assert_eq!(check_top_against_the_front_end(&long), FRAMES);
}

/// A small network over a random top, and examples of cut features with
/// 0, some and all windows real.
fn tuned_tiny() -> (Net, Vec<Example>) {
    let frames = 7;
    let shape = Shape {
        frames,
        dim: CHANNELS,
        dilations: DILATIONS.to_vec(),
        channels: 5,
        heads: vec![3, 2],
    };
    let mut rng = Rng::new(21);
    let silence: Vec<f32> = (0..CHANNELS).map(|_| rng.normal()).collect();
    let mut net = Net::new(shape, 4).with_front(EmbeddingTop::random(8), silence);
    for h in &mut net.heads {
        h.q.iter_mut().for_each(|q| *q = rng.normal() * 0.5);
    }
    let examples: Vec<Example> = [0, 3, 7, 5]
        .iter()
        .enumerate()
        .map(|(i, &real)| {
            let mut features: Vec<f32> =
                (0..rows_for(frames) * ROW).map(|_| rng.normal()).collect();
            features.extend((0..frames).map(|w| if w >= frames - real { 1.0 } else { 0.0 }));
            Example {
                features,
                targets: vec![Some((i % 3) as u16), Some((i % 2) as u16)],
            }
        })
        .collect();
    assert_eq!(examples[0].features.len(), net.features());
    net.fit_normalization(&examples);
    (net, examples)
}

#[test]
fn gradients_through_the_network_into_a_tuned_top_match_finite_differences() {
    let (net, examples) = tuned_tiny();
    let batch: Vec<&Example> = examples.iter().collect();
    let (_, grads) = net.loss_and_grads(&batch);
    let analytic = grads.flatten();
    assert_eq!(analytic.len(), net.parameters());
    let own = net.parameters() - net.front.as_ref().map_or(0, |f| f.top.parameters());
    let eps = 1e-3;
    let mut bad = Vec::new();
    let (mut checked_top, mut moving_top) = (0, 0);
    // Every 7th of the network's own, every 331st of the top's.
    let indices = (0..own)
        .step_by(7)
        .chain((own..analytic.len()).step_by(331));
    for i in indices {
        let numeric = numeric_gradient(&net, &batch, i, eps);
        let a = analytic[i];
        if (a - numeric).abs() > 2e-3 + 0.05 * numeric.abs() {
            bad.push((i, a, numeric));
        }
        if i >= own {
            checked_top += 1;
            moving_top += usize::from(a.abs() > 1e-4);
        }
    }
    assert!(bad.len() <= 3, "{} gradients differ: {bad:?}", bad.len());
    assert!(
        checked_top > 300 && moving_top > checked_top / 3,
        "{moving_top} of {checked_top} top gradients move"
    );
}

#[test]
fn frozen_epochs_train_the_network_alone_on_the_tops_embeddings_then_the_top_trains() {
    let (net, examples) = tuned_tiny();
    // A plain copy on the embedded examples answers as the tuned network.
    let embedded = net.embedded(&examples, 2);
    let mut plain = net.clone();
    plain.front = None;
    for (e, p) in examples.iter().zip(&embedded) {
        let (a, b) = (net.predict(&e.features), plain.predict(&p.features));
        for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
            assert!((x - y).abs() < 1e-5, "tuned {x} vs plain {y}");
        }
    }
    let opts = TrainOptions {
        epochs: 3,
        front_epochs: Some(1),
        batch: 2,
        threads: 1,
        dropout: 0.0,
        ..TrainOptions::default()
    };
    // No validation: every epoch counts as the best so far, so the last wins.
    let mut tuned = net.clone();
    let mut reports = Vec::new();
    tuned.train(&examples, &[], &opts, |r| {
        reports.push((r.epoch, r.epochs, r.loss))
    });
    let mut alone = Vec::new();
    let first = TrainOptions {
        epochs: 2,
        front_epochs: None,
        ..opts.clone()
    };
    plain.train(&embedded, &[], &first, |r| alone.push(r.loss));
    let numbers: Vec<(usize, usize)> = reports.iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(numbers, [(1, 3), (2, 3), (3, 3)]);
    for (r, l) in reports.iter().zip(&alone) {
        assert!(
            (r.2 - l).abs() < 1e-5,
            "epoch {}: loss {} with the top frozen, {l} for the plain network",
            r.0,
            r.2
        );
    }
    let before = net.front.as_ref().expect("front").top.clone();
    let after = &tuned.front.as_ref().expect("front").top;
    let flat = |t: &EmbeddingTop| -> Vec<f32> {
        t.convs
            .iter()
            .flat_map(|c| c.w.iter().chain(&c.b).copied())
            .collect()
    };
    let moved = flat(&before)
        .iter()
        .zip(flat(after))
        .filter(|(a, b)| **a != *b)
        .count();
    assert!(
        moved > before.parameters() / 2,
        "the last epoch moved {moved} of the top's {} parameters",
        before.parameters()
    );
}

#[test]
fn a_network_with_the_pretrained_top_sees_what_the_plain_network_sees() {
    // Same weights, one on embeddings and one on the cut front end's rows:
    // the same probabilities for the same audio.
    let dir = models_dir();
    let top = EmbeddingTop::load(&dir.join("embedding_model.onnx")).expect("top");
    let shape = Shape {
        frames: FRAMES,
        dim: CHANNELS,
        dilations: DILATIONS.to_vec(),
        channels: 16,
        heads: vec![4, 3],
    };
    let plain = Net::new(shape, 2);
    let mut silence = vec![0.0; FEATURES];
    CommandFront::load(
        &dir.join("melspectrogram.onnx"),
        &dir.join("embedding_model.onnx"),
    )
    .expect("front")
    .features_of(&[], &mut silence)
    .expect("silence");
    let tuned = plain.clone().with_front(top, silence[..CHANNELS].to_vec());
    for audio in [utterance(), utterance()[16_000..36_000].to_vec()] {
        let ((embeddings, _), (rows, _)) = both_fronts(&audio);
        let (a, b) = (plain.predict(&embeddings), tuned.predict(&rows));
        for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
            assert!((x - y).abs() < 1e-4, "plain {x} vs tuned {y}");
        }
    }
}

#[test]
fn a_network_with_a_tuned_top_on_tract_gives_its_own_probabilities() {
    let heads = vec![4, 3];
    let shape = Shape {
        frames: FRAMES,
        dim: CHANNELS,
        dilations: DILATIONS.to_vec(),
        channels: 16,
        heads: heads.clone(),
    };
    let mut rng = Rng::new(31);
    let silence: Vec<f32> = (0..CHANNELS).map(|_| rng.normal()).collect();
    let mut net = Net::new(shape, 3).with_front(EmbeddingTop::random(12), silence);
    for h in &mut net.heads {
        h.q.iter_mut().for_each(|q| *q = rng.normal() * 0.3);
        h.b.iter_mut().for_each(|b| *b = rng.normal() * 0.3);
    }
    net.mean.iter_mut().for_each(|m| *m = rng.normal());
    net.inv_std
        .iter_mut()
        .for_each(|s| *s = rng.range(0.05, 0.2));
    let labels = Labels {
        format: LABELS_FORMAT,
        frames: FRAMES,
        intents: (0..3).map(|i| format!("intent{i}")).collect(),
        slots: vec![SlotLabels {
            name: "slot".to_string(),
            values: vec!["a".to_string(), "b".to_string()],
        }],
        intent_slots: vec![vec![0], vec![], vec![]],
        threshold: 0.5,
        intent_thresholds: Default::default(),
        grammar_sha256: "0".repeat(64),
        front: Front::Cut,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("intent.onnx"), onnx::to_onnx(&net, "test")).expect("onnx");
    std::fs::write(
        dir.path().join("labels.json"),
        serde_json::to_string(&labels).expect("json"),
    )
    .expect("labels");
    let mut model = IntentModel::load(dir.path()).expect("tract loads the export");
    assert_eq!(model.front(), Front::Cut);
    let mut differ = 0.0f32;
    for real in [0, 1, 23, FRAMES] {
        let mut features: Vec<f32> = (0..CUT_FEATURES - FRAMES).map(|_| rng.normal()).collect();
        features.extend((0..FRAMES).map(|w| if w >= FRAMES - real { 1.0 } else { 0.0 }));
        let ours = net.predict(&features);
        let tract = model.probabilities(&features).expect("runs");
        for (x, y) in tract.iter().flatten().zip(ours.iter().flatten()) {
            assert!(
                (x - y).abs() < 1e-4,
                "{real} real windows: tract {x} vs net {y}"
            );
        }
        differ = differ.max((ours[0][0] - 1.0 / 4.0).abs());
    }
    assert!(
        differ > 1e-2,
        "the probabilities do not depend on the input"
    );
    let err = model
        .probabilities(&vec![0.0; FEATURES])
        .expect_err("embeddings are not rows");
    assert!(err.to_string().contains(&CUT_FEATURES.to_string()), "{err}");
}
