//! Text in and out of a language model: `tokenizer.json` (any Hugging Face
//! tokenizer), the chat template from `tokenizer_config.json`, and an
//! incremental decoder that never splits a UTF-8 character.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::error::ModelError;

/// One message of a chat, as the templates expect it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model's tokenizer with its special tokens and chat template.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// Ids that end a generation (`eos_token`, and `generation_config.json`'s list).
    eos_ids: Vec<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// The Jinja chat template, if the model ships one.
    chat_template: Option<String>,
}

fn load_error(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Load {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, ModelError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| load_error(path, format!("invalid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(load_error(path, e.to_string())),
    }
}

/// A special token in tokenizer_config.json is a string or `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json` (optional) and
    /// `generation_config.json` (optional) from a model directory.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(load_error(&path, "tokenizer.json is missing"));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| load_error(&path, format!("not a usable tokenizer: {e}")))?;
        let config_path: PathBuf = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?.unwrap_or(Value::Null);
        let bos_token = token_string(config.get("bos_token"));
        let eos_token = token_string(config.get("eos_token"));
        let chat_template = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // Some repositories ship a list of named templates.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        let mut eos_ids: Vec<u32> = Vec::new();
        if let Some(eos) = &eos_token
            && let Some(id) = inner.token_to_id(eos)
        {
            eos_ids.push(id);
        }
        let gen_path = dir.join("generation_config.json");
        if let Some(gen_cfg) = read_json(&gen_path)? {
            match gen_cfg.get("eos_token_id") {
                Some(Value::Number(n)) => eos_ids.extend(n.as_u64().map(|v| v as u32)),
                Some(Value::Array(a)) => {
                    eos_ids.extend(a.iter().filter_map(Value::as_u64).map(|v| v as u32))
                }
                _ => {}
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        if eos_ids.is_empty() {
            return Err(load_error(
                &config_path,
                "no end-of-sequence token: neither tokenizer_config.json's eos_token nor generation_config.json's eos_token_id names one",
            ));
        }
        Ok(TextTokenizer {
            inner,
            eos_ids,
            bos_token,
            eos_token,
            chat_template,
        })
    }

    /// Token ids of `text`. `add_special_tokens` applies the tokenizer's
    /// post-processor (a BOS for Llama-style tokenizers); chat prompts made by
    /// the template already hold their special tokens and pass `false`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ModelError> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Input(format!("cannot tokenize the text: {e}")))
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Input(format!("cannot decode tokens: {e}")))
    }

    /// The text of one token as the vocabulary spells it (for debugging).
    pub fn token_str(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template over `messages`, ending with the assistant's
    /// turn opened when `add_generation_prompt`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            ModelError::Input("this model has no chat template (tokenizer_config.json)".into())
        })?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let template_error =
            |e: minijinja::Error| ModelError::Input(format!("chat template failed: {e:#}"));
        env.add_template("chat", template).map_err(template_error)?;
        let tmpl = env.get_template("chat").map_err(template_error)?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(template_error)
    }
}

/// Turns a growing list of token ids into text pieces, holding back bytes
/// until they form whole UTF-8 characters (a byte-level BPE token can end in
/// the middle of one: an emoji is often two or three tokens).
#[derive(Default)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the window decoded for context (so that decoders that strip a
    /// leading space see the token before).
    prefix_offset: usize,
    /// End of the text already emitted, in `ids`.
    read_offset: usize,
}

impl TextStream {
    /// Adds one token; returns the new text it completes (maybe empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<String, ModelError> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back at the end (an incomplete character, decoded lossily).
    pub fn finish(&mut self, tokenizer: &TextTokenizer) -> Result<String, ModelError> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or("").to_string())
    }
}
