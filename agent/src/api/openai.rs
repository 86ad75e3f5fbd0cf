//! `POST /v1/chat/completions` and `POST /v1/completions`, as OpenAI's
//! clients expect them: the same request fields, response objects, SSE
//! chunks and `[DONE]`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use kith_models::llm::{ChatMessage, GenerateOptions, SamplingParams};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{ApiError, AppState, InFlightGuard, json_response, read_json, sse_response};
use crate::mesh::delegate::{self, Load, Route};
use crate::worker::{Finish, Job, ModelWorker, Prompt, TextEvent};

/// Events buffered between a worker and its response.
const EVENT_BUFFER: usize = 32;

/// Fields both endpoints share.
#[derive(Debug, Deserialize)]
struct Sampling {
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// Not OpenAI's, but llama.cpp's and vLLM's.
    top_k: Option<usize>,
    repetition_penalty: Option<f32>,
    stop: Option<Stop>,
    seed: Option<u64>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// A message's content: a string, or an array of parts of which text is read.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: PromptField,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

/// Which endpoint a response is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

impl Sampling {
    /// Generation options with the configured defaults; 400 naming the field when invalid.
    fn options(&self, state: &AppState) -> Result<GenerateOptions, ApiError> {
        let defaults = &state.config.generation;
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::bad_request(format!(
                "n = {n}: kith returns one choice per request"
            ))
            .param("n"));
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        if max_tokens == Some(0) {
            return Err(ApiError::bad_request("max_tokens must be at least 1").param("max_tokens"));
        }
        let temperature = self.temperature.unwrap_or(defaults.temperature);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(ApiError::bad_request(format!(
                "temperature = {temperature}: must be within 0..=2"
            ))
            .param("temperature"));
        }
        let top_p = self.top_p.unwrap_or(defaults.top_p);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(
                ApiError::bad_request(format!("top_p = {top_p}: must be within (0, 1]"))
                    .param("top_p"),
            );
        }
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
            return Err(ApiError::bad_request(format!(
                "repetition_penalty = {repetition_penalty}: must be > 0"
            ))
            .param("repetition_penalty"));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 || stop.iter().any(|s| s.is_empty()) {
            return Err(
                ApiError::bad_request("stop takes up to 4 non-empty strings").param("stop"),
            );
        }
        Ok(GenerateOptions {
            sampling: SamplingParams {
                temperature,
                top_k: self.top_k.unwrap_or(0),
                top_p,
                repetition_penalty,
                seed: self.seed.unwrap_or_else(random_seed),
            },
            max_tokens: Some(max_tokens.unwrap_or(u64::from(defaults.max_tokens)) as usize),
            stop,
            ignore_eos: false,
        })
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// A seed for requests that give none (sampling is then not reproducible, as with OpenAI).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(SystemTime::now())
}

fn chat_messages(messages: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages is empty").param("messages"));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}].role = {:?}: expected system, user or assistant",
                    m.role
                ))
                .param(format!("messages[{i}].role")));
            }
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        if p.kind != "text" {
                            return Err(ApiError::bad_request(format!(
                                "messages[{i}] has a `{}` part: kith's text models read text parts only",
                                p.kind
                            ))
                            .param(format!("messages[{i}].content")));
                        }
                        text.push_str(p.text.as_deref().unwrap_or(""));
                    }
                    text
                }
            };
            let role = if m.role == "developer" { "system".to_string() } else { m.role };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let guard = state.admit()?;
    let body: ChatRequest = read_json(&state, req).await?;
    let options = body.sampling.options(&state)?;
    let prompt = Prompt::Chat(chat_messages(body.messages)?);
    let reply = Reply {
        kind: Kind::Chat,
        model: body.model,
        stream: body.sampling.stream,
        include_usage: body.sampling.include_usage(),
    };
    run(state, guard, reply, prompt, options).await
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let guard = state.admit()?;
    let body: CompletionRequest = read_json(&state, req).await?;
    let options = body.sampling.options(&state)?;
    let text = match body.prompt {
        PromptField::One(s) => s,
        PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptField::Many(_) => {
            return Err(
                ApiError::bad_request("prompt: kith takes one prompt per request").param("prompt"),
            );
        }
    };
    if text.is_empty() {
        return Err(ApiError::bad_request("prompt is empty").param("prompt"));
    }
    let reply = Reply {
        kind: Kind::Completion,
        model: body.model,
        stream: body.sampling.stream,
        include_usage: body.sampling.include_usage(),
    };
    run(state, guard, reply, Prompt::Text(text), options).await
}

/// How to answer one request.
struct Reply {
    kind: Kind,
    model: String,
    stream: bool,
    include_usage: bool,
}

