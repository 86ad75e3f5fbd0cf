//! The intent network and its training: a small dilated 1-D convolution
//! stack over the speech-embedding sequence, and one attention-pooled
//! softmax head per output (the intent, then one per slot).
//!
//! ```text
//! embeddings [T, 96] → normalize → conv k3 d1 → ReLU → conv k3 d2 → ReLU
//!   → conv k3 d4 → ReLU = H [T, C]
//! for each head h:  a = softmax_t(H q_h);  p = Σ_t a_t H_t;  y = softmax(W_h p + b_h)
//! ```
//!
//! Why this shape: words sit at different times in a command, so each head
//! learns where to look (its attention query) instead of a fixed position;
//! dilations give each frame ~1.2 s of context on top of the embedding's
//! own 0.76 s, enough to tell "kitchen lights" from "kitchen timer". It is
//! ~100 k parameters: trains in minutes on two cores and runs in well
//! under a millisecond.
//!
//! Training is plain minibatch gradient descent (AdamW) with hand-written
//! gradients, checked against finite differences in the tests. Matrix
//! products go through `matrixmultiply`; a batch is split over threads.

use crate::intent::embedding_top::{EmbeddingTop, TopGrads, TopTrace};
use crate::intent::grammar::Rng;

/// Kernel width of every convolution.
pub const KERNEL: usize = 3;
/// Dilation of each convolution layer, by default.
pub const DILATIONS: [usize; 3] = [1, 2, 4];

/// Sizes of a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// Embeddings per input (time steps).
    pub frames: usize,
    /// Size of one embedding.
    pub dim: usize,
    /// Channels of every convolution.
    pub channels: usize,
    /// Dilation of each convolution layer, in order (e.g. [`DILATIONS`]).
    pub dilations: Vec<usize>,
    /// Classes of each head.
    pub heads: Vec<usize>,
}

