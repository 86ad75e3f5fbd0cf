//! WAV files of every shape a user might hand kith, good and bad.

use std::path::{Path, PathBuf};

use hound::{SampleFormat, WavSpec, WavWriter};
use kith_hal::{AudioError, AudioSource, WavSource};

/// Writes a sine of `hz` at `rate` with `channels` channels for `secs` seconds.
fn write_sine(path: &Path, rate: u32, channels: u16, bits: u16, float: bool, hz: f32, secs: f32) {
    let spec = WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: bits,
        sample_format: if float {
            SampleFormat::Float
        } else {
            SampleFormat::Int
        },
    };
    let mut w = WavWriter::create(path, spec).expect("create wav");
    let frames = (rate as f32 * secs) as usize;
    for i in 0..frames {
        // f64 phase: f32 loses whole samples past 2^24 (a 10-minute file).
        let v = (0.5
            * (2.0 * std::f64::consts::PI * f64::from(hz) * i as f64 / f64::from(rate)).sin())
            as f32;
        for _ in 0..channels {
            if float {
                w.write_sample(v).expect("write");
            } else {
                let max = (1i64 << (bits - 1)) as f32 - 1.0;
                w.write_sample((v * max) as i32).expect("write");
            }
        }
    }
    w.finalize().expect("finalize");
}

fn read_all(path: &Path) -> Result<Vec<i16>, (Vec<i16>, AudioError)> {
    let mut src = WavSource::open(path).map_err(|e| (Vec::new(), e))?;
    let mut out = Vec::new();
    let mut buf = [0i16; 1000];
    loop {
        match src.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return Err((out, e)),
        }
    }
}

/// Frequency estimated from zero crossings.
fn frequency(samples: &[i16]) -> f32 {
    let crossings = samples
        .windows(2)
        .filter(|w| (w[0] < 0) != (w[1] < 0))
        .count();
    crossings as f32 / 2.0 / (samples.len() as f32 / 16_000.0)
}

fn amplitude(samples: &[i16]) -> f32 {
    samples
        .iter()
        .map(|s| i32::from(*s).abs())
        .max()
        .unwrap_or(0) as f32
        / 32768.0
}

fn tmp(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

#[test]
fn sixteen_khz_mono_16_bit_passes_through_bit_exact() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = tmp(&dir, "a.wav");
    write_sine(&p, 16_000, 1, 16, false, 440.0, 0.5);
    let expected: Vec<i16> = hound::WavReader::open(&p)
        .expect("open")
        .samples::<i16>()
        .map(|s| s.expect("s"))
        .collect();
    assert_eq!(read_all(&p).expect("read"), expected);
}

#[test]
fn a_48_khz_stereo_file_becomes_16_khz_mono_with_pitch_and_length_kept() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = tmp(&dir, "a.wav");
    write_sine(&p, 48_000, 2, 16, false, 440.0, 1.0);
    let out = read_all(&p).expect("read");
    assert_eq!(out.len(), 16_000, "one second of 16 kHz");
    let f = frequency(&out[1000..15000]);
    assert!((f - 440.0).abs() < 5.0, "pitch kept: {f} Hz");
    let a = amplitude(&out[1000..15000]);
    assert!((a - 0.5).abs() < 0.03, "level kept: {a}");
}

#[test]
fn eight_bit_24_bit_and_float_files_decode_to_the_same_tone() {
    let dir = tempfile::tempdir().expect("tmp");
    for (bits, float, rate) in [
        (8, false, 8_000),
        (24, false, 44_100),
        (32, false, 22_050),
        (32, true, 16_000),
    ] {
        let p = tmp(&dir, &format!("{bits}-{float}.wav"));
        write_sine(&p, rate, 1, bits, float, 300.0, 0.5);
        let out = read_all(&p).expect("read");
        assert_eq!(out.len(), 8_000, "{bits}-bit {rate} Hz: half a second");
        let f = frequency(&out[500..7500]);
        assert!((f - 300.0).abs() < 5.0, "{bits}-bit: {f} Hz");
        assert!(
            (amplitude(&out[500..7500]) - 0.5).abs() < 0.03,
            "{bits}-bit level"
        );
    }
}