async fn run(
    state: Arc<AppState>,
    guard: InFlightGuard,
    mut reply: Reply,
    prompt: Prompt,
    options: GenerateOptions,
) -> Result<Response, ApiError> {
    let mut rx = dispatch(&state, &mut reply.model, prompt, options, !reply.stream)?;
    // The first event decides the status: errors before any token are plain HTTP errors.
    let (prompt_tokens, node) = match rx.recv().await {
        Some(TextEvent::Started {
            prompt_tokens,
            node,
        }) => (prompt_tokens, node.unwrap_or_else(|| state.node.clone())),
        Some(TextEvent::Failed(e)) => return Err(e.into()),
        Some(other) => return Err(ApiError::internal(format!("worker sent {other:?} first"))),
        None => return Err(ApiError::internal("the model worker stopped")),
    };
    let head = Head::new(&reply);
    if reply.stream {
        let stream = SseStream {
            rx,
            head,
            pending: VecDeque::new(),
            prompt_tokens,
            include_usage: reply.include_usage,
            done: false,
            _guard: guard,
        };
        return Ok(with_node(
            sse_response(Body::from_stream(stream.into_stream())),
            &node,
        ));
    }
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(TextEvent::Text(t)) => text.push_str(&t),
            Some(TextEvent::Restart) => text.clear(),
            Some(TextEvent::Done {
                finish,
                completion_tokens,
            }) => {
                return Ok(with_node(
                    json_response(
                        StatusCode::OK,
                        &head.complete(&text, finish, prompt_tokens, completion_tokens),
                    ),
                    &node,
                ));
            }
            Some(TextEvent::Failed(e)) => return Err(e.into()),
            Some(TextEvent::Started { .. }) => {}
            None => return Err(ApiError::internal("the model worker stopped mid-answer")),
        }
    }
}

/// Names the node that ran the request (`x-kith-node`).
fn with_node(mut response: Response, node: &str) -> Response {
    if let Ok(v) = axum::http::HeaderValue::from_str(node) {
        response.headers_mut().insert("x-kith-node", v);
    }
    response
}

/// Rough token count of a prompt (4 bytes a token), for routing only.
fn estimate_tokens(prompt: &Prompt) -> u32 {
    let bytes: usize = match prompt {
        Prompt::Chat(m) => m.iter().map(|m| m.content.len() + 4).sum(),
        Prompt::Text(t) => t.len(),
    };
    (bytes / 4).min(u32::MAX as usize) as u32
}

/// Sends a text request where it will finish soonest: this node, or a peer
/// (see `mesh::delegate`). Resolves `model: "auto"` first.
fn dispatch(
    state: &Arc<AppState>,
    model: &mut String,
    prompt: Prompt,
    options: GenerateOptions,
    restartable: bool,
) -> Result<mpsc::Receiver<TextEvent>, ApiError> {
    let mesh = state.mesh().filter(|m| m.config.delegate).cloned();
    let max_tokens = options.max_tokens.unwrap_or(256).min(u32::MAX as usize) as u32;
    let prompt_tokens = estimate_tokens(&prompt);
    if model == "auto" {
        *model = auto(state, mesh.as_deref(), prompt_tokens + max_tokens)?;
    }
    let local = state.local_text_worker(model);
    let peers = mesh
        .as_ref()
        .map(|m| m.peers_with(model))
        .unwrap_or_default();
    let mesh = match mesh {
        Some(m) if !peers.is_empty() => m,
        _ => return submit_local(&local?, model, prompt, options),
    };
    if let Err(e) = &local
        && e.status != StatusCode::NOT_FOUND
    {
        return Err(e.clone());
    }
    let local_load = local.as_ref().ok().map(|w| Load {
        loaded: w.stats.loaded.load(Ordering::Relaxed),
        queued: w.stats.queued.load(Ordering::Relaxed) as u32,
        busy: w.stats.busy.load(Ordering::Relaxed),
        capacity: w.capacity() as u32,
        decode_tps: w.stats.tokens_per_s_milli.load(Ordering::Relaxed) as f64 / 1000.0,
        service_s: w.stats.service_ms.load(Ordering::Relaxed) as f64 / 1000.0,
    });
    let peer_loads: Vec<_> = peers
        .iter()
        .map(|(id, m)| (id.clone(), Load::from(m), mesh.rtt(id)))
        .collect();
    let routes = delegate::rank(local_load, &peer_loads, prompt_tokens, max_tokens);
    let mut busy = None;
    for (i, route) in routes.iter().enumerate() {
        match route {
            Route::Local => match local.as_ref() {
                Ok(worker) => match submit_local(worker, model, prompt.clone(), options.clone()) {
                    Ok(rx) => return Ok(rx),
                    Err(e) => busy = Some(e),
                },
                Err(e) => return Err(e.clone()),
            },
            Route::Peer(_) => {
                let candidates: Vec<String> = routes[i..]
                    .iter()
                    .filter_map(|r| match r {
                        Route::Peer(p) => Some(p.clone()),
                        Route::Local => None,
                    })
                    .collect();
                let work = delegate::work(&prompt, &options)?;
                let (tx, rx) = mpsc::channel(EVENT_BUFFER);
                delegate::delegate(
                    mesh.clone(),
                    model.clone(),
                    work,
                    candidates,
                    restartable,
                    tx,
                );
                return Ok(rx);
            }
        }
    }
    Err(busy.unwrap_or_else(|| ApiError::unavailable(format!("no node can run `{model}` now"))))
}

