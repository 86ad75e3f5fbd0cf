//! Making clean synthetic speech sound like a room: a clip placed with
//! random lead and tail, additive noise at a chosen SNR (white, pink,
//! babble of other synthetic speech, or the user's recordings), simple
//! room reverb and a gain change.

use kith_models::intent::grammar::Rng;

/// Where additive noise comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoiseKind {
    White,
    Pink,
    /// Other speech mixed together (from a bank of synthetic sentences).
    Babble,
    /// One of the user's recordings (`--noise DIR`).
    Recorded,
}

impl NoiseKind {
    pub fn name(self) -> &'static str {
        match self {
            NoiseKind::White => "white",
            NoiseKind::Pink => "pink",
            NoiseKind::Babble => "babble",
            NoiseKind::Recorded => "recorded",
        }
    }
}

/// Sounds noise is cut from.
#[derive(Debug, Default)]
pub struct NoiseBank {
    /// Babble tracks (several voices summed), 16 kHz.
    pub babble: Vec<Vec<i16>>,
    /// The user's noise recordings, 16 kHz.
    pub recorded: Vec<Vec<i16>>,
}

/// One clip's augmentation, drawn up front so it can be logged and replayed.
#[derive(Debug, Clone, Copy)]
pub struct Recipe {
    pub lead_ms: u32,
    pub tail_ms: u32,
    /// Noise and its SNR in dB; `None` leaves the clip clean.
    pub noise: Option<(NoiseKind, f32)>,
    /// Reverb time (RT60) in seconds and wet share.
    pub reverb: Option<(f32, f32)>,
    /// Overall gain in dB.
    pub gain_db: f32,
}

impl Recipe {
    /// A clean clip with fixed short padding.
    pub fn clean() -> Recipe {
        Recipe {
            lead_ms: 200,
            tail_ms: 200,
            noise: None,
            reverb: None,
            gain_db: 0.0,
        }
    }
}

fn rms(x: &[f32]) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt()
}

