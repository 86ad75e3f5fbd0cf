//! Text generation with a decoder-only ONNX model in the layout optimum and
//! onnx-community publish: inputs `input_ids`, `attention_mask`,
//! `position_ids`, `past_key_values.N.key/value`; outputs `logits`,
//! `present.N.key/value`; beside it `tokenizer.json` and
//! `tokenizer_config.json`.
//!
//! One optimized tract plan serves prefill (many tokens) and decode (one
//! token): the sequence and past lengths stay symbolic, the batch is fixed
//! to 1. The KV cache is the model's own `present` outputs, fed back as the
//! next step's `past` inputs without a copy.

pub mod q4;
mod sampler;
mod text;

use std::path::{Path, PathBuf};

use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::error::{ModelError, reason};
pub use sampler::{REPETITION_WINDOW, Sampler, SamplingParams, argmax};
pub use text::{ChatMessage, TextStream, TextTokenizer};

/// Options for loading a language model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute logits only for the last position (prefill then skips the
    /// vocabulary projection of every prompt token but the last).
    pub last_logits_only: bool,
    /// Threads for matrix products (1: run on the caller's thread only).
    pub threads: usize,
    /// Run 4-bit MatMulNBits layers with kith's SIMD kernel (see `q4`) where
    /// the CPU has one; otherwise tract's own.
    pub fast_q4: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            last_logits_only: true,
            threads: 1,
            fast_q4: true,
        }
    }
}

/// Where each input and output of the ONNX model sits.
#[derive(Debug, Clone)]
struct Io {
    ids: usize,
    mask: Option<usize>,
    positions: Option<usize>,
    /// Input index of each cache tensor (key and value of every layer).
    past: Vec<usize>,
    logits: usize,
    /// Output index of the `present` tensor matching `past[i]`.
    present: Vec<usize>,
    /// (kv heads, head dim) of every cache tensor.
    cache_shape: Vec<(usize, usize)>,
    n_inputs: usize,
}

/// A loaded causal language model, its tokenizer and its KV cache.
pub struct CausalLm {
    name: String,
    path: PathBuf,
    state: TypedSimpleState,
    tokenizer: TextTokenizer,
    io: Io,
    /// Longest sequence (prompt + generated) the model was trained for.
    context: usize,
    /// The cache tensors for `cached` tokens, in `io.past` order.
    cache: Vec<TValue>,
    /// The tokens whose keys and values are in `cache`.
    cached: Vec<u32>,
    vocab: usize,
    /// Whether the graph was rewritten to compute only the last position's logits.
    last_logits_only: bool,
    /// Per-operator (calls, time) when profiling is on; `None` otherwise.
    profile: Option<OpProfile>,
    /// Profile per node (layer numbers folded) rather than per operator type.
    profile_detailed: bool,
    /// MatMulNBits layers running on kith's 4-bit kernel.
    fused_q4: usize,
}

/// `/model/layers.12/mlp/down_proj/...` -> `/model/layers.*/mlp/down_proj/...`
fn generic_node_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '.' && chars.peek().is_some_and(char::is_ascii_digit) {
            while chars.peek().is_some_and(char::is_ascii_digit) {
                chars.next();
            }
            out.push('*');
        }
    }
    out
}

/// Time spent per tract operator type: (calls, total time). The one place
/// this crate reads a clock, and only when asked to (`kith generate --profile`).
pub type OpProfile = std::collections::BTreeMap<String, (u64, std::time::Duration)>;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model emitted an end-of-sequence token or a stop string appeared.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The context window is full.
    ContextFull,
}

impl FinishReason {
    /// The name OpenAI's API uses (`stop` or `length`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length | FinishReason::ContextFull => "length",
        }
    }
}

/// Limits of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    pub sampling: SamplingParams,
    /// Most tokens to generate; `None` runs until a stop or the context is full.
    pub max_tokens: Option<usize>,
    /// Generation ends before any of these strings; they are not returned.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
}

