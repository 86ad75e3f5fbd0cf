//! Text generation on tract against references: llama.cpp's tokenizer ids,
//! onnxruntime's greedy tokens on the same ONNX file, and plain facts.
//!
//! Needs `smollm2-135m` installed in `$KITH_MODELS_DIR` (the README's test
//! command does it). Fixtures come from `scripts/make_llm_fixtures.py`.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use kith_models::ModelError;
use kith_models::llm::{
    CausalLm, ChatMessage, FinishReason, GenerateOptions, LoadOptions, SamplingParams, TextStream,
    TextTokenizer,
};
use serde_json::Value;

fn model_dir() -> PathBuf {
    let dir = std::env::var_os("KITH_MODELS_DIR")
        .map(PathBuf::from)
        .expect("KITH_MODELS_DIR (run the README's test command)");
    let model = dir.join("smollm2-135m");
    assert!(
        model.join("model.onnx").is_file(),
        "smollm2-135m missing in {} (run `kith models fetch smollm2-135m`)",
        dir.display()
    );
    model
}

/// Loading takes seconds: every test shares one model, one at a time.
fn lm() -> MutexGuard<'static, CausalLm> {
    static LM: OnceLock<Mutex<CausalLm>> = OnceLock::new();
    LM.get_or_init(|| {
        Mutex::new(CausalLm::load(&model_dir(), &LoadOptions::default()).expect("load smollm2"))
    })
    .lock()
    .unwrap_or_else(|e| e.into_inner())
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).expect("fixture JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens: Some(max_tokens),
        ..GenerateOptions::default()
    }
}

fn chat_ids(lm: &CausalLm, user: &str) -> Vec<u32> {
    let text = lm
        .tokenizer()
        .apply_chat_template(&[ChatMessage::new("user", user)], true)
        .unwrap();
    lm.tokenizer().encode(&text, false).unwrap()
}

fn generate(
    lm: &mut CausalLm,
    prompt: &[u32],
    options: &GenerateOptions,
) -> (Vec<u32>, String, FinishReason) {
    let mut generation = lm.generate(prompt, options).unwrap();
    let mut tokens = Vec::new();
    let mut text = String::new();
    for piece in generation.by_ref() {
        let piece = piece.unwrap();
        tokens.push(piece.token);
        text.push_str(&piece.text);
    }
    let reason = generation.finish_reason().unwrap();
    (tokens, text, reason)
}

#[test]
fn tokenizer_ids_equal_llama_cpp_for_numbers_unicode_and_chat_markup() {
    let tok = TextTokenizer::load(&model_dir()).unwrap();
    let fx = fixture("llm_tokenizer.json");
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text, false).unwrap();
        assert_eq!(
            got,
            ids(&case["ids"]),
            "ids differ from llama.cpp for {text:?}"
        );
    }
}

#[test]
fn chat_template_renders_the_default_system_message() {
    let tok = TextTokenizer::load(&model_dir()).unwrap();
    let text = tok
        .apply_chat_template(&[ChatMessage::new("user", "Hi")], true)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // EOS is <|im_end|> (id 2), not the GGUF's <|im_start|>.
    assert_eq!(tok.eos_ids(), &[2]);
}

#[test]
fn greedy_tokens_equal_onnxruntime_on_the_same_file() {
    let fx = fixture("llm_greedy.json");
    let onnx = model_dir().join("model.onnx");
    let sha = {
        use std::io::Read;
        let mut f = std::fs::File::open(&onnx).unwrap();
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).unwrap();
        sha256_hex(&buf)
    };
    assert_eq!(
        sha,
        fx["model_sha256"].as_str().unwrap(),
        "the installed model is not the one the fixture was made with (re-run scripts/make_llm_fixtures.py)"
    );
    let prompt = ids(&fx["prompt_ids"]);
    let expected = ids(&fx["greedy_ids"]);
    assert!(expected.len() >= 30);
    let mut lm = lm();
    lm.reset_cache().unwrap();
    // The prompt the fixture used is the one our template and tokenizer make.
    let user = fx["messages"][0]["content"].as_str().unwrap();
    assert_eq!(chat_ids(&lm, user), prompt);
    let options = GenerateOptions {
        ignore_eos: true,
        ..greedy(expected.len())
    };
    let (tokens, _, _) = generate(&mut lm, &prompt, &options);
    assert_eq!(tokens, expected);
}

#[test]
fn the_capital_of_france_is_paris() {
    let mut lm = lm();
    let prompt = chat_ids(&lm, "What is the capital of France?");
    let (_, text, reason) = generate(&mut lm, &prompt, &greedy(24));
    assert!(text.contains("Paris"), "answer: {text:?}");
    assert_eq!(
        reason,
        FinishReason::Stop,
        "the model should end its turn: {text:?}"
    );
}

