//! Cost of training the intent network: one batch's loss and gradients, and
//! one epoch of the training loop (dropout, AdamW, the validation pass), at
//! the size `kith intent train` uses for the smart-home context (64 frames
//! of 96-value embeddings, 96 channels, dilations 1, 2, 4; an intent head
//! and ten slot heads). A full training run is about
//! `30 epochs × clips / 256` of the epoch figure.
//!
//! The embedding's top (`intent::embedding_top`) from each depth
//! (conv2d_15, 13 and 11 to conv2d_19), which a trainer tuning the front
//! end runs per clip as well: forward and backward over the rows of 33
//! windows (the average command's real windows out of 64) and of all 64.
//!
//! `cargo bench -p kith-benches --bench intent_train` (no models needed).

use criterion::{Criterion, criterion_group, criterion_main};
use kith_models::intent::embedding_top::{CHANNELS, Depth, EmbeddingTop};
use kith_models::intent::grammar::Rng;
use kith_models::intent::net::{DILATIONS, Example, Net, Shape, TrainOptions};

/// The smart-home context's heads: 10 intents + "none", then each slot's
/// values + "absent".
const HEADS: [usize; 11] = [11, 3, 7, 11, 9, 11, 3, 11, 11, 8, 5];

fn shape() -> Shape {
    Shape {
        frames: 64,
        dim: 96,
        channels: 96,
        dilations: DILATIONS.to_vec(),
        heads: HEADS.to_vec(),
    }
}

/// Random features; an intent for every example and two of its slots, as
/// a command of the grammar has.
fn examples(n: usize, seed: u64) -> Vec<Example> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let features = (0..64 * 96).map(|_| rng.normal()).collect();
            let mut targets = vec![None; HEADS.len()];
            targets[0] = Some(rng.below(HEADS[0]) as u16);
            for _ in 0..2 {
                let s = 1 + rng.below(HEADS.len() - 1);
                targets[s] = Some(rng.below(HEADS[s]) as u16);
            }
            Example { features, targets }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let train = examples(256, 1);
    let validation = examples(32, 2);
    let mut net = Net::new(shape(), 1);
    net.fit_normalization(&train);
    let batch: Vec<&Example> = train.iter().take(32).collect();
    let mut group = c.benchmark_group("intent_train");
    group.sample_size(10);
    group.bench_function("gradients of a batch of 32, 1 thread", |b| {
        b.iter(|| net.parallel_grads(&batch, 1))
    });
    group.bench_function("gradients of a batch of 32, 2 threads", |b| {
        b.iter(|| net.parallel_grads(&batch, 2))
    });
    let opts = TrainOptions {
        epochs: 1,
        ..TrainOptions::default()
    };
    group.bench_function("one epoch of 256 clips (8 batches, 2 threads)", |b| {
        b.iter(|| {
            let mut n = net.clone();
            n.train(&train, &validation, &opts, |_| {});
            n
        })
    });
    group.finish();
}

fn bench_top(c: &mut Criterion) {
    let mut rng = Rng::new(4);
    let mut group = c.benchmark_group("embedding_top");
    group.sample_size(20);
    for depth in Depth::ALL {
        let top = EmbeddingTop::random(depth, 3);
        let from = depth.first_layer();
        for windows in [33, 64] {
            let rows: Vec<f32> = (0..depth.rows_for(windows) * depth.row())
                .map(|_| rng.normal())
                .collect();
            let g: Vec<f32> = (0..windows * CHANNELS).map(|_| rng.normal()).collect();
            group.bench_function(format!("from {from}, forward, {windows} windows"), |b| {
                b.iter(|| top.embed(&rows))
            });
            group.bench_function(
                format!("from {from}, forward and backward, {windows} windows"),
                |b| {
                    let mut grads = top.zero_grads();
                    b.iter(|| {
                        if let Ok(trace) = top.forward(&rows) {
                            top.backward(&trace, &g, &mut grads);
                        }
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench, bench_top);
criterion_main!(benches);
