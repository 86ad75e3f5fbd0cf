//! WAV files as an [`AudioSource`]: any rate, any channel count, 8/16/24/32-bit
//! integer or 32-bit float, read in blocks (a 10-minute file uses as little
//! memory as a 1-second one), downmixed and resampled to 16 kHz mono.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Cursor, Read};
use std::path::{Path, PathBuf};

use hound::{SampleFormat, WavReader};

use crate::error::AudioError;
use crate::resample::MonoResampler;
use crate::{AudioSource, SAMPLE_RATE};

/// Frames read from the file per block.
const BLOCK_FRAMES: usize = 2048;

/// What a WAV header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WavInfo {
    pub sample_rate: u32,
    pub channels: u16,
    pub bits: u16,
    pub float: bool,
    /// Frames (samples per channel) the header declares.
    pub frames: u64,
}

impl WavInfo {
    /// Declared duration in milliseconds.
    pub fn duration_ms(&self) -> u64 {
        self.frames * 1000 / u64::from(self.sample_rate.max(1))
    }
}

/// A WAV file delivering 16 kHz mono i16.
pub struct WavSource {
    /// The file, for messages.
    path: PathBuf,
    /// hound's reader, positioned at the next unread sample.
    reader: WavReader<Box<dyn Read + Send>>,
    /// The header.
    info: WavInfo,
    /// Factor that brings a raw sample to i16 scale.
    scale: f32,
    /// Downmix + resample state.
    resampler: MonoResampler,
    /// One block of mono input.
    mono: Vec<f32>,
    /// Converted samples not yet handed out.
    ready: VecDeque<i16>,
    /// Frames read from the file so far.
    frames_read: u64,
    /// The input is exhausted (resampler flushed).
    ended: bool,
    /// An error met while reading, reported once `ready` is drained.
    failure: Option<AudioError>,
}

impl WavSource {
    /// Opens and validates `path`.
    pub fn open(path: &Path) -> Result<Self, AudioError> {
        let file = File::open(path).map_err(|source| AudioError::Open {
            path: path.into(),
            source,
        })?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len == 0 {
            return Err(AudioError::Empty { path: path.into() });
        }
        Self::from_reader(path, Box::new(BufReader::new(file)))
    }

