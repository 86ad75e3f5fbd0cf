//! The top of the speech embedding as a network kith can train: the last
//! five convolutions of openWakeWord's `embedding_model.onnx`
//! (conv2d_15 to conv2d_19), with hand-written gradients.
//!
//! kith's intent network otherwise learns on frozen embeddings. An
//! experiment (`models/intents/EXPERIMENTS.md`, "The top of the speech
//! embedding, trained") found that training these five layers with it,
//! started from their pretrained weights, is what lifts commands under
//! babble; this module is the first part of doing that in kith's own
//! trainer. Its input is the embedding model's activations after
//! `max_pooling2d_3` (the "rows"), its output the embeddings.
//!
//! ```text
//! rows [R, 2 bands, 96]                       R = 2n + 8 for n embeddings
//!   → conv2d_15 (1×3 over the bands, padded) → act
//!   → conv2d_16 (3×1 over time, valid)       → act   [R-2, 2, 96]
//!   → conv2d_17 (1×3 over the bands, padded) → act
//!   → conv2d_18 (3×1 over time, valid)       → act   [R-4, 2, 96]
//!   → max-pool 2×2, stride 2                         [R/2-2, 1, 96]
//!   → conv2d_19 (3×1 over time, valid, no bias)      [n, 96]
//! act(z) = max(LeakyRelu_0.2(z), floor), floor = -0.4 in the shipped model
//! ```
//!
//! A row is 4 mel frames (40 ms) and an embedding window 76 frames, so
//! window k of a stream is rows 2k..2k+10: run over a whole stream's rows
//! the layers give every window's embedding at once, with no window's work
//! repeated. Layout is row-major [row, band, channel] throughout.

use std::path::Path;

use tract_onnx::pb;
use tract_onnx::prelude::*;

use super::net::gemm;
use crate::error::{ModelError, reason};
use crate::wake::EMBEDDING_DIM;

/// Channels of every layer (the embedding's size).
pub const CHANNELS: usize = EMBEDDING_DIM;
/// Frequency bands at the cut.
pub const BANDS: usize = 2;
/// Kernel width of every convolution.
const KERNEL: usize = 3;
/// Rows per embedding step (8 mel frames).
pub const ROWS_PER_STEP: usize = 2;
/// Rows a window spans beyond its own [`ROWS_PER_STEP`].
pub const EXTRA_ROWS: usize = 8;
/// Values in one row.
pub const ROW: usize = BANDS * CHANNELS;
/// Slope of the LeakyRelu below zero.
const SLOPE: f32 = 0.2;
/// The graph tensor the rows are read from (the input of conv2d_15).
pub const CUT_LAYER: &str = "conv2d_15";

/// Rows needed for `embeddings` consecutive embeddings.
pub const fn rows_for(embeddings: usize) -> usize {
    ROWS_PER_STEP * embeddings + EXTRA_ROWS
}

/// Which axis a convolution slides over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// 1×3 over the two bands, zero-padded: as many positions out as in.
    Bands,
    /// 3×1 over time, unpadded: two rows fewer out than in.
    Time,
}

