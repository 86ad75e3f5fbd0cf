//! Synthetic speakers: espeak-ng's English voices with its voice variants,
//! and the MBROLA voices Debian packages, at many rates and pitches.
//!
//! Voices and rates are split once, here, into those training may use and
//! those kept for the held-out test, so a test figure is always on voices
//! and rates the model never heard: the test's voices are held-out variants
//! (timbres) of the training accents and a held-out MBROLA voice; one whole
//! accent (`en-029`) is kept out of training too and reported on its own.
//!
//! Training may add *mixed* variants ([`MixedVariants`]): new timbres made
//! by crossing two training variants' voice files and jittering their
//! formants and pitch. They give training many more speakers from the same
//! population as the named variants, never from the test's.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use kith_hal::MonoResampler;
use kith_models::intent::grammar::Rng;

/// One synthetic speaker.
#[derive(Clone, PartialEq, Eq)]
pub struct Voice {
    /// What espeak-ng's `-v` takes: `en-us+m3`, `mb-us1`.
    pub espeak: String,
    /// espeak-ng's data directory to use (`ESPEAK_DATA_PATH`) when the
    /// variant is one of [`MixedVariants`]; `None`: the installed one.
    pub data: Option<Arc<Path>>,
}

impl Voice {
    fn named(espeak: impl Into<String>) -> Voice {
        Voice {
            espeak: espeak.into(),
            data: None,
        }
    }
}

/// A voice is known by its name alone: a mixed variant's name is the hash
/// of its voice file, so the name is what the feature cache keys on (the
/// data directory is a temporary place).
impl std::fmt::Debug for Voice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Voice({})", self.espeak)
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
    /// Voices with a [`MixedVariants`] variant.
    pub mixed: usize,
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
    synthesize(&Voice::named("en-us"), 160, 50, 1.0, "test").context(
        "espeak-ng does not run: install it (`apt-get install espeak-ng`; scripts/setup does)",
    )?;
    let mut list = Vec::new();
    for a in accents {
        for v in variants {
            list.push(Voice::named(format!("{a}+{v}")));
        }
    }
    let mut found = 0;
    for m in mbrola {
        let voice = Voice::named(*m);
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
        mixed: 0,
    })
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
    let mut cmd = Command::new("espeak-ng");
    if let Some(data) = &voice.data {
        cmd.env("ESPEAK_DATA_PATH", data.as_ref());
    }
    let out = cmd
        .args([
            "-v",
            &voice.espeak,
            "-s",
            &rate.to_string(),
            "-p",
            &pitch.to_string(),
        ])
        .arg("--stdout")
        .arg("--")
        .arg(text)
        .output()
        .context("running espeak-ng")?;
    if !out.status.success() {
        bail!(
            "espeak-ng -v {} failed: {}",
            voice.espeak,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
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

/// Mixed espeak-ng variants: voice files made by crossing two of the
/// training variants (each setting taken from one parent or the other),
/// then moving every formant's frequency by up to ±8 % and the pitch by up
/// to ±12 %. They live in private copies of espeak-ng's data directory
/// (links to the installed files, plus the new variants), removed on drop.
pub struct MixedVariants {
    /// The private data directories (each holds `espeak-ng-data/`); variant
    /// `i` is in directory `i / PER_DIRECTORY`.
    dirs: Vec<Arc<Path>>,
    /// Removes the directories on drop.
    _temp: Vec<tempfile::TempDir>,
    /// The variants' names (`kith-` and the hash of their file).
    pub names: Vec<String>,
}

/// How far a mixed variant's formant frequencies and pitch may move from
/// its parents' (as factors).
const FORMANT_JITTER: (f32, f32) = (0.92, 1.08);
const PITCH_JITTER: (f32, f32) = (0.88, 1.12);
/// Variants per private data directory: espeak-ng lists at most 349 voices
/// (languages and variants together, 130-odd of them languages), and a
/// voice past that limit "does not exist".
const PER_DIRECTORY: usize = 100;

impl MixedVariants {
    /// Makes `count` mixed variants from the training variants, the same
    /// ones for the same `seed`.
    pub fn make(count: usize, seed: u64) -> Result<MixedVariants> {
        let installed = espeak_data_dir()?;
        let variants_dir = installed.join("voices").join("!v");
        let mut parents = Vec::new();
        for name in TRAIN_VARIANTS {
            let path = variants_dir.join(name);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading espeak-ng's variant {}", path.display()))?;
            parents.push(VariantFile::parse(&text));
        }
        let mut rng = Rng::new(seed ^ 0x6D69_7865_645F_7631);
        let mut names: Vec<String> = Vec::with_capacity(count);
        let mut temp = Vec::new();
        let mut dirs: Vec<Arc<Path>> = Vec::new();
        let mut own_variants = PathBuf::new();
        while names.len() < count {
            let a = &parents[rng.below(parents.len())];
            let b = &parents[rng.below(parents.len())];
            let body = VariantFile::cross(a, b, &mut rng).render();
            let name = format!("kith-{}", &super::train::grammar_hash(&body)[..12]);
            if names.contains(&name) {
                continue;
            }
            if names.len().is_multiple_of(PER_DIRECTORY) {
                // A new data directory: the installed data but its voices,
                // and a variants folder holding only ours.
                let dir = tempfile::Builder::new()
                    .prefix("kith-espeak-")
                    .tempdir()
                    .context("creating a directory for mixed espeak-ng variants")?;
                let data = dir.path().join("espeak-ng-data");
                own_variants = data.join("voices").join("!v");
                std::fs::create_dir_all(&own_variants)
                    .with_context(|| format!("creating {}", own_variants.display()))?;
                link_entries(&installed, &data, "voices")?;
                dirs.push(Arc::from(dir.path()));
                temp.push(dir);
            }
            let text = format!("language variant\nname {name}\n{body}");
            std::fs::write(own_variants.join(&name), text)
                .with_context(|| format!("writing the variant {name}"))?;
            names.push(name);
        }
        let mixed = MixedVariants {
            dirs,
            _temp: temp,
            names,
        };
        // espeak-ng falls back to the plain voice for a variant it cannot
        // read: check that the first of each directory speaks differently.
        let plain = synthesize(&Voice::named("en-us"), 160, 50, 1.0, "test")?;
        for i in (0..mixed.names.len()).step_by(PER_DIRECTORY) {
            if synthesize(&mixed.voice("en-us", i), 160, 50, 1.0, "test")? == plain {
                bail!(
                    "espeak-ng did not read the mixed variant {}",
                    mixed.names[i]
                );
            }
        }
        Ok(mixed)
    }

    /// Mixed variant `i` in `accent`.
    pub fn voice(&self, accent: &str, i: usize) -> Voice {
        Voice {
            espeak: format!("{accent}+{}", self.names[i]),
            data: self.dirs.get(i / PER_DIRECTORY).cloned(),
        }
    }

    /// Adds every mixed variant of every training accent to `set`.
    pub fn extend(&self, set: &mut VoiceSet) {
        for a in TRAIN_ACCENTS {
            for i in 0..self.names.len() {
                set.voices.push(self.voice(a, i));
            }
        }
        set.mixed += self.names.len() * TRAIN_ACCENTS.len();
    }
}

/// Links every entry of `from` into `to`, except `skip`.
fn link_entries(from: &Path, to: &Path, skip: &str) -> Result<()> {
    let entries = std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("reading {}", from.display()))?;
        if e.file_name() == skip {
            continue;
        }
        let target = to.join(e.file_name());
        std::os::unix::fs::symlink(e.path(), &target)
            .with_context(|| format!("linking {}", target.display()))?;
    }
    Ok(())
}

