//! The HTTP API: OpenAI-compatible text endpoints, speech-to-intent, the
//! event stream, health and metrics. Handlers parse and check requests and
//! hand the work to model workers (text) or to the intent engine on the
//! blocking pool (speech to intent); they never run inference themselves.

mod error;
mod metrics;
mod openai;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, watch};

pub use error::ApiError;
pub use metrics::Metrics;

use crate::config::Config;
use crate::store::ModelStore;
use crate::worker::{Backend, CutFlag, ModelWorker};

/// Everything the handlers share.
pub struct AppState {
    /// This node's name (logs, /health).
    pub node: String,
    /// The configuration the agent runs with.
    pub config: Config,
    /// Installed models, to list them and to start workers on demand.
    pub store: ModelStore,
    /// One worker per model that has been asked for (or preloaded).
    workers: Mutex<BTreeMap<String, Arc<ModelWorker>>>,
    /// Set at the first stop signal: new requests get 503.
    pub draining: AtomicBool,
    /// Set when the drain deadline passes: running jobs stop at their next token.
    pub cut: CutFlag,
    /// Requests admitted and not yet answered (streams count until their end).
    in_flight: Arc<AtomicUsize>,
    /// Request counters.
    pub metrics: Metrics,
    /// Audio events (JSON), fanned out to `GET /v1/events` clients.
    events: broadcast::Sender<String>,
    /// The last events, replayed to each new `GET /v1/events` client (the
    /// lock also orders publishing against subscribing: no gap, no repeat).
    recent_events: Mutex<std::collections::VecDeque<String>>,
    /// Becomes true when the server stops: endless streams end.
    pub shutdown: watch::Receiver<bool>,
    /// For uptime.
    pub started: Instant,
    /// The audio pipeline's figures.
    pub audio: AudioStatus,
    /// The mesh, when enabled (set once, after the API is bound).
    mesh: OnceLock<Arc<crate::mesh::Mesh>>,
    /// The speech-to-intent model (audio.intent), when configured.
    intent: OnceLock<Arc<crate::intent::IntentEngine>>,
}

/// What `/metrics` and `/health` show of the audio pipeline.
#[derive(Debug, Default)]
pub struct AudioStatus {
    /// A source is being listened to.
    pub running: AtomicBool,
    /// Real-time factor × 1e6 (processing time / audio time).
    pub rtf_micro: AtomicU64,
    /// Wake words heard.
    pub detections: AtomicU64,
}