/// One convolution as a matrix: `w` is [KERNEL * 96, 96], row `j * 96 + i`
/// for tap j and input channel i; `b` is empty for a layer with no bias.
#[derive(Debug, Clone)]
pub struct TopConv {
    pub axis: Axis,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

/// conv2d_15 to conv2d_19 with the model's activation constant.
#[derive(Debug, Clone)]
pub struct EmbeddingTop {
    /// The five convolutions in order; the pooling sits before the last.
    pub convs: Vec<TopConv>,
    /// The activation's lower clamp (the graph's `Maximum` constant).
    pub floor: f32,
}

/// What one example's forward pass keeps for its backward pass.
pub struct TopTrace {
    /// Rows in.
    rows: usize,
    /// Each convolution's input as an im2col matrix.
    cols: Vec<Vec<f32>>,
    /// Pre-activation of the four activated convolutions.
    pre: Vec<Vec<f32>>,
    /// Per pooled value, the index (into conv2d_18's output) of the maximum.
    argmax: Vec<usize>,
    /// The embeddings, [n, 96].
    pub embeddings: Vec<f32>,
}

/// Gradients, laid out as the parameters: (w, b) per convolution.
#[derive(Debug, Clone)]
pub struct TopGrads {
    pub convs: Vec<(Vec<f32>, Vec<f32>)>,
}

impl EmbeddingTop {
    /// Reads conv2d_15..19 from openWakeWord's embedding model at `path`,
    /// checking that the graph is the one this module implements.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let fail = |e: TractError| ModelError::Load {
            path: path.to_path_buf(),
            reason: reason(&e),
        };
        let proto = tract_onnx::onnx()
            .proto_model_for_path(path)
            .map_err(fail)?;
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| unexpected(path, "no graph"))?;
        let tensors: Vec<&pb::TensorProto> = graph.initializer.iter().collect();
        let find = |name: &str| tensors.iter().find(|t| t.name == name).copied();
        let nodes = &graph.node;
        let mut convs = Vec::new();
        let mut floor = None;
        for layer in 15..=19 {
            let tag = format!("conv2d_{layer}/");
            let at = nodes
                .iter()
                .position(|n| n.op_type == "Conv" && n.name.contains(&tag))
                .ok_or_else(|| unexpected(path, &format!("no Conv named {tag}")))?;
            let node = &nodes[at];
            let w = node
                .input
                .get(1)
                .and_then(|n| find(n))
                .ok_or_else(|| unexpected(path, &format!("{tag} has no constant weights")))?;
            let dims: Vec<i64> = w.dims.clone();
            let axis = match dims.as_slice() {
                [96, 96, 1, 3] => Axis::Bands,
                [96, 96, 3, 1] => Axis::Time,
                other => {
                    return Err(unexpected(
                        path,
                        &format!("{tag} weights are {other:?}, not 96×96×1×3 or ×3×1"),
                    ));
                }
            };
            let expected = if layer % 2 == 1 {
                Axis::Bands
            } else {
                Axis::Time
            };
            if axis != expected && layer != 19 {
                return Err(unexpected(
                    path,
                    &format!("{tag} slides over the wrong axis"),
                ));
            }
            let values = floats(w).ok_or_else(|| unexpected(path, "weights are not f32"))?;
            let b = match node.input.get(2) {
                Some(name) => find(name)
                    .and_then(floats)
                    .filter(|b| b.len() == CHANNELS)
                    .ok_or_else(|| unexpected(path, &format!("{tag} bias is not 96 f32")))?,
                None => Vec::new(),
            };
            // ONNX [o, i, kh, kw] → [j * 96 + i, o].
            let mut m = vec![0.0; KERNEL * CHANNELS * CHANNELS];
            for o in 0..CHANNELS {
                for i in 0..CHANNELS {
                    for j in 0..KERNEL {
                        m[(j * CHANNELS + i) * CHANNELS + o] =
                            values[(o * CHANNELS + i) * KERNEL + j];
                    }
                }
            }
            if layer < 19 {
                let act = |k: usize, op: &str| {
                    nodes
                        .get(at + k)
                        .filter(|n| n.op_type == op)
                        .ok_or_else(|| unexpected(path, &format!("{tag} is not followed by {op}")))
                };
                let leaky = act(1, "LeakyRelu")?;
                let alpha = leaky
                    .attribute
                    .iter()
                    .find(|a| a.name == "alpha")
                    .map(|a| a.f)
                    .unwrap_or(0.01);
                if (alpha - SLOPE).abs() > 1e-6 {
                    return Err(unexpected(
                        path,
                        &format!("{tag}'s LeakyRelu slope is {alpha}"),
                    ));
                }
                let max = act(2, "Max")?;
                let c = max
                    .input
                    .get(1)
                    .and_then(|n| find(n))
                    .and_then(floats)
                    .filter(|v| v.len() == 1)
                    .ok_or_else(|| unexpected(path, &format!("{tag}'s Max has no scalar")))?;
                match floor {
                    None => floor = Some(c[0]),
                    Some(f) if f == c[0] => {}
                    Some(f) => {
                        return Err(unexpected(
                            path,
                            &format!("activation floors differ ({f} and {})", c[0]),
                        ));
                    }
                }
            }
            if layer == 18 {
                let pool = nodes
                    .get(at + 3)
                    .filter(|n| n.op_type == "MaxPool")
                    .ok_or_else(|| unexpected(path, "conv2d_18 is not followed by a MaxPool"))?;
                let ints = |name: &str| {
                    pool.attribute
                        .iter()
                        .find(|a| a.name == name)
                        .map(|a| a.ints.clone())
                };
                if ints("kernel_shape") != Some(vec![2, 2]) || ints("strides") != Some(vec![2, 2]) {
                    return Err(unexpected(path, "the last pooling is not 2×2, stride 2"));
                }
            }
            convs.push(TopConv { axis, w: m, b });
        }
        Ok(EmbeddingTop {
            convs,
            floor: floor.ok_or_else(|| unexpected(path, "no activation"))?,
        })
    }

    /// A top of random weights at the real sizes (He-normal kernels, small
    /// biases): benchmarks and tests of the arithmetic, not a start for
    /// training, which starts from the pretrained weights.
    pub fn random(seed: u64) -> Self {
        let mut rng = crate::intent::grammar::Rng::new(seed);
        let scale = (2.0 / (KERNEL * CHANNELS) as f32).sqrt();
        let axes = [Axis::Bands, Axis::Time, Axis::Bands, Axis::Time, Axis::Time];
        let convs = axes
            .iter()
            .enumerate()
            .map(|(i, &axis)| TopConv {
                axis,
                w: (0..KERNEL * CHANNELS * CHANNELS)
                    .map(|_| rng.normal() * scale)
                    .collect(),
                b: if i < 4 {
                    (0..CHANNELS).map(|_| rng.normal() * 0.1).collect()
                } else {
                    Vec::new()
                },
            })
            .collect();
        EmbeddingTop { convs, floor: -0.4 }
    }

    /// Number of parameters.
    pub fn parameters(&self) -> usize {
        self.convs.iter().map(|c| c.w.len() + c.b.len()).sum()
    }

    /// The embeddings of `rows` ([R, 2, 96], R = 2n + 8): [n, 96].
    pub fn embed(&self, rows: &[f32]) -> Result<Vec<f32>, ModelError> {
        Ok(self.forward(rows)?.embeddings)
    }

    fn act(&self, z: f32) -> f32 {
        let y = if z > 0.0 { z } else { SLOPE * z };
        y.max(self.floor)
    }

    fn act_grad(&self, z: f32) -> f32 {
        if z > 0.0 {
            1.0
        } else if SLOPE * z > self.floor {
            SLOPE
        } else {
            0.0
        }
    }

    /// The forward pass of one example, keeping what the backward pass needs.
    pub fn forward(&self, rows: &[f32]) -> Result<TopTrace, ModelError> {
        let r = rows.len() / ROW;
        if !rows.len().is_multiple_of(ROW) || r < EXTRA_ROWS + ROWS_PER_STEP || !r.is_multiple_of(2)
        {
            return Err(ModelError::Input(format!(
                "the embedding's top takes an even number ≥ {} of rows of {ROW} values, got {} values",
                EXTRA_ROWS + ROWS_PER_STEP,
                rows.len()
            )));
        }
        let mut x = rows.to_vec();
        let mut len = r;
        let mut cols = Vec::with_capacity(5);
        let mut pre = Vec::with_capacity(4);
        let mut argmax = Vec::new();
        for (li, conv) in self.convs.iter().enumerate() {
            let bands = if li == 4 { 1 } else { BANDS };
            if li == 4 {
                // Max-pool 2×2 over (time, bands), stride 2.
                let out = len / 2;
                let mut pooled = vec![0.0; out * CHANNELS];
                argmax = vec![0; out * CHANNELS];
                for t in 0..out {
                    for c in 0..CHANNELS {
                        let mut best = (f32::NEG_INFINITY, 0);
                        for dt in 0..2 {
                            for f in 0..BANDS {
                                let i = ((2 * t + dt) * BANDS + f) * CHANNELS + c;
                                if x[i] > best.0 {
                                    best = (x[i], i);
                                }
                            }
                        }
                        pooled[t * CHANNELS + c] = best.0;
                        argmax[t * CHANNELS + c] = best.1;
                    }
                }
                x = pooled;
                len = out;
            }
            let (col, out_len) = im2col(&x, len, bands, conv.axis);
            let positions = out_len * bands;
            let mut z = vec![0.0; positions * CHANNELS];
            if !conv.b.is_empty() {
                for row in z.chunks_exact_mut(CHANNELS) {
                    row.copy_from_slice(&conv.b);
                }
            }
            gemm(
                positions,
                KERNEL * CHANNELS,
                CHANNELS,
                &col,
                false,
                &conv.w,
                false,
                &mut z,
                !conv.b.is_empty(),
            );
            cols.push(col);
            len = out_len;
            if li < 4 {
                x = z.iter().map(|&v| self.act(v)).collect();
                pre.push(z);
            } else {
                x = z;
            }
        }
        Ok(TopTrace {
            rows: r,
            cols,
            pre,
            argmax,
            embeddings: x,
        })
    }

    /// Gradients of the parameters given the gradient of the loss with
    /// respect to the embeddings ([n, 96]), added into `grads`.
    pub fn backward(&self, trace: &TopTrace, d_embeddings: &[f32], grads: &mut TopGrads) {
        assert_eq!(d_embeddings.len(), trace.embeddings.len());
        let mut dy = d_embeddings.to_vec();
        let mut len = trace.embeddings.len() / CHANNELS;
        // Lengths of each conv's input, in rows.
        let r = trace.rows;
        let inputs = [r, r, r - 2, r - 2, (r - 4) / 2];
        for li in (0..5).rev() {
            let conv = &self.convs[li];
            let bands = if li == 4 { 1 } else { BANDS };
            if li < 4 {
                for (g, &z) in dy.iter_mut().zip(&trace.pre[li]) {
                    *g *= self.act_grad(z);
                }
            }
            let positions = len * bands;
            let (gw, gb) = &mut grads.convs[li];
            gemm(
                KERNEL * CHANNELS,
                positions,
                CHANNELS,
                &trace.cols[li],
                true,
                &dy,
                false,
                gw,
                true,
            );
            if !gb.is_empty() {
                for row in dy.chunks_exact(CHANNELS) {
                    gb.iter_mut().zip(row).for_each(|(g, d)| *g += d);
                }
            }
            if li == 0 {
                break;
            }
            let mut dcol = vec![0.0; positions * KERNEL * CHANNELS];
            gemm(
                positions,
                CHANNELS,
                KERNEL * CHANNELS,
                &dy,
                false,
                &conv.w,
                true,
                &mut dcol,
                false,
            );
            let in_len = inputs[li];
            let dx = col2im(&dcol, in_len, bands, conv.axis);
            if li == 4 {
                // Back through the pooling: each gradient to its maximum.
                let mut d = vec![0.0; (r - 4) * ROW];
                for (g, &i) in dx.iter().zip(&trace.argmax) {
                    d[i] += g;
                }
                dy = d;
                len = r - 4;
            } else {
                dy = dx;
                len = in_len;
            }
        }
    }

    /// Zero gradients shaped as the parameters.
    pub fn zero_grads(&self) -> TopGrads {
        TopGrads {
            convs: self
                .convs
                .iter()
                .map(|c| (vec![0.0; c.w.len()], vec![0.0; c.b.len()]))
                .collect(),
        }
    }

    /// A parameter by flat index (w then b of each layer, in order).
    pub fn nudge(&mut self, index: usize, delta: f32) {
        let mut i = index;
        for c in &mut self.convs {
            for p in [&mut c.w, &mut c.b] {
                if i < p.len() {
                    p[i] += delta;
                    return;
                }
                i -= p.len();
            }
        }
    }
}

