//! Speech to intent, the pure parts: Rhino grammars (good and bad files in
//! `tests/fixtures/grammars`), balanced sampling, the network's gradients
//! and training, the ONNX export on tract, and the command front end.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use kith_models::intent::grammar::{Grammar, HoldOut, Rng, Utterance, normalize};
use kith_models::intent::net::{DILATIONS, Example, Net, Shape, TrainOptions};
use kith_models::intent::{
    CommandFront, FEATURES, FRAMES, IntentModel, LABELS_FORMAT, Labels, SlotLabels, onnx,
};
use kith_models::wake::EMBEDDING_DIM;
use support::{models_dir, numeric_gradient};

fn grammar_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/grammars")
        .join(kind)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("fixture dir")
        .map(|e| e.expect("entry").path())
        .collect();
    v.sort();
    v
}

fn lights() -> Grammar {
    let text = std::fs::read_to_string(grammar_dir("good").join("lights.yaml")).expect("fixture");
    Grammar::parse(&text).expect("lights.yaml parses")
}

#[test]
fn every_bad_grammar_is_refused_at_the_line_and_column_its_first_line_names() {
    let bad = files(&grammar_dir("bad"));
    assert!(bad.len() >= 10, "fixtures missing");
    for path in bad {
        let text = std::fs::read_to_string(&path).expect("fixture");
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks `# expect:`", path.display()));
        match Grammar::parse(&text) {
            Ok(_) => panic!("{} parsed, expected `{expect}`", path.display()),
            Err(e) => assert!(
                e.to_string().starts_with(expect),
                "{}: got `{e}`, expected `{expect}`",
                path.display()
            ),
        }
    }
}

#[test]
fn the_rhino_example_parses_into_intents_slots_and_macros() {
    let g = lights();
    let names: Vec<&str> = g.intents.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["changeColor", "lightsOff"]);
    let slots: Vec<(&str, &str, usize)> = g
        .slots
        .iter()
        .map(|s| (s.name.as_str(), s.ty.as_str(), s.values.len()))
        .collect();
    assert_eq!(slots, [("location", "location", 3), ("color", "color", 3)]);
    assert_eq!(g.intents[0].slots, [0, 1]);
    assert_eq!(g.intents[1].slots, [0]);
}

#[test]
fn sentences_of_the_grammar_match_with_their_slots_and_others_do_not() {
    let g = lights();
    let meaning = |text: &str| {
        g.parse_text(text).map(|(i, slots)| {
            let slots: Vec<(String, String)> = slots
                .iter()
                .map(|&(s, v)| (g.slots[s].name.clone(), g.slots[s].values[v].clone()))
                .collect();
            (g.intents[i].name.clone(), slots)
        })
    };
    let slot = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        meaning("Make all the living room lights dark blue."),
        Some((
            "changeColor".into(),
            vec![slot("location", "living room"), slot("color", "dark blue")]
        ))
    );
    assert_eq!(
        meaning("would you change the kitchen lights to red"),
        Some((
            "changeColor".into(),
            vec![slot("location", "kitchen"), slot("color", "red")]
        ))
    );
    assert_eq!(
        meaning("turn off the lights"),
        Some(("lightsOff".into(), vec![]))
    );
    assert_eq!(
        meaning("turn off all the lights in the bedroom"),
        Some(("lightsOff".into(), vec![slot("location", "bedroom")]))
    );
    for not in [
        "turn the garage lights red",
        "make the kitchen lights",
        "turn off the lights please",
        "what time is it",
        "",
    ] {
        assert_eq!(meaning(not), None, "`{not}` is not in the grammar");
    }
}

#[test]
fn sampling_says_every_slot_value_equally_often_and_only_sentences_of_the_grammar() {
    let g = lights();
    let mut sampler = g.sampler(7);
    let mut per_intent = vec![0; g.intents.len()];
    let mut counts: BTreeMap<(usize, usize), u32> = BTreeMap::new();
    for _ in 0..600 {
        let u = sampler.next_utterance();
        per_intent[u.intent] += 1;
        let (intent, slots) = g
            .parse_text(&u.text)
            .unwrap_or_else(|| panic!("sampled `{}` does not parse", u.text));
        assert_eq!(intent, u.intent, "`{}`", u.text);
        let mut want = u.slots.clone();
        want.sort();
        let mut got = slots;
        got.sort();
        assert_eq!(got, want, "`{}`", u.text);
        for s in u.slots {
            *counts.entry(s).or_default() += 1;
        }
    }
    assert_eq!(per_intent, [300, 300], "intents in turn");
    for (s, slot) in g.slots.iter().enumerate() {
        let seen: Vec<u32> = (0..slot.values.len())
            .map(|v| counts.get(&(s, v)).copied().unwrap_or(0))
            .collect();
        let (lo, hi) = (seen.iter().min().copied(), seen.iter().max().copied());
        assert!(
            lo > Some(0),
            "slot {} has a value never said: {seen:?}",
            slot.name
        );
        assert!(
            hi.zip(lo).is_some_and(|(h, l)| h - l <= 1),
            "slot {} is unbalanced: {seen:?}",
            slot.name
        );
    }
}