#[test]
fn an_empty_file_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = tmp(&dir, "empty.wav");
    std::fs::write(&p, b"").expect("write");
    let e = WavSource::open(&p).err().expect("must fail");
    assert!(matches!(e, AudioError::Empty { .. }), "{e}");
    assert!(e.to_string().contains("empty"), "{e}");
}

#[test]
fn a_file_that_is_not_wav_is_a_clear_error_with_a_fix() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = tmp(&dir, "song.mp3");
    std::fs::write(
        &p,
        b"ID3\x03\x00\x00\x00\x00\x00\x00 this is an mp3, honest",
    )
    .expect("write");
    let e = WavSource::open(&p).err().expect("must fail");
    assert!(matches!(e, AudioError::NotWav { .. }), "{e}");
    assert!(
        e.to_string().contains("not a WAV file") && e.to_string().contains("sox"),
        "{e}"
    );
}

#[test]
fn a_missing_file_names_the_path() {
    let e = WavSource::open(Path::new("/nonexistent/kith.wav"))
        .err()
        .expect("must fail");
    assert!(e.to_string().contains("/nonexistent/kith.wav"), "{e}");
}

#[test]
fn a_truncated_file_delivers_every_sample_present_then_says_it_was_truncated() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = tmp(&dir, "cut.wav");
    write_sine(&p, 16_000, 1, 16, false, 440.0, 1.0);
    let bytes = std::fs::read(&p).expect("read");
    // Keep the header (44 bytes) and 0.25 s of samples.
    std::fs::write(&p, &bytes[..44 + 8_000]).expect("write");
    let (delivered, e) = read_all(&p).expect_err("must report truncation");
    assert_eq!(delivered.len(), 4_000, "all 0.25 s present were delivered");
    assert!(
        matches!(
            e,
            AudioError::Truncated {
                declared_ms: 1000,
                read_ms: 250,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn a_header_cut_short_is_not_wav() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = tmp(&dir, "hdr.wav");
    write_sine(&p, 16_000, 1, 16, false, 440.0, 0.1);
    let bytes = std::fs::read(&p).expect("read");
    std::fs::write(&p, &bytes[..20]).expect("write");
    let e = WavSource::open(&p).err().expect("must fail");
    assert!(matches!(e, AudioError::NotWav { .. }), "{e}");
}

#[test]
fn a_ten_minute_file_streams_through_with_its_exact_length() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = tmp(&dir, "long.wav");
    write_sine(&p, 44_100, 1, 16, false, 1000.0, 600.0);
    let mut src = WavSource::open(&p).expect("open");
    assert_eq!(src.info().duration_ms(), 600_000);
    let mut buf = [0i16; 1280];
    let mut total = 0usize;
    let mut last_chunk_freq = 0.0;
    loop {
        let n = src.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n;
        assert!(
            n == buf.len() || total == 600 * 16_000,
            "full chunks until the end"
        );
        last_chunk_freq = frequency(&buf[..n]);
    }
    assert_eq!(total, 600 * 16_000);
    assert!(
        (last_chunk_freq - 1000.0).abs() < 30.0,
        "still the same tone at the end: {last_chunk_freq}"
    );
}

#[test]
fn a_wav_held_in_memory_reads_like_the_file_and_names_itself_in_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = tmp(&dir, "tone.wav");
    write_sine(&p, 48_000, 2, 16, false, 440.0, 0.5);
    let bytes = std::fs::read(&p).expect("read");
    let from_file = read_all(&p).expect("file reads");
    let mut src = WavSource::from_bytes("upload.wav", bytes.clone()).expect("bytes open");
    let mut from_memory = Vec::new();
    let mut buf = [0i16; 1000];
    loop {
        match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => from_memory.extend_from_slice(&buf[..n]),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(from_memory, from_file);
    let e = WavSource::from_bytes("upload.wav", bytes[..20].to_vec())
        .err()
        .expect("a cut header is rejected");
    assert!(e.to_string().contains("upload.wav"), "{e}");
}