impl TopGrads {
    /// Every gradient in parameter order (see [`EmbeddingTop::nudge`]).
    pub fn flatten(&self) -> Vec<f32> {
        self.convs
            .iter()
            .flat_map(|(w, b)| w.iter().chain(b).copied())
            .collect()
    }
}

/// Input [len, bands, 96] → the convolution's im2col matrix
/// [positions out, KERNEL * 96] and the rows out.
fn im2col(x: &[f32], len: usize, bands: usize, axis: Axis) -> (Vec<f32>, usize) {
    let out_len = match axis {
        Axis::Bands => len,
        Axis::Time => len - (KERNEL - 1),
    };
    let mut col = vec![0.0; out_len * bands * KERNEL * CHANNELS];
    for t in 0..out_len {
        for f in 0..bands {
            let dst = (t * bands + f) * KERNEL * CHANNELS;
            for j in 0..KERNEL {
                if let Some(src) = source(t, f, j, len, bands, axis) {
                    col[dst + j * CHANNELS..dst + (j + 1) * CHANNELS]
                        .copy_from_slice(&x[src..src + CHANNELS]);
                }
            }
        }
    }
    (col, out_len)
}

/// The adjoint of [`im2col`]: sums each tap's gradient back onto its input.
fn col2im(col: &[f32], len: usize, bands: usize, axis: Axis) -> Vec<f32> {
    let out_len = match axis {
        Axis::Bands => len,
        Axis::Time => len - (KERNEL - 1),
    };
    let mut x = vec![0.0; len * bands * CHANNELS];
    for t in 0..out_len {
        for f in 0..bands {
            let from = (t * bands + f) * KERNEL * CHANNELS;
            for j in 0..KERNEL {
                if let Some(dst) = source(t, f, j, len, bands, axis) {
                    let taps = &col[from + j * CHANNELS..from + (j + 1) * CHANNELS];
                    x[dst..dst + CHANNELS]
                        .iter_mut()
                        .zip(taps)
                        .for_each(|(a, b)| *a += b);
                }
            }
        }
    }
    x
}

/// Offset of tap `j`'s input for output position (t, f), if inside.
fn source(t: usize, f: usize, j: usize, len: usize, bands: usize, axis: Axis) -> Option<usize> {
    let (st, sf) = match axis {
        Axis::Bands => (t as isize, f as isize + j as isize - 1),
        Axis::Time => ((t + j) as isize, f as isize),
    };
    let inside = st >= 0 && (st as usize) < len && sf >= 0 && (sf as usize) < bands;
    inside.then(|| ((st as usize) * bands + sf as usize) * CHANNELS)
}

/// A tensor's f32 values, from `float_data` or little-endian `raw_data`.
fn floats(t: &pb::TensorProto) -> Option<Vec<f32>> {
    if t.data_type != pb::tensor_proto::DataType::Float as i32 {
        return None;
    }
    if !t.float_data.is_empty() {
        return Some(t.float_data.clone());
    }
    if !t.raw_data.len().is_multiple_of(4) {
        return None;
    }
    Some(
        t.raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    )
}

fn unexpected(path: &Path, why: &str) -> ModelError {
    ModelError::Shape {
        model: path.display().to_string(),
        reason: format!("not openWakeWord's embedding model as kith trains it: {why}"),
    }
}