fn model_name(dir: &Path) -> String {
    dir.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

/// Rewrites the proto so that the node producing `logits` sees only the
/// last position: prefill then projects one hidden state onto the
/// vocabulary instead of all of them. Returns whether it applied.
fn keep_last_logits(proto: &mut pb::ModelProto) -> bool {
    let Some(graph) = proto.graph.as_mut() else {
        return false;
    };
    let Some(ix) = graph
        .node
        .iter()
        .position(|n| n.output.iter().any(|o| o == "logits"))
    else {
        return false;
    };
    let producer = &graph.node[ix];
    if !matches!(producer.op_type.as_str(), "MatMul" | "MatMulNBits" | "Gemm")
        || producer.input.is_empty()
    {
        return false;
    }
    let hidden = producer.input[0].clone();
    let sliced = format!("{hidden}/kith_last_position");
    let int_tensor = |name: &str, v: i64| pb::TensorProto {
        name: name.to_string(),
        dims: vec![1],
        data_type: pb::tensor_proto::DataType::Int64 as i32,
        int64_data: vec![v],
        ..Default::default()
    };
    let names = ["kith_last.starts", "kith_last.ends", "kith_last.axes"];
    graph.initializer.push(int_tensor(names[0], -1));
    graph.initializer.push(int_tensor(names[1], i64::MAX));
    graph.initializer.push(int_tensor(names[2], -2));
    let slice = pb::NodeProto {
        name: "kith_last_position".into(),
        op_type: "Slice".into(),
        input: vec![hidden, names[0].into(), names[1].into(), names[2].into()],
        output: vec![sliced.clone()],
        ..Default::default()
    };
    graph.node[ix].input[0] = sliced;
    graph.node.insert(ix, slice);
    true
}

impl CausalLm {
    /// Loads `dir/model.onnx` with its tokenizer files.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self, ModelError> {
        let path = dir.join("model.onnx");
        let fail = |e: TractError| ModelError::Load {
            path: path.clone(),
            reason: reason(&e),
        };
        let shape_err = |reason: String| ModelError::Shape {
            model: model_name(dir),
            reason,
        };
        if !path.is_file() {
            return Err(ModelError::Load {
                path: path.clone(),
                reason: "model.onnx is missing".into(),
            });
        }
        let tokenizer = TextTokenizer::load(dir)?;
        let context = read_context_length(dir)?;

        let mut onnx = tract_onnx::onnx()
            .with_ignore_output_shapes(true)
            .with_ignore_value_info(true);
        let mut proto = onnx.proto_model_for_path(&path).map_err(fail)?;
        let last_only = options.last_logits_only && keep_last_logits(&mut proto);
        // kith's kernel runs 4-bit layers where it has SIMD for them, and
        // 8-bit ones (which tract does not take) everywhere.
        q4::register(&mut onnx);
        let only_8bit = !(options.fast_q4 && q4::Kernel::simd_available());
        let fused = q4::fuse_q4_linears(&mut proto, only_8bit).0;
        let parsed = onnx
            .parse(&proto, dir.to_str())
            .map_err(|e| fail(e.context("parsing the ONNX graph")))?;
        drop(proto);
        let mut model = parsed.model;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(shape_err(format!(
                "unresolved inputs {:?}",
                parsed.unresolved_inputs
            )));
        }

        // Name the inputs and outputs, and fix batch = 1 on each input.
        let seq = model.symbols.sym("S");
        let past_len = model.symbols.sym("P");
        let mut io = Io {
            ids: usize::MAX,
            mask: None,
            positions: None,
            past: Vec::new(),
            logits: usize::MAX,
            present: Vec::new(),
            cache_shape: Vec::new(),
            n_inputs: model.inputs.len(),
        };
        let input_names: Vec<String> = model
            .inputs
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let mut past_names = Vec::new();
        for (ix, name) in input_names.iter().enumerate() {
            let fact = match name.as_str() {
                "input_ids" => {
                    io.ids = ix;
                    i64::fact([1.to_dim(), seq.to_dim()])
                }
                "attention_mask" => {
                    io.mask = Some(ix);
                    i64::fact([1.to_dim(), past_len.to_dim() + seq.to_dim()])
                }
                "position_ids" => {
                    io.positions = Some(ix);
                    i64::fact([1.to_dim(), seq.to_dim()])
                }
                n if n.starts_with("past_key_values.") => {
                    let declared = model.input_fact(ix).map_err(fail)?;
                    let dims: Vec<Option<i64>> = (0..4)
                        .map(|d| {
                            declared
                                .shape
                                .dim(d)
                                .and_then(|d| d.concretize())
                                .and_then(|d| d.to_i64().ok())
                        })
                        .collect();
                    let (Some(heads), Some(head_dim)) = (dims[1], dims[3]) else {
                        return Err(shape_err(format!(
                            "input {n} must declare its heads and head size (got {:?})",
                            declared.shape
                        )));
                    };
                    io.past.push(ix);
                    io.cache_shape.push((heads as usize, head_dim as usize));
                    past_names.push(n.to_string());
                    f32::fact([
                        1.to_dim(),
                        (heads as usize).to_dim(),
                        past_len.to_dim(),
                        (head_dim as usize).to_dim(),
                    ])
                }
                other => {
                    return Err(shape_err(format!(
                        "unsupported input `{other}` (expected input_ids, attention_mask, position_ids, past_key_values.N.key/value)"
                    )));
                }
            };
            model = model.with_input_fact(ix, fact.into()).map_err(fail)?;
        }
        if io.ids == usize::MAX {
            return Err(shape_err("no `input_ids` input".into()));
        }
        let output_names: Vec<String> = model
            .outputs
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| model.node(o.node).name.clone())
            })
            .collect();
        io.logits = output_names
            .iter()
            .position(|n| n == "logits")
            .ok_or_else(|| shape_err("no `logits` output".into()))?;
        for past in &past_names {
            let present = past.replacen("past_key_values", "present", 1);
            let ix = output_names
                .iter()
                .position(|n| *n == present)
                .ok_or_else(|| shape_err(format!("input {past} has no `{present}` output")))?;
            io.present.push(ix);
        }

        let optimized = model
            .into_typed()
            .map_err(|e| fail(e.context("typing the graph")))?
            .into_optimized()
            .map_err(|e| fail(e.context("optimizing")))?;
        let vocab_dim = optimized
            .outlet_fact(optimized.outputs[io.logits])
            .map_err(fail)?
            .shape
            .last()
            .and_then(|d| d.to_i64().ok())
            .unwrap_or(tokenizer.vocab_size() as i64) as usize;
        let run_options = tract_onnx::tract_core::runtime::RunOptions {
            executor: (options.threads > 1)
                .then(|| tract_linalg::multithread::Executor::multithread(options.threads)),
            ..Default::default()
        };
        let plan = optimized
            .into_runnable_with_options(&run_options)
            .map_err(fail)?;
        let state = plan.spawn().map_err(fail)?;
        let mut lm = CausalLm {
            name: model_name(dir),
            path: path.clone(),
            state,
            tokenizer,
            io,
            context,
            cache: Vec::new(),
            cached: Vec::new(),
            vocab: vocab_dim,
            last_logits_only: false,
            profile: None,
            profile_detailed: false,
            fused_q4: 0,
        };
        lm.reset_cache()?;
        lm.last_logits_only = last_only;
        release_freed_heap();
        lm.fused_q4 = fused;
        Ok(lm)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The context window: prompt and generated tokens together.
    pub fn context_length(&self) -> usize {
        self.context
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Starts (or with `false` stops) timing every operator of every run.
    /// `detailed` keys the profile by node (layers folded together).
    pub fn set_profiling(&mut self, on: bool, detailed: bool) {
        self.profile = on.then(OpProfile::new);
        self.profile_detailed = detailed;
    }

    /// Takes the profile gathered since the last call (profiling stays on).
    pub fn take_profile(&mut self) -> Option<OpProfile> {
        self.profile.as_mut().map(std::mem::take)
    }

    /// How many quantized layers run on kith's kernel (the others on tract's).
    pub fn fast_q4_layers(&self) -> usize {
        self.fused_q4
    }

    /// Whether prefill computes logits for the last position only.
    pub fn last_logits_only(&self) -> bool {
        self.last_logits_only
    }

    /// Forgets every cached token.
    pub fn reset_cache(&mut self) -> Result<(), ModelError> {
        self.cache = self
            .io
            .cache_shape
            .iter()
            .map(|&(h, d)| Tensor::zero::<f32>(&[1, h, 0, d]).map(TValue::from))
            .collect::<TractResult<Vec<_>>>()
            .map_err(|e| self.run_error(e))?;
        self.cached.clear();
        Ok(())
    }

    fn run_error(&self, e: TractError) -> ModelError {
        ModelError::Run {
            model: self.name.clone(),
            reason: reason(&e),
        }
    }

    /// Keeps only the first `n` cached tokens.
    fn truncate_cache(&mut self, n: usize) -> Result<(), ModelError> {
        if n >= self.cached.len() {
            return Ok(());
        }
        if n == 0 {
            return self.reset_cache();
        }
        for t in self.cache.iter_mut() {
            let sliced = t.slice(2, 0, n).map_err(|e| ModelError::Run {
                model: self.name.clone(),
                reason: reason(&e),
            })?;
            *t = sliced.into();
        }
        self.cached.truncate(n);
        Ok(())
    }

    /// Runs the model on `tokens` after the cached ones; returns the logits
    /// of the last position and extends the cache.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Input("no tokens to run".into()));
        }
        let past = self.cached.len();
        let total = past + tokens.len();
        if total > self.context {
            return Err(ModelError::ContextOverflow {
                tokens: total,
                context: self.context,
            });
        }
        let s = tokens.len();
        let mut inputs: TVec<TValue> = tvec![TValue::from(Tensor::zero::<i64>(&[0]).map_err(|e| self.run_error(e))?); self.io.n_inputs];
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        inputs[self.io.ids] = tensor1(&ids)
            .into_shape(&[1, s])
            .map_err(|e| self.run_error(e))?
            .into();
        if let Some(ix) = self.io.mask {
            inputs[ix] = Tensor::from_shape(&[1, total], &vec![1i64; total])
                .map_err(|e| self.run_error(e))?
                .into();
        }
        if let Some(ix) = self.io.positions {
            let pos: Vec<i64> = (past as i64..total as i64).collect();
            inputs[ix] = Tensor::from_shape(&[1, s], &pos)
                .map_err(|e| self.run_error(e))?
                .into();
        }
        for (slot, &ix) in self.io.past.iter().enumerate() {
            inputs[ix] = self.cache[slot].clone();
        }
        let detailed = self.profile_detailed;
        let mut outputs = match self.profile.as_mut() {
            None => self.state.run(inputs),
            Some(profile) => self
                .state
                .run_plan_with_eval(inputs, |ctx, state, node, input| {
                    let t = std::time::Instant::now();
                    let out = tract_onnx::tract_core::plan::eval(ctx, state, node, input);
                    let key = if detailed {
                        format!("{} {}", node.op().name(), generic_node_name(&node.name))
                    } else {
                        node.op().name().to_string()
                    };
                    let entry = profile.entry(key).or_default();
                    entry.0 += 1;
                    entry.1 += t.elapsed();
                    out
                }),
        }
        .map_err(|e| self.run_error(e))?;
        for (slot, &ix) in self.io.present.iter().enumerate() {
            self.cache[slot] = outputs[ix].clone();
        }
        self.cached.extend_from_slice(tokens);
        let logits = std::mem::replace(
            &mut outputs[self.io.logits],
            TValue::from(Tensor::zero::<f32>(&[0]).map_err(|e| self.run_error(e))?),
        );
        drop(outputs);
        let view = logits.try_as_plain_ram().map_err(|e| self.run_error(e))?;
        let all = view.as_slice::<f32>().map_err(|e| self.run_error(e))?;
        if all.len() < self.vocab || all.len() % self.vocab != 0 {
            return Err(ModelError::Shape {
                model: self.name.clone(),
                reason: format!(
                    "logits hold {} values for a vocabulary of {}",
                    all.len(),
                    self.vocab
                ),
            });
        }
        Ok(all[all.len() - self.vocab..].to_vec())
    }

    /// Prepares a generation from prompt token ids: reuses the longest cached
    /// prefix, runs the rest of the prompt, and returns an iterator of pieces.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        options: &GenerateOptions,
    ) -> Result<Generation<'_>, ModelError> {
        if prompt.is_empty() {
            return Err(ModelError::Input("the prompt is empty".into()));
        }
        if prompt.len() >= self.context {
            return Err(ModelError::ContextOverflow {
                tokens: prompt.len(),
                context: self.context,
            });
        }
        if options.stop.iter().any(String::is_empty) {
            return Err(ModelError::Input("a stop string is empty".into()));
        }
        let sampler = Sampler::new(options.sampling.clone())?;
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        self.truncate_cache(common)?;
        let logits = self.forward(&prompt[common..])?;
        Ok(Generation {
            recent: prompt.to_vec(),
            lm: self,
            sampler,
            logits,
            max_tokens: options.max_tokens,
            stop: options.stop.clone(),
            ignore_eos: options.ignore_eos,
            generated: 0,
            stream: TextStream::default(),
            held: String::new(),
            finished: None,
            reused: common,
        })
    }
}

