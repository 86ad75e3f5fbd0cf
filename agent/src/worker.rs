//! Model workers: one plain thread per model, fed by a bounded queue.
//!
//! Inference never runs on the async runtime. A request becomes a [`Job`];
//! [`ModelWorker::submit`] refuses it when the queue is full (the API answers
//! 429), so waiting work is bounded by `queue_depth` per model. The worker
//! streams [`TextEvent`]s back on a bounded channel; when the receiver is
//! gone (the client hung up) it stops generating at the next token.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kith_models::ModelError;
use kith_models::llm::{CausalLm, ChatMessage, FinishReason, GenerateOptions, LoadOptions};
use tokio::sync::mpsc;

/// What a text job asks for.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Messages rendered through the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Raw text, tokenized as is.
    Text(String),
}

/// Events of one text job, in order: `Started`, any number of `Text`, then
/// `Done`; or `Failed` at any point.
#[derive(Debug)]
pub enum TextEvent {
    Started {
        prompt_tokens: usize,
        /// The peer that runs the job; `None`: this node.
        node: Option<String>,
    },
    Text(String),
    /// The text so far is void: the job starts over on another node (a
    /// delegated, non-streamed request whose node failed mid-answer).
    Restart,
    Done {
        finish: Finish,
        completion_tokens: usize,
    },
    Failed(JobError),
}

/// Why a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Model(FinishReason),
    /// The drain deadline passed during shutdown.
    Cut,
}

impl Finish {
    /// OpenAI's `finish_reason`: a cut answer is a truncated one.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Model(r) => r.as_str(),
            Finish::Cut => "length",
        }
    }
}

/// A job that could not run.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    /// The request cannot be served by this model (prompt too long…).
    #[error("{0}")]
    BadRequest(String),
    /// The prompt does not fit the context window.
    #[error("{0}")]
    ContextLength(String),
    /// The model failed to load or to run.
    #[error("{0}")]
    Model(String),
    /// No node could run it (peers gone, busy or without the model).
    #[error("{0}")]
    Unavailable(String),
    /// The agent is shutting down and the job never started.
    #[error("kith is shutting down; the request was not started")]
    ShuttingDown,
}

/// One request for a worker.
pub struct Job {
    pub prompt: Prompt,
    pub options: GenerateOptions,
    /// Where events go; bounded, so a slow client slows its own job only.
    pub events: mpsc::Sender<TextEvent>,
}

/// The queue is full; try again after roughly this long.
#[derive(Debug, Clone, Copy)]
pub struct Busy {
    pub retry_after: Duration,
}

/// What a worker runs.
pub enum Backend {
    /// A language model directory, loaded on first use.
    Language {
        dir: PathBuf,
        threads: usize,
        model: Option<Box<CausalLm>>,
    },
    /// Answers with the prompt's last words: the API without a model.
    Echo,
}

/// Figures a worker keeps for `/metrics`, health and Retry-After.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Jobs waiting in the queue.
    pub queued: AtomicUsize,
    /// A job is running.
    pub busy: AtomicBool,
    /// The model is in memory.
    pub loaded: AtomicBool,
    /// Jobs finished (any outcome).
    pub jobs: AtomicU64,
    /// Tokens generated.
    pub tokens: AtomicU64,
    /// Jobs stopped because their client went away.
    pub abandoned: AtomicU64,
    /// Decode speed of the last job, tokens/s × 1000.
    pub tokens_per_s_milli: AtomicU64,
    /// Moving average of a job's duration, ms.
    pub service_ms: AtomicU64,
    /// Milliseconds since the worker started, when it last showed progress.
    pub heartbeat_ms: AtomicU64,
}

