//! One ONNX model, loaded with fixed input shapes, optimized once, run many
//! times with input tensors allocated once and refilled in place.
//! Every input is f32 with a shape fixed at load time.

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;

use crate::error::{ModelError, reason};

/// A runnable, optimized tract plan with its own state and reusable inputs.
pub struct OnnxPlan {
    /// Short name used in errors ("embedding_model", "alexa_v0.1").
    name: String,
    /// The optimized plan, kept to start a fresh state on reset.
    plan: Arc<TypedSimplePlan>,
    /// The plan's execution state, kept across calls so tract does not rebuild it.
    state: TypedSimpleState,
    /// Input tensors, allocated at load time and filled in place before each run.
    inputs: Vec<Arc<Tensor>>,
}

impl OnnxPlan {
    /// Loads `path`, fixes every input to the given f32 shape, optimizes and plans it.
    pub fn load(path: &Path, input_shapes: &[&[usize]]) -> Result<Self, ModelError> {
        let fail = |e: TractError| ModelError::Load {
            path: path.to_path_buf(),
            reason: reason(&e),
        };
        let mut model = tract_onnx::onnx().model_for_path(path).map_err(fail)?;
        for (ix, shape) in input_shapes.iter().enumerate() {
            model = model
                .with_input_fact(ix, f32::fact(*shape).into())
                .map_err(fail)?;
        }
        let optimized = model.into_optimized().map_err(fail)?;
        Self::from_typed(path, optimized, input_shapes, true)
    }

    /// Plans an optimized typed model. `stateless` makes every run start
    /// from the model's initial recurrent state (ONNX semantics); a pulsed
    /// (streaming) model needs its state carried instead.
    pub(crate) fn from_typed(
        path: &Path,
        mut optimized: TypedModel,
        input_shapes: &[&[usize]],
        stateless: bool,
    ) -> Result<Self, ModelError> {
        let fail = |e: TractError| ModelError::Load {
            path: path.to_path_buf(),
            reason: reason(&e),
        };
        if stateless {
            reset_recurrent_state_every_run(&mut optimized);
        }
        let plan = optimized.into_runnable().map_err(fail)?;
        let state = plan.spawn().map_err(fail)?;
        let inputs = input_shapes
            .iter()
            .map(|s| Tensor::zero::<f32>(s).map(Arc::new))
            .collect::<TractResult<Vec<_>>>()
            .map_err(fail)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Ok(OnnxPlan {
            name,
            plan,
            state,
            inputs,
        })
    }

    /// Drops any state carried between runs (a pulsed model's stream).
    pub(crate) fn reset_state(&mut self) -> Result<(), ModelError> {
        self.state = self.plan.spawn().map_err(|e| ModelError::Run {
            model: self.name.clone(),
            reason: reason(&e),
        })?;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Mutable access to input `ix` for filling before [`OnnxPlan::run`].
    /// No copy happens once the previous run released its handle.
    pub fn input_mut(&mut self, ix: usize) -> Result<&mut [f32], ModelError> {
        let err = |reason: String| ModelError::Run {
            model: self.name.clone(),
            reason,
        };
        let tensor = Arc::make_mut(&mut self.inputs[ix]);
        tensor
            .to_plain_array_view_mut::<f32>()
            .map_err(|e| err(reason(&e)))?
            .into_slice()
            .ok_or_else(|| err(format!("input {ix} is not contiguous")))
    }

    /// Runs the plan and copies every output out (allocates: for tools and
    /// tests, not for streaming).
    pub fn run_to_vecs(&mut self) -> Result<Vec<Vec<f32>>, ModelError> {
        let outputs = self.run()?;
        (0..outputs.len())
            .map(|ix| output_slice(&self.name, &outputs, ix).map(<[f32]>::to_vec))
            .collect()
    }

    /// Runs the plan on the current inputs and returns its outputs.
    pub(crate) fn run(&mut self) -> Result<TVec<TValue>, ModelError> {
        let inputs: TVec<TValue> = self
            .inputs
            .iter()
            .map(|t| TValue::from_const(Arc::clone(t)))
            .collect();
        self.state.run(inputs).map_err(|e| ModelError::Run {
            model: self.name.clone(),
            reason: reason(&e),
        })
    }

    /// Copies output `ix` of a run into `out`, checking its length.
    pub(crate) fn read_output(
        &self,
        outputs: &TVec<TValue>,
        ix: usize,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let slice = output_slice(&self.name, outputs, ix)?;
        if slice.len() != out.len() {
            return Err(ModelError::Shape {
                model: self.name.clone(),
                reason: format!(
                    "output {ix} has {} values, expected {}",
                    slice.len(),
                    out.len()
                ),
            });
        }
        out.copy_from_slice(slice);
        Ok(())
    }
}

/// Borrows output `ix` of a run as f32 values.
pub(crate) fn output_slice<'a>(
    model: &str,
    outputs: &'a TVec<TValue>,
    ix: usize,
) -> Result<&'a [f32], ModelError> {
    let err = |reason: String| ModelError::Run {
        model: model.to_string(),
        reason,
    };
    let value = outputs
        .get(ix)
        .ok_or_else(|| err(format!("no output {ix}")))?;
    let view = value.try_as_plain_ram().map_err(|e| err(reason(&e)))?;
    view.as_slice::<f32>().map_err(|e| err(reason(&e)))
}

/// ONNX models are stateless: every run starts from the model's initial
/// recurrent state. tract's scan and GRU kernels carry their state from one
/// run to the next in a reused `SimpleState` (for streaming use), which made
/// an LSTM head (hey_mycroft) drift away from onnxruntime. Reusing the state
/// saves an allocation per run, so flip the ops to reset instead.
fn reset_recurrent_state_every_run(model: &mut TypedModel) {
    use tract_onnx::tract_core::ops::gru_seq::GruSeq;
    use tract_onnx::tract_core::ops::scan::OptScan;
    for node in model.nodes_mut() {
        if let Some(scan) = node.op_as::<OptScan>()
            && !scan.reset_every_turn
        {
            let mut params = (**scan).clone();
            params.reset_every_turn = true;
            node.op = Box::new(OptScan::new(Arc::new(params)));
        } else if let Some(gru) = node.op_as_mut::<GruSeq>() {
            gru.reset_every_turn = true;
        }
    }
}