/// Parsing a model allocates (and frees) about as much again as the model
/// holds; glibc keeps those pages, which doubled the resident size (300 MB ->
/// 150 MB for SmolLM2-135M after trimming). Hand them back.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the heap to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn read_context_length(dir: &Path) -> Result<usize, ModelError> {
    let path = dir.join("config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(2048),
        Err(e) => {
            return Err(ModelError::Load {
                path,
                reason: e.to_string(),
            });
        }
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Load {
        path: path.clone(),
        reason: format!("invalid JSON: {e}"),
    })?;
    Ok([
        "max_position_embeddings",
        "n_positions",
        "max_sequence_length",
    ]
    .iter()
    .find_map(|k| v.get(*k).and_then(serde_json::Value::as_u64))
    .unwrap_or(2048) as usize)
}

/// One step of a generation: the token and the text it completes (empty
/// while a UTF-8 character or a possible stop string is incomplete).
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub token: u32,
    pub text: String,
}

/// A generation in progress; each `next()` runs one decode step.
pub struct Generation<'a> {
    lm: &'a mut CausalLm,
    sampler: Sampler,
    /// Logits for the next token.
    logits: Vec<f32>,
    /// Prompt and generated tokens (the repetition penalty's window).
    recent: Vec<u32>,
    max_tokens: Option<usize>,
    stop: Vec<String>,
    ignore_eos: bool,
    generated: usize,
    stream: TextStream,
    /// Text held back because it may be the start of a stop string.
    held: String,
    finished: Option<FinishReason>,
    /// Prompt tokens whose cache was reused from the previous generation.
    reused: usize,
}