/// White noise of unit RMS.
fn white(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

/// Pink (1/f) noise from white through Paul Kellet's economy filter.
fn pink(n: usize, rng: &mut Rng) -> Vec<f32> {
    let (mut b0, mut b1, mut b2) = (0.0f32, 0.0f32, 0.0f32);
    (0..n)
        .map(|_| {
            let w = rng.normal();
            b0 = 0.99765 * b0 + w * 0.0990460;
            b1 = 0.96300 * b1 + w * 0.2965164;
            b2 = 0.57000 * b2 + w * 1.0526913;
            b0 + b1 + b2 + w * 0.1848
        })
        .collect()
}

/// `n` samples cut from a random place of a random track (looped).
fn cut(tracks: &[Vec<i16>], n: usize, rng: &mut Rng) -> Option<Vec<f32>> {
    let track = tracks.get(rng.below(tracks.len().max(1)))?;
    if track.is_empty() {
        return None;
    }
    let start = rng.below(track.len());
    Some(
        (0..n)
            .map(|i| f32::from(track[(start + i) % track.len()]))
            .collect(),
    )
}

/// Schroeder reverb: four parallel combs and two allpasses, delays in
/// samples chosen for a small room, feedback set for the RT60.
fn reverb(x: &[f32], rt60: f32, wet: f32) -> Vec<f32> {
    const COMBS: [usize; 4] = [557, 617, 683, 743];
    const ALLPASS: [(usize, f32); 2] = [(139, 0.7), (47, 0.7)];
    let rate = 16_000.0;
    let mut out = vec![0.0; x.len()];
    for &d in &COMBS {
        let g = 10f32.powf(-3.0 * d as f32 / (rt60 * rate));
        let mut buf = vec![0.0f32; d];
        let mut i = 0;
        for (o, &s) in out.iter_mut().zip(x) {
            let y = buf[i];
            buf[i] = s + g * y;
            i = (i + 1) % d;
            *o += y / COMBS.len() as f32;
        }
    }
    for &(d, g) in &ALLPASS {
        let mut buf = vec![0.0f32; d];
        let mut i = 0;
        for o in out.iter_mut() {
            let delayed = buf[i];
            let v = *o + g * delayed;
            buf[i] = v;
            *o = delayed - g * v;
            i = (i + 1) % d;
        }
    }
    x.iter()
        .zip(&out)
        .map(|(d, w)| (1.0 - wet) * d + wet * w)
        .collect()
}

/// The speech level noise is set against when a clip holds no speech
/// (silence, or nothing at all): about what espeak-ng's voices give for a
/// sentence (RMS 0.08–0.10 of full scale over a whole sentence, −21 dBFS).
/// So a noise-only clip "at 12 dB" is as loud as the noise behind a
/// typical command at 12 dB.
pub const REFERENCE_SPEECH_RMS: f32 = 3000.0;

/// Applies `recipe` to clean 16 kHz speech. Noise is mixed at the
/// recipe's SNR against the speech's own level, or against
/// [`REFERENCE_SPEECH_RMS`] when the speech is silent.
pub fn apply(speech: &[i16], recipe: &Recipe, bank: &NoiseBank, rng: &mut Rng) -> Vec<i16> {
    let lead = recipe.lead_ms as usize * 16;
    let tail = recipe.tail_ms as usize * 16;
    let mut x = vec![0.0f32; lead + speech.len() + tail];
    for (d, s) in x[lead..].iter_mut().zip(speech) {
        *d = f32::from(*s);
    }
    if let Some((rt60, wet)) = recipe.reverb {
        x = reverb(&x, rt60, wet);
    }
    if let Some((kind, snr_db)) = recipe.noise {
        let noise = match kind {
            NoiseKind::White => Some(white(x.len(), rng)),
            NoiseKind::Pink => Some(pink(x.len(), rng)),
            NoiseKind::Babble => cut(&bank.babble, x.len(), rng),
            NoiseKind::Recorded => cut(&bank.recorded, x.len(), rng),
        };
        // SNR against the speech's own level (its samples only, not the
        // padding); a clip with no speech is noise alone, at the level it
        // would have behind typical speech.
        let speech_rms = rms(&x[lead..lead + speech.len()]);
        let speech_rms = if speech_rms > 0.0 {
            speech_rms
        } else {
            REFERENCE_SPEECH_RMS
        };
        if let Some(noise) = noise {
            let noise_rms = rms(&noise);
            if noise_rms > 0.0 {
                let scale = speech_rms / noise_rms / 10f32.powf(snr_db / 20.0);
                for (s, n) in x.iter_mut().zip(&noise) {
                    *s += n * scale;
                }
            }
        }
    }
    let gain = 10f32.powf(recipe.gain_db / 20.0);
    x.iter()
        .map(|v| (v * gain).round().clamp(-32768.0, 32767.0) as i16)
        .collect()
}

/// Draws a training recipe: mostly noisy (0–30 dB), sometimes reverberant,
/// with varied padding and level.
pub fn training_recipe(rng: &mut Rng, bank: &NoiseBank) -> Recipe {
    let noise = if rng.unit() < 0.2 {
        None
    } else {
        let r = rng.unit();
        let kind = if !bank.recorded.is_empty() && r < 0.25 {
            NoiseKind::Recorded
        } else if r < 0.45 {
            NoiseKind::Babble
        } else if r < 0.8 {
            NoiseKind::Pink
        } else {
            NoiseKind::White
        };
        let kind = if kind == NoiseKind::Babble && bank.babble.is_empty() {
            NoiseKind::Pink
        } else {
            kind
        };
        Some((kind, rng.range(0.0, 30.0)))
    };
    let reverb = (rng.unit() < 0.3).then(|| (rng.range(0.15, 0.6), rng.range(0.1, 0.4)));
    Recipe {
        lead_ms: 50 + rng.below(750) as u32,
        tail_ms: 50 + rng.below(750) as u32,
        noise,
        reverb,
        gain_db: rng.range(-18.0, 6.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(n: usize) -> Vec<i16> {
        (0..n)
            .map(|i| ((i as f32 * 0.05).sin() * 8000.0) as i16)
            .collect()
    }

    #[test]
    fn noise_is_mixed_at_the_requested_snr() {
        let speech = tone(16_000);
        let bank = NoiseBank::default();
        for kind in [NoiseKind::White, NoiseKind::Pink] {
            for snr in [0.0f32, 12.0, 24.0] {
                let recipe = Recipe {
                    lead_ms: 0,
                    tail_ms: 0,
                    noise: Some((kind, snr)),
                    reverb: None,
                    gain_db: 0.0,
                };
                let mixed = apply(&speech, &recipe, &bank, &mut Rng::new(1));
                let noise: Vec<f32> = mixed
                    .iter()
                    .zip(&speech)
                    .map(|(m, s)| f32::from(*m) - f32::from(*s))
                    .collect();
                let s: Vec<f32> = speech.iter().map(|&v| f32::from(v)).collect();
                let measured = 20.0 * (rms(&s) / rms(&noise)).log10();
                assert!(
                    (measured - snr).abs() < 0.3,
                    "{kind:?} at {snr} dB measured {measured}"
                );
            }
        }
    }

    #[test]
    fn a_clip_without_speech_is_noise_at_the_reference_level() {
        // Silence and no samples at all: both are "no speech".
        for speech in [vec![0i16; 16_000], Vec::new()] {
            for snr in [0.0f32, 12.0] {
                let recipe = Recipe {
                    lead_ms: 100,
                    tail_ms: 100,
                    noise: Some((NoiseKind::Pink, snr)),
                    reverb: None,
                    gain_db: 0.0,
                };
                let out = apply(&speech, &recipe, &NoiseBank::default(), &mut Rng::new(4));
                assert_eq!(out.len(), speech.len() + 3_200);
                let x: Vec<f32> = out.iter().map(|&v| f32::from(v)).collect();
                let measured = 20.0 * (REFERENCE_SPEECH_RMS / rms(&x)).log10();
                assert!(
                    (measured - snr).abs() < 0.3,
                    "{} samples of silence at {snr} dB: noise {} dB under the reference",
                    speech.len(),
                    measured
                );
            }
        }
    }

    #[test]
    fn padding_gain_and_reverb_keep_the_clip_in_range() {
        let speech = tone(8_000);
        let recipe = Recipe {
            lead_ms: 100,
            tail_ms: 300,
            noise: None,
            reverb: Some((0.5, 0.4)),
            gain_db: 20.0,
        };
        let out = apply(&speech, &recipe, &NoiseBank::default(), &mut Rng::new(2));
        assert_eq!(out.len(), 8_000 + 400 * 16);
        assert!(out[..1600].iter().all(|&s| s == 0), "lead is silent");
        // Reverb rings on into the tail.
        assert!(out[8_000 + 1600..].iter().any(|&s| s != 0));
    }

    #[test]
    fn pink_noise_has_more_energy_low_than_high() {
        let p = pink(1 << 14, &mut Rng::new(3));
        // First difference is a high-pass: for pink noise it removes most energy.
        let diff: Vec<f32> = p.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(rms(&diff) < 0.8 * rms(&p), "{} vs {}", rms(&diff), rms(&p));
        let w = white(1 << 14, &mut Rng::new(3));
        let wd: Vec<f32> = w.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(rms(&wd) > 1.2 * rms(&w));
    }
}
