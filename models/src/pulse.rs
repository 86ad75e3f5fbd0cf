//! The speech embedding model as a streaming (pulsed) network.
//!
//! openWakeWord runs the embedding model on the last 76 mel frames at every
//! chunk, although 68 of those frames were already seen: about 90 % of the
//! work is repeated. The model is convolutional in time (valid convolutions,
//! max-pools of stride 2, total stride 8), so tract-pulse can turn it into a
//! network that takes 8 new frames per call, keeps the intermediate
//! activations it still needs, and emits one embedding per call: the same
//! numbers as the windowed model, for a fraction of the work.
//!
//! Two edits make the shipped graph pulsable: its first Reshape hard-codes
//! 76 frames (made symbolic here), and its last Reshape folds time into the
//! batch axis (dropped: the output is read straight from the last conv).

use std::path::Path;

use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_pulse::internal::*;

use crate::error::{ModelError, reason};
use crate::plan::OnnxPlan;

/// ONNX data type code for int64.
const ONNX_INT64: i32 = 7;

/// A pulsed embedding model: `pulse` frames in, one embedding (or, cut,
/// the rows of an inner layer) out.
pub(crate) struct PulsedEmbedding {
    /// The plan, input [1, pulse, bins, 1]; carries the stream between runs.
    pub(crate) plan: OnnxPlan,
    /// Output steps the pulsed network lags behind its input stream.
    pub(crate) delay: usize,
    /// Shape of one pulse's output, [1, channels, steps, bands] (the
    /// embedding: [1, 96, 1, 1]).
    pub(crate) shape: [usize; 4],
}

/// Loads `path` (openWakeWord's embedding_model.onnx) as a pulsed network.
pub(crate) fn load(path: &Path, bins: usize, pulse: usize) -> Result<PulsedEmbedding, ModelError> {
    load_cut(path, bins, pulse, None)
}

/// [`load`], or with `cut` the network up to the input of the convolution
/// named `cut` (e.g. "conv2d_15"), whose activations it streams instead.
pub(crate) fn load_cut(
    path: &Path,
    bins: usize,
    pulse: usize,
    cut: Option<&str>,
) -> Result<PulsedEmbedding, ModelError> {
    let fail = |e: TractError| ModelError::Load {
        path: path.to_path_buf(),
        reason: reason(&e),
    };
    let shape_err = |why: &str| ModelError::Shape {
        model: path.display().to_string(),
        reason: format!("cannot stream this embedding model ({why}); use the windowed embedding"),
    };
    let onnx = tract_onnx::onnx();
    let mut proto = onnx.proto_model_for_path(path).map_err(fail)?;
    let graph = proto.graph.as_mut().ok_or_else(|| shape_err("no graph"))?;

    // The first Reshape: [-1, 1, 76, bins+2] → [1, 1, -1, bins+2].
    let first = graph
        .node
        .iter()
        .find(|n| n.op_type == "Reshape")
        .ok_or_else(|| shape_err("no Reshape"))?;
    let shape_name = first
        .input
        .get(1)
        .cloned()
        .ok_or_else(|| shape_err("Reshape without shape"))?;
    let init = graph
        .initializer
        .iter_mut()
        .find(|i| i.name == shape_name)
        .ok_or_else(|| shape_err("Reshape shape is not a constant"))?;
    let old = int64_values(init).ok_or_else(|| shape_err("Reshape shape is not int64"))?;
    let [_, 1, _, width] = old.as_slice() else {
        return Err(shape_err("unexpected first Reshape"));
    };
    *init = pb::TensorProto {
        name: shape_name,
        dims: vec![4],
        data_type: ONNX_INT64,
        int64_data: vec![1, 1, -1, *width],
        ..Default::default()
    };

    // The last node: a Reshape folding time into batch. Read its input instead.
    let last = graph
        .node
        .last()
        .cloned()
        .ok_or_else(|| shape_err("empty graph"))?;
    if last.op_type != "Reshape"
        || graph.output.len() != 1
        || graph.output[0].name != last.output[0]
    {
        return Err(shape_err("the output is not a final Reshape"));
    }
    graph.node.pop();
    graph.output[0].name = last.input[0].clone();
    graph.output[0].r#type = None;
    if let Some(layer) = cut {
        let tag = format!("{layer}/");
        let at = graph
            .node
            .iter()
            .position(|n| n.op_type == "Conv" && n.name.contains(&tag))
            .ok_or_else(|| shape_err("no convolution to cut at"))?;
        let input = graph.node[at].input.first().cloned();
        graph.output[0].name = input.ok_or_else(|| shape_err("a Conv without input"))?;
        graph.node.truncate(at);
    }

    let mut model = onnx.model_for_proto_model(&proto).map_err(fail)?;
    let time = model.symbols.sym("T");
    let fact = f32::fact([1.to_dim(), time.clone().into(), bins.to_dim(), 1.to_dim()]);
    model.set_input_fact(0, fact.into()).map_err(fail)?;
    let typed = model
        .into_typed()
        .map_err(fail)?
        .into_decluttered()
        .map_err(fail)?;
    let pulsed = PulsedModel::new(&typed, time, &pulse.to_dim()).map_err(fail)?;
    let out = pulsed.output_fact(0).map_err(fail)?;
    let delay = out
        .stream
        .as_ref()
        .map(|s| s.delay)
        .ok_or_else(|| shape_err("output is not streamed"))?;
    let dims: Vec<usize> = out
        .shape
        .iter()
        .map(|d| d.to_usize().ok())
        .collect::<Option<_>>()
        .ok_or_else(|| shape_err("a pulse's output has a symbolic size"))?;
    let shape: [usize; 4] = dims
        .try_into()
        .map_err(|_| shape_err("the output is not [1, channels, time, bands]"))?;
    if cut.is_none() && shape.iter().product::<usize>() != 96 {
        return Err(shape_err("not one 96-dim embedding per pulse"));
    }
    if shape[0] != 1 || out.stream.as_ref().map(|s| s.axis) != Some(2) {
        return Err(shape_err("the output does not stream along its third axis"));
    }
    let optimized = pulsed
        .into_typed()
        .map_err(fail)?
        .into_optimized()
        .map_err(fail)?;
    let plan = OnnxPlan::from_typed(path, optimized, &[&[1, pulse, bins, 1]], false)?;
    Ok(PulsedEmbedding { plan, delay, shape })
}

fn int64_values(t: &pb::TensorProto) -> Option<Vec<i64>> {
    if t.data_type != ONNX_INT64 {
        return None;
    }
    if !t.int64_data.is_empty() {
        return Some(t.int64_data.clone());
    }
    let raw = &t.raw_data;
    if !raw.len().is_multiple_of(8) {
        return None;
    }
    Some(
        raw.chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect(),
    )
}
