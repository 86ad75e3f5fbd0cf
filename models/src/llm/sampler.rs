//! Choosing the next token from logits: greedy, or temperature / top-k /
//! top-p sampling with a repetition penalty, reproducible from a seed.

use crate::error::ModelError;

/// How tokens are chosen. `temperature == 0` is greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token every step.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 keeps all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 keeps all).
    pub top_p: f32,
    /// Divides positive logits (multiplies negative ones) of tokens seen in the
    /// last [`REPETITION_WINDOW`] tokens; 1 disables it.
    pub repetition_penalty: f32,
    /// Seed of the random generator: the same seed gives the same tokens.
    pub seed: u64,
}

/// How many recent tokens the repetition penalty looks at (llama.cpp's default).
pub const REPETITION_WINDOW: usize = 64;

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Rejects values that have no meaning (negative temperature, top_p out of (0, 1]).
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(ModelError::Input(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Input(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(ModelError::Input(format!(
                "repetition_penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            )));
        }
        Ok(())
    }
}

/// A sampler with its random state and scratch buffers (allocated once).
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    /// (logit, token) candidates, reused every step.
    candidates: Vec<(f32, u32)>,
    /// Distinct recent tokens for the repetition penalty, reused every step.
    seen: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, ModelError> {
        params.validate()?;
        Ok(Sampler {
            rng: SplitMix64(params.seed),
            params,
            candidates: Vec::new(),
            seen: Vec::new(),
        })
    }

    /// Picks the next token. `logits` is modified (penalty applied in place);
    /// `recent` are the latest tokens of the context.
    pub fn sample(&mut self, logits: &mut [f32], recent: &[u32]) -> u32 {
        let penalty = self.params.repetition_penalty;
        if penalty != 1.0 {
            let start = recent.len().saturating_sub(REPETITION_WINDOW);
            self.seen.clear();
            self.seen.extend_from_slice(&recent[start..]);
            self.seen.sort_unstable();
            self.seen.dedup();
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
                }
            }
        }
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (l * inv_t, i as u32)),
        );
        if self.candidates.is_empty() {
            return argmax(logits);
        }
        let by_logit_desc =
            |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let k = self.params.top_k;
        if k > 0 && k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k - 1, by_logit_desc);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(by_logit_desc);
        // Softmax over the survivors, in place.
        let max = self.candidates[0].0;
        let mut sum = 0.0f32;
        for c in self.candidates.iter_mut() {
            c.0 = (c.0 - max).exp();
            sum += c.0;
        }
        for c in self.candidates.iter_mut() {
            c.0 /= sum;
        }
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = self.candidates.len();
            for (i, c) in self.candidates.iter().enumerate() {
                acc += c.0;
                if acc >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.candidates.truncate(keep);
        }
        let total: f32 = self.candidates.iter().map(|c| c.0).sum();
        let mut r = self.rng.next_f32() * total;
        for c in &self.candidates {
            r -= c.0;
            if r <= 0.0 {
                return c.1;
            }
        }
        self.candidates[self.candidates.len() - 1].1
    }
}

/// Index of the largest logit (the first one on ties, as numpy's argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

/// SplitMix64: tiny, fast, and its sequence never changes with a crate
/// upgrade, so a seed reproduces the same text on every kith version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty: 1.0,
            seed,
        }
    }

    #[test]
    fn greedy_picks_the_largest_logit() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&mut [0.1, 3.0, -2.0, 2.9], &[]), 1);
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens_and_another_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed)).unwrap();
            (0..40)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let mut s = Sampler::new(params(5.0, 1, 1.0, 3)).unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 0.5, 0.99], &[]), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Token 2 holds ~0.87 of the mass: top_p 0.5 keeps it alone.
        let mut s = Sampler::new(params(1.0, 0, 0.5, 11)).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 3.0, 0.5], &[]), 2);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two tokens with probabilities ~0.73 / 0.27.
        let mut s = Sampler::new(params(1.0, 0, 1.0, 5)).unwrap();
        let n = 4000;
        let ones = (0..n)
            .filter(|_| s.sample(&mut [0.0, 1.0], &[]) == 1)
            .count();
        let p = ones as f32 / n as f32;
        assert!((p - 0.731).abs() < 0.03, "p = {p}");
    }

    #[test]
    fn repetition_penalty_counts_each_recent_token_once() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        })
        .unwrap();
        let mut logits = [4.0, 3.0, -1.0];
        // Token 0 seen three times: penalized once (4 -> 2), so token 1 wins.
        assert_eq!(s.sample(&mut logits, &[0, 0, 0, 2]), 1);
        assert_eq!(logits, [2.0, 3.0, -2.0]);
    }

    #[test]
    fn meaningless_parameters_are_rejected() {
        assert!(Sampler::new(params(-1.0, 0, 1.0, 0)).is_err());
        assert!(Sampler::new(params(f32::NAN, 0, 1.0, 0)).is_err());
        assert!(Sampler::new(params(1.0, 0, 0.0, 0)).is_err());
        assert!(Sampler::new(params(1.0, 0, 1.5, 0)).is_err());
    }
}
