//! The microphone path through real ALSA and cpal, with no sound card: an
//! ALSA configuration whose default capture device is the `file` plugin
//! reading a raw recording. It checks that capture opens, that ALSA's
//! format and rate conversion, the downmix and the resampler deliver the
//! recording's audio as 16 kHz mono. (The plugin is not paced in real time,
//! so this checks delivery, not timing.)
#![cfg(feature = "mic")]

use kith_hal::{AudioSource, MicSource};

#[test]
fn a_capture_device_delivers_its_audio_as_16_khz_mono() {
    let dir = tempfile::tempdir().expect("tmp");
    // 0.5 s of silence, then 0.5 s of a 440 Hz tone at half scale, 16 kHz mono s16le.
    let mut raw = Vec::new();
    for i in 0..16_000u32 {
        let v = if i < 8_000 {
            0.0
        } else {
            0.5 * (2.0 * std::f64::consts::PI * 440.0 * f64::from(i) / 16_000.0).sin()
        };
        raw.extend_from_slice(&((v * 32767.0) as i16).to_le_bytes());
    }
    let recording = dir.path().join("recording.raw");
    std::fs::write(&recording, raw).expect("write");
    let config = dir.path().join("asound.conf");
    std::fs::write(
        &config,
        format!(
            "pcm.null {{ type null }}\n\
             pcm.recording {{ type file slave.pcm \"null\" file \"/dev/null\" infile \"{}\" format \"raw\" }}\n\
             pcm.!default {{ type plug slave {{ pcm \"recording\" format S16_LE rate 16000 channels 1 }} }}\n",
            recording.display()
        ),
    )
    .expect("write");
    // SAFETY: the only test in this binary; set before any audio thread starts.
    unsafe { std::env::set_var("ALSA_CONFIG_PATH", &config) };

    let mut mic = MicSource::open(None).expect("the file-backed default device opens");
    let mut buf = [0i16; 1280];
    let mut loudest = 0i16;
    let mut samples = 0usize;
    for _ in 0..200 {
        let n = mic.read(&mut buf).expect("read");
        samples += n;
        loudest = loudest.max(
            buf[..n]
                .iter()
                .map(|s| s.saturating_abs())
                .max()
                .unwrap_or(0),
        );
        if loudest > 10_000 {
            break;
        }
    }
    // The next chunk lies inside the tone: its pitch survived ALSA's
    // conversion to the device's format and kith's resampling back.
    let n = mic.read(&mut buf).expect("read");
    let crossings = buf[..n]
        .windows(2)
        .filter(|w| (w[0] < 0) != (w[1] < 0))
        .count();
    let hz = crossings as f32 / 2.0 / (n as f32 / 16_000.0);
    assert!(
        (400.0..480.0).contains(&hz),
        "pitch {hz} Hz from {}",
        mic.describe()
    );
    assert!(
        (14_000..=18_000).contains(&loudest),
        "the tone arrives at half scale (got peak {loudest} after {samples} samples) from {}",
        mic.describe()
    );
}