/// The model `auto` stands for, by the request's size.
fn auto(
    state: &AppState,
    mesh: Option<&crate::mesh::Mesh>,
    tokens: u32,
) -> Result<String, ApiError> {
    let mut models: Vec<(String, u32)> = state
        .text_model_names()
        .into_iter()
        .filter(|n| n != "echo")
        .map(|n| {
            let size = state.model_size_mb(&n);
            (n, size)
        })
        .collect();
    for (_, m) in mesh.map(|m| m.peer_models()).unwrap_or_default() {
        if m.name.as_str() != "echo" && !models.iter().any(|(n, _)| n == m.name.as_str()) {
            models.push((m.name.to_string(), m.size_mb));
        }
    }
    delegate::auto_model(&models, tokens, state.config.mesh.auto_small_tokens).ok_or_else(|| {
        ApiError::model_not_found(
            "model `auto`: no text model is installed on this node or on its peers",
        )
        .param("model")
    })
}

fn submit_local(
    worker: &Arc<ModelWorker>,
    model: &str,
    prompt: Prompt,
    options: GenerateOptions,
) -> Result<mpsc::Receiver<TextEvent>, ApiError> {
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    worker
        .submit(Job {
            prompt,
            options,
            events: tx,
        })
        .map_err(|busy| {
            tracing::info!(model, queue = worker.depth(), "queue full: 429");
            ApiError::busy(model, busy)
        })?;
    Ok(rx)
}

/// What every object of one response shares.
struct Head {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Head {
    fn new(reply: &Reply) -> Head {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let prefix = match reply.kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        };
        Head {
            kind: reply.kind,
            id: format!("{prefix}-{created:x}{n:06x}"),
            created,
            model: reply.model.clone(),
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id, "object": self.object(chunk), "created": self.created,
            "model": self.model, "system_fingerprint": concat!("kith-", env!("CARGO_PKG_VERSION")),
            "choices": choices,
        })
    }

    fn complete(&self, text: &str, finish: Finish, prompt: usize, completion: usize) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": null, "finish_reason": finish.as_str(),
            }),
            Kind::Completion => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish.as_str(),
            }),
        };
        let mut v = self.envelope(false, json!([choice]));
        v["usage"] = usage(prompt, completion);
        v
    }

    /// One streamed piece; `role` only in a chat's first chunk.
    fn delta(&self, text: &str, first: bool, finish: Option<Finish>) -> Value {
        let finish = finish.map(Finish::as_str);
        let choice = match self.kind {
            Kind::Chat => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else if finish.is_some() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
        };
        self.envelope(true, json!([choice]))
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn frame(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// A streaming response: worker events turned into SSE frames. Dropping it
/// (the client left) drops the receiver, which stops the worker.
struct SseStream {
    rx: mpsc::Receiver<TextEvent>,
    head: Head,
    pending: VecDeque<Bytes>,
    prompt_tokens: usize,
    include_usage: bool,
    done: bool,
    /// Counts this response as in flight until its last byte.
    _guard: InFlightGuard,
}

impl SseStream {
    fn into_stream(
        mut self,
    ) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> {
        if self.head.kind == Kind::Chat {
            let first = self.head.delta("", true, None);
            self.pending.push_back(frame(&first));
        }
        futures_util::stream::unfold(self, |mut s| async move {
            loop {
                if let Some(b) = s.pending.pop_front() {
                    return Some((Ok(b), s));
                }
                if s.done {
                    return None;
                }
                s.next_event().await;
            }
        })
    }

    async fn next_event(&mut self) {
        match self.rx.recv().await {
            Some(TextEvent::Text(t)) => {
                let v = self.head.delta(&t, false, None);
                self.pending.push_back(frame(&v));
            }
            Some(TextEvent::Done {
                finish,
                completion_tokens,
            }) => {
                let v = self.head.delta("", false, Some(finish));
                self.pending.push_back(frame(&v));
                if self.include_usage {
                    let mut u = self.head.envelope(true, json!([]));
                    u["usage"] = usage(self.prompt_tokens, completion_tokens);
                    self.pending.push_back(frame(&u));
                }
                self.finish();
            }
            Some(TextEvent::Failed(e)) => {
                let e = ApiError::from(e);
                self.pending.push_back(frame(&e.body()));
                self.finish();
            }
            Some(TextEvent::Started { .. }) | Some(TextEvent::Restart) => {}
            None => {
                let e = ApiError::internal("the model worker stopped mid-answer");
                self.pending.push_back(frame(&e.body()));
                self.finish();
            }
        }
    }

    fn finish(&mut self) {
        self.pending
            .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.done = true;
    }
}
