//! The default ALSA capture device as an [`AudioSource`], through cpal.
//!
//! cpal's callback copies samples into a bounded queue (about 2 s); the
//! reader downmixes and resamples to 16 kHz. A reader that falls behind loses
//! the oldest audio, never memory: overruns are counted.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};

use crate::AudioSource;
use crate::error::AudioError;
use crate::resample::MonoResampler;

/// Raw queue between cpal's callback and the reader.
struct Shared {
    /// Mono samples in i16 scale, bounded by `capacity`.
    queue: Mutex<(VecDeque<f32>, u64)>,
    /// Signalled when samples arrive.
    ready: Condvar,
    /// Maximum samples queued before the oldest are dropped.
    capacity: usize,
}

/// Live capture from a microphone.
pub struct MicSource {
    /// Keeps the capture running; dropping it stops capture.
    _stream: cpal::Stream,
    /// Queue shared with the callback.
    shared: Arc<Shared>,
    /// Device name, for messages.
    name: String,
    /// Device rate → 16 kHz.
    resampler: MonoResampler,
    /// Resampled samples not yet handed out.
    out: VecDeque<i16>,
    /// Scratch block moved out of the queue.
    block: Vec<f32>,
}

impl MicSource {
    /// Opens the default input device (or the one whose name contains `name`).
    pub fn open(name: Option<&str>) -> Result<Self, AudioError> {
        // ALSA may capture without a card (a plugin reading a file, a
        // network PCM), so try first and explain a missing card after.
        Self::open_device(name).map_err(|e| match e {
            AudioError::Mic(reason) if !alsa_has_cards() => AudioError::Mic(format!(
                "no sound card: ALSA lists none in /proc/asound/cards (is the device connected and its driver loaded? `arecord -l` lists capture devices); {reason}"
            )),
            other => other,
        })
    }

    fn open_device(name: Option<&str>) -> Result<Self, AudioError> {
        let host = cpal::default_host();
        let device = match name {
            None => host.default_input_device().ok_or_else(|| {
                AudioError::Mic(
                    "no capture device found (is a microphone connected? `arecord -l` lists them)"
                        .into(),
                )
            })?,
            Some(wanted) => host
                .input_devices()
                .map_err(|e| AudioError::Mic(e.to_string()))?
                .find(|d| d.name().map(|n| n.contains(wanted)).unwrap_or(false))
                .ok_or_else(|| {
                    AudioError::Mic(format!(
                        "no capture device named like {wanted:?} (`arecord -l` lists them)"
                    ))
                })?,
        };
        let device_name = device.name().unwrap_or_else(|_| "unknown".into());
        let config = device
            .default_input_config()
            .map_err(|e| AudioError::Mic(format!("{device_name}: {e}")))?;
        let rate = config.sample_rate().0;
        let channels = usize::from(config.channels());
        let shared = Arc::new(Shared {
            queue: Mutex::new((VecDeque::with_capacity(rate as usize * 2), 0)),
            ready: Condvar::new(),
            capacity: rate as usize * 2,
        });
        let err_fn = |e: cpal::StreamError| eprintln!("kith: microphone stream error: {e}");
        let stream_config: cpal::StreamConfig = config.clone().into();
        let stream = match config.sample_format() {
            cpal::SampleFormat::I16 => {
                let shared = Arc::clone(&shared);
                device.build_input_stream(
                    &stream_config,
                    move |data: &[i16], _| enqueue(&shared, data, channels, f32::from),
                    err_fn,
                    None,
                )
            }
            cpal::SampleFormat::F32 => {
                let shared = Arc::clone(&shared);
                device.build_input_stream(
                    &stream_config,
                    move |data: &[f32], _| enqueue(&shared, data, channels, |s| s * 32768.0),
                    err_fn,
                    None,
                )
            }
            other => {
                return Err(AudioError::Mic(format!(
                    "{device_name}: unsupported sample format {other:?}"
                )));
            }
        }
        .map_err(|e| AudioError::Mic(format!("{device_name}: {e}")))?;
        stream
            .play()
            .map_err(|e| AudioError::Mic(format!("{device_name}: {e}")))?;
        Ok(MicSource {
            _stream: stream,
            shared,
            name: format!("{device_name} ({rate} Hz, {channels} ch)"),
            resampler: MonoResampler::new(rate)?,
            out: VecDeque::with_capacity(4096),
            block: Vec::with_capacity(4096),
        })
    }

    /// Samples dropped because the reader fell behind.
    pub fn overruns(&self) -> u64 {
        self.shared.queue.lock().map(|q| q.1).unwrap_or(0)
    }
}

/// Whether the kernel reports any ALSA sound card.
fn alsa_has_cards() -> bool {
    std::fs::read_to_string("/proc/asound/cards")
        .map(|cards| !cards.contains("no soundcards") && !cards.trim().is_empty())
        .unwrap_or(false)
}

fn enqueue<T: Copy>(shared: &Shared, data: &[T], channels: usize, to_f32: impl Fn(T) -> f32) {
    let Ok(mut guard) = shared.queue.lock() else {
        return;
    };
    let (queue, dropped) = &mut *guard;
    for frame in data.chunks_exact(channels.max(1)) {
        let sum: f32 = frame.iter().map(|s| to_f32(*s)).sum();
        if queue.len() == shared.capacity {
            queue.pop_front();
            *dropped += 1;
        }
        queue.push_back(sum / frame.len() as f32);
    }
    shared.ready.notify_one();
}

impl AudioSource for MicSource {
    fn read(&mut self, buf: &mut [i16]) -> Result<usize, AudioError> {
        while self.out.is_empty() {
            self.block.clear();
            {
                let guard = self
                    .shared
                    .queue
                    .lock()
                    .map_err(|_| AudioError::Mic("capture thread panicked".into()))?;
                let (mut guard, _) = self
                    .shared
                    .ready
                    .wait_timeout_while(guard, Duration::from_secs(2), |q| q.0.is_empty())
                    .map_err(|_| AudioError::Mic("capture thread panicked".into()))?;
                if guard.0.is_empty() {
                    return Err(AudioError::Mic(format!(
                        "{}: no audio for 2 s (device busy or unplugged?)",
                        self.name
                    )));
                }
                self.block.extend(guard.0.drain(..));
            }
            let out = &mut self.out;
            self.resampler.push(&self.block, &mut |s| {
                out.push_back(s.round().clamp(-32768.0, 32767.0) as i16)
            })?;
        }
        let n = buf.len().min(self.out.len());
        for (dst, src) in buf.iter_mut().zip(self.out.drain(..n)) {
            *dst = src;
        }
        Ok(n)
    }

    fn describe(&self) -> String {
        format!("mic: {}", self.name)
    }
}