/// A model's thread and its queue.
pub struct ModelWorker {
    /// The model's name in the API.
    pub name: String,
    /// "text-generation" or "echo".
    pub task: &'static str,
    jobs: SyncSender<Job>,
    capacity: usize,
    pub stats: Arc<WorkerStats>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Set once the drain deadline passes: every running job ends at its next token.
pub type CutFlag = Arc<AtomicBool>;

impl ModelWorker {
    /// Starts the thread. `preload` loads the model now instead of on first use.
    pub fn spawn(
        name: &str,
        backend: Backend,
        queue_depth: usize,
        preload: bool,
        cut: CutFlag,
    ) -> std::io::Result<ModelWorker> {
        let task = match backend {
            Backend::Language { .. } => "text-generation",
            Backend::Echo => "echo",
        };
        let (tx, rx) = sync_channel(queue_depth);
        let stats = Arc::new(WorkerStats::default());
        stats.loaded.store(task == "echo", Ordering::SeqCst);
        let thread = {
            let stats = stats.clone();
            let name = name.to_string();
            std::thread::Builder::new()
                .name(format!("model-{name}"))
                .spawn(move || run(name, backend, rx, stats, cut, preload))?
        };
        Ok(ModelWorker {
            name: name.to_string(),
            task,
            jobs: tx,
            capacity: queue_depth,
            stats,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a job, or says how long to wait when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), Busy> {
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                let per_job = self.stats.service_ms.load(Ordering::Relaxed).max(1000);
                let waiting = (self.capacity as u64 + 1) * per_job;
                Err(Busy {
                    retry_after: Duration::from_millis(waiting.clamp(1000, 60_000)),
                })
            }
        }
    }

    /// The thread is running (it ends only by a panic).
    pub fn alive(&self) -> bool {
        self.thread
            .lock()
            .map(|t| t.as_ref().is_some_and(|h| !h.is_finished()))
            .unwrap_or(false)
    }

