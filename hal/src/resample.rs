//! Mono resampling to 16 kHz with rubato's FFT resampler, streaming, with
//! its delay trimmed so sample `n` of the output lines up with time `n/16000`.

use rubato::{FftFixedIn, Resampler};

use crate::SAMPLE_RATE;
use crate::error::AudioError;

/// Samples fed to the resampler per call.
const BLOCK: usize = 1024;

/// Streaming mono resampler from any rate to 16 kHz. At 16 kHz it passes
/// samples through unchanged.
pub struct MonoResampler {
    /// Input rate in Hz.
    from_hz: u32,
    /// The FFT resampler; `None` when the input is already 16 kHz.
    fft: Option<FftFixedIn<f32>>,
    /// Input samples waiting for a full block.
    pending: Vec<f32>,
    /// Output buffer for one block.
    out: Vec<Vec<f32>>,
    /// Output samples still to drop (the resampler's delay).
    delay_left: usize,
    /// Input samples seen, to know how much output the end should yield.
    consumed: u64,
    /// Output samples delivered.
    produced: u64,
}

impl MonoResampler {
    /// A resampler from `from_hz` to 16 kHz.
    pub fn new(from_hz: u32) -> Result<Self, AudioError> {
        let fail = |reason: String| AudioError::Resample { from_hz, reason };
        if from_hz == 0 {
            return Err(fail("the sample rate is 0".into()));
        }
        let fft = if from_hz == SAMPLE_RATE {
            None
        } else {
            Some(
                FftFixedIn::<f32>::new(from_hz as usize, SAMPLE_RATE as usize, BLOCK, 2, 1)
                    .map_err(|e| fail(e.to_string()))?,
            )
        };
        let out_len = fft.as_ref().map_or(0, |f| f.output_frames_max());
        Ok(MonoResampler {
            from_hz,
            delay_left: fft.as_ref().map_or(0, |f| f.output_delay()),
            fft,
            pending: Vec::with_capacity(BLOCK),
            out: vec![vec![0.0; out_len]],
            consumed: 0,
            produced: 0,
        })
    }

    /// Feeds input samples (any scale); passes the resampled ones to `sink`.
    pub fn push(&mut self, input: &[f32], sink: &mut impl FnMut(f32)) -> Result<(), AudioError> {
        self.consumed += input.len() as u64;
        if self.fft.is_none() {
            self.produced += input.len() as u64;
            input.iter().for_each(|s| sink(*s));
            return Ok(());
        }
        for s in input {
            self.pending.push(*s);
            if self.pending.len() == BLOCK {
                let range = self.process_block()?;
                for s in &self.out[0][range] {
                    self.produced += 1;
                    sink(*s);
                }
                self.pending.clear();
            }
        }
        Ok(())
    }

    /// Flushes the tail at the end of the stream: the output then holds
    /// exactly `input length × 16000 / rate` samples.
    pub fn finish(&mut self, sink: &mut impl FnMut(f32)) -> Result<(), AudioError> {
        if self.fft.is_none() {
            return Ok(());
        }
        let expected = self.consumed * u64::from(SAMPLE_RATE) / u64::from(self.from_hz);
        // Zero-pad until the delayed output has caught up with the input.
        for _ in 0..8 {
            if self.produced >= expected {
                break;
            }
            self.pending.resize(BLOCK, 0.0);
            let range = self.process_block()?;
            for s in &self.out[0][range] {
                if self.produced < expected {
                    self.produced += 1;
                    sink(*s);
                }
            }
            self.pending.clear();
        }
        Ok(())
    }

    /// Resamples the full block in `pending`; returns the new output range in `out[0]`.
    fn process_block(&mut self) -> Result<std::ops::Range<usize>, AudioError> {
        let from_hz = self.from_hz;
        let Some(fft) = self.fft.as_mut() else {
            return Ok(0..0);
        };
        let (_, written) = fft
            .process_into_buffer(&[&self.pending[..]], &mut self.out, None)
            .map_err(|e| AudioError::Resample {
                from_hz,
                reason: e.to_string(),
            })?;
        let skip = self.delay_left.min(written);
        self.delay_left -= skip;
        Ok(skip..written)
    }
}