#[test]
fn sampling_a_grammar_of_billions_of_sentences_is_instant() {
    // 12 choices of 10 words: 10^12 sentences; sampling must not enumerate.
    let choice = (0..10)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let expr = vec![format!("[{choice}]"); 12].join(" ");
    let text = format!("context:\n  expressions:\n    big:\n      - \"{expr}\"\n");
    let g = Grammar::parse(&text).expect("parses");
    let mut s = g.sampler(1);
    for _ in 0..1000 {
        assert_eq!(s.next_utterance().text.split(' ').count(), 12);
    }
}

#[test]
fn holding_out_test_sentences_leaves_training_every_intent_and_every_slot_value() {
    let contexts = [
        Path::new(env!("CARGO_MANIFEST_DIR")).join("intents/smart-home/context.yaml"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("intents/coffee/context.yaml"),
        grammar_dir("good").join("lights.yaml"),
    ];
    for path in contexts {
        let g = Grammar::parse(&std::fs::read_to_string(&path).expect("context")).expect("parses");
        for (seed, rule) in [
            (1u64, HoldOut::Words),
            (2, HoldOut::Words),
            (1, HoldOut::WordPairs),
            (2, HoldOut::WordPairs),
        ] {
            // The test's sentences, then more beside them (for setting
            // thresholds): the rules hold for both together.
            let test = g.hold_out(seed, 20, rule);
            let more = g.hold_out_beside(seed ^ 9, 20, &test, rule);
            let test_texts: HashSet<&str> =
                test.iter().flatten().map(|u| u.text.as_str()).collect();
            for u in more.iter().flatten() {
                assert!(
                    !test_texts.contains(u.text.as_str()),
                    "{path:?}: {}",
                    u.text
                );
            }
            let held: Vec<Vec<_>> = test
                .iter()
                .zip(&more)
                .map(|(t, m)| t.iter().chain(m).cloned().collect())
                .collect();
            let held_texts: HashSet<&str> =
                held.iter().flatten().map(|u| u.text.as_str()).collect();
            assert_eq!(held_texts.len(), held.iter().map(Vec::len).sum::<usize>());
            // Smart-home's four light and thermostat intents have
            // sentences to spare; the test takes a fifth of the others'.
            if path.ends_with("smart-home/context.yaml") {
                let spare = more.iter().filter(|m| m.len() >= 10).count();
                assert!(
                    spare >= 4,
                    "{:?}",
                    more.iter().map(Vec::len).collect::<Vec<_>>()
                );
            }
            // Distinct sentences per intent, and the slot values, on a big sample.
            let mut sampler = g.sampler(seed ^ 0xABC);
            let mut distinct: Vec<HashSet<String>> = vec![HashSet::new(); g.intents.len()];
            let mut trainable: HashSet<(usize, usize)> = HashSet::new();
            let mut trained_intents: HashSet<usize> = HashSet::new();
            let mut trained_words: HashSet<String> = HashSet::new();
            let mut words: HashSet<String> = HashSet::new();
            let mut trained_pairs: HashSet<(String, String)> = HashSet::new();
            let mut pairs: HashSet<(String, String)> = HashSet::new();
            for _ in 0..20_000 {
                let u = sampler.next_utterance();
                distinct[u.intent].insert(u.text.clone());
                words.extend(normalize(&u.text));
                pairs.extend(g.word_pairs(&u));
                if !held_texts.contains(u.text.as_str()) {
                    trained_words.extend(normalize(&u.text));
                    trained_pairs.extend(g.word_pairs(&u));
                    trained_intents.insert(u.intent);
                    trainable.extend(u.slots.iter().copied());
                }
            }
            for (i, sentences) in held.iter().enumerate() {
                let name = &g.intents[i].name;
                assert!(sentences.iter().all(|u| u.intent == i), "{path:?} {name}");
                assert!(
                    test[i].len() <= 20 && more[i].len() <= 20,
                    "{path:?} {name}"
                );
                let d = distinct[i].len();
                if d >= 3 {
                    assert!(
                        !sentences.is_empty(),
                        "{path:?} {name}: {d} distinct, none held out"
                    );
                }
                assert!(
                    sentences.len() <= (d / 5).max(usize::from(d >= 3)),
                    "{path:?} {name}: {} held out of {d}",
                    sentences.len()
                );
                assert!(
                    trained_intents.contains(&i),
                    "{path:?} {name} never trained"
                );
            }
            let unheard: Vec<&String> = words.difference(&trained_words).collect();
            assert!(
                unheard.is_empty(),
                "{path:?}: words only in held-out sentences: {unheard:?}"
            );
            if rule == HoldOut::WordPairs {
                let unheard: Vec<_> = pairs.difference(&trained_pairs).collect();
                assert!(
                    unheard.is_empty(),
                    "{path:?}: word pairs only in held-out sentences: {unheard:?}"
                );
            }
            for (si, slot) in g.slots.iter().enumerate() {
                for (vi, value) in slot.values.iter().enumerate() {
                    assert!(
                        trainable.contains(&(si, vi)),
                        "{path:?}: slot {} value {value:?} is only in held-out sentences",
                        slot.name
                    );
                }
            }
        }
    }
}

#[test]
fn word_pairs_mark_slots_and_the_ends_of_the_sentence() {
    let path = grammar_dir("good").join("phrasings.yaml");
    let g = Grammar::parse(&std::fs::read_to_string(path).expect("fixture")).expect("parses");
    let (intent, slots) = g.parse_text("turn it up").expect("in the grammar");
    let u = Utterance {
        text: "turn it up".into(),
        intent,
        slots,
    };
    let pairs = g.word_pairs(&u);
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("<s>", "turn"),
            ("turn", "it"),
            ("it", "$direction"),
            ("$direction", "</s>")
        ]
    );
    // A value of two words is one mark; the words around it stay.
    let (intent, slots) = g
        .parse_text("make the living room warmer")
        .expect("in the grammar");
    let u = Utterance {
        text: "make the living room warmer".into(),
        intent,
        slots,
    };
    let pairs = g.word_pairs(&u);
    assert!(
        pairs.contains(&("the".into(), "$location".into())),
        "{pairs:?}"
    );
    assert!(
        pairs.contains(&("$location".into(), "warmer".into())),
        "{pairs:?}"
    );
    assert_eq!(pairs.len(), 5, "{pairs:?}");
}

