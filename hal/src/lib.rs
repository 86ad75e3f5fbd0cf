//! kith-hal: the device.
//!
//! Audio capture behind one trait, [`AudioSource`], with a microphone
//! implementation (cpal/ALSA, feature `mic`) and a WAV file implementation
//! that tests and batch jobs use the same way. Every source delivers 16 kHz
//! mono i16, whatever it reads. This crate knows nothing about models or
//! networks. [`telemetry`] reads what the process uses.

mod error;
#[cfg(feature = "mic")]
mod mic;
mod resample;
pub mod telemetry;
mod wav;

pub use error::AudioError;
#[cfg(feature = "mic")]
pub use mic::MicSource;
pub use resample::MonoResampler;
pub use wav::{WavInfo, WavSource};

/// The sample rate every [`AudioSource`] delivers, in Hz.
pub const SAMPLE_RATE: u32 = 16_000;

/// A stream of 16 kHz mono i16 audio.
pub trait AudioSource {
    /// Fills `buf` with the next samples and returns how many were written.
    /// `Ok(0)` means the stream ended. An error comes only after every
    /// sample before it was delivered.
    fn read(&mut self, buf: &mut [i16]) -> Result<usize, AudioError>;

    /// A short human description ("a.wav (48000 Hz, 2 ch, 16-bit)", "mic: default").
    fn describe(&self) -> String;
}
