//! The speech embedding's top layers as kith trains them
//! (`intent::embedding_top`), from each depth (conv2d_15, 13 and 11 on):
//! hand-written gradients against finite differences, and the pretrained
//! layers over the streamed rows of the cut embedding model against the
//! whole embedding model.
//!
//! The parity tests need the models installed (the README's test command
//! does it) in `$KITH_MODELS_DIR`.

mod support;

use kith_models::CHUNK_SAMPLES;
use kith_models::intent::embedding_top::{CHANNELS, Depth, EmbeddingTop};
use kith_models::intent::grammar::Rng;
use kith_models::intent::net::{DILATIONS, Example, Net, Shape, TrainOptions};
use support::{models_dir, numeric_gradient, utterance};

use kith_models::intent::{
    CommandFront, FEATURES, FRAMES, Front, IntentModel, LABELS_FORMAT, Labels, SlotLabels, onnx,
};

/// The layers are piecewise linear: a central difference is exact unless a
/// kink (an activation's or a pooling's switch) lies within ±eps, and its
/// f32 rounding error grows as eps shrinks. The deeper tops have more kinks
/// near any point: at eps = 1e-3 about a tenth of the nine-layer top's
/// differences still move with eps (and agree at 3e-4), while at 3e-4 the
/// five-layer top's rounding shows. So a gradient is checked at both steps
/// and is wrong when it misses both: returns the difference at the larger
/// step then, `None` when either agrees.
fn off_at_both_steps(
    analytic: f32,
    numeric: impl Fn(f32) -> f32,
    abs: f32,
    rel: f32,
) -> Option<f32> {
    let agrees = |n: f32| (analytic - n).abs() <= abs + rel * n.abs();
    let coarse = numeric(1e-3);
    (!agrees(coarse) && !agrees(numeric(2.5e-4))).then_some(coarse)
}

/// Σ embeddings ⊙ g: a loss whose gradient with respect to the embeddings is g.
fn weighted_sum(top: &EmbeddingTop, rows: &[f32], g: &[f32]) -> f64 {
    let e = top.embed(rows).expect("embed");
    e.iter().zip(g).map(|(a, b)| f64::from(a * b)).sum()
}

#[test]
fn gradients_of_the_top_match_finite_differences() {
    for depth in Depth::ALL {
        gradients_of_the_top_from(depth);
    }
}

fn gradients_of_the_top_from(depth: Depth) {
    let top = EmbeddingTop::random(depth, 5);
    let mut rng = Rng::new(6);
    let n = 1;
    let rows: Vec<f32> = (0..depth.rows_for(n) * depth.row())
        .map(|_| rng.normal())
        .collect();
    let g: Vec<f32> = (0..n * CHANNELS).map(|_| rng.normal()).collect();
    let trace = top.forward(&rows).expect("forward");
    assert_eq!(trace.embeddings.len(), n * CHANNELS);
    let mut grads = top.zero_grads();
    top.backward(&trace, &g, &mut grads);
    let analytic = grads.flatten();
    assert_eq!(analytic.len(), top.parameters());
    let mut checked = 0;
    let mut nonzero = 0;
    let mut bad = Vec::new();
    // About 700 parameters, spread over all the layers.
    let step = (analytic.len() / 700).max(1);
    let mut layers_moving = vec![false; top.convs.len()];
    let layer_of = |mut i: usize| {
        top.convs
            .iter()
            .position(|c| {
                let size = c.w.len() + c.b.len();
                let here = i < size;
                i = i.saturating_sub(size);
                here
            })
            .unwrap_or(usize::MAX)
    };
    for i in (0..analytic.len()).step_by(step) {
        let numeric = |eps: f32| {
            let mut plus = top.clone();
            plus.nudge(i, eps);
            let mut minus = top.clone();
            minus.nudge(i, -eps);
            ((weighted_sum(&plus, &rows, &g) - weighted_sum(&minus, &rows, &g))
                / (2.0 * f64::from(eps))) as f32
        };
        let a = analytic[i];
        if let Some(numeric) = off_at_both_steps(a, numeric, 2e-2, 0.02) {
            bad.push((i, a, numeric));
        }
        nonzero += usize::from(a.abs() > 1e-3);
        if a.abs() > 1e-3 {
            layers_moving[layer_of(i)] = true;
        }
        checked += 1;
    }
    let from = depth.first_layer();
    // A nudge can cross a kink of the activation or switch a pooling's
    // maximum; with these sizes that happens for at most a handful.
    assert!(
        bad.len() <= checked / 50,
        "from {from}: {} of {checked} gradients differ: {bad:?}",
        bad.len()
    );
    assert!(
        checked > 600 && nonzero > checked / 2,
        "from {from}: {nonzero} of {checked}"
    );
    assert!(
        layers_moving.iter().all(|&m| m),
        "from {from}: layers with a gradient: {layers_moving:?}"
    );
}