    /// A WAV file held in memory (an upload, say); `name` is used in messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self, AudioError> {
        let path = Path::new(name);
        if bytes.is_empty() {
            return Err(AudioError::Empty { path: path.into() });
        }
        Self::from_reader(path, Box::new(Cursor::new(bytes)))
    }

    fn from_reader(path: &Path, input: Box<dyn Read + Send>) -> Result<Self, AudioError> {
        let reader = WavReader::new(input).map_err(|e| match e {
            hound::Error::Unsupported => AudioError::Unsupported {
                path: path.into(),
                reason: "hound cannot decode this format (compressed WAV?)".into(),
            },
            other => AudioError::NotWav {
                path: path.into(),
                reason: other.to_string(),
            },
        })?;
        let spec = reader.spec();
        let float = spec.sample_format == SampleFormat::Float;
        let scale = match (spec.sample_format, spec.bits_per_sample) {
            (SampleFormat::Int, b @ 8..=32) => 2f32.powi(16 - i32::from(b)),
            (SampleFormat::Float, 32) => 32768.0,
            (f, b) => {
                return Err(AudioError::Unsupported {
                    path: path.into(),
                    reason: format!(
                        "{b}-bit {f:?} samples (supported: 8/16/24/32-bit integer, 32-bit float)"
                    ),
                });
            }
        };
        if spec.channels == 0 {
            return Err(AudioError::Unsupported {
                path: path.into(),
                reason: "0 channels".into(),
            });
        }
        let info = WavInfo {
            sample_rate: spec.sample_rate,
            channels: spec.channels,
            bits: spec.bits_per_sample,
            float,
            frames: u64::from(reader.duration()),
        };
        let resampler = MonoResampler::new(spec.sample_rate)?;
        Ok(WavSource {
            path: path.into(),
            reader,
            info,
            scale,
            resampler,
            mono: Vec::with_capacity(BLOCK_FRAMES),
            ready: VecDeque::with_capacity(BLOCK_FRAMES * 4),
            frames_read: 0,
            ended: false,
            failure: None,
        })
    }

    /// The header.
    pub fn info(&self) -> WavInfo {
        self.info
    }

    /// Reads one block from the file into `ready`.
    fn fill(&mut self) -> Result<(), AudioError> {
        let channels = usize::from(self.info.channels);
        let wanted = BLOCK_FRAMES * channels;
        self.mono.clear();
        let (taken, failure) = if self.info.float {
            downmix(
                self.reader.samples::<f32>().take(wanted),
                channels,
                &mut self.mono,
                |v| v,
            )
        } else {
            downmix(
                self.reader.samples::<i32>().take(wanted),
                channels,
                &mut self.mono,
                |v| v as f32,
            )
        };
        self.frames_read += self.mono.len() as u64;
        let scale = self.scale;
        let ready = &mut self.ready;
        let mut sink = |s: f32| ready.push_back(to_i16(s * scale));
        self.resampler.push(&self.mono, &mut sink)?;
        if let Some(e) = failure {
            self.resampler.finish(&mut sink)?;
            self.ended = true;
            // hound reports a short data chunk as an I/O or a format error
            // depending on where the bytes stop; before the declared end,
            // both mean the file was cut.
            self.failure = Some(if self.frames_read < self.info.frames {
                AudioError::Truncated {
                    path: self.path.clone(),
                    declared_ms: self.info.duration_ms(),
                    read_ms: self.frames_read * 1000 / u64::from(self.info.sample_rate),
                }
            } else {
                AudioError::Read {
                    path: self.path.clone(),
                    reason: e.to_string(),
                }
            });
        } else if taken < wanted {
            self.resampler.finish(&mut sink)?;
            self.ended = true;
        }
        Ok(())
    }
}

/// Averages interleaved samples into mono frames; returns the samples taken
/// and the error that stopped the read, if any.
fn downmix<S>(
    samples: impl Iterator<Item = hound::Result<S>>,
    channels: usize,
    mono: &mut Vec<f32>,
    to_f32: impl Fn(S) -> f32,
) -> (usize, Option<hound::Error>) {
    let mut frame_sum = 0.0f32;
    let mut in_frame = 0usize;
    let mut taken = 0usize;
    for s in samples {
        taken += 1;
        match s {
            Ok(v) => {
                frame_sum += to_f32(v);
                in_frame += 1;
            }
            Err(e) => return (taken, Some(e)),
        }
        if in_frame == channels {
            mono.push(frame_sum / channels as f32);
            frame_sum = 0.0;
            in_frame = 0;
        }
    }
    (taken, None)
}

fn to_i16(s: f32) -> i16 {
    s.round().clamp(-32768.0, 32767.0) as i16
}

impl AudioSource for WavSource {
    fn read(&mut self, buf: &mut [i16]) -> Result<usize, AudioError> {
        // Fill the whole buffer when the file has enough: callers get full chunks.
        while self.ready.len() < buf.len() && !self.ended {
            self.fill()?;
        }
        if self.ready.is_empty() {
            return match self.failure.take() {
                Some(e) => Err(e),
                None => Ok(0),
            };
        }
        let n = buf.len().min(self.ready.len());
        for (dst, src) in buf.iter_mut().zip(self.ready.drain(..n)) {
            *dst = src;
        }
        Ok(n)
    }

    fn describe(&self) -> String {
        let i = self.info;
        let kind = if i.float { "float" } else { "int" };
        let resampled = if i.sample_rate == SAMPLE_RATE && i.channels == 1 {
            ""
        } else {
            ", converted to 16 kHz mono"
        };
        format!(
            "{} ({} Hz, {} ch, {}-bit {kind}, {} ms{resampled})",
            self.path.display(),
            i.sample_rate,
            i.channels,
            i.bits,
            i.duration_ms()
        )
    }
}