#[test]
fn the_word_pair_rule_never_holds_a_phrasing_out_whole() {
    // Short phrasings of two sentences ("turn it up", "turn it down") say
    // only words longer ones say too: the word rule may test both and
    // train neither; the word-pair rule keeps one of them in training.
    let path = grammar_dir("good").join("phrasings.yaml");
    let g = Grammar::parse(&std::fs::read_to_string(path).expect("fixture")).expect("parses");
    let untrained_pairs = |rule: HoldOut, seed: u64| -> usize {
        let held: HashSet<String> = g
            .hold_out(seed, 20, rule)
            .into_iter()
            .flatten()
            .map(|u| u.text)
            .collect();
        let mut sampler = g.sampler(seed ^ 0xABC);
        let (mut all, mut trained) = (HashSet::new(), HashSet::new());
        for _ in 0..5_000 {
            let u = sampler.next_utterance();
            all.extend(g.word_pairs(&u));
            if !held.contains(&u.text) {
                trained.extend(g.word_pairs(&u));
            }
        }
        all.difference(&trained).count()
    };
    let seeds = 1..=20u64;
    let by_words: usize = seeds
        .clone()
        .map(|s| untrained_pairs(HoldOut::Words, s))
        .sum();
    assert!(
        by_words > 0,
        "the word rule never held a phrasing out whole in 20 seeds: this grammar no longer shows the difference"
    );
    for seed in seeds {
        assert_eq!(untrained_pairs(HoldOut::WordPairs, seed), 0, "seed {seed}");
    }
}

