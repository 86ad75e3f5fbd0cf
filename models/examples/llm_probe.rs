//! Loads a language model directory and times prefill and decode:
//! `cargo run --release -p kith-models --example llm_probe -- DIR [TOKENS]`.
use std::time::Instant;

use kith_models::llm::{CausalLm, ChatMessage, GenerateOptions, LoadOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).ok_or("usage: llm_probe DIR [TOKENS]")?);
    let n: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(32);
    let options = LoadOptions {
        last_logits_only: std::env::var("KITH_ALL_LOGITS").is_err(),
        fast_q4: std::env::var("KITH_TRACT_Q4").is_err(),
        threads: std::env::var("KITH_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(1),
    };
    let t = Instant::now();
    let mut lm = CausalLm::load(&dir, &options)?;
    let rss = || {
        std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    eprintln!("after load: {}", rss());
    eprintln!(
        "load {:.0} ms ({} layers on kith's q4 kernel)",
        t.elapsed().as_secs_f64() * 1e3,
        lm.fast_q4_layers()
    );
    let prompt = lm.tokenizer().apply_chat_template(
        &[ChatMessage::new("user", "What is the capital of France?")],
        true,
    )?;
    let ids = lm.tokenizer().encode(&prompt, false)?;
    let profiling = std::env::var("KITH_PROFILE").is_ok();
    lm.set_profiling(
        profiling,
        std::env::var("KITH_PROFILE").is_ok_and(|v| v == "nodes"),
    );
    let t = Instant::now();
    let mut generation = lm.generate(
        &ids,
        &GenerateOptions {
            max_tokens: Some(n),
            ignore_eos: std::env::var("KITH_IGNORE_EOS").is_ok(),
            ..Default::default()
        },
    )?;
    let prefill = t.elapsed();
    let t = Instant::now();
    let mut text = String::new();
    let mut tokens = Vec::new();
    for piece in generation.by_ref() {
        let p = piece?;
        tokens.push(p.token);
        text.push_str(&p.text);
    }
    let decode = t.elapsed();
    let generated = generation.generated_tokens();
    let finish = generation.finish_reason();
    drop(generation);
    if let Some(profile) = lm.take_profile() {
        let total: f64 = profile.values().map(|(_, d)| d.as_secs_f64()).sum();
        let mut rows: Vec<_> = profile.into_iter().collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1.1));
        for (op, (calls, d)) in rows.iter().take(40) {
            eprintln!(
                "{:>7.1} ms {:>5.1}% {:>7} calls  {op}",
                d.as_secs_f64() * 1e3,
                100.0 * d.as_secs_f64() / total,
                calls
            );
        }
    }
    println!("{text}");
    eprintln!(
        "prompt {} tokens, prefill {:.0} ms; {} tokens in {:.0} ms = {:.1} tok/s; {:?}; {:?}",
        ids.len(),
        prefill.as_secs_f64() * 1e3,
        generated,
        decode.as_secs_f64() * 1e3,
        generated as f64 / decode.as_secs_f64(),
        finish,
        tokens
    );
    Ok(())
}
