//! The top of the speech embedding as a network kith can train: the last
//! five, seven or nine convolutions of openWakeWord's `embedding_model.onnx`
//! (conv2d_15, conv2d_13 or conv2d_11 to conv2d_19: a [`Depth`]), with
//! hand-written gradients.
//!
//! kith's intent network otherwise learns on frozen embeddings. Experiments
//! (`models/intents/EXPERIMENTS.md`, "The top of the speech embedding,
//! trained" and "Two more layers of the embedding, trained") found that
//! training these layers with it, started from their pretrained weights,
//! is what lifts commands under babble, and more of them more. Its input is
//! the embedding model's activations before the first layer it holds (the
//! "rows"), its output the embeddings.
//!
//! ```text
//! from 11: rows [R, 4 bands, 72]                       R = 2n + 12
//!   → conv2d_11 (1×3 over the bands, padded) → act
//!   → conv2d_12 (3×1 over time, valid)       → act   [R-2, 4, 96]
//! from 13: rows [R, 4 bands, 96]                       R = 2n + 10
//!   → conv2d_13 (1×3 over the bands, padded) → act
//!   → conv2d_14 (3×1 over time, valid)       → act   [R-2, 4, 96]
//!   → max-pool 1×2 over the bands                    [R-2, 2, 96]
//! from 15: rows [R, 2 bands, 96]                       R = 2n + 8
//!   → conv2d_15 (1×3 over the bands, padded) → act
//!   → conv2d_16 (3×1 over time, valid)       → act   [R-2, 2, 96]
//!   → conv2d_17 (1×3 over the bands, padded) → act
//!   → conv2d_18 (3×1 over time, valid)       → act   [R-4, 2, 96]
//!   → max-pool 2×2, stride 2                         [R/2-2, 1, 96]
//!   → conv2d_19 (3×1 over time, valid, no bias)      [n, 96]
//! act(z) = max(LeakyRelu_0.2(z), floor), floor = -0.4 in the shipped model
//! (R counted at each depth's own input)
//! ```
//!
//! A row is 4 mel frames (40 ms) at every depth and an embedding window 76
//! frames, so from 15 window k of a stream is rows 2k..2k+10 (two rows more
//! per time convolution below): run over a whole stream's rows the layers
//! give every window's embedding at once, with no window's work repeated.
//! Layout is row-major [row, band, channel] throughout.

use std::path::Path;

use tract_onnx::pb;
use tract_onnx::prelude::*;

use super::net::gemm;
use crate::error::{ModelError, reason};
use crate::wake::EMBEDDING_DIM;

/// Channels out of every layer (the embedding's size).
pub const CHANNELS: usize = EMBEDDING_DIM;
/// Kernel width of every convolution.
pub const KERNEL: usize = 3;
/// Rows per embedding step (8 mel frames).
pub const ROWS_PER_STEP: usize = 2;
/// Slope of the LeakyRelu below zero.
const SLOPE: f32 = 0.2;
/// The embedding model's last layer.
const LAST_LAYER: usize = 19;

/// The first of the embedding model's layers a top holds, and so where
/// the model is cut and what the cut front end streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Depth {
    /// conv2d_15–19: five layers, rows of 2 bands × 96.
    From15,
    /// conv2d_13–19: seven layers, rows of 4 bands × 96.
    From13,
    /// conv2d_11–19: nine layers, rows of 4 bands × 72.
    From11,
}

impl Depth {
    /// Every depth, shallowest first.
    pub const ALL: [Depth; 3] = [Depth::From15, Depth::From13, Depth::From11];

    /// The depth whose first layer is conv2d_`layer`.
    pub fn from_layer(layer: usize) -> Option<Depth> {
        Depth::ALL.into_iter().find(|d| d.first_layer() == layer)
    }

    /// The number of the first layer held (conv2d_N).
    pub const fn first_layer(self) -> usize {
        match self {
            Depth::From15 => 15,
            Depth::From13 => 13,
            Depth::From11 => 11,
        }
    }

    /// Layers held.
    pub const fn layers(self) -> usize {
        LAST_LAYER + 1 - self.first_layer()
    }

    /// Frequency bands of a row.
    pub const fn bands(self) -> usize {
        match self {
            Depth::From15 => 2,
            Depth::From13 | Depth::From11 => 4,
        }
    }

    /// Channels of a row.
    pub const fn channels(self) -> usize {
        match self {
            Depth::From11 => 72,
            Depth::From15 | Depth::From13 => CHANNELS,
        }
    }

    /// Values in one row.
    pub const fn row(self) -> usize {
        self.bands() * self.channels()
    }