/// A 1-D convolution as a matrix: `w` is [KERNEL * c_in, c_out], row
/// `j * c_in + c` for tap j (offset `(j - 1) * dilation`) and input channel c.
#[derive(Debug, Clone)]
pub struct Conv {
    pub c_in: usize,
    pub c_out: usize,
    pub dilation: usize,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

/// One output head: attention query `q` [C], then `w` [C, K] and `b` [K].
#[derive(Debug, Clone)]
pub struct Head {
    pub q: Vec<f32>,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

/// The speech embedding's top, trained with the network: the network's
/// features are then the cut front end's (`CommandFront::load_cut`): the
/// rows of the last `frames` windows, then one value per window, 1 where
/// the window holds the command's stream and 0 where the embedding of
/// silence stands instead.
#[derive(Debug, Clone)]
pub struct TunedFront {
    pub top: EmbeddingTop,
    /// The embedding of silence (the plain front end's starting history).
    pub silence: Vec<f32>,
}

/// The network's parameters.
#[derive(Debug, Clone)]
pub struct Net {
    pub shape: Shape,
    /// Per-dimension mean of the training embeddings.
    pub mean: Vec<f32>,
    /// Per-dimension 1 / standard deviation of the training embeddings.
    pub inv_std: Vec<f32>,
    pub convs: Vec<Conv>,
    pub heads: Vec<Head>,
    /// The embedding's top, when it is trained too (`None`: the features
    /// are the embeddings themselves).
    pub front: Option<TunedFront>,
}

/// One training example: features [frames * dim] and, per head, the target
/// class or `None` where the head has nothing to learn from this example
/// (a slot the intent does not have).
#[derive(Debug, Clone)]
pub struct Example {
    pub features: Vec<f32>,
    pub targets: Vec<Option<u16>>,
}

/// Activations kept for the backward pass.
struct Trace {
    batch: usize,
    /// With a tuned front: per example, its real windows and the top's trace.
    tops: Vec<(usize, Option<TopTrace>)>,
    /// Per example, the span masked in training (start, length).
    spans: Vec<(usize, usize)>,
    /// Each conv layer's input as an im2col matrix, [B*T, KERNEL*c_in].
    cols: Vec<Vec<f32>>,
    /// Pre-activation of each conv layer.
    pre: Vec<Vec<f32>>,
    /// Dropout mask of each conv layer's output (empty without dropout).
    masks: Vec<Vec<f32>>,
    /// Output of the last conv, [B*T, C].
    h: Vec<f32>,
    /// Attention weights, [B*T, heads].
    attn: Vec<f32>,
    /// Pooled vector per head, [B, C] each.
    pooled: Vec<Vec<f32>>,
    /// Softmax probabilities per head, [B, K] each.
    probs: Vec<Vec<f32>>,
}

/// Gradients, laid out as the parameters.
#[derive(Debug, Clone)]
pub struct Grads {
    convs: Vec<(Vec<f32>, Vec<f32>)>,
    heads: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)>,
    top: Option<TopGrads>,
}

/// C[m,n] (+)= A[m,k] · B[k,n], with either operand read transposed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
    c: &mut [f32],
    accumulate: bool,
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    let (rsa, csa) = if a_t {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let (rsb, csb) = if b_t {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: the asserts above bound every index the strides reach:
    // A is m×k, B is k×n and C is m×n, each dense in the layout described.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa,
            csa,
            b.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

fn softmax_in_place(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in v.iter_mut() {
        *x /= sum;
    }
}

impl Net {
    /// A freshly initialized network (He-normal convolutions, zero queries:
    /// every head starts as mean pooling).
    pub fn new(shape: Shape, seed: u64) -> Net {
        let mut rng = Rng::new(seed);
        let mut convs = Vec::new();
        let mut c_in = shape.dim;
        for &dilation in &shape.dilations {
            let fan_in = KERNEL * c_in;
            let std = (2.0 / fan_in as f32).sqrt();
            convs.push(Conv {
                c_in,
                c_out: shape.channels,
                dilation,
                w: (0..fan_in * shape.channels)
                    .map(|_| rng.normal() * std)
                    .collect(),
                b: vec![0.0; shape.channels],
            });
            c_in = shape.channels;
        }
        let c = shape.channels;
        let heads = shape
            .heads
            .iter()
            .map(|&k| {
                let std = (1.0 / c as f32).sqrt();
                Head {
                    q: vec![0.0; c],
                    w: (0..c * k).map(|_| rng.normal() * std).collect(),
                    b: vec![0.0; k],
                }
            })
            .collect();
        Net {
            mean: vec![0.0; shape.dim],
            inv_std: vec![1.0; shape.dim],
            shape,
            convs,
            heads,
            front: None,
        }
    }

    /// The network with the embedding's `top` trained along: its features
    /// become the cut front end's (see [`TunedFront`]). `silence` is the
    /// embedding of silence ([`Shape::dim`] values).
    pub fn with_front(mut self, top: EmbeddingTop, silence: Vec<f32>) -> Net {
        assert_eq!(
            silence.len(),
            self.shape.dim,
            "the silence is one embedding"
        );
        self.front = Some(TunedFront { top, silence });
        self
    }

    /// Values in one input: [`Shape::frames`] × [`Shape::dim`], or with a
    /// tuned front the rows of as many windows and one value per window.
    pub fn features(&self) -> usize {
        let t = self.shape.frames;
        match self.front {
            None => t * self.shape.dim,
            Some(ref f) => f.top.depth.rows_for(t) * f.top.depth.row() + t,
        }
    }

    /// The embeddings [frames * dim] of one input (itself without a tuned
    /// front), with the top's trace and how many windows are real.
    fn embeddings(&self, features: &[f32]) -> (Vec<f32>, usize, Option<TopTrace>) {
        let t = self.shape.frames;
        assert_eq!(
            features.len(),
            self.features(),
            "features of the wrong size"
        );
        let Some(front) = &self.front else {
            return (features.to_vec(), t, None);
        };
        let (rows, mask) = features.split_at(features.len() - t);
        // The real windows are the newest; the mask is ones from there on.
        let real = mask.iter().rev().take_while(|&&m| m > 0.5).count();
        let mut e = Vec::with_capacity(t * self.shape.dim);
        for _ in real..t {
            e.extend_from_slice(&front.silence);
        }
        if real == 0 {
            return (e, 0, None);
        }
        let depth = front.top.depth;
        let from = rows.len() - depth.rows_for(real) * depth.row();
        let trace = front
            .top
            .forward(&rows[from..])
            .expect("the rows of 1 to `frames` windows are a valid input of the top");
        e.extend_from_slice(&trace.embeddings);
        (e, real, Some(trace))
    }

    /// Sets the input normalization from the training features' embeddings.
    pub fn fit_normalization(&mut self, examples: &[Example]) {
        let d = self.shape.dim;
        let mut sum = vec![0.0f64; d];
        let mut sq = vec![0.0f64; d];
        let mut n = 0usize;
        for e in examples {
            let (embeddings, _, _) = self.embeddings(&e.features);
            for row in embeddings.chunks_exact(d) {
                for (i, &x) in row.iter().enumerate() {
                    sum[i] += f64::from(x);
                    sq[i] += f64::from(x) * f64::from(x);
                }
                n += 1;
            }
        }
        let n = n.max(1) as f64;
        for i in 0..d {
            let mean = sum[i] / n;
            let var = (sq[i] / n - mean * mean).max(1e-6);
            self.mean[i] = mean as f32;
            self.inv_std[i] = (1.0 / var.sqrt()) as f32;
        }
    }

    /// Number of parameters (the tuned front's included).
    pub fn parameters(&self) -> usize {
        self.convs
            .iter()
            .map(|c| c.w.len() + c.b.len())
            .sum::<usize>()
            + self
                .heads
                .iter()
                .map(|h| h.q.len() + h.w.len() + h.b.len())
                .sum::<usize>()
            + self.front.as_ref().map_or(0, |f| f.top.parameters())
    }

    /// Class probabilities of every head for one input of [frames * dim].
    pub fn predict(&self, features: &[f32]) -> Vec<Vec<f32>> {
        let trace = self.forward(&[features], None);
        trace.probs
    }

    /// The mean of the class probabilities of several networks (an
    /// ensemble) for one input, as [`crate::intent::onnx::to_onnx_ensemble`]
    /// computes it.
    pub fn predict_mean(nets: &[Net], features: &[f32]) -> Vec<Vec<f32>> {
        let mut mean: Vec<Vec<f32>> = Vec::new();
        for net in nets {
            let probs = net.predict(features);
            if mean.is_empty() {
                mean = probs;
            } else {
                for (m, p) in mean.iter_mut().zip(&probs) {
                    for (a, b) in m.iter_mut().zip(p) {
                        *a += b;
                    }
                }
            }
        }
        let n = nets.len().max(1) as f32;
        for v in mean.iter_mut().flatten() {
            *v /= n;
        }
        mean
    }

    /// The forward pass; with `noise`, training's regularization: one span
    /// of up to 6 frames masked per example (half the time) and dropout
    /// after every convolution.
    fn forward(&self, batch: &[&[f32]], mut noise: Option<(&mut Rng, f32)>) -> Trace {
        let t = self.shape.frames;
        let d = self.shape.dim;
        let b = batch.len();
        let rows = b * t;
        let mut x = Vec::with_capacity(rows * d);
        let mut tops = Vec::new();
        let mut spans = Vec::with_capacity(b);
        for f in batch {
            let (embeddings, real, top) = self.embeddings(f);
            if self.front.is_some() {
                tops.push((real, top));
            }
            for row in embeddings.chunks_exact(d) {
                x.extend(
                    row.iter()
                        .zip(&self.mean)
                        .zip(&self.inv_std)
                        .map(|((v, m), s)| (v - m) * s),
                );
            }
            let mut span = (0, 0);
            if let Some((rng, _)) = noise.as_mut()
                && rng.below(2) == 1
            {
                let len = 1 + rng.below(6);
                let start = rng.below(t.saturating_sub(len).max(1));
                let base = x.len() - t * d;
                let end = (start + len).min(t);
                x[base + start * d..base + end * d].fill(0.0);
                span = (start, end - start);
            }
            spans.push(span);
        }
        let mut masks = Vec::new();
        let mut cols = Vec::new();
        let mut pre = Vec::new();
        for conv in &self.convs {
            let col = im2col(&x, b, t, conv.c_in, conv.dilation);
            let mut z = vec![0.0; rows * conv.c_out];
            for row in z.chunks_exact_mut(conv.c_out) {
                row.copy_from_slice(&conv.b);
            }
            gemm(
                rows,
                KERNEL * conv.c_in,
                conv.c_out,
                &col,
                false,
                &conv.w,
                false,
                &mut z,
                true,
            );
            let mut y: Vec<f32> = z.iter().map(|v| v.max(0.0)).collect();
            if let Some((rng, p)) = noise.as_mut() {
                // Four 16-bit draws per random number: a mask is as many
                // draws as activations, and the generator would otherwise
                // cost a tenth of the step.
                let keep = 1.0 / (1.0 - *p);
                let drop_below = (*p * 65_536.0) as u64;
                let mut mask = vec![keep; y.len()];
                for four in mask.chunks_mut(4) {
                    let r = rng.next_u64();
                    for (j, m) in four.iter_mut().enumerate() {
                        if (r >> (16 * j)) & 0xFFFF < drop_below {
                            *m = 0.0;
                        }
                    }
                }
                y.iter_mut().zip(&mask).for_each(|(v, m)| *v *= m);
                masks.push(mask);
            }
            x = y;
            cols.push(col);
            pre.push(z);
        }
        let h = x;
        let c = self.shape.channels;
        let nh = self.heads.len();
        // Every head's attention scores in one product, H · [q_1 … q_n]:
        // one query at a time would be a matrix-vector product per head,
        // where packing the operands costs as much as the arithmetic.
        let queries = self.queries();
        let mut attn = vec![0.0; rows * nh];
        gemm(rows, c, nh, &h, false, &queries, false, &mut attn, false);
        let mut column = vec![0.0; t];
        for seq in attn.chunks_exact_mut(t * nh) {
            for hi in 0..nh {
                for (ti, v) in column.iter_mut().enumerate() {
                    *v = seq[ti * nh + hi];
                }
                softmax_in_place(&mut column);
                for (ti, v) in column.iter().enumerate() {
                    seq[ti * nh + hi] = *v;
                }
            }
        }
        // Pooled vectors, every head at once: P_b = A_b^T · H_b [heads, C].
        let mut pooled_all = vec![0.0; b * nh * c];
        for bi in 0..b {
            gemm(
                nh,
                t,
                c,
                &attn[bi * t * nh..(bi + 1) * t * nh],
                true,
                &h[bi * t * c..(bi + 1) * t * c],
                false,
                &mut pooled_all[bi * nh * c..(bi + 1) * nh * c],
                false,
            );
        }
        let mut pooled = Vec::new();
        let mut probs = Vec::new();
        for (hi, (head, &k)) in self.heads.iter().zip(&self.shape.heads).enumerate() {
            let mut p = vec![0.0; b * c];
            for (bi, row) in p.chunks_exact_mut(c).enumerate() {
                let at = (bi * nh + hi) * c;
                row.copy_from_slice(&pooled_all[at..at + c]);
            }
            let mut logits = vec![0.0; b * k];
            for row in logits.chunks_exact_mut(k) {
                row.copy_from_slice(&head.b);
            }
            gemm(b, c, k, &p, false, &head.w, false, &mut logits, true);
            for row in logits.chunks_exact_mut(k) {
                softmax_in_place(row);
            }
            pooled.push(p);
            probs.push(logits);
        }
        Trace {
            batch: b,
            tops,
            spans,
            masks,
            cols,
            pre,
            h,
            attn,
            pooled,
            probs,
        }
    }

    /// Mean cross-entropy over the batch (summed over heads) and its gradient.
    pub fn loss_and_grads(&self, batch: &[&Example]) -> (f32, Grads) {
        self.loss_and_grads_with(batch, None)
    }

    /// [`Net::loss_and_grads`], regularized with `(seed, dropout)` if given.
    fn loss_and_grads_with(&self, batch: &[&Example], noise: Option<(u64, f32)>) -> (f32, Grads) {
        let features: Vec<&[f32]> = batch.iter().map(|e| e.features.as_slice()).collect();
        let mut rng = noise.map(|(seed, _)| Rng::new(seed));
        let trace = self.forward(&features, rng.as_mut().zip(noise.map(|(_, p)| p)));
        let t = self.shape.frames;
        let c = self.shape.channels;
        let b = trace.batch;
        let rows = b * t;
        let scale = 1.0 / b as f32;
        let mut loss = 0.0;
        let mut grads = self.zero_grads();
        let nh = self.heads.len();
        let mut dh = vec![0.0; rows * c];
        // dP of every head, [B, heads, C] (zero for a head with no target here).
        let mut dp_all = vec![0.0; b * nh * c];
        for (hi, (head, &k)) in self.heads.iter().zip(&self.shape.heads).enumerate() {
            let probs = &trace.probs[hi];
            let mut dlogits = vec![0.0; b * k];
            let mut any = false;
            for (bi, e) in batch.iter().enumerate() {
                if let Some(target) = e.targets[hi] {
                    let target = usize::from(target);
                    let p = &probs[bi * k..(bi + 1) * k];
                    loss -= p[target].max(1e-12).ln() * scale;
                    let d = &mut dlogits[bi * k..(bi + 1) * k];
                    for (j, dj) in d.iter_mut().enumerate() {
                        *dj = (p[j] - if j == target { 1.0 } else { 0.0 }) * scale;
                    }
                    any = true;
                }
            }
            if !any {
                continue;
            }
            let (_, gw, gb) = &mut grads.heads[hi];
            let p = &trace.pooled[hi];
            gemm(c, b, k, p, true, &dlogits, false, gw, true);
            for row in dlogits.chunks_exact(k) {
                for (g, d) in gb.iter_mut().zip(row) {
                    *g += d;
                }
            }
            // dP = dlogits · W^T  [B, C]
            let mut dp = vec![0.0; b * c];
            gemm(b, k, c, &dlogits, false, &head.w, true, &mut dp, false);
            for (bi, row) in dp.chunks_exact(c).enumerate() {
                let at = (bi * nh + hi) * c;
                dp_all[at..at + c].copy_from_slice(row);
            }
        }
        // Back through the attention pooling, every head at once.
        let a = &trace.attn;
        let mut de = vec![0.0; rows * nh];
        let mut da = vec![0.0; t * nh];
        for bi in 0..b {
            let dpb = &dp_all[bi * nh * c..(bi + 1) * nh * c];
            let ab = &a[bi * t * nh..(bi + 1) * t * nh];
            let hb = &trace.h[bi * t * c..(bi + 1) * t * c];
            // dA = H_b · dP_b^T  [T, heads]
            gemm(t, c, nh, hb, false, dpb, true, &mut da, false);
            let deb = &mut de[bi * t * nh..(bi + 1) * t * nh];
            for hi in 0..nh {
                let dot: f32 = (0..t).map(|ti| ab[ti * nh + hi] * da[ti * nh + hi]).sum();
                for ti in 0..t {
                    let i = ti * nh + hi;
                    deb[i] = ab[i] * (da[i] - dot);
                }
            }
            // dH_b += A_b · dP_b
            gemm(
                t,
                nh,
                c,
                ab,
                false,
                dpb,
                false,
                &mut dh[bi * t * c..(bi + 1) * t * c],
                true,
            );
        }
        // dQ = H^T · dE [C, heads]; dH += dE · Q^T
        let mut dq = vec![0.0; c * nh];
        gemm(c, rows, nh, &trace.h, true, &de, false, &mut dq, false);
        for (hi, (gq, _, _)) in grads.heads.iter_mut().enumerate() {
            for (ci, g) in gq.iter_mut().enumerate() {
                *g += dq[ci * nh + hi];
            }
        }
        let queries = self.queries();
        gemm(rows, nh, c, &de, false, &queries, true, &mut dh, true);
        // Back through the convolutions.
        let mut dy = dh;
        for (li, conv) in self.convs.iter().enumerate().rev() {
            if let Some(mask) = trace.masks.get(li) {
                dy.iter_mut().zip(mask).for_each(|(g, m)| *g *= m);
            }
            let z = &trace.pre[li];
            for (g, zv) in dy.iter_mut().zip(z) {
                if *zv <= 0.0 {
                    *g = 0.0;
                }
            }
            let (gw, gb) = &mut grads.convs[li];
            gemm(
                KERNEL * conv.c_in,
                rows,
                conv.c_out,
                &trace.cols[li],
                true,
                &dy,
                false,
                gw,
                true,
            );
            for row in dy.chunks_exact(conv.c_out) {
                for (g, d) in gb.iter_mut().zip(row) {
                    *g += d;
                }
            }
            if li == 0 && self.front.is_none() {
                break;
            }
            let mut dcol = vec![0.0; rows * KERNEL * conv.c_in];
            gemm(
                rows,
                conv.c_out,
                KERNEL * conv.c_in,
                &dy,
                false,
                &conv.w,
                true,
                &mut dcol,
                false,
            );
            dy = col2im(&dcol, b, t, conv.c_in, conv.dilation);
        }
        // With a tuned front, dy is now the gradient of the normalized
        // embeddings: back through the normalization, the masked span and
        // the silence (neither depends on the top), into the top.
        if let (Some(front), Some(top_grads)) = (&self.front, grads.top.as_mut()) {
            let d = self.shape.dim;
            for (bi, (real, top_trace)) in trace.tops.iter().enumerate() {
                let Some(top_trace) = top_trace else { continue };
                let seq = &mut dy[bi * t * d..(bi + 1) * t * d];
                let (start, len) = trace.spans[bi];
                seq[start * d..(start + len) * d].fill(0.0);
                for row in seq.chunks_exact_mut(d) {
                    row.iter_mut().zip(&self.inv_std).for_each(|(g, s)| *g *= s);
                }
                front
                    .top
                    .backward(top_trace, &seq[(t - real) * d..], top_grads);
            }
        }
        (loss, grads)
    }

    /// Every head's attention query as the columns of one [C, heads] matrix.
    fn queries(&self) -> Vec<f32> {
        let nh = self.heads.len();
        let mut q = vec![0.0; self.shape.channels * nh];
        for (hi, head) in self.heads.iter().enumerate() {
            for (ci, v) in head.q.iter().enumerate() {
                q[ci * nh + hi] = *v;
            }
        }
        q
    }

    fn zero_grads(&self) -> Grads {
        Grads {
            convs: self
                .convs
                .iter()
                .map(|c| (vec![0.0; c.w.len()], vec![0.0; c.b.len()]))
                .collect(),
            heads: self
                .heads
                .iter()
                .map(|h| {
                    (
                        vec![0.0; h.q.len()],
                        vec![0.0; h.w.len()],
                        vec![0.0; h.b.len()],
                    )
                })
                .collect(),
            top: self.front.as_ref().map(|f| f.top.zero_grads()),
        }
    }

    /// Every parameter, in a fixed order (the optimizer's view).
    fn params_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let mut out = Vec::new();
        for c in &mut self.convs {
            out.push(&mut c.w);
            out.push(&mut c.b);
        }
        for h in &mut self.heads {
            out.push(&mut h.q);
            out.push(&mut h.w);
            out.push(&mut h.b);
        }
        if let Some(front) = &mut self.front {
            for c in &mut front.top.convs {
                out.push(&mut c.w);
                out.push(&mut c.b);
            }
        }
        out
    }

    /// How many of [`Net::params_mut`]'s entries are the network's own
    /// (the tuned front's follow).
    fn own_params(&self) -> usize {
        2 * self.convs.len() + 3 * self.heads.len()
    }
}

impl Grads {
    fn into_vecs(self) -> Vec<Vec<f32>> {
        let mut out = Vec::new();
        for (w, b) in self.convs {
            out.push(w);
            out.push(b);
        }
        for (q, w, b) in self.heads {
            out.push(q);
            out.push(w);
            out.push(b);
        }
        if let Some(top) = self.top {
            for (w, b) in top.convs {
                out.push(w);
                out.push(b);
            }
        }
        out
    }

    fn add(&mut self, other: &Grads) {
        let pairs = self.convs.iter_mut().zip(&other.convs);
        for ((w, b), (ow, ob)) in pairs {
            w.iter_mut().zip(ow).for_each(|(x, y)| *x += y);
            b.iter_mut().zip(ob).for_each(|(x, y)| *x += y);
        }
        for ((q, w, b), (oq, ow, ob)) in self.heads.iter_mut().zip(&other.heads) {
            q.iter_mut().zip(oq).for_each(|(x, y)| *x += y);
            w.iter_mut().zip(ow).for_each(|(x, y)| *x += y);
            b.iter_mut().zip(ob).for_each(|(x, y)| *x += y);
        }
        if let (Some(top), Some(other)) = (&mut self.top, &other.top) {
            for ((w, b), (ow, ob)) in top.convs.iter_mut().zip(&other.convs) {
                w.iter_mut().zip(ow).for_each(|(x, y)| *x += y);
                b.iter_mut().zip(ob).for_each(|(x, y)| *x += y);
            }
        }
    }

    fn scale(&mut self, s: f32) {
        for (w, b) in &mut self.convs {
            w.iter_mut().chain(b.iter_mut()).for_each(|x| *x *= s);
        }
        for (q, w, b) in &mut self.heads {
            q.iter_mut()
                .chain(w.iter_mut())
                .chain(b.iter_mut())
                .for_each(|x| *x *= s);
        }
        if let Some(top) = &mut self.top {
            for (w, b) in &mut top.convs {
                w.iter_mut().chain(b.iter_mut()).for_each(|x| *x *= s);
            }
        }
    }

    /// A flat view for tests.
    pub fn flatten(&self) -> Vec<f32> {
        self.clone().into_vecs().concat()
    }
}

/// [B*T, C] → [B*T, KERNEL*C] with zero padding at each sequence's ends.
fn im2col(x: &[f32], b: usize, t: usize, c: usize, dilation: usize) -> Vec<f32> {
    let mut col = vec![0.0; b * t * KERNEL * c];
    for bi in 0..b {
        for ti in 0..t {
            let dst = &mut col[(bi * t + ti) * KERNEL * c..(bi * t + ti + 1) * KERNEL * c];
            for j in 0..KERNEL {
                let src = ti as isize + (j as isize - 1) * dilation as isize;
                if src >= 0 && (src as usize) < t {
                    let s = (bi * t + src as usize) * c;
                    dst[j * c..(j + 1) * c].copy_from_slice(&x[s..s + c]);
                }
            }
        }
    }
    col
}

/// The adjoint of [`im2col`]: sums each column block back onto its frame.
fn col2im(col: &[f32], b: usize, t: usize, c: usize, dilation: usize) -> Vec<f32> {
    let mut x = vec![0.0; b * t * c];
    for bi in 0..b {
        for ti in 0..t {
            let src = &col[(bi * t + ti) * KERNEL * c..(bi * t + ti + 1) * KERNEL * c];
            for j in 0..KERNEL {
                let at = ti as isize + (j as isize - 1) * dilation as isize;
                if at >= 0 && (at as usize) < t {
                    let d = (bi * t + at as usize) * c;
                    for (dst, s) in x[d..d + c].iter_mut().zip(&src[j * c..(j + 1) * c]) {
                        *dst += s;
                    }
                }
            }
        }
    }
    x
}

/// Training settings.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch: usize,
    pub learning_rate: f32,
    pub weight_decay: f32,
    /// Threads a batch is split over.
    pub threads: usize,
    /// Share of convolution outputs zeroed in training.
    pub dropout: f32,
    pub seed: u64,
    /// Peak learning rate of a tuned front's layers (Adam, no weight
    /// decay: they start trained and should stay near their weights).
    pub front_learning_rate: f32,
    /// With a tuned front: of the `epochs`, how many (the last) train the
    /// front's layers too (`None`: all). The epochs before run on the
    /// embeddings the pretrained layers make, computed once, so they cost
    /// what a plain network's do; the last ones then start from the best
    /// of them, each part with its own learning-rate schedule.
    pub front_epochs: Option<usize>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            epochs: 30,
            batch: 32,
            learning_rate: 2e-3,
            weight_decay: 0.05,
            threads: 2,
            dropout: 0.2,
            seed: 1,
            front_learning_rate: 3e-4,
            front_epochs: None,
        }
    }
}

