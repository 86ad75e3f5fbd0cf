//! Times kith's 4-bit linear kernels on a 3072 x 576 weight (SmolLM2's gate/up):
//! `cargo run --release -p kith-models --example q4_kernel`.
use std::time::Instant;

use kith_models::llm::q4::{Kernel, PackedQ4};

fn main() {
    let (n, k) = (3072, 576);
    let nb = k / 32;
    let b: Vec<u8> = (0..n * nb * 16)
        .map(|i| ((i * 2654435761usize) >> 7) as u8)
        .collect();
    let scales: Vec<f32> = (0..n * nb).map(|i| 0.01 + (i % 7) as f32 * 1e-3).collect();
    let offsets: Vec<f32> = (0..n * nb).map(|i| (i % 5) as f32 * 1e-3).collect();
    let w = PackedQ4::from_matmul_nbits(&b, &scales, Some(&offsets), n, k).unwrap();
    // Thirty copies stream from memory as a model's layers do (no cache reuse).
    let many: Vec<PackedQ4> = (0..300)
        .map(|_| PackedQ4::from_matmul_nbits(&b, &scales, Some(&offsets), n, k).unwrap())
        .collect();
    let x: Vec<f32> = (0..k).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
    let mut y = vec![0f32; n];
    let t = Instant::now();
    for _ in 0..3 {
        for w in &many {
            w.matmul(Kernel::detect(), &x, &mut y);
        }
    }
    let s = t.elapsed().as_secs_f64() / 900.0;
    println!(
        "from memory, m=1: {:.1} us per call, {:.2} G weights/s",
        s * 1e6,
        (n * k) as f64 / s / 1e9
    );
    for m in [1usize, 4, 64] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let mut y = vec![0f32; m * n];
        for kernel in [Kernel::detect(), Kernel::Scalar] {
            let reps = if m == 1 { 400 } else { 40 };
            let t = Instant::now();
            for _ in 0..reps {
                w.matmul(kernel, &x, &mut y);
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{kernel:?} m={m}: {:.1} us per call, {:.2} G weights*rows/s",
                s * 1e6,
                (n * k * m) as f64 / s / 1e9
            );
        }
    }
}