/// Where espeak-ng keeps its data (`espeak-ng --version` says).
fn espeak_data_dir() -> Result<PathBuf> {
    let out = Command::new("espeak-ng")
        .arg("--version")
        .output()
        .context("running espeak-ng --version")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let path = text
        .split("Data at:")
        .nth(1)
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .context("espeak-ng --version does not say where its data is")?;
    Ok(PathBuf::from(path))
}

/// The settings of an espeak-ng voice variant file, keyed by what one line
/// sets (`pitch`, `formant 3`, `klatt`, ...); `language` and `name` are
/// left out, since a new variant has its own.
#[derive(Debug, Clone, Default)]
struct VariantFile {
    settings: Vec<(String, Vec<String>)>,
}

impl VariantFile {
    fn parse(text: &str) -> VariantFile {
        let mut settings = Vec::new();
        for line in text.lines() {
            let line = line.split("//").next().unwrap_or("").trim();
            let mut words = line.split_whitespace();
            let Some(key) = words.next() else { continue };
            let key = key.to_ascii_lowercase();
            if key == "language" || key == "name" {
                continue;
            }
            let values: Vec<String> = words.map(str::to_string).collect();
            let key = match (key.as_str(), values.first()) {
                ("formant", Some(n)) => format!("formant {n}"),
                _ => key,
            };
            let values = if key.starts_with("formant ") {
                values[1..].to_vec()
            } else {
                values
            };
            settings.push((key, values));
        }
        VariantFile { settings }
    }