/// Holds one unit of in-flight work until dropped.
pub struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AppState {
    pub fn new(
        node: String,
        config: Config,
        store: ModelStore,
        events: broadcast::Sender<String>,
        shutdown: watch::Receiver<bool>,
    ) -> AppState {
        AppState {
            node,
            config,
            store,
            workers: Mutex::new(BTreeMap::new()),
            draining: AtomicBool::new(false),
            cut: Arc::new(AtomicBool::new(false)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            metrics: Metrics::default(),
            events,
            recent_events: Mutex::new(std::collections::VecDeque::with_capacity(RECENT_EVENTS)),
            shutdown,
            started: Instant::now(),
            audio: AudioStatus::default(),
            mesh: OnceLock::new(),
            intent: OnceLock::new(),
        }
    }

    /// The speech-to-intent engine, when one is configured.
    pub fn intent(&self) -> Option<&Arc<crate::intent::IntentEngine>> {
        self.intent.get()
    }

    pub fn set_intent(&self, engine: Arc<crate::intent::IntentEngine>) {
        let _ = self.intent.set(engine);
    }

    /// The mesh, when this node is part of one.
    pub fn mesh(&self) -> Option<&Arc<crate::mesh::Mesh>> {
        self.mesh.get()
    }

    pub fn set_mesh(&self, mesh: Arc<crate::mesh::Mesh>) {
        let _ = self.mesh.set(mesh);
    }

    /// Size of an installed model's file, MiB (0 when unknown).
    pub fn model_size_mb(&self, name: &str) -> u32 {
        self.store
            .catalog()
            .model(name)
            .ok()
            .and_then(|m| std::fs::metadata(self.store.dir().join(m.hashed_file())).ok())
            .map_or(0, |md| (md.len() >> 20).min(u64::from(u32::MAX)) as u32)
    }

    /// Sends an event (JSON) to every `GET /v1/events` client, now and (for
    /// the last few) later.
    pub fn publish(&self, json: String) {
        if let Ok(mut recent) = self.recent_events.lock() {
            if recent.len() == RECENT_EVENTS {
                recent.pop_front();
            }
            recent.push_back(json.clone());
            let _ = self.events.send(json);
        }
    }

    /// The recent events and a receiver for the ones after them.
    fn subscribe(&self) -> (Vec<String>, broadcast::Receiver<String>) {
        match self.recent_events.lock() {
            Ok(recent) => (recent.iter().cloned().collect(), self.events.subscribe()),
            Err(_) => (Vec::new(), self.events.subscribe()),
        }
    }

    /// Admits a request, or 503 while draining.
    pub fn admit(&self) -> Result<InFlightGuard, ApiError> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlightGuard(self.in_flight.clone());
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::draining());
        }
        Ok(guard)
    }

    /// Requests admitted and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Every worker started so far.
    pub fn workers(&self) -> Vec<Arc<ModelWorker>> {
        self.workers
            .lock()
            .map(|w| w.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every worker thread is running.
    pub fn workers_alive(&self) -> bool {
        self.workers().iter().all(|w| w.alive())
    }

    /// Starts the worker of an installed model (or the echo model).
    pub fn start_worker(&self, name: &str, preload: bool) -> anyhow::Result<Arc<ModelWorker>> {
        let mut workers = self
            .workers
            .lock()
            .map_err(|_| anyhow::anyhow!("worker table poisoned"))?;
        if let Some(w) = workers.get(name) {
            return Ok(w.clone());
        }
        let backend = if name == "echo" && self.config.models.echo {
            Backend::Echo
        } else {
            let entry = self.store.catalog().model(name)?;
            anyhow::ensure!(
                entry.task == "text-generation",
                "model `{name}` is a {} model, not a text-generation one",
                entry.task
            );
            anyhow::ensure!(
                self.installed(name),
                "model `{name}` is not installed in {} (run `kith models fetch {name}`)",
                self.store.dir().display()
            );
            Backend::Language {
                dir: self.store.path(entry),
                threads: self.config.models.threads as usize,
                model: None,
            }
        };
        let worker = Arc::new(ModelWorker::spawn(
            name,
            backend,
            self.config.models.queue_depth as usize,
            preload,
            self.cut.clone(),
        )?);
        tracing::info!(
            model = name,
            task = worker.task,
            preload,
            "model worker started"
        );
        workers.insert(name.to_string(), worker.clone());
        Ok(worker)
    }

    /// The worker serving text model `name` on this node, started on first use.
    pub fn local_text_worker(&self, name: &str) -> Result<Arc<ModelWorker>, ApiError> {
        if let Some(w) = self.workers.lock().ok().and_then(|w| w.get(name).cloned()) {
            return Ok(w);
        }
        let text_models = || self.text_model_names().join(", ");
        if name == "echo" && self.config.models.echo {
            return self
                .start_worker(name, false)
                .map_err(|e| ApiError::internal(format!("{e:#}")));
        }
        match self.store.catalog().models.iter().find(|m| m.name == name) {
            Some(m) if m.task != "text-generation" => Err(ApiError::bad_request(format!(
                "model `{name}` is a {} model; this endpoint needs a text-generation model (installed: {})",
                m.task,
                text_models()
            ))
            .param("model")),
            Some(_) if !self.installed(name) => Err(ApiError::model_not_found(format!(
                "model `{name}` is not installed on node {} (run `kith models fetch {name}` there)",
                self.node
            ))
            .param("model")),
            Some(_) => self
                .start_worker(name, false)
                .map_err(|e| ApiError::internal(format!("{e:#}"))),
            None => Err(ApiError::model_not_found(format!(
                "model `{name}` does not exist (installed text models: {})",
                text_models()
            ))
            .param("model")),
        }
    }

    fn installed(&self, name: &str) -> bool {
        self.store
            .catalog()
            .model(name)
            .map(|m| self.store.dir().join(m.hashed_file()).is_file())
            .unwrap_or(false)
    }

    /// Installed text models, plus `echo` when enabled.
    pub fn text_model_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .store
            .catalog()
            .language_models()
            .filter(|m| self.installed(&m.name))
            .map(|m| m.name.clone())
            .collect();
        if self.config.models.echo {
            names.push("echo".into());
        }
        names
    }
}

