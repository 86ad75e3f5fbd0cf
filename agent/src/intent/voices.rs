//! Synthetic speakers: espeak-ng's English voices with its voice variants,
//! and the MBROLA voices Debian packages, at many rates and pitches.
//!
//! Voices and rates are split once, here, into those training may use and
//! those kept for the held-out test, so a test figure is always on voices
//! and rates the model never heard: the test's voices are held-out variants
//! (timbres) of the training accents and a held-out MBROLA voice; one whole
//! accent (`en-029`) is kept out of training too and reported on its own.

use std::process::Command;

use anyhow::{Context, Result, bail};
use kith_hal::MonoResampler;

/// One synthetic speaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Voice {
    /// What espeak-ng's `-v` takes: `en-us+m3`, `mb-us1`.
    pub espeak: String,
}

impl Voice {
    /// Its timbre: the variant after `+` (`m3` of `en-us+m3`), or an
    /// MBROLA voice's whole name.
    pub fn variant(&self) -> &str {
        self.espeak.rsplit('+').next().unwrap_or(&self.espeak)
    }
}

/// espeak-ng English accents used for training (and, with held-out
/// variants, for the main test).
const TRAIN_ACCENTS: [&str; 7] = [
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-us-nyc",
];
/// An accent no training voice has: its own test row.
pub const HELD_OUT_ACCENT: &str = "en-029";
/// espeak-ng voice variants (timbre) used for training. Robotic, whispered
/// and croaking variants are left out; so are the siblings of the test's.
const TRAIN_VARIANTS: [&str; 51] = [
    "m1", "m2", "m3", "m4", "m5", "m6", "m8", "f1", "f2", "f3", "f5", "klatt", "klatt2", "klatt3",
    "klatt5", "klatt6", "Andy", "Annie", "Denis", "Gene", "Gene2", "Lee", "linda", "Alex",
    "Alicia", "Andrea", "Mike", "Michael", "adam", "anika", "aunty", "belinda", "benjamin",
    "boris", "caleb", "david", "ed", "edward", "grandma", "grandpa", "iven", "john", "max",
    "norbert", "paul", "quincy", "rob", "robert", "shelby", "travis", "victor",
];
/// Variants kept for the test.
const TEST_VARIANTS: [&str; 5] = ["m7", "f4", "klatt4", "michel", "steph"];
/// MBROLA voices (Debian's mbrola-us1/us2/us3/en1).
const TRAIN_MBROLA: [&str; 3] = ["mb-us1", "mb-us2", "mb-en1"];
const TEST_MBROLA: [&str; 1] = ["mb-us3"];
/// Speaking rates (words per minute): the test's rates are never trained on.
pub const TRAIN_RATES: [u32; 7] = [125, 135, 155, 165, 175, 195, 210];
pub const TEST_RATES: [u32; 2] = [145, 185];
/// Speed perturbation for training: the audio is resampled by a factor in
/// this range, which moves pitch, tempo and formants together (a shorter
/// or longer vocal tract); the test hears voices unperturbed.
pub const TRAIN_SPEED: (f32, f32) = (0.88, 1.12);

/// The voices of one split.
#[derive(Debug, Clone)]
pub struct VoiceSet {
    pub split: Split,
    pub voices: Vec<Voice>,
    pub rates: Vec<u32>,
    /// MBROLA voices found installed.
    pub mbrola: usize,
}

/// Which speakers a data set uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    /// Held-out variants of the training accents, and a held-out MBROLA voice.
    Test,
    /// Held-out variants of [`HELD_OUT_ACCENT`].
    Accent,
}

/// The voices of `split` that work on this machine. espeak-ng must be
/// installed; MBROLA voices are used when they are.
pub fn voices(split: Split) -> Result<VoiceSet> {
    let (accents, variants, mbrola, rates): (&[&str], &[&str], &[&str], &[u32]) = match split {
        Split::Train => (&TRAIN_ACCENTS, &TRAIN_VARIANTS, &TRAIN_MBROLA, &TRAIN_RATES),
        Split::Test => (&TRAIN_ACCENTS, &TEST_VARIANTS, &TEST_MBROLA, &TEST_RATES),
        Split::Accent => (&[HELD_OUT_ACCENT], &TEST_VARIANTS, &[], &TEST_RATES),
    };
    synthesize(
        &Voice {
            espeak: "en-us".into(),
        },
        160,
        50,
        1.0,
        "test",
    )
    .context(
        "espeak-ng does not run: install it (`apt-get install espeak-ng`; scripts/setup does)",
    )?;
    let mut list = Vec::new();
    for a in accents {
        for v in variants {
            list.push(Voice {
                espeak: format!("{a}+{v}"),
            });
        }
    }
    let mut found = 0;
    for m in mbrola {
        let voice = Voice {
            espeak: (*m).to_string(),
        };
        if synthesize(&voice, 160, 50, 1.0, "test").is_ok() {
            list.push(voice);
            found += 1;
        }
    }
    if found == 0 && !mbrola.is_empty() {
        tracing::warn!(
            split = ?split,
            "no MBROLA voice found: training uses espeak-ng's voices only (apt-get install mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1)"
        );
    }
    Ok(VoiceSet {
        split,
        voices: list,
        rates: rates.to_vec(),
        mbrola: found,
    })
}

/// Whether `voice` is one of the MBROLA voices (`mb-us1`, ...).
pub fn is_mbrola(voice: &Voice) -> bool {
    voice.espeak.starts_with("mb-")
}