/// Of `epochs`, how many train a tuned front's layers, given
/// [`TrainOptions::front_epochs`].
pub fn tuned_epochs(epochs: usize, front_epochs: Option<usize>) -> usize {
    front_epochs.map_or(epochs, |n| n.min(epochs))
}

/// Progress of one epoch, for the caller's progress display.
#[derive(Debug, Clone, Copy)]
pub struct EpochReport {
    pub epoch: usize,
    pub epochs: usize,
    pub loss: f32,
    /// Share of validation examples with every head right.
    pub validation_accuracy: f32,
}

/// AdamW state, with a step count per parameter so that parameters joining
/// later (a tuned front's layers) start their bias correction afresh while
/// the others carry their moments on.
struct Adam {
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    steps: Vec<i32>,
}

impl Adam {
    /// Zero moments for every parameter of `net` this state does not hold yet.
    fn cover(&mut self, net: &mut Net) {
        for p in net.params_mut().into_iter().skip(self.m.len()) {
            self.m.push(vec![0.0; p.len()]);
            self.v.push(vec![0.0; p.len()]);
            self.steps.push(0);
        }
    }
}

/// Where one part of training sits in the learning-rate schedules.
struct Part {
    /// Epoch number of the part's first epoch, of `total_epochs`, for reports.
    first: usize,
    total_epochs: usize,
    /// Optimizer steps taken before this part, and in the whole run: the
    /// network's own layers follow one cosine decay over all of training.
    steps_before: usize,
    steps_total: usize,
}

