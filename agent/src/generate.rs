//! `kith generate` and `kith chat`: local text generation on the command line.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use kith_models::llm::{
    CausalLm, ChatMessage, FinishReason, GenerateOptions, LoadOptions, SamplingParams,
};
use serde::Serialize;

use crate::store::ModelStore;

/// The text-generation model used when none is named.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// Finds a language model: a catalog name (installed and intact) or a
/// directory in the optimum layout (`model.onnx` + `tokenizer.json`).
pub fn resolve_model(store: &ModelStore, name: &str) -> Result<PathBuf> {
    let as_path = Path::new(name);
    if as_path.join("model.onnx").is_file() {
        return Ok(as_path.to_path_buf());
    }
    let catalog = store.catalog();
    match catalog.models.iter().find(|m| m.name == name) {
        Some(entry) if entry.task == "text-generation" => store.require(name),
        Some(entry) => bail!(
            "model `{name}` is a {} model, not a text-generation one (text models: {})",
            entry.task,
            language_model_names(store)
        ),
        None => bail!(
            "unknown model `{name}`: neither a catalog model nor a directory holding model.onnx (text models: {})",
            language_model_names(store)
        ),
    }
}

fn language_model_names(store: &ModelStore) -> String {
    let names: Vec<&str> = store
        .catalog()
        .language_models()
        .map(|m| m.name.as_str())
        .collect();
    names.join(", ")
}

/// Loads a model with `threads` for its matrix products, timing it.
pub fn load(dir: &Path, threads: usize) -> Result<(CausalLm, f64)> {
    let t = Instant::now();
    let options = LoadOptions {
        threads,
        ..LoadOptions::default()
    };
    let lm = CausalLm::load(dir, &options)
        .with_context(|| format!("loading language model {}", dir.display()))?;
    Ok((lm, t.elapsed().as_secs_f64() * 1e3))
}

/// Figures of one generation, printed by `--stats`.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationStats {
    pub model: String,
    pub prompt_tokens: usize,
    /// Prompt tokens served from the KV cache of the previous turn.
    pub cached_prompt_tokens: usize,
    pub generated_tokens: usize,
    pub load_ms: f64,
    pub prefill_ms: f64,
    /// Decode speed after the first token.
    pub decode_tokens_per_s: f64,
    pub finish_reason: &'static str,
    pub peak_rss_mb: Option<f64>,
}

/// Runs one generation, calling `out` with each piece of text as it comes.
pub fn run(
    lm: &mut CausalLm,
    prompt_ids: &[u32],
    options: &GenerateOptions,
    load_ms: f64,
    out: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<(GenerationStats, FinishReason)> {
    let t = Instant::now();
    let mut generation = lm.generate(prompt_ids, options)?;
    let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    for piece in generation.by_ref() {
        let piece = piece?;
        if !piece.text.is_empty() {
            out(&piece.text)?;
        }
    }
    let decode_s = t.elapsed().as_secs_f64();
    let generated = generation.generated_tokens();
    let cached = generation.reused_prompt_tokens();
    let finish = generation.finish_reason().unwrap_or(FinishReason::Stop);
    let stats = GenerationStats {
        model: lm.name().to_string(),
        prompt_tokens: prompt_ids.len(),
        cached_prompt_tokens: cached,
        generated_tokens: generated,
        load_ms,
        prefill_ms,
        decode_tokens_per_s: if decode_s > 0.0 {
            generated as f64 / decode_s
        } else {
            0.0
        },
        finish_reason: finish.as_str(),
        peak_rss_mb: peak_rss_mb(),
    };
    Ok((stats, finish))
}

/// Prints the 25 most expensive operators of a profile on stderr.
pub fn print_profile(profile: &kith_models::llm::OpProfile) {
    let total: f64 = profile.values().map(|(_, d)| d.as_secs_f64()).sum();
    let mut rows: Vec<_> = profile.iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1.1));
    eprintln!("time per operator ({:.0} ms in all):", total * 1e3);
    for (op, (calls, d)) in rows.iter().take(25) {
        eprintln!(
            "{:>9.1} ms {:>5.1}% {:>7} calls  {op}",
            d.as_secs_f64() * 1e3,
            100.0 * d.as_secs_f64() / total.max(1e-9),
            calls
        );
    }
}

/// The process's peak resident memory (VmHWM), in MB.
pub fn peak_rss_mb() -> Option<f64> {
    kith_hal::telemetry::process_memory().map(|m| m.peak_resident_bytes as f64 / (1 << 20) as f64)
}

/// Sampling settings shared by `generate` and `chat`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub sampling: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

impl Settings {
    pub fn options(&self) -> GenerateOptions {
        GenerateOptions {
            sampling: self.sampling.clone(),
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
        }
    }
}

/// Prompt ids for `text`, through the chat template when `chat`.
pub fn prompt_ids(lm: &CausalLm, text: &str, system: Option<&str>, chat: bool) -> Result<Vec<u32>> {
    let tok = lm.tokenizer();
    if chat {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(ChatMessage::new("system", s));
        }
        messages.push(ChatMessage::new("user", text));
        let rendered = tok.apply_chat_template(&messages, true)?;
        Ok(tok.encode(&rendered, false)?)
    } else {
        Ok(tok.encode(text, true)?)
    }
}

/// An interactive chat on stdin/stdout, keeping the conversation (and its KV
/// cache) between turns.
pub fn chat_loop(
    lm: &mut CausalLm,
    settings: &Settings,
    system: Option<&str>,
    input: &mut dyn BufRead,
    output: &mut dyn Write,
    interactive: bool,
) -> Result<()> {
    let mut history: Vec<ChatMessage> = Vec::new();
    if let Some(s) = system {
        history.push(ChatMessage::new("system", s));
    }
    if interactive {
        writeln!(
            output,
            "chatting with {} (context {} tokens). /reset starts over, /exit or Ctrl-D quits.",
            lm.name(),
            lm.context_length()
        )?;
    }
    let mut line = String::new();
    loop {
        if interactive {
            write!(output, "> ")?;
            output.flush()?;
        }
        line.clear();
        if input.read_line(&mut line).context("reading stdin")? == 0 {
            break;
        }
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.truncate(usize::from(system.is_some()));
                writeln!(output, "(conversation cleared)")?;
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", text));
        // Drop the oldest turns (never the system message) until the prompt fits.
        let ids = loop {
            let rendered = lm.tokenizer().apply_chat_template(&history, true)?;
            let ids = lm.tokenizer().encode(&rendered, false)?;
            let room = settings
                .max_tokens
                .unwrap_or(256)
                .min(lm.context_length() / 2);
            let first = usize::from(system.is_some());
            if ids.len() + room <= lm.context_length() || history.len() <= first + 1 {
                break ids;
            }
            history.remove(first);
            writeln!(output, "(oldest message dropped to fit the context window)")?;
        };
        let mut reply = String::new();
        let result = run(lm, &ids, &settings.options(), 0.0, &mut |piece| {
            reply.push_str(piece);
            output.write_all(piece.as_bytes())?;
            output.flush()?;
            Ok(())
        });
        writeln!(output)?;
        match result {
            Ok(_) => history.push(ChatMessage::new("assistant", reply.trim())),
            Err(e) => {
                history.pop();
                writeln!(output, "(error: {e:#})")?;
            }
        }
    }
    Ok(())
}