    /// Rows a window spans beyond its own [`ROWS_PER_STEP`]: each time
    /// convolution (every even layer) takes two.
    pub const fn extra_rows(self) -> usize {
        8 + (15 - self.first_layer())
    }

    /// Rows needed for `embeddings` consecutive embeddings.
    pub const fn rows_for(self, embeddings: usize) -> usize {
        ROWS_PER_STEP * embeddings + self.extra_rows()
    }

    /// The graph's name of the first layer, whose input the rows are.
    pub fn cut_layer(self) -> String {
        format!("conv2d_{}", self.first_layer())
    }
}

/// Which axis a convolution slides over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// 1×3 over the bands, zero-padded: as many positions out as in.
    Bands,
    /// 3×1 over time, unpadded: two rows fewer out than in.
    Time,
}

/// A max-pooling: `time` × `bands` windows with as large a stride.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub time: usize,
    pub bands: usize,
}

/// Layer conv2d_`layer` of the embedding model: its axis, its input
/// channels, and the pooling just before it (when the top holds the layer
/// the pooling follows).
pub fn layer_shape(depth: Depth, layer: usize) -> (Axis, usize, Option<Pool>) {
    let axis = if layer % 2 == 1 && layer < LAST_LAYER {
        Axis::Bands
    } else {
        Axis::Time
    };
    let cin = if layer == depth.first_layer() {
        depth.channels()
    } else {
        CHANNELS
    };
    let pool = match layer {
        15 if depth.first_layer() < 15 => Some(Pool { time: 1, bands: 2 }),
        LAST_LAYER => Some(Pool { time: 2, bands: 2 }),
        _ => None,
    };
    (axis, cin, pool)
}

