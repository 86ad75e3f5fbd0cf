//! Silero voice activity detection on tract, streaming, LSTM state carried.
//!
//! Runs the folded model `silero_vad_folded.onnx` (made at fetch time from
//! openWakeWord's silero_vad.onnx; see the catalog). Frames are 640 samples
//! (40 ms), two per 80 ms chunk, scaled by 1/32767; the chunk's score is the
//! mean of its frames, as openWakeWord computes it.

use std::path::Path;

use crate::CHUNK_SAMPLES;
use crate::error::ModelError;
use crate::plan::OnnxPlan;

/// Samples per VAD frame.
pub const VAD_FRAME: usize = 640;
const STATE: usize = 2 * 64;

/// Streaming silero VAD.
pub struct Vad {
    /// Plan with inputs `input` [1, 640], `h` and `c` [2, 1, 64].
    plan: OnnxPlan,
    /// LSTM hidden state carried between frames.
    h: [f32; STATE],
    /// LSTM cell state carried between frames.
    c: [f32; STATE],
}

impl Vad {
    /// Loads the folded silero model.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let plan = OnnxPlan::load(path, &[&[1, VAD_FRAME], &[2, 1, 64], &[2, 1, 64]])?;
        Ok(Vad {
            plan,
            h: [0.0; STATE],
            c: [0.0; STATE],
        })
    }

    /// Forgets the carried state.
    pub fn reset(&mut self) {
        self.h = [0.0; STATE];
        self.c = [0.0; STATE];
    }

    /// Speech probability of one 640-sample frame of f32 samples already
    /// scaled to -1..1; carries the state to the next call.
    pub fn frame_probability(&mut self, frame: &[f32]) -> Result<f32, ModelError> {
        if frame.len() != VAD_FRAME {
            return Err(ModelError::Input(format!(
                "a VAD frame is {VAD_FRAME} samples, got {}",
                frame.len()
            )));
        }
        self.plan.input_mut(0)?.copy_from_slice(frame);
        self.plan.input_mut(1)?.copy_from_slice(&self.h);
        self.plan.input_mut(2)?.copy_from_slice(&self.c);
        let outputs = self.plan.run()?;
        let mut p = [0.0f32];
        self.plan.read_output(&outputs, 0, &mut p)?;
        self.plan.read_output(&outputs, 1, &mut self.h)?;
        self.plan.read_output(&outputs, 2, &mut self.c)?;
        Ok(p[0])
    }

    /// Speech probability of one 1280-sample chunk of i16 audio: the mean
    /// over its two frames.
    pub fn chunk_probability(&mut self, chunk: &[i16]) -> Result<f32, ModelError> {
        if chunk.len() != CHUNK_SAMPLES {
            return Err(ModelError::Input(format!(
                "a chunk is {CHUNK_SAMPLES} samples, got {}",
                chunk.len()
            )));
        }
        let mut frame = [0.0f32; VAD_FRAME];
        let mut sum = 0.0;
        for part in chunk.chunks_exact(VAD_FRAME) {
            for (dst, s) in frame.iter_mut().zip(part) {
                *dst = f32::from(*s) / 32767.0;
            }
            sum += self.frame_probability(&frame)?;
        }
        Ok(sum / (CHUNK_SAMPLES / VAD_FRAME) as f32)
    }
}