#[test]
fn the_top_refuses_rows_it_cannot_use() {
    for depth in Depth::ALL {
        let top = EmbeddingTop::random(depth, 1);
        let (row, extra) = (depth.row(), depth.extra_rows());
        for values in [
            0,
            row * (extra + 1),
            row * (extra + 3),
            row * (extra + 4) + 1,
        ] {
            let err = top.embed(&vec![0.0; values]).expect_err("bad length");
            assert!(err.to_string().contains("rows of"), "{err}");
        }
        assert_eq!(
            top.embed(&vec![0.0; row * (extra + 4)])
                .expect("two windows' rows")
                .len(),
            2 * CHANNELS
        );
    }
}

#[test]
fn the_shipped_embedding_model_loads_as_a_top_from_each_depth() {
    let path = models_dir().join("embedding_model.onnx");
    let square = 3 * 96 * 96;
    for (depth, layers, parameters) in [
        (Depth::From15, 5, 5 * square + 4 * 96),
        (Depth::From13, 7, 7 * square + 6 * 96),
        (Depth::From11, 9, 3 * 72 * 96 + 8 * square + 8 * 96),
    ] {
        let top = EmbeddingTop::load(&path, depth).expect("top");
        assert_eq!(top.convs.len(), layers);
        assert_eq!(top.floor, -0.4);
        assert_eq!(top.parameters(), parameters);
    }
    let missing = EmbeddingTop::load(&models_dir().join("melspectrogram.onnx"), Depth::From13)
        .expect_err("not an embedding model");
    assert!(missing.to_string().contains("conv2d_13"), "{missing}");
}

/// The features of `audio` from the command front end and from the
/// command front end cut before `depth`'s first layer, with each one's
/// count of real windows.
fn both_fronts(audio: &[i16], depth: Depth) -> ((Vec<f32>, usize), (Vec<f32>, usize)) {
    let dir = models_dir();
    let mel = dir.join("melspectrogram.onnx");
    let emb = dir.join("embedding_model.onnx");
    let mut whole = CommandFront::load(&mel, &emb).expect("front");
    let mut cut = CommandFront::load_cut(&mel, &emb, depth).expect("cut front");
    let cut_features = Front::cut(depth).features();
    assert_eq!((whole.features(), cut.features()), (FEATURES, cut_features));
    assert_eq!(cut.front(), Front::cut(depth));
    let mut e = vec![0.0; FEATURES];
    whole.features_of(audio, &mut e).expect("embeddings");
    let mut r = vec![0.0; cut_features];
    cut.features_of(audio, &mut r).expect("rows");
    ((e, whole.real_windows()), (r, cut.real_windows()))
}

/// Checks that the pretrained top from every depth, over its cut features,
/// gives the command front end's embeddings for every real window;
/// returns how many.
fn check_top_against_the_front_end(audio: &[i16]) -> usize {
    let counts: Vec<usize> = Depth::ALL
        .into_iter()
        .map(|depth| check_top_from(depth, audio))
        .collect();
    assert!(
        counts.iter().all(|&c| c == counts[0]),
        "real windows per depth: {counts:?}"
    );
    counts[0]
}