#[test]
fn the_same_seed_gives_the_same_text_and_another_seed_differs() {
    let mut lm = lm();
    let prompt = chat_ids(&lm, "Tell me a story about a cat.");
    let sample = |lm: &mut CausalLm, seed| {
        let options = GenerateOptions {
            sampling: SamplingParams {
                temperature: 1.0,
                seed,
                ..SamplingParams::default()
            },
            ignore_eos: true,
            ..greedy(16)
        };
        generate(lm, &prompt, &options).0
    };
    let a = sample(&mut lm, 1);
    let b = sample(&mut lm, 1);
    let c = sample(&mut lm, 2);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn a_stop_string_ends_the_text_before_it() {
    let mut lm = lm();
    let prompt = chat_ids(&lm, "What is the capital of France?");
    let (_, full, _) = generate(&mut lm, &prompt, &greedy(24));
    let at = full.find("Paris").expect("Paris in the answer");
    let options = GenerateOptions {
        stop: vec!["Paris".into()],
        ..greedy(24)
    };
    let (_, text, reason) = generate(&mut lm, &prompt, &options);
    assert_eq!(text, full[..at]);
    assert_eq!(reason, FinishReason::Stop);
}

#[test]
fn max_tokens_ends_with_length() {
    let mut lm = lm();
    let prompt = chat_ids(&lm, "Write a long essay about rivers.");
    let mut generation = lm.generate(&prompt, &greedy(5)).unwrap();
    let n = generation.by_ref().count();
    assert_eq!(n, 5);
    assert_eq!(generation.finish_reason(), Some(FinishReason::Length));
}

#[test]
fn a_second_turn_reuses_the_cache_and_matches_a_fresh_run() {
    let mut lm = lm();
    lm.reset_cache().unwrap();
    let first = chat_ids(&lm, "Name three colors.");
    let (tokens, _, _) = generate(&mut lm, &first, &greedy(12));
    // The next prompt extends the first (as a chat's next turn does).
    let mut second = first.clone();
    second.extend_from_slice(&tokens);
    second.extend(
        lm.tokenizer()
            .encode("\nAnd three animals?", false)
            .unwrap(),
    );
    let mut generation = lm.generate(&second, &greedy(12)).unwrap();
    assert!(generation.reused_prompt_tokens() >= first.len());
    let reused: Vec<u32> = generation.by_ref().map(|p| p.unwrap().token).collect();
    lm.reset_cache().unwrap();
    let (fresh, _, _) = generate(&mut lm, &second, &greedy(12));
    assert_eq!(reused, fresh);
}

#[test]
fn text_stream_never_splits_a_character() {
    let tok = TextTokenizer::load(&model_dir()).unwrap();
    let text = "naïve café 🙂👍🏽 日本語 ∑x² — ok";
    let ids = tok.encode(text, false).unwrap();
    assert!(ids.len() > 10);
    let mut stream = TextStream::default();
    let mut out = String::new();
    for id in ids {
        let piece = stream.push(&tok, id).unwrap();
        assert!(
            !piece.contains('\u{FFFD}'),
            "piece {piece:?} splits a character"
        );
        out.push_str(&piece);
    }
    out.push_str(&stream.finish(&tok).unwrap());
    assert_eq!(out, text);
}

#[test]
fn a_prompt_longer_than_the_context_is_a_clear_error() {
    let mut lm = lm();
    let context = lm.context_length();
    let prompt = vec![42u32; context + 10];
    let err = lm.generate(&prompt, &greedy(4)).err().expect("must fail");
    assert!(matches!(err, ModelError::ContextOverflow { tokens, .. } if tokens == context + 10));
    assert!(err.to_string().contains("context window"), "{err}");
    // The model still works afterwards.
    let prompt = chat_ids(&lm, "Hi");
    assert!(lm.generate(&prompt, &greedy(2)).is_ok());
}

#[test]
fn a_corrupt_onnx_file_is_a_load_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "config.json"] {
        std::fs::copy(model_dir().join(f), dir.path().join(f)).unwrap();
    }
    let good = std::fs::read(model_dir().join("model.onnx")).unwrap();
    std::fs::write(dir.path().join("model.onnx"), &good[..good.len() / 3]).unwrap();
    let err = CausalLm::load(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, ModelError::Load { .. }), "{err:?}");
    assert!(err.to_string().contains("model.onnx"), "{err}");
}

#[test]
fn a_directory_without_a_tokenizer_is_a_load_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.onnx"), b"not a model").unwrap();
    let err = CausalLm::load(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn kith_4_bit_kernel_and_tract_matmulnbits_give_the_same_tokens() {
    let options = LoadOptions {
        fast_q4: false,
        ..LoadOptions::default()
    };
    let mut plain = CausalLm::load(&model_dir(), &options).unwrap();
    // Only the 8-bit LM head, which tract does not take, runs on kith's kernel.
    assert_eq!(plain.fast_q4_layers(), 1);
    let mut fast = lm();
    if kith_models::llm::q4::Kernel::simd_available() {
        // 30 layers x (qkv, o, gate/up, down) + the LM head.
        assert_eq!(fast.fast_q4_layers(), 121);
    }
    let prompt = chat_ids(&fast, "List three uses of a paperclip.");
    let options = GenerateOptions {
        ignore_eos: true,
        ..greedy(24)
    };
    let (a, _, _) = generate(&mut fast, &prompt, &options);
    let (b, _, _) = generate(&mut plain, &prompt, &options);
    assert_eq!(a, b);
}