impl Net {
    /// Trains on `train`, reporting after each epoch (with the accuracy on
    /// `validation`); the learning rate follows a cosine decay. Returns the
    /// network of the epoch with the best validation accuracy. With a tuned
    /// front and [`TrainOptions::front_epochs`], the epochs before those
    /// train the network alone on the pretrained layers' embeddings.
    pub fn train(
        &mut self,
        train: &[Example],
        validation: &[Example],
        opts: &TrainOptions,
        mut on_epoch: impl FnMut(EpochReport),
    ) {
        let front_epochs = tuned_epochs(opts.epochs, opts.front_epochs);
        let frozen = opts.epochs - front_epochs;
        let steps_per_epoch = train.len().div_ceil(opts.batch.max(1));
        let whole = Part {
            first: 0,
            total_epochs: opts.epochs,
            steps_before: 0,
            steps_total: steps_per_epoch * opts.epochs,
        };
        let mut adam = Adam {
            m: Vec::new(),
            v: Vec::new(),
            steps: Vec::new(),
        };
        if self.front.is_none() || frozen == 0 {
            let best = self.train_part(
                train,
                validation,
                opts,
                &whole,
                &mut adam,
                None,
                &mut on_epoch,
            );
            *self = best.1;
            return;
        }
        let plain_train = self.embedded(train, opts.threads);
        let plain_validation = self.embedded(validation, opts.threads);
        let front = self.front.take();
        let part = TrainOptions {
            epochs: frozen,
            ..opts.clone()
        };
        let (accuracy, mut best) = self.train_part(
            &plain_train,
            &plain_validation,
            &part,
            &whole,
            &mut adam,
            None,
            &mut on_epoch,
        );
        drop((plain_train, plain_validation));
        best.front = front;
        *self = best.clone();
        // The second part goes on from the first: the network's own layers
        // keep their optimizer moments and their place in the decay (a fresh
        // start there doubled the loss at the switch), while the front's
        // layers start a cosine decay of their own.
        let part = TrainOptions {
            epochs: front_epochs,
            seed: opts.seed.wrapping_add(0x5eed),
            ..opts.clone()
        };
        let best = self.train_part(
            train,
            validation,
            &part,
            &Part {
                first: frozen,
                steps_before: steps_per_epoch * frozen,
                ..whole
            },
            &mut adam,
            Some((accuracy, best)),
            &mut on_epoch,
        );
        *self = best.1;
    }