/// A tiny random problem for the gradient check.
fn tiny() -> (Net, Vec<Example>) {
    let shape = Shape {
        frames: 7,
        dim: 4,
        dilations: DILATIONS.to_vec(),
        channels: 5,
        heads: vec![3, 2],
    };
    let mut net = Net::new(shape, 3);
    let mut rng = Rng::new(11);
    // Non-zero queries and biases so every path carries gradient.
    for h in &mut net.heads {
        h.q.iter_mut().for_each(|q| *q = rng.normal() * 0.5);
    }
    for c in &mut net.convs {
        c.b.iter_mut().for_each(|b| *b = rng.normal() * 0.1);
    }
    let examples = (0..5)
        .map(|i| Example {
            features: (0..28).map(|_| rng.normal()).collect(),
            targets: vec![
                Some((i % 3) as u16),
                if i % 2 == 0 { Some(1) } else { None },
            ],
        })
        .collect();
    (net, examples)
}

#[test]
fn gradients_match_finite_differences() {
    let (net, examples) = tiny();
    let batch: Vec<&Example> = examples.iter().collect();
    let (_, grads) = net.loss_and_grads(&batch);
    let analytic = grads.flatten();
    assert_eq!(analytic.len(), net.parameters());
    let eps = 1e-3;
    let mut checked = 0;
    let mut bad = Vec::new();
    for i in (0..analytic.len()).step_by(3) {
        let numeric = numeric_gradient(&net, &batch, i, eps);
        let a = analytic[i];
        if (a - numeric).abs() > 2e-3 + 0.05 * numeric.abs() {
            bad.push((i, a, numeric));
        }
        checked += 1;
    }
    assert!(bad.is_empty(), "gradients differ: {bad:?}");
    assert!(checked > 50);
}

#[test]
fn a_batch_split_over_threads_gives_the_same_gradient() {
    let (net, examples) = tiny();
    let batch: Vec<&Example> = examples.iter().collect();
    let (l1, g1) = net.parallel_grads(&batch, 1);
    let (l2, g2) = net.parallel_grads(&batch, 2);
    assert!((l1 - l2).abs() < 1e-5, "{l1} vs {l2}");
    for (a, b) in g1.flatten().iter().zip(g2.flatten()) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

/// Class = which third of the sequence holds a bump in dimension 0; head 1
/// = the sign of dimension 1 at the bump. Mean pooling cannot do it.
fn planted(n: usize, seed: u64) -> Vec<Example> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let class = rng.below(3);
            let sign = rng.below(2);
            let mut f: Vec<f32> = (0..12 * 3).map(|_| rng.normal() * 0.3).collect();
            let t = class * 4 + rng.below(4);
            f[t * 3] += 3.0;
            f[t * 3 + 1] += if sign == 1 { 2.0 } else { -2.0 };
            Example {
                features: f,
                targets: vec![Some(class as u16), Some(sign as u16)],
            }
        })
        .collect()
}

#[test]
fn training_learns_where_and_what_on_a_planted_problem() {
    let shape = Shape {
        frames: 12,
        dim: 3,
        dilations: DILATIONS.to_vec(),
        channels: 16,
        heads: vec![3, 2],
    };
    let mut net = Net::new(shape, 5);
    let train = planted(600, 1);
    let test = planted(200, 2);
    net.fit_normalization(&train);
    let before = net.accuracy(&test);
    let mut reports = Vec::new();
    let opts = TrainOptions {
        epochs: 25,
        ..TrainOptions::default()
    };
    net.train(&train, &test[..100], &opts, |r| reports.push(r));
    assert_eq!(reports.len(), 25);
    assert!(reports[24].loss < reports[0].loss, "loss fell");
    let after = net.accuracy(&test[100..]);
    assert!(before < 0.5, "chance before training: {before}");
    assert!(after >= 0.95, "accuracy after training {after}");
}

fn write_model(dir: &Path, net: &Net, labels: &Labels) {
    std::fs::write(dir.join("intent.onnx"), onnx::to_onnx(net, "test")).expect("write onnx");
    std::fs::write(
        dir.join("labels.json"),
        serde_json::to_string(labels).expect("json"),
    )
    .expect("write labels");
}

fn labels_for(heads: &[usize]) -> Labels {
    Labels {
        format: LABELS_FORMAT,
        frames: FRAMES,
        intents: (0..heads[0] - 1).map(|i| format!("intent{i}")).collect(),
        slots: heads[1..]
            .iter()
            .enumerate()
            .map(|(s, &k)| SlotLabels {
                name: format!("slot{s}"),
                values: (0..k - 1).map(|v| format!("value {v}")).collect(),
            })
            .collect(),
        intent_slots: (0..heads[0] - 1)
            .map(|i| if i == 0 { vec![0, 1] } else { vec![1] })
            .collect(),
        threshold: 0.5,
        intent_thresholds: Default::default(),
        grammar_sha256: "0".repeat(64),
        front: Default::default(),
    }
}