/// One convolution as a matrix: `w` is [KERNEL * cin, 96], row `j * cin + i`
/// for tap j and input channel i; `b` is empty for a layer with no bias.
#[derive(Debug, Clone)]
pub struct TopConv {
    pub axis: Axis,
    /// Input channels.
    pub cin: usize,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

/// The embedding model's layers from `depth` to conv2d_19, with the
/// model's activation constant.
#[derive(Debug, Clone)]
pub struct EmbeddingTop {
    pub depth: Depth,
    /// The convolutions in order (the poolings sit between them, see
    /// [`layer_shape`]); every one but the last is activated.
    pub convs: Vec<TopConv>,
    /// The activation's lower clamp (the graph's `Maximum` constant).
    pub floor: f32,
}

/// What one convolution of a forward pass keeps for the backward pass.
struct Step {
    /// Its input as an im2col matrix.
    col: Vec<f32>,
    /// Its input's rows and bands.
    len: usize,
    bands: usize,
    /// Pre-activation (activated layers only).
    pre: Option<Vec<f32>>,
    /// The pooling before it: per pooled value, the index of its maximum
    /// in the pooling's input, and that input's size.
    pool: Option<(Vec<usize>, usize)>,
}

/// What one example's forward pass keeps for its backward pass.
pub struct TopTrace {
    steps: Vec<Step>,
    /// The embeddings, [n, 96].
    pub embeddings: Vec<f32>,
}

/// Gradients, laid out as the parameters: (w, b) per convolution.
#[derive(Debug, Clone)]
pub struct TopGrads {
    pub convs: Vec<(Vec<f32>, Vec<f32>)>,
}

impl EmbeddingTop {
    /// Reads conv2d_N..19 (N: `depth`'s first layer) from openWakeWord's
    /// embedding model at `path`, checking that the graph is the one this
    /// module implements.
    pub fn load(path: &Path, depth: Depth) -> Result<Self, ModelError> {
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
        for layer in depth.first_layer()..=LAST_LAYER {
            let tag = format!("conv2d_{layer}/");
            let (axis, cin, _) = layer_shape(depth, layer);
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
            let want: [i64; 4] = match axis {
                Axis::Bands => [CHANNELS as i64, cin as i64, 1, KERNEL as i64],
                Axis::Time => [CHANNELS as i64, cin as i64, KERNEL as i64, 1],
            };
            if w.dims != want {
                return Err(unexpected(
                    path,
                    &format!("{tag} weights are {:?}, not {want:?}", w.dims),
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
            // ONNX [o, i, kh, kw] → [j * cin + i, o].
            let mut m = vec![0.0; KERNEL * cin * CHANNELS];
            for o in 0..CHANNELS {
                for i in 0..cin {
                    for j in 0..KERNEL {
                        m[(j * cin + i) * CHANNELS + o] = values[(o * cin + i) * KERNEL + j];
                    }
                }
            }
            if layer < LAST_LAYER {
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
                if let (_, _, Some(p)) = layer_shape(depth, layer + 1) {
                    let pool = nodes
                        .get(at + 3)
                        .filter(|n| n.op_type == "MaxPool")
                        .ok_or_else(|| {
                            unexpected(path, &format!("{tag} is not followed by a MaxPool"))
                        })?;
                    let ints = |name: &str| {
                        pool.attribute
                            .iter()
                            .find(|a| a.name == name)
                            .map(|a| a.ints.clone())
                    };
                    let want = Some(vec![p.time as i64, p.bands as i64]);
                    if ints("kernel_shape") != want || ints("strides") != want {
                        return Err(unexpected(
                            path,
                            &format!(
                                "the pooling after {tag} is not {}×{}, stride {0}×{1}",
                                p.time, p.bands
                            ),
                        ));
                    }
                }
            }
            convs.push(TopConv { axis, cin, w: m, b });
        }
        Ok(EmbeddingTop {
            depth,
            convs,
            floor: floor.ok_or_else(|| unexpected(path, "no activation"))?,
        })
    }

    /// A top of random weights at the real sizes (He-normal kernels, small
    /// biases): benchmarks and tests of the arithmetic, not a start for
    /// training, which starts from the pretrained weights.
    pub fn random(depth: Depth, seed: u64) -> Self {
        let mut rng = crate::intent::grammar::Rng::new(seed);
        let convs = (depth.first_layer()..=LAST_LAYER)
            .map(|layer| {
                let (axis, cin, _) = layer_shape(depth, layer);
                let scale = (2.0 / (KERNEL * cin) as f32).sqrt();
                TopConv {
                    axis,
                    cin,
                    w: (0..KERNEL * cin * CHANNELS)
                        .map(|_| rng.normal() * scale)
                        .collect(),
                    b: if layer < LAST_LAYER {
                        (0..CHANNELS).map(|_| rng.normal() * 0.1).collect()
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect();
        EmbeddingTop {
            depth,
            convs,
            floor: -0.4,
        }
    }

    /// Number of parameters.
    pub fn parameters(&self) -> usize {
        self.convs.iter().map(|c| c.w.len() + c.b.len()).sum()
    }

    /// The embeddings of `rows` ([R, bands, channels] of the depth,
    /// R = 2n + extra rows): [n, 96].
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
        let d = self.depth;
        let row = d.row();
        let r = rows.len() / row;
        let least = d.extra_rows() + ROWS_PER_STEP;
        if !rows.len().is_multiple_of(row) || r < least || !r.is_multiple_of(2) {
            return Err(ModelError::Input(format!(
                "the embedding's top from {} takes an even number ≥ {least} of rows of {row} values, got {} values",
                d.cut_layer(),
                rows.len()
            )));
        }
        let mut x = rows.to_vec();
        let (mut len, mut bands) = (r, d.bands());
        let mut steps = Vec::with_capacity(self.convs.len());
        let last = self.convs.len() - 1;
        for (li, conv) in self.convs.iter().enumerate() {
            let mut pool = None;
            if let (_, _, Some(p)) = layer_shape(d, d.first_layer() + li) {
                let (pooled, argmax, out_len) = max_pool(&x, len, bands, p);
                pool = Some((argmax, x.len()));
                x = pooled;
                len = out_len;
                bands /= p.bands;
            }
            let (col, out_len) = im2col(&x, len, bands, conv.cin, conv.axis);
            let positions = out_len * bands;
            let mut z = vec![0.0; positions * CHANNELS];
            if !conv.b.is_empty() {
                for row in z.chunks_exact_mut(CHANNELS) {
                    row.copy_from_slice(&conv.b);
                }
            }
            gemm(
                positions,
                KERNEL * conv.cin,
                CHANNELS,
                &col,
                false,
                &conv.w,
                false,
                &mut z,
                !conv.b.is_empty(),
            );
            let mut step = Step {
                col,
                len,
                bands,
                pre: None,
                pool,
            };
            len = out_len;
            if li < last {
                x = z.iter().map(|&v| self.act(v)).collect();
                step.pre = Some(z);
            } else {
                x = z;
            }
            steps.push(step);
        }
        Ok(TopTrace {
            steps,
            embeddings: x,
        })
    }

    /// Gradients of the parameters given the gradient of the loss with
    /// respect to the embeddings ([n, 96]), added into `grads`.
    pub fn backward(&self, trace: &TopTrace, d_embeddings: &[f32], grads: &mut TopGrads) {
        assert_eq!(d_embeddings.len(), trace.embeddings.len());
        let mut dy = d_embeddings.to_vec();
        for li in (0..self.convs.len()).rev() {
            let conv = &self.convs[li];
            let step = &trace.steps[li];
            if let Some(pre) = &step.pre {
                for (g, &z) in dy.iter_mut().zip(pre) {
                    *g *= self.act_grad(z);
                }
            }
            let positions = dy.len() / CHANNELS;
            let (gw, gb) = &mut grads.convs[li];
            gemm(
                KERNEL * conv.cin,
                positions,
                CHANNELS,
                &step.col,
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
            let mut dcol = vec![0.0; positions * KERNEL * conv.cin];
            gemm(
                positions,
                CHANNELS,
                KERNEL * conv.cin,
                &dy,
                false,
                &conv.w,
                true,
                &mut dcol,
                false,
            );
            let dx = col2im(&dcol, step.len, step.bands, conv.cin, conv.axis);
            dy = match &step.pool {
                // Back through the pooling: each gradient to its maximum.
                Some((argmax, size)) => {
                    let mut d = vec![0.0; *size];
                    for (g, &i) in dx.iter().zip(argmax) {
                        d[i] += g;
                    }
                    d
                }
                None => dx,
            };
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

/// Max-pools [len, bands, 96] by `p` (stride as the window): the pooled
/// values, the index of each one's maximum, and the rows out.
fn max_pool(x: &[f32], len: usize, bands: usize, p: Pool) -> (Vec<f32>, Vec<usize>, usize) {
    let (out_len, out_bands) = (len / p.time, bands / p.bands);
    let mut pooled = vec![0.0; out_len * out_bands * CHANNELS];
    let mut argmax = vec![0; pooled.len()];
    for t in 0..out_len {
        for f in 0..out_bands {
            for c in 0..CHANNELS {
                let mut best = (f32::NEG_INFINITY, 0);
                for dt in 0..p.time {
                    for df in 0..p.bands {
                        let i = ((p.time * t + dt) * bands + p.bands * f + df) * CHANNELS + c;
                        if x[i] > best.0 {
                            best = (x[i], i);
                        }
                    }
                }
                let o = (t * out_bands + f) * CHANNELS + c;
                pooled[o] = best.0;
                argmax[o] = best.1;
            }
        }
    }
    (pooled, argmax, out_len)
}

/// Input [len, bands, ch] → the convolution's im2col matrix
/// [positions out, KERNEL * ch] and the rows out.
fn im2col(x: &[f32], len: usize, bands: usize, ch: usize, axis: Axis) -> (Vec<f32>, usize) {
    let out_len = match axis {
        Axis::Bands => len,
        Axis::Time => len - (KERNEL - 1),
    };
    let mut col = vec![0.0; out_len * bands * KERNEL * ch];
    for t in 0..out_len {
        for f in 0..bands {
            let dst = (t * bands + f) * KERNEL * ch;
            for j in 0..KERNEL {
                if let Some(src) = source(t, f, j, len, bands, axis) {
                    col[dst + j * ch..dst + (j + 1) * ch]
                        .copy_from_slice(&x[src * ch..(src + 1) * ch]);
                }
            }
        }
    }
    (col, out_len)
}

/// The adjoint of [`im2col`]: sums each tap's gradient back onto its input.
fn col2im(col: &[f32], len: usize, bands: usize, ch: usize, axis: Axis) -> Vec<f32> {
    let out_len = match axis {
        Axis::Bands => len,
        Axis::Time => len - (KERNEL - 1),
    };
    let mut x = vec![0.0; len * bands * ch];
    for t in 0..out_len {
        for f in 0..bands {
            let from = (t * bands + f) * KERNEL * ch;
            for j in 0..KERNEL {
                if let Some(dst) = source(t, f, j, len, bands, axis) {
                    let taps = &col[from + j * ch..from + (j + 1) * ch];
                    x[dst * ch..(dst + 1) * ch]
                        .iter_mut()
                        .zip(taps)
                        .for_each(|(a, b)| *a += b);
                }
            }
        }
    }
    x
}

/// The input position (row × bands + band) of tap `j` for output position
/// (t, f), if inside.
fn source(t: usize, f: usize, j: usize, len: usize, bands: usize, axis: Axis) -> Option<usize> {
    let (st, sf) = match axis {
        Axis::Bands => (t as isize, f as isize + j as isize - 1),
        Axis::Time => ((t + j) as isize, f as isize),
    };
    let inside = st >= 0 && (st as usize) < len && sf >= 0 && (sf as usize) < bands;
    inside.then(|| (st as usize) * bands + sf as usize)
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