/// The API's routes.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.api.max_body_bytes as usize;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics::render))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/audio/intents", post(audio_intents))
        .route("/v1/events", get(events))
        .route("/v1/mesh/peers", get(mesh_peers))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

async fn count_requests(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = metrics::route_label(req.uri().path());
    let response = next.run(req).await;
    state.metrics.count(route, response.status().as_u16());
    response
}

async fn unknown_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::unknown_route(method.as_str(), uri.path())
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// The body of `req`, at most `limit` bytes.
async fn read_body(req: Request, limit: u64) -> Result<Bytes, ApiError> {
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit
    {
        return Err(ApiError::too_large(limit));
    }
    axum::body::to_bytes(req.into_body(), limit as usize)
        .await
        .map_err(|e| {
            // http-body-util's limit error, somewhere in the chain.
            let mut cause: Option<&dyn std::error::Error> = Some(&e);
            while let Some(c) = cause {
                if c.to_string().contains("length limit exceeded") {
                    return ApiError::too_large(limit);
                }
                cause = c.source();
            }
            ApiError::bad_request(format!("reading the request body: {e}"))
        })
}

fn content_type(req: &Request) -> String {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

/// Reads a JSON request body into `T`: 415 for another content type, 413
/// when too large, 400 with serde's reason (and position) when malformed.
pub async fn read_json<T: DeserializeOwned>(state: &AppState, req: Request) -> Result<T, ApiError> {
    let ct = content_type(&req);
    if ct != "application/json" {
        let shown = if ct.is_empty() {
            "none".to_string()
        } else {
            ct
        };
        return Err(ApiError::unsupported_media_type(format!(
            "the body must be JSON with `Content-Type: application/json` (got: {shown}; with curl add -H 'Content-Type: application/json')"
        )));
    }
    let bytes = read_body(req, state.config.api.max_body_bytes).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid for this endpoint: {e}")))
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let draining = state.draining.load(Ordering::SeqCst);
    let workers: Vec<_> = state
        .workers()
        .iter()
        .map(|w| {
            serde_json::json!({
                "model": w.name, "alive": w.alive(),
                "loaded": w.stats.loaded.load(Ordering::Relaxed), "queue": w.depth(),
            })
        })
        .collect();
    let body = serde_json::json!({
        "status": if draining { "draining" } else { "ok" },
        "node": state.node,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started.elapsed().as_secs(),
        "in_flight": state.in_flight(),
        "workers": workers,
        "audio": state.audio.running.load(Ordering::Relaxed),
    });
    let status = if draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    json_response(status, &body)
}

fn model_object(id: &str, task: &str, loaded: bool) -> serde_json::Value {
    serde_json::json!({
        "id": id, "object": "model", "created": 0, "owned_by": "kith",
        "task": task, "loaded": loaded, "nodes": ["local"],
    })
}

fn installed_models(state: &AppState) -> Vec<serde_json::Value> {
    let workers = state.workers();
    let loaded = |name: &str| {
        workers
            .iter()
            .any(|w| w.name == name && w.stats.loaded.load(Ordering::Relaxed))
    };
    let mut data: Vec<_> = state
        .store
        .catalog()
        .models
        .iter()
        .filter(|m| state.installed(&m.name))
        .map(|m| model_object(&m.name, &m.task, loaded(&m.name)))
        .collect();
    if state.config.models.echo {
        data.push(model_object("echo", "echo", true));
    }
    // Models peers serve: this node answers for them too (by delegation).
    if let Some(mesh) = state.mesh().filter(|m| m.config.delegate) {
        for (peer, m) in mesh.peer_models() {
            let name = m.name.as_str();
            match data.iter_mut().find(|d| d["id"] == name) {
                Some(d) => {
                    if let Some(nodes) = d["nodes"].as_array_mut() {
                        nodes.push(peer.into());
                    }
                }
                None => {
                    let mut o = model_object(name, "text-generation", m.loaded);
                    o["nodes"] = serde_json::json!([peer]);
                    data.push(o);
                }
            }
        }
    }
    let text = data.iter().any(|d| d["task"] == "text-generation");
    if text {
        let mut auto = model_object("auto", "text-generation", true);
        auto["description"] =
            "the smallest text model for short requests, the largest in the mesh for long ones"
                .into();
        data.push(auto);
    }
    data
}

async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    let data = installed_models(&state);
    json_response(
        StatusCode::OK,
        &serde_json::json!({"object": "list", "data": data}),
    )
}