    /// Each setting of either parent, taken from a random one of them
    /// (absent if that parent lacks it), with formant frequencies and
    /// pitch jittered.
    fn cross(a: &VariantFile, b: &VariantFile, rng: &mut Rng) -> VariantFile {
        let mut keys: Vec<&str> = Vec::new();
        for (k, _) in a.settings.iter().chain(&b.settings) {
            if !keys.contains(&k.as_str()) {
                keys.push(k);
            }
        }
        let pitch_factor = rng.range(PITCH_JITTER.0, PITCH_JITTER.1);
        let mut settings = Vec::new();
        for key in keys {
            let parent = if rng.unit() < 0.5 { a } else { b };
            let jitter = rng.range(FORMANT_JITTER.0, FORMANT_JITTER.1);
            let Some((_, values)) = parent.settings.iter().find(|(k, _)| k == key) else {
                continue;
            };
            let mut values = values.clone();
            let factor = if key == "pitch" {
                Some(pitch_factor)
            } else if key.starts_with("formant ") {
                Some(jitter)
            } else {
                None
            };
            if let Some(f) = factor {
                // The first number of a formant line is its frequency (%);
                // both numbers of `pitch` are Hz.
                let n = if key == "pitch" { 2 } else { 1 };
                for v in values.iter_mut().take(n) {
                    if let Ok(x) = v.parse::<f32>() {
                        *v = format!("{}", (x * f).round() as i64);
                    }
                }
            }
            settings.push((key.to_string(), values));
        }
        VariantFile { settings }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for (key, values) in &self.settings {
            let _ = writeln!(out, "{key} {}", values.join(" "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M3: &str = "language variant\nname male3\ngender male\npitch 80 122\n\
        formant 0 100 100 100\nformant 1  96  97 100\nconsonants 100\n";
    const F4: &str = "language variant\nname female4\ngender female\necho 130 15\n\
        pitch 142 200\nformant 0 120  80 150\nformant 2 130  75 150 -200 // note\n";

    fn value<'a>(v: &'a VariantFile, key: &str) -> Option<&'a [String]> {
        v.settings
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, vs)| vs.as_slice())
    }

    #[test]
    fn a_variant_file_is_read_as_settings_keyed_by_what_they_set() {
        let f4 = VariantFile::parse(F4);
        let keys: Vec<&str> = f4.settings.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["gender", "echo", "pitch", "formant 0", "formant 2"]);
        assert_eq!(
            value(&f4, "formant 2").unwrap(),
            ["130", "75", "150", "-200"]
        );
    }

    #[test]
    fn a_mixed_variant_takes_each_setting_from_a_parent_and_jitters_only_formants_and_pitch() {
        let (a, b) = (VariantFile::parse(M3), VariantFile::parse(F4));
        let mut rng = Rng::new(7);
        let mut from_a = 0;
        let mut from_b = 0;
        for _ in 0..200 {
            let child = VariantFile::cross(&a, &b, &mut rng);
            for (key, values) in &child.settings {
                let parents: Vec<&[String]> = [value(&a, key), value(&b, key)]
                    .into_iter()
                    .flatten()
                    .collect();
                assert!(!parents.is_empty(), "{key} is in neither parent");
                let jittered = key == "pitch" || key.starts_with("formant ");
                let n = if key == "pitch" {
                    2
                } else {
                    usize::from(jittered)
                };
                let matches = |p: &[String]| {
                    p.len() == values.len()
                        && p.iter().zip(values).enumerate().all(|(i, (pv, cv))| {
                            if i < n {
                                let (pv, cv): (f32, f32) =
                                    (pv.parse().unwrap(), cv.parse().unwrap());
                                let (lo, hi) = if key == "pitch" {
                                    PITCH_JITTER
                                } else {
                                    FORMANT_JITTER
                                };
                                cv >= (pv * lo).round() - 1.0 && cv <= (pv * hi).round() + 1.0
                            } else {
                                pv == cv
                            }
                        })
                };
                assert!(
                    parents.iter().any(|p| matches(p)),
                    "{key} {values:?} is no parent's setting within the jitter"
                );
            }
            if value(&child, "consonants").is_some() {
                from_a += 1;
            }
            if value(&child, "echo").is_some() {
                from_b += 1;
            }
        }
        // Each parent gives its own settings about half the time.
        assert!((70..130).contains(&from_a), "{from_a}");
        assert!((70..130).contains(&from_b), "{from_b}");
    }

    #[test]
    fn mixed_variants_are_the_same_for_a_seed_and_speak_in_their_own_timbre() {
        // More than one data directory's worth: espeak-ng lists only so many voices.
        let n = PER_DIRECTORY + 30;
        let one = MixedVariants::make(n, 3).unwrap();
        let again = MixedVariants::make(n, 3).unwrap();
        let other = MixedVariants::make(n, 4).unwrap();
        assert_eq!(
            one.names, again.names,
            "the same seed makes the same variants"
        );
        assert_ne!(one.names, other.names);
        let mut set = VoiceSet {
            split: Split::Train,
            voices: Vec::new(),
            rates: TRAIN_RATES.to_vec(),
            mbrola: 0,
            mixed: 0,
        };
        one.extend(&mut set);
        assert_eq!(set.voices.len(), n * TRAIN_ACCENTS.len());
        assert_eq!(set.mixed, set.voices.len());
        let text = "turn on the kitchen lights";
        let plain = synthesize(&Voice::named("en-gb-scotland"), 160, 50, 1.0, text).unwrap();
        // Variants from both directories, the last one among them.
        let tried = [0, 1, PER_DIRECTORY, n - 1];
        let spoken: Vec<Vec<i16>> = tried
            .iter()
            .map(|&i| synthesize(&one.voice("en-gb-scotland", i), 160, 50, 1.0, text).unwrap())
            .collect();
        for (i, s) in tried.iter().zip(&spoken) {
            let n = &one.names[*i];
            assert!(s.len() > 8_000, "{n} said too little");
            assert_ne!(s, &plain, "{n} sounds like the plain accent");
        }
        assert_ne!(spoken[0], spoken[1]);
    }
}