fn check_top_from(depth: Depth, audio: &[i16]) -> usize {
    let top = EmbeddingTop::load(&models_dir().join("embedding_model.onnx"), depth).expect("top");
    let ((embeddings, real), (rows, real_cut)) = both_fronts(audio, depth);
    assert_eq!(real, real_cut, "the fronts count different real windows");
    let (rows, mask) = rows.split_at(rows.len() - FRAMES);
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
        "from {}: largest difference {worst} (embeddings up to {scale})",
        depth.first_layer()
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

/// A small network over a random top from `depth`, and examples of cut
/// features with 0, some and all windows real.
fn tuned_tiny(depth: Depth) -> (Net, Vec<Example>) {
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
    let mut net = Net::new(shape, 4).with_front(EmbeddingTop::random(depth, 8), silence);
    for h in &mut net.heads {
        h.q.iter_mut().for_each(|q| *q = rng.normal() * 0.5);
    }
    let examples: Vec<Example> = [0, 3, 7, 5]
        .iter()
        .enumerate()
        .map(|(i, &real)| {
            let mut features: Vec<f32> = (0..depth.rows_for(frames) * depth.row())
                .map(|_| rng.normal())
                .collect();
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
    for depth in [Depth::From15, Depth::From11] {
        gradients_through_the_network_into_a_top_from(depth);
    }
}

fn gradients_through_the_network_into_a_top_from(depth: Depth) {
    let (net, examples) = tuned_tiny(depth);
    let batch: Vec<&Example> = examples.iter().collect();
    let (_, grads) = net.loss_and_grads(&batch);
    let analytic = grads.flatten();
    assert_eq!(analytic.len(), net.parameters());
    let own = net.parameters() - net.front.as_ref().map_or(0, |f| f.top.parameters());
    let mut bad = Vec::new();
    let (mut checked_top, mut moving_top) = (0, 0);
    // Every 7th of the network's own, about 400 of the top's.
    let indices = (0..own)
        .step_by(7)
        .chain((own..analytic.len()).step_by(((analytic.len() - own) / 400).max(1)));
    for i in indices {
        let a = analytic[i];
        let numeric = |eps: f32| numeric_gradient(&net, &batch, i, eps);
        if let Some(numeric) = off_at_both_steps(a, numeric, 2e-3, 0.05) {
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

/// Every weight and bias of a top, in order.
fn flat(t: &EmbeddingTop) -> Vec<f32> {
    t.convs
        .iter()
        .flat_map(|c| c.w.iter().chain(&c.b).copied())
        .collect()
}

#[test]
fn frozen_epochs_train_the_network_alone_on_the_tops_embeddings_then_the_top_trains() {
    // The deepest top: its first layer has 72 channels in, the others 96.
    let (net, examples) = tuned_tiny(Depth::From11);
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
    // The frozen epochs are a plain network's first epochs of the same run:
    // one learning-rate decay over all three.
    let mut alone = Vec::new();
    let first = TrainOptions {
        front_epochs: None,
        ..opts.clone()
    };
    plain.train(&embedded, &[], &first, |r| alone.push(r.loss));
    let numbers: Vec<(usize, usize)> = reports.iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(numbers, [(1, 3), (2, 3), (3, 3)]);
    for (r, l) in reports.iter().zip(&alone).take(2) {
        assert!(
            (r.2 - l).abs() < 1e-5,
            "epoch {}: loss {} with the top frozen, {l} for the plain network",
            r.0,
            r.2
        );
    }
    let before = net.front.as_ref().expect("front").top.clone();
    let after = &tuned.front.as_ref().expect("front").top;
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
fn tuning_the_top_goes_on_with_the_networks_own_optimizer_and_decay() {
    // With the top's learning rate at zero and every example in one batch
    // (so the shuffle cannot matter), the tuned run's own layers take the
    // steps a plain network takes over all its epochs: the switch to tuning
    // neither restarts their moments nor their learning rate. Quiet inputs
    // keep the top's gradients small: the norm clipped is over every
    // parameter, so large ones would shorten the tuned run's steps.
    let (net, mut examples) = tuned_tiny(Depth::From11);
    let rows = Depth::From11.rows_for(7) * Depth::From11.row();
    for e in &mut examples {
        e.features[..rows].iter_mut().for_each(|x| *x *= 0.01);
    }
    let embedded = net.embedded(&examples, 1);
    let mut plain = net.clone();
    plain.front = None;
    let opts = TrainOptions {
        epochs: 4,
        front_epochs: Some(2),
        batch: examples.len(),
        threads: 1,
        dropout: 0.0,
        front_learning_rate: 0.0,
        ..TrainOptions::default()
    };
    let mut tuned = net.clone();
    tuned.train(&examples, &[], &opts, |_| {});
    let whole = TrainOptions {
        front_epochs: None,
        ..opts.clone()
    };
    plain.train(&embedded, &[], &whole, |_| {});
    let top = |n: &Net| flat(&n.front.as_ref().expect("front").top);
    assert!(
        top(&tuned) == top(&net),
        "a zero learning rate moved the top"
    );
    let mut largest = 0.0f32;
    for (e, p) in examples.iter().zip(&embedded) {
        let (a, b) = (tuned.predict(&e.features), plain.predict(&p.features));
        for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
            largest = largest.max((x - y).abs());
        }
    }
    // A restart at the switch (the old trainer) moved these by 0.049.
    assert!(largest < 1e-4, "tuned and plain differ by {largest}");
    let moved = net
        .predict(&examples[0].features)
        .iter()
        .flatten()
        .zip(plain.predict(&embedded[0].features).iter().flatten())
        .any(|(x, y)| (x - y).abs() > 1e-3);
    assert!(moved, "training moved the answers");
}

#[test]
fn a_network_with_the_pretrained_top_sees_what_the_plain_network_sees() {
    // Same weights, one on embeddings and one on the cut front end's rows:
    // the same probabilities for the same audio.
    let dir = models_dir();
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
    for depth in Depth::ALL {
        let top = EmbeddingTop::load(&dir.join("embedding_model.onnx"), depth).expect("top");
        let tuned = plain.clone().with_front(top, silence[..CHANNELS].to_vec());
        for audio in [utterance(), utterance()[16_000..36_000].to_vec()] {
            let ((embeddings, _), (rows, _)) = both_fronts(&audio, depth);
            let (a, b) = (plain.predict(&embeddings), tuned.predict(&rows));
            for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
                assert!(
                    (x - y).abs() < 1e-4,
                    "from {}: plain {x} vs tuned {y}",
                    depth.first_layer()
                );
            }
        }
    }
}

#[test]
fn a_network_with_a_tuned_top_on_tract_gives_its_own_probabilities() {
    for depth in Depth::ALL {
        tuned_top_on_tract(depth);
    }
}

fn tuned_top_on_tract(depth: Depth) {
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
    let mut net = Net::new(shape, 3).with_front(EmbeddingTop::random(depth, 12), silence);
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
        front: Front::cut(depth),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("intent.onnx"), onnx::to_onnx(&net, "test")).expect("onnx");
    std::fs::write(
        dir.path().join("labels.json"),
        serde_json::to_string(&labels).expect("json"),
    )
    .expect("labels");
    let mut model = IntentModel::load(dir.path()).expect("tract loads the export");
    assert_eq!(model.front(), Front::cut(depth));
    let features = model.front().features();
    let mut differ = 0.0f32;
    for real in [0, 1, 23, FRAMES] {
        let mut features: Vec<f32> = (0..features - FRAMES).map(|_| rng.normal()).collect();
        features.extend((0..FRAMES).map(|w| if w >= FRAMES - real { 1.0 } else { 0.0 }));
        let ours = net.predict(&features);
        let tract = model.probabilities(&features).expect("runs");
        for (x, y) in tract.iter().flatten().zip(ours.iter().flatten()) {
            assert!(
                (x - y).abs() < 1e-4,
                "from {}, {real} real windows: tract {x} vs net {y}",
                depth.first_layer()
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
    assert!(err.to_string().contains(&features.to_string()), "{err}");
}

#[test]
fn labels_name_the_depth_and_older_cut_models_read_as_from_15() {
    let json = |f: Front| serde_json::to_string(&f).expect("json");
    assert_eq!(json(Front::cut(Depth::From15)), "\"cut\"");
    assert_eq!(json(Front::cut(Depth::From13)), "\"cut13\"");
    assert_eq!(json(Front::cut(Depth::From11)), "\"cut11\"");
    let old: Front = serde_json::from_str("\"cut\"").expect("a model of before depths");
    assert_eq!(old.depth(), Some(Depth::From15));
    assert_eq!(Front::Embeddings.depth(), None);
    // The inputs differ per depth: a front end of one cannot feed another.
    let sizes: Vec<usize> = Depth::ALL
        .into_iter()
        .map(|d| Front::cut(d).features())
        .collect();
    assert_eq!(
        sizes,
        [136 * 192 + 64, 138 * 384 + 64, 140 * 288 + 64],
        "rows × row values + the mask"
    );
}