impl Generation<'_> {
    /// Why the generation ended, once `next()` returned `None`.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Tokens generated so far.
    pub fn generated_tokens(&self) -> usize {
        self.generated
    }

    /// Prompt tokens that did not need to run again (cache reuse).
    pub fn reused_prompt_tokens(&self) -> usize {
        self.reused
    }

    /// Splits `held` at a stop string, or releases what cannot start one.
    fn release(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if self.stop.is_empty() {
            return (std::mem::take(&mut self.held), false);
        }
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a prefix of some stop string.
        let mut keep = 0;
        for s in &self.stop {
            for (i, _) in self.held.char_indices() {
                let suffix = &self.held[i..];
                if s.starts_with(suffix) {
                    keep = keep.max(suffix.len());
                    break;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    fn step(&mut self) -> Result<Option<Piece>, ModelError> {
        if self.finished.is_some() {
            return Ok(None);
        }
        if self.max_tokens.is_some_and(|m| self.generated >= m) {
            self.finished = Some(FinishReason::Length);
            return Ok(None);
        }
        let token = self.sampler.sample(&mut self.logits, &self.recent);
        if !self.ignore_eos && self.lm.tokenizer.is_eos(token) {
            self.finished = Some(FinishReason::Stop);
            let tail = self.stream.finish(&self.lm.tokenizer)?;
            let (text, _) = self.release(&tail);
            let text = text + &std::mem::take(&mut self.held);
            return Ok((!text.is_empty()).then_some(Piece { token, text }));
        }
        self.generated += 1;
        self.recent.push(token);
        let new_text = self.stream.push(&self.lm.tokenizer, token)?;
        let (text, stopped) = self.release(&new_text);
        if stopped {
            self.finished = Some(FinishReason::Stop);
            return Ok(Some(Piece { token, text }));
        }
        let at_limit = self.max_tokens.is_some_and(|m| self.generated >= m);
        if self.lm.cached.len() + 1 > self.lm.context && !at_limit {
            self.finished = Some(FinishReason::ContextFull);
        } else if !at_limit {
            self.logits = self.lm.forward(&[token])?;
        }
        let mut text = text;
        if at_limit || self.finished.is_some() {
            let tail = self.stream.finish(&self.lm.tokenizer)?;
            let (more, _) = self.release(&tail);
            text.push_str(&more);
            text.push_str(&std::mem::take(&mut self.held));
            if self.finished.is_none() {
                self.finished = Some(FinishReason::Length);
            }
        }
        Ok(Some(Piece { token, text }))
    }
}

impl Iterator for Generation<'_> {
    type Item = Result<Piece, ModelError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.step() {
            Ok(Some(p)) => Some(Ok(p)),
            Ok(None) => None,
            Err(e) => {
                self.finished = Some(FinishReason::Stop);
                Some(Err(e))
            }
        }
    }
}

impl std::fmt::Debug for CausalLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CausalLm")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("context", &self.context)
            .field("cached", &self.cached.len())
            .finish()
    }
}