async fn get_model(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match installed_models(&state)
        .into_iter()
        .find(|m| m["id"] == id.as_str())
    {
        Some(m) => json_response(StatusCode::OK, &m),
        None => ApiError::model_not_found(format!("model `{id}` is not installed on this node"))
            .into_response(),
    }
}

/// `GET /v1/mesh/peers`: the peer table and the broker in use.
async fn mesh_peers(State(state): State<Arc<AppState>>) -> Response {
    match state.mesh() {
        Some(mesh) => json_response(StatusCode::OK, &mesh.to_json()),
        None => json_response(
            StatusCode::OK,
            &serde_json::json!({
                "node": state.node, "enabled": false, "peers": [],
                "hint": "the mesh is off on this node (mesh.enabled = false)",
            }),
        ),
    }
}

/// `GET /v1/events`: audio events as server-sent events, until the client
/// leaves or the agent stops.
async fn events(State(state): State<Arc<AppState>>) -> Response {
    let (recent, rx) = state.subscribe();
    let mut backlog: std::collections::VecDeque<Bytes> =
        std::iter::once(Bytes::from_static(b": kith events\n\n"))
            .chain(
                recent
                    .into_iter()
                    .map(|json| Bytes::from(format!("data: {json}\n\n"))),
            )
            .collect();
    let shutdown = state.shutdown.clone();
    let stream = futures_util::stream::unfold((rx, shutdown), move |(mut rx, mut shutdown)| {
        let next = backlog.pop_front();
        async move {
            if let Some(frame) = next {
                return Some((Ok::<_, std::convert::Infallible>(frame), (rx, shutdown)));
            }
            loop {
                let ev = tokio::select! {
                    ev = rx.recv() => Some(ev),
                    _ = shutdown.wait_for(|stop| *stop) => None,
                };
                match ev {
                    Some(Ok(json)) => {
                        let frame = Bytes::from(format!("data: {json}\n\n"));
                        return Some((Ok(frame), (rx, shutdown)));
                    }
                    Some(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                    Some(Err(broadcast::error::RecvError::Closed)) | None => return None,
                }
            }
        }
    });
    sse_response(Body::from_stream(stream))
}

fn sse_response(body: Body) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `POST /v1/audio/intents`: a WAV body, or multipart `file` + `model`.
async fn audio_intents(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let _guard = state.admit()?;
    let limit = state.config.api.max_body_bytes;
    let query_model = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("model=")))
        .map(str::to_string);
    let (wav, model) = match content_type(&req).as_str() {
        "audio/wav"
        | "audio/x-wav"
        | "audio/wave"
        | "audio/vnd.wave"
        | "application/octet-stream" => (read_body(req, limit).await?.to_vec(), query_model),
        "multipart/form-data" => {
            let mut form = Multipart::from_request(req, &())
                .await
                .map_err(|e| ApiError::bad_request(format!("reading the multipart form: {e}")))?;
            let (mut file, mut model) = (None, query_model);
            while let Some(field) = form
                .next_field()
                .await
                .map_err(|e| multipart_error(e, limit))?
            {
                match field.name() {
                    Some("file") => {
                        file = Some(
                            field
                                .bytes()
                                .await
                                .map_err(|e| multipart_error(e, limit))?
                                .to_vec(),
                        )
                    }
                    Some("model") => {
                        model = Some(field.text().await.map_err(|e| multipart_error(e, limit))?)
                    }
                    _ => {}
                }
            }
            let file = file.ok_or_else(|| {
                ApiError::bad_request("the form has no `file` field (the WAV audio)").param("file")
            })?;
            (file, model)
        }
        other => {
            return Err(ApiError::unsupported_media_type(format!(
                "send the audio as a WAV body (Content-Type: audio/wav) or as multipart/form-data with a `file` field (got: {})",
                if other.is_empty() { "none" } else { other }
            )));
        }
    };
    // Decoding is CPU work: off the runtime.
    let samples = tokio::task::spawn_blocking(move || decode_wav(wav))
        .await
        .map_err(|e| ApiError::internal(format!("decoding task: {e}")))??;
    let duration_ms = samples.len() as u64 * 1000 / u64::from(kith_hal::SAMPLE_RATE);
    let model = model.unwrap_or_default();
    let Some(engine) = state.intent().cloned() else {
        return Err(ApiError::model_not_found(format!(
            "no speech-to-intent model is configured on node {} (the {duration_ms} ms of audio were read fine): start it with `kith up --intent DIR` or set audio.intent",
            state.node
        ))
        .param("model"));
    };
    if !model.is_empty() && model != engine.name {
        return Err(ApiError::model_not_found(format!(
            "speech-to-intent model `{model}` is not installed on node {} (installed: {})",
            state.node, engine.name
        ))
        .param("model"));
    }
    let started = Instant::now();
    let understood = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || engine.understand(&samples))
            .await
            .map_err(|e| ApiError::internal(format!("intent task: {e}")))?
            .map_err(|e| ApiError::internal(format!("understanding the command: {e:#}")))?
    };
    tracing::info!(
        duration_ms,
        model = %engine.name,
        understood = understood.understood,
        intent = understood.intent.as_deref().unwrap_or(""),
        ms = started.elapsed().as_millis() as u64,
        "audio intent request"
    );
    let mut head = serde_json::Map::new();
    head.insert("model".into(), engine.name.clone().into());
    head.insert("duration_ms".into(), duration_ms.into());
    Ok(json_response(
        StatusCode::OK,
        &crate::intent::understanding_json(head, &understood),
    ))
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: u64) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(limit)
    } else {
        ApiError::bad_request(format!("reading the multipart form: {}", e.body_text()))
    }
}