/// Probabilities of the heads `[3, 3, 3]`: `intent` at `p`, every slot
/// head certain of its first value.
fn heard(intent: usize, p: f32) -> Vec<Vec<f32>> {
    let mut i = vec![(1.0 - p) / 2.0; 3];
    i[intent] = p;
    vec![i, vec![0.0, 1.0, 0.0], vec![0.0, 1.0, 0.0]]
}

#[test]
fn an_intent_with_a_threshold_of_its_own_is_judged_by_it_and_the_others_by_the_default() {
    let mut labels = labels_for(&[3, 3, 3]);
    assert_eq!(labels.threshold_of(0), 0.5);
    assert!(labels.decode(&heard(0, 0.6)).understood);
    labels.intent_thresholds.insert("intent0".to_string(), 0.7);
    labels.intent_thresholds.insert("intent1".to_string(), 0.3);
    let u = labels.decode(&heard(0, 0.6));
    assert!(!u.understood, "0.6 is under intent0's own 0.7");
    assert_eq!(u.intent.as_deref(), Some("intent0"));
    assert!(labels.decode(&heard(0, 0.7)).understood);
    assert!(
        labels.decode(&heard(1, 0.4)).understood,
        "over intent1's 0.3"
    );
    // Old labels files, without the map, still read, as one threshold.
    let old = serde_json::to_string(&labels_for(&[3, 3, 3])).expect("json");
    assert!(!old.contains("intent_thresholds"));
    let back: Labels = serde_json::from_str(&old).expect("reads");
    assert!(back.intent_thresholds.is_empty());
    let new: Labels =
        serde_json::from_str(&serde_json::to_string(&labels).expect("json")).expect("reads back");
    assert_eq!(new.threshold_of(1), 0.3);
}

#[test]
fn the_exported_onnx_model_on_tract_gives_the_networks_own_probabilities() {
    let heads = vec![4, 5, 3];
    let mut net = Net::new(
        Shape {
            frames: FRAMES,
            dim: EMBEDDING_DIM,
            dilations: DILATIONS.to_vec(),
            channels: 24,
            heads: heads.clone(),
        },
        9,
    );
    let mut rng = Rng::new(4);
    for h in &mut net.heads {
        h.q.iter_mut().for_each(|q| *q = rng.normal() * 0.3);
        h.b.iter_mut().for_each(|b| *b = rng.normal() * 0.3);
    }
    net.mean.iter_mut().for_each(|m| *m = rng.normal());
    net.inv_std
        .iter_mut()
        .for_each(|s| *s = rng.range(0.5, 2.0));
    let dir = tempfile::tempdir().expect("tempdir");
    let labels = labels_for(&heads);
    write_model(dir.path(), &net, &labels);
    let mut model = IntentModel::load(dir.path()).expect("tract loads the export");
    for seed in 0..3 {
        let mut rng = Rng::new(100 + seed);
        let features: Vec<f32> = (0..FEATURES).map(|_| rng.normal()).collect();
        let ours = net.predict(&features);
        let tract = model.probabilities(&features).expect("runs");
        assert_eq!(tract.len(), ours.len());
        for (a, b) in tract.iter().zip(&ours) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-4, "tract {x} vs net {y}");
            }
        }
        let (a, b) = (model.infer(&features).expect("infer"), labels.decode(&ours));
        assert_eq!(
            (a.understood, a.intent, a.slots),
            (b.understood, b.intent, b.slots)
        );
        assert!((a.score - b.score).abs() < 1e-4);
    }
}

/// A network of the model's input size with random (not trained) weights,
/// so that its heads' answers differ from another seed's.
fn random_net(heads: &[usize], seed: u64) -> Net {
    let mut net = Net::new(
        Shape {
            frames: FRAMES,
            dim: EMBEDDING_DIM,
            dilations: DILATIONS.to_vec(),
            channels: 16,
            heads: heads.to_vec(),
        },
        seed,
    );
    let mut rng = Rng::new(seed + 50);
    for h in &mut net.heads {
        h.q.iter_mut().for_each(|q| *q = rng.normal() * 0.3);
        h.b.iter_mut().for_each(|b| *b = rng.normal());
    }
    net.mean.iter_mut().for_each(|m| *m = rng.normal() * 0.1);
    net
}