/// Whether `voice` says every sound of `text`. espeak-ng's own voices
/// always do. An MBROLA voice lacks a diphone wherever espeak-ng's phoneme
/// table for it maps a sound to one its database does not hold (Debian
/// bookworm's `mb-us3` has no `O2`: "on", "off", "orange"); mbrola then
/// plays silence there and says so on stderr ("U-O2 unknown, replaced
/// with _-_"). A command with a word cut out is no fair clip to train or
/// test on.
pub fn can_say(voice: &Voice, text: &str) -> Result<bool> {
    if !is_mbrola(voice) || text.trim().is_empty() {
        return Ok(true);
    }
    let out = espeak(voice, &[], text)?;
    Ok(!String::from_utf8_lossy(&out.stderr).contains("unknown, replaced with"))
}

/// Speaks `text` at 16 kHz mono, `speed` times faster (and higher) than
/// the voice's own (1.0: as it is).
pub fn synthesize(
    voice: &Voice,
    rate: u32,
    pitch: u32,
    speed: f32,
    text: &str,
) -> Result<Vec<i16>> {
    let out = espeak(
        voice,
        &["-s", &rate.to_string(), "-p", &pitch.to_string()],
        text,
    )?;
    let (rate_hz, samples) = parse_stream_wav(&out.stdout)
        .with_context(|| format!("reading espeak-ng's output for voice {}", voice.espeak))?;
    if samples.is_empty() {
        bail!("espeak-ng -v {} produced no audio", voice.espeak);
    }
    // Read the samples as if recorded at a rate `speed` times theirs
    // (rounded to 100 Hz, which keeps the resampler's FFTs small).
    let from_hz = if (speed - 1.0).abs() < 1e-3 {
        rate_hz
    } else {
        ((rate_hz as f32 * speed / 100.0).round() as u32).max(1) * 100
    };
    resample(from_hz, &samples)
}

/// Runs espeak-ng with `voice` and `args` on `text`, the WAV on stdout;
/// an error if it fails.
fn espeak(voice: &Voice, args: &[&str], text: &str) -> Result<std::process::Output> {
    let out = Command::new("espeak-ng")
        .args(["-v", &voice.espeak])
        .args(args)
        .args(["--stdout", "--", text])
        .output()
        .context("running espeak-ng")?;
    if !out.status.success() {
        bail!(
            "espeak-ng -v {} failed: {}",
            voice.espeak,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// espeak-ng's `--stdout` WAV: a 44-byte PCM header whose lengths are
/// placeholders (it streams), then 16-bit mono samples.
fn parse_stream_wav(bytes: &[u8]) -> Result<(u32, Vec<i16>)> {
    if bytes.len() < 44 || &bytes[..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        bail!("not a WAV stream");
    }
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    let u32_at =
        |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    if &bytes[12..16] != b"fmt " || u16_at(20) != 1 || u16_at(22) != 1 || u16_at(34) != 16 {
        bail!("expected 16-bit mono PCM");
    }
    if &bytes[36..40] != b"data" {
        bail!("no data chunk where expected");
    }
    let rate = u32_at(24);
    let samples = bytes[44..]
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    Ok((rate, samples))
}

fn resample(rate_hz: u32, samples: &[i16]) -> Result<Vec<i16>> {
    let mut resampler = MonoResampler::new(rate_hz)?;
    let input: Vec<f32> = samples.iter().map(|&s| f32::from(s)).collect();
    let mut out = Vec::with_capacity(samples.len() * 16_000 / rate_hz.max(1) as usize + 16);
    let mut sink = |s: f32| out.push(s.round().clamp(-32768.0, 32767.0) as i16);
    resampler.push(&input, &mut sink)?;
    resampler.finish(&mut sink)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn voice(name: &str) -> Voice {
        Voice {
            espeak: name.into(),
        }
    }

    #[test]
    fn an_mbrola_voice_that_drops_a_vowel_cannot_say_the_words_that_hold_it() {
        let us3 = voice("mb-us3");
        if synthesize(&us3, 160, 50, 1.0, "test").is_err() {
            // scripts/setup installs the MBROLA voices where Debian has them.
            eprintln!("mbrola-us3 is not installed: nothing to check");
            return;
        }
        // Debian bookworm's espeak-ng maps "on" to O2, which us3 lacks.
        let turn_on = "turn the kitchen lights on";
        let sunny = "will it be sunny tomorrow";
        let said_on = can_say(&us3, turn_on).expect("espeak-ng runs");
        let said_sunny = can_say(&us3, sunny).expect("espeak-ng runs");
        assert!(said_sunny, "mb-us3 says {sunny:?} whole");
        if said_on {
            eprintln!("this espeak-ng maps O2 for us3: every word is said");
        }
        // Whatever the version, the check agrees with mbrola's own warnings.
        let out = espeak(&us3, &[], turn_on).expect("espeak-ng runs");
        let warned = String::from_utf8_lossy(&out.stderr).contains("unknown");
        assert_eq!(said_on, !warned);
        // espeak-ng's own voices are not checked: they say every sound.
        assert!(can_say(&voice("en-us+m3"), turn_on).expect("no process needed"));
    }

    #[test]
    fn a_voice_variant_is_its_timbre_whatever_the_accent() {
        assert_eq!(voice("en-gb-scotland+steph").variant(), "steph");
        assert_eq!(voice("en-us+steph").variant(), "steph");
        assert_eq!(voice("mb-us3").variant(), "mb-us3");
    }
}