/// Checks that `bytes` are a complete WAV file; returns its duration.
fn decode_wav(bytes: Vec<u8>) -> Result<Vec<i16>, ApiError> {
    use kith_hal::AudioSource;
    let mut source = kith_hal::WavSource::from_bytes("the uploaded audio", bytes)
        .map_err(|e| ApiError::bad_request(e.to_string()).param("file"))?;
    let mut buf = [0i16; 4096];
    let mut samples = Vec::new();
    loop {
        match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => samples.extend_from_slice(&buf[..n]),
            Err(e) => return Err(ApiError::bad_request(e.to_string()).param("file")),
        }
        if samples.len() > MAX_COMMAND_SAMPLES {
            return Err(ApiError::bad_request(format!(
                "the audio is longer than {} s: a spoken command is a few seconds (the model hears the last 5.12 s)",
                MAX_COMMAND_SAMPLES / kith_hal::SAMPLE_RATE as usize
            ))
            .param("file"));
        }
    }
    Ok(samples)
}

/// Longest upload `POST /v1/audio/intents` takes, in samples (60 s).
const MAX_COMMAND_SAMPLES: usize = 60 * kith_hal::SAMPLE_RATE as usize;

/// Events replayed to a new `GET /v1/events` client.
const RECENT_EVENTS: usize = 16;

/// How long the drain waits between checks.
pub const DRAIN_POLL: Duration = Duration::from_millis(20);