#[test]
fn an_exported_ensemble_on_tract_gives_the_mean_of_its_networks_probabilities() {
    let heads = vec![4, 5, 3];
    let nets: Vec<Net> = (0..3).map(|m| random_net(&heads, 20 + m)).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("intent.onnx"),
        onnx::to_onnx_ensemble(&nets, "test"),
    )
    .expect("write onnx");
    std::fs::write(
        dir.path().join("labels.json"),
        serde_json::to_string(&labels_for(&heads)).expect("json"),
    )
    .expect("write labels");
    let mut model = IntentModel::load(dir.path()).expect("tract loads the ensemble");
    let mut rng = Rng::new(7);
    let features: Vec<f32> = (0..FEATURES).map(|_| rng.normal()).collect();
    let mean = Net::predict_mean(&nets, &features);
    let first = nets[0].predict(&features);
    let tract = model.probabilities(&features).expect("runs");
    assert_eq!(tract.len(), heads.len());
    let mut differs = false;
    for ((t, m), f) in tract.iter().zip(&mean).zip(&first) {
        assert_eq!(t.len(), m.len());
        for ((x, y), z) in t.iter().zip(m).zip(f) {
            assert!((x - y).abs() < 1e-4, "tract {x} vs mean of the nets {y}");
            differs |= (y - z).abs() > 1e-3;
        }
        assert!((t.iter().sum::<f32>() - 1.0).abs() < 1e-4, "a distribution");
    }
    assert!(differs, "the mean is not just the first network's answer");
}

#[test]
fn a_model_directory_with_broken_labels_is_refused_with_the_file_named() {
    let heads = vec![3, 3, 3];
    let net = Net::new(
        Shape {
            frames: FRAMES,
            dim: EMBEDDING_DIM,
            dilations: DILATIONS.to_vec(),
            channels: 8,
            heads: heads.clone(),
        },
        1,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut labels = labels_for(&heads);
    labels.slots.pop();
    labels.intent_slots = vec![vec![0], vec![0]];
    write_model(dir.path(), &net, &labels);
    let err = IntentModel::load(dir.path())
        .err()
        .expect("mismatch refused")
        .to_string();
    assert!(err.contains("do not match labels.json"), "{err}");

    std::fs::write(dir.path().join("labels.json"), "{\"format\": 1}").expect("write");
    let err = IntentModel::load(dir.path())
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("labels.json") && err.contains("not a kith labels file"),
        "{err}"
    );

    for (name, t, says) in [
        ("intent9", 0.5, "\"intent9\", not an intent of this model"),
        ("intent0", 1.5, "the threshold of intent0 is 1.5"),
    ] {
        let mut labels = labels_for(&heads);
        labels.intent_thresholds.insert(name.to_string(), t);
        write_model(dir.path(), &net, &labels);
        let err = IntentModel::load(dir.path())
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("labels.json") && err.contains(says), "{err}");
    }

    let empty = tempfile::tempdir().expect("tempdir");
    let err = IntentModel::load(empty.path())
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("labels.json"), "{err}");
}

#[test]
fn command_features_are_the_same_fed_at_once_or_in_uneven_pieces() {
    let dir = models_dir();
    let mut front = CommandFront::load(
        &dir.join("melspectrogram.onnx"),
        &dir.join("embedding_model.onnx"),
    )
    .expect("front end");
    let wav = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/utterance.wav");
    let samples: Vec<i16> = hound::WavReader::open(wav)
        .expect("wav")
        .samples::<i16>()
        .map(|s| s.expect("sample"))
        .collect();
    let mut whole = vec![0.0; FEATURES];
    front.features_of(&samples, &mut whole).expect("features");
    let mut pieces = vec![0.0; FEATURES];
    front.begin().expect("begin");
    let mut at = 0;
    for (i, len) in [1usize, 700, 1279, 1281, 3000, 17]
        .iter()
        .cycle()
        .enumerate()
    {
        if at >= samples.len() || i > 10_000 {
            break;
        }
        let end = (at + len).min(samples.len());
        front.push(&samples[at..end]).expect("push");
        at = end;
    }
    front.finish(&mut pieces).expect("finish");
    assert_eq!(whole, pieces);
    // The speech is in there: the newest embeddings are not all silence.
    let first = &whole[..EMBEDDING_DIM];
    let differs = whole
        .chunks_exact(EMBEDDING_DIM)
        .filter(|row| row.iter().zip(first).any(|(a, b)| (a - b).abs() > 1e-3))
        .count();
    assert!(
        differs > 20,
        "only {differs} embeddings differ from the first"
    );
}