    /// The examples with their features replaced by the embeddings this
    /// network's front makes of them (what a plain network reads), over
    /// `threads` threads.
    pub fn embedded(&self, examples: &[Example], threads: usize) -> Vec<Example> {
        let per = examples.len().div_ceil(threads.max(1)).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = examples
                .chunks(per)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|e| Example {
                                features: self.embeddings(&e.features).0,
                                targets: e.targets.clone(),
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            join(handles).into_iter().flatten().collect()
        })
    }

    /// `opts.epochs` epochs of training from this network, placed in the
    /// run by `part`, with `adam` carried from any part before; the best
    /// network by validation accuracy, `best` included.
    #[allow(clippy::too_many_arguments)]
    fn train_part(
        &mut self,
        train: &[Example],
        validation: &[Example],
        opts: &TrainOptions,
        part: &Part,
        adam: &mut Adam,
        mut best: Option<(f32, Net)>,
        on_epoch: &mut impl FnMut(EpochReport),
    ) -> (f32, Net) {
        let mut rng = Rng::new(opts.seed);
        let mut order: Vec<usize> = (0..train.len()).collect();
        adam.cover(self);
        let steps_per_epoch = train.len().div_ceil(opts.batch.max(1));
        let own_total = part.steps_total.max(1);
        let front_total = (steps_per_epoch * opts.epochs).max(1);
        let cosine = |progress: f32| 0.5 * (1.0 + (std::f32::consts::PI * progress.min(1.0)).cos());
        let mut step = 0usize;
        for epoch in 0..opts.epochs {
            rng.shuffle(&mut order);
            let mut loss_sum = 0.0;
            for batch in order.chunks(opts.batch.max(1)) {
                let examples: Vec<&Example> = batch.iter().map(|&i| &train[i]).collect();
                let noise = (opts.dropout > 0.0).then(|| (rng.next_u64(), opts.dropout));
                let (loss, grads) = self.parallel_grads_with(&examples, opts.threads, noise);
                loss_sum += loss * examples.len() as f32;
                let own = cosine((part.steps_before + step) as f32 / own_total as f32);
                let front = cosine(step as f32 / front_total as f32);
                step += 1;
                self.adam_step(
                    adam,
                    grads,
                    opts.learning_rate * own,
                    opts.weight_decay,
                    opts.front_learning_rate * front,
                );
            }
            let accuracy = self.parallel_accuracy(validation, opts.threads);
            on_epoch(EpochReport {
                epoch: part.first + epoch + 1,
                epochs: part.total_epochs,
                loss: loss_sum / train.len().max(1) as f32,
                validation_accuracy: accuracy,
            });
            if best.as_ref().is_none_or(|(a, _)| accuracy >= *a) {
                best = Some((accuracy, self.clone()));
            }
        }
        best.unwrap_or_else(|| (0.0, self.clone()))
    }

    /// Loss and gradients of a batch split over `threads` threads.
    pub fn parallel_grads(&self, batch: &[&Example], threads: usize) -> (f32, Grads) {
        self.parallel_grads_with(batch, threads, None)
    }

    fn parallel_grads_with(
        &self,
        batch: &[&Example],
        threads: usize,
        noise: Option<(u64, f32)>,
    ) -> (f32, Grads) {
        let threads = threads.clamp(1, batch.len().max(1));
        if threads == 1 {
            return self.loss_and_grads_with(batch, noise);
        }
        let per = batch.len().div_ceil(threads);
        let parts: Vec<(f32, Grads, usize)> = std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .chunks(per)
                .enumerate()
                .map(|(i, part)| {
                    let noise = noise.map(|(seed, p)| (seed.wrapping_add(i as u64), p));
                    s.spawn(move || {
                        let (l, g) = self.loss_and_grads_with(part, noise);
                        (l, g, part.len())
                    })
                })
                .collect();
            join(handles)
        });
        let n = batch.len() as f32;
        let mut loss = 0.0;
        let mut total: Option<Grads> = None;
        for (l, mut g, len) in parts {
            // Each part averaged over its own size: re-weight to the batch.
            let w = len as f32 / n;
            loss += l * w;
            g.scale(w);
            match &mut total {
                Some(t) => t.add(&g),
                None => total = Some(g),
            }
        }
        (loss, total.unwrap_or_else(|| self.zero_grads()))
    }

    fn adam_step(
        &mut self,
        adam: &mut Adam,
        grads: Grads,
        lr: f32,
        weight_decay: f32,
        front_lr: f32,
    ) {
        let grads = grads.into_vecs();
        let own = self.own_params();
        // Clip the global norm at 5: a rare huge batch gradient cannot undo training.
        let norm = grads
            .iter()
            .flat_map(|g| g.iter())
            .map(|g| g * g)
            .sum::<f32>()
            .sqrt();
        let clip = if norm > 5.0 { 5.0 / norm } else { 1.0 };
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        for (pi, p) in self.params_mut().into_iter().enumerate() {
            adam.steps[pi] += 1;
            let c1 = 1.0 - b1.powi(adam.steps[pi]);
            let c2 = 1.0 - b2.powi(adam.steps[pi]);
            let (lr, weight_decay) = if pi < own {
                (lr, weight_decay)
            } else {
                (front_lr, 0.0)
            };
            let g = &grads[pi];
            let m = &mut adam.m[pi];
            let v = &mut adam.v[pi];
            for i in 0..p.len() {
                let gi = g[i] * clip;
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                let update = (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
                p[i] -= lr * (update + weight_decay * p[i]);
            }
        }
    }

    /// Share of examples whose every targeted head's top class is the target.
    pub fn accuracy(&self, examples: &[Example]) -> f32 {
        if examples.is_empty() {
            return 0.0;
        }
        self.right(examples) as f32 / examples.len() as f32
    }

    /// [`Net::accuracy`], the examples split over `threads` threads.
    fn parallel_accuracy(&self, examples: &[Example], threads: usize) -> f32 {
        if examples.is_empty() {
            return 0.0;
        }
        let per = examples.len().div_ceil(threads.max(1));
        let right: usize = std::thread::scope(|s| {
            let handles: Vec<_> = examples
                .chunks(per)
                .map(|part| s.spawn(move || self.right(part)))
                .collect();
            join(handles).into_iter().sum()
        });
        right as f32 / examples.len() as f32
    }

    /// How many of `examples` have every targeted head's top class right.
    fn right(&self, examples: &[Example]) -> usize {
        let mut right = 0;
        for chunk in examples.chunks(64) {
            let features: Vec<&[f32]> = chunk.iter().map(|e| e.features.as_slice()).collect();
            let trace = self.forward(&features, None);
            for (bi, e) in chunk.iter().enumerate() {
                let ok = e.targets.iter().enumerate().all(|(hi, t)| match t {
                    None => true,
                    Some(t) => {
                        let k = self.shape.heads[hi];
                        argmax(&trace.probs[hi][bi * k..(bi + 1) * k]) == usize::from(*t)
                    }
                });
                right += usize::from(ok);
            }
        }
        right
    }

    /// A parameter by flat index (tests: finite differences).
    pub fn nudge(&mut self, index: usize, delta: f32) {
        let mut i = index;
        for p in self.params_mut() {
            if i < p.len() {
                p[i] += delta;
                return;
            }
            i -= p.len();
        }
    }
}

/// The results of scoped threads, in order; a thread's panic is raised again here.
fn join<T>(handles: Vec<std::thread::ScopedJoinHandle<'_, T>>) -> Vec<T> {
    handles
        .into_iter()
        .map(|h| match h.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        })
        .collect()
}

/// Index of the largest value.
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv { (i, x) } else { (bi, bv) }
        })
        .0
}