    /// Jobs that may wait.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Jobs waiting plus the one running.
    pub fn depth(&self) -> usize {
        self.stats.queued.load(Ordering::Relaxed)
            + usize::from(self.stats.busy.load(Ordering::Relaxed))
    }
}

/// How often an idle worker refreshes its heartbeat.
const IDLE_TICK: Duration = Duration::from_millis(500);

fn run(
    name: String,
    mut backend: Backend,
    jobs: Receiver<Job>,
    stats: Arc<WorkerStats>,
    cut: CutFlag,
    preload: bool,
) {
    let epoch = Instant::now();
    let beat = |stats: &WorkerStats| {
        stats
            .heartbeat_ms
            .store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed)
    };
    if preload && let Err(e) = backend.ensure_loaded(&name, &stats) {
        tracing::error!(model = %name, error = %e, "preloading failed; will retry on first request");
    }
    loop {
        beat(&stats);
        let job = match jobs.recv_timeout(IDLE_TICK) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        stats.queued.fetch_sub(1, Ordering::SeqCst);
        if job.events.is_closed() {
            stats.abandoned.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if cut.load(Ordering::SeqCst) {
            let _ = job
                .events
                .blocking_send(TextEvent::Failed(JobError::ShuttingDown));
            continue;
        }
        stats.busy.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let mut progress = || beat(&stats);
        let outcome = backend.serve(&name, &job, &stats, &cut, &mut progress);
        let ms = started.elapsed().as_millis() as u64;
        let avg = stats.service_ms.load(Ordering::Relaxed);
        stats.service_ms.store(
            if avg == 0 { ms } else { (avg * 7 + ms) / 8 },
            Ordering::Relaxed,
        );
        stats.jobs.fetch_add(1, Ordering::Relaxed);
        stats.busy.store(false, Ordering::SeqCst);
        match outcome {
            Served::Done => {}
            Served::Abandoned => {
                stats.abandoned.fetch_add(1, Ordering::Relaxed);
                tracing::info!(model = %name, "client went away; generation stopped");
            }
            Served::Failed(e) => {
                tracing::warn!(model = %name, error = %e, "request failed");
                let _ = job.events.blocking_send(TextEvent::Failed(e));
            }
        }
    }
    tracing::debug!(model = %name, "worker stopped");
}

enum Served {
    Done,
    /// The client hung up.
    Abandoned,
    Failed(JobError),
}

/// Sends an event, waiting at most `STALL` for a slow reader.
fn send(events: &mpsc::Sender<TextEvent>, mut event: TextEvent) -> bool {
    const STALL: Duration = Duration::from_secs(60);
    let deadline = Instant::now() + STALL;
    loop {
        match events.try_send(event) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(e)) => {
                if Instant::now() > deadline {
                    return false;
                }
                event = e;
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

impl Backend {
    fn ensure_loaded(&mut self, name: &str, stats: &WorkerStats) -> Result<(), JobError> {
        let Backend::Language {
            dir,
            threads,
            model,
        } = self
        else {
            return Ok(());
        };
        if model.is_none() {
            let started = Instant::now();
            let options = LoadOptions {
                threads: *threads,
                ..LoadOptions::default()
            };
            let lm = CausalLm::load(dir, &options).map_err(|e| {
                JobError::Model(format!(
                    "loading model `{name}` from {}: {e}",
                    dir.display()
                ))
            })?;
            tracing::info!(
                model = %name,
                load_ms = started.elapsed().as_millis() as u64,
                context = lm.context_length(),
                "model loaded"
            );
            *model = Some(Box::new(lm));
            stats.loaded.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    fn serve(
        &mut self,
        name: &str,
        job: &Job,
        stats: &WorkerStats,
        cut: &AtomicBool,
        progress: &mut dyn FnMut(),
    ) -> Served {
        if let Err(e) = self.ensure_loaded(name, stats) {
            return Served::Failed(e);
        }
        progress();
        match self {
            Backend::Echo => serve_echo(job, stats, cut),
            Backend::Language { model, .. } => match model.as_deref_mut() {
                Some(lm) => serve_language(lm, job, stats, cut, progress),
                None => Served::Failed(JobError::Model("model not loaded".into())),
            },
        }
    }
}

fn serve_echo(job: &Job, stats: &WorkerStats, cut: &AtomicBool) -> Served {
    let text = match &job.prompt {
        Prompt::Text(t) => t.as_str(),
        Prompt::Chat(m) => m.last().map(|m| m.content.as_str()).unwrap_or(""),
    };
    let words: Vec<&str> = text.split_whitespace().collect();
    if !send(
        &job.events,
        TextEvent::Started {
            prompt_tokens: words.len(),
            node: None,
        },
    ) {
        return Served::Abandoned;
    }
    let max = job.options.max_tokens.unwrap_or(usize::MAX);
    let mut sent = 0;
    let mut finish = Finish::Model(FinishReason::Stop);
    for (i, w) in words.iter().enumerate() {
        if sent == max {
            finish = Finish::Model(FinishReason::Length);
            break;
        }
        if cut.load(Ordering::Relaxed) {
            finish = Finish::Cut;
            break;
        }
        let piece = if i == 0 {
            w.to_string()
        } else {
            format!(" {w}")
        };
        if !send(&job.events, TextEvent::Text(piece)) {
            return Served::Abandoned;
        }
        sent += 1;
    }
    stats.tokens.fetch_add(sent as u64, Ordering::Relaxed);
    finished(job, stats, finish, sent)
}

/// Sends `Done`, the worker marked idle first: a client that sends its
/// next request the moment this one ends must find the worker free, not
/// routed around it (a node seen busy hands work to a peer).
fn finished(job: &Job, stats: &WorkerStats, finish: Finish, completion_tokens: usize) -> Served {
    stats.busy.store(false, Ordering::SeqCst);
    if send(
        &job.events,
        TextEvent::Done {
            finish,
            completion_tokens,
        },
    ) {
        Served::Done
    } else {
        Served::Abandoned
    }
}

fn prompt_ids(lm: &CausalLm, prompt: &Prompt) -> Result<Vec<u32>, JobError> {
    let tok = lm.tokenizer();
    let ids = match prompt {
        Prompt::Chat(messages) => {
            if !tok.has_chat_template() {
                return Err(JobError::BadRequest(format!(
                    "model `{}` has no chat template: use /v1/completions",
                    lm.name()
                )));
            }
            let rendered = tok
                .apply_chat_template(messages, true)
                .map_err(|e| JobError::BadRequest(format!("rendering the chat template: {e}")))?;
            tok.encode(&rendered, false)
        }
        Prompt::Text(text) => tok.encode(text, true),
    };
    ids.map_err(|e| JobError::BadRequest(format!("tokenizing the prompt: {e}")))
}

fn serve_language(
    lm: &mut CausalLm,
    job: &Job,
    stats: &WorkerStats,
    cut: &AtomicBool,
    progress: &mut dyn FnMut(),
) -> Served {
    let ids = match prompt_ids(lm, &job.prompt) {
        Ok(ids) => ids,
        Err(e) => return Served::Failed(e),
    };
    let context = lm.context_length();
    if ids.is_empty() {
        return Served::Failed(JobError::BadRequest("the prompt is empty".into()));
    }
    if ids.len() >= context {
        return Served::Failed(JobError::ContextLength(format!(
            "the prompt is {} tokens but model `{}` holds {context} in all; shorten the prompt",
            ids.len(),
            lm.name()
        )));
    }
    let mut options = job.options.clone();
    options.max_tokens = Some(
        options
            .max_tokens
            .unwrap_or(usize::MAX)
            .min(context - ids.len()),
    );
    let mut generation = match lm.generate(&ids, &options) {
        Ok(g) => g,
        Err(ModelError::ContextOverflow { tokens, context }) => {
            return Served::Failed(JobError::ContextLength(format!(
                "the prompt is {tokens} tokens but the model holds {context}"
            )));
        }
        Err(ModelError::Input(m)) => return Served::Failed(JobError::BadRequest(m)),
        Err(e) => return Served::Failed(JobError::Model(e.to_string())),
    };
    if !send(
        &job.events,
        TextEvent::Started {
            prompt_tokens: ids.len(),
            node: None,
        },
    ) {
        return Served::Abandoned;
    }
    progress();
    let decode_started = Instant::now();
    let mut finish = None;
    for piece in generation.by_ref() {
        let piece = match piece {
            Ok(p) => p,
            Err(e) => return Served::Failed(JobError::Model(e.to_string())),
        };
        progress();
        if !piece.text.is_empty() && !send(&job.events, TextEvent::Text(piece.text)) {
            stats
                .tokens
                .fetch_add(generation.generated_tokens() as u64, Ordering::Relaxed);
            return Served::Abandoned;
        }
        if cut.load(Ordering::Relaxed) {
            finish = Some(Finish::Cut);
            break;
        }
    }
    let generated = generation.generated_tokens();
    let finish = finish.unwrap_or(Finish::Model(
        generation.finish_reason().unwrap_or(FinishReason::Stop),
    ));
    stats.tokens.fetch_add(generated as u64, Ordering::Relaxed);
    let secs = decode_started.elapsed().as_secs_f64();
    if generated > 1 && secs > 0.0 {
        stats
            .tokens_per_s_milli
            .store((generated as f64 / secs * 1000.0) as u64, Ordering::Relaxed);
    }
    finished(job, stats, finish, generated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_is_idle_once_only_done_is_left_to_deliver() {
        let worker =
            ModelWorker::spawn("echo", Backend::Echo, 2, false, CutFlag::default()).expect("spawn");
        // Room for one event: the worker waits on this reader at each send.
        let (tx, mut rx) = mpsc::channel(1);
        worker
            .submit(Job {
                prompt: Prompt::Text("one two three".into()),
                options: GenerateOptions::default(),
                events: tx,
            })
            .expect("queue has room");
        // Started, "one", " two": then " three" fills the channel and the
        // worker waits to send Done, its generation over.
        for _ in 0..3 {
            assert!(rx.blocking_recv().is_some());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while worker.stats.busy.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        // A client that asks again the moment Done arrives finds it free.
        assert!(
            !worker.stats.busy.load(Ordering::SeqCst),
            "still busy with only Done to deliver"
        );
        let rest: Vec<TextEvent> = std::iter::from_fn(|| rx.blocking_recv()).collect();
        assert!(
            matches!(rest.as_slice(), [TextEvent::Text(t), TextEvent::Done { completion_tokens: 3, .. }] if t == " three"),
            "{rest:?}"
        );
    }
}
