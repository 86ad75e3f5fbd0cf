//! Where a text request runs, and a delegated request on both ends.
//!
//! The estimate of a completion time on a node, for a request of `p`
//! prompt tokens and `n` tokens to generate, at measured decode speed `s`:
//!
//! ```text
//! wait (jobs ahead × mean job time) + load (1 s if not in memory)
//!   + p ÷ (8 s)  (prefill runs ~8× faster than decode)
//!   + n ÷ s
//!   + round trip (peers only)
//! ```
//!
//! A node not measured yet is assumed as fast as this one. A node whose
//! queue is full is not a candidate. A peer must beat this
//! node by 10 % and 50 ms: ties stay local. A delegated request goes one
//! hop: jobs received from peers always run locally.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kith_models::llm::{ChatMessage, FinishReason, GenerateOptions, SamplingParams};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;

use super::wire::{
    self, ChatTurn, EventKind, FailCode, JobEvent, JobRequest, Message, ModelState, Options, Work,
};
use super::{Mesh, Pending};
use crate::api::{ApiError, AppState};
use crate::worker::{Finish, Job, JobError, Prompt, TextEvent};

/// Decode speed assumed before one is measured, tokens/s.
const ASSUMED_TPS: f64 = 20.0;
/// Tries of a delegated request (different nodes) before it fails.
pub const MAX_ATTEMPTS: usize = 3;
/// Events buffered between the link and a delegated request.
const EVENT_BUFFER: usize = 256;

/// What the estimate needs to know of a model on one node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    pub loaded: bool,
    pub queued: u32,
    pub busy: bool,
    pub capacity: u32,
    /// Tokens/s (0: not measured).
    pub decode_tps: f64,
    /// Mean job time, s (0: not measured).
    pub service_s: f64,
}

impl From<&ModelState> for Load {
    fn from(m: &ModelState) -> Load {
        Load {
            loaded: m.loaded,
            queued: u32::from(m.queued),
            busy: m.busy,
            capacity: u32::from(m.capacity),
            decode_tps: f64::from(m.decode_milli_tps) / 1000.0,
            service_s: f64::from(m.service_ms) / 1000.0,
        }
    }
}

/// Estimated seconds to finish a request of `prompt` + `max_tokens` tokens;
/// `None` when the queue is full. `prior` is the speed assumed where none
/// is measured yet.
pub fn eta(load: &Load, prompt: u32, max_tokens: u32, rtt: Duration, prior: f64) -> Option<f64> {
    if load.queued >= load.capacity {
        return None;
    }
    let tps = if load.decode_tps > 0.0 {
        load.decode_tps
    } else {
        prior
    };
    let job = if load.service_s > 0.0 {
        load.service_s
    } else {
        256.0 / tps
    };
    let ahead = f64::from(load.queued) + if load.busy { 1.0 } else { 0.0 };
    let load_s = if load.loaded { 0.0 } else { 1.0 };
    Some(
        ahead * job
            + load_s
            + f64::from(prompt) / (8.0 * tps)
            + f64::from(max_tokens) / tps
            + rtt.as_secs_f64(),
    )
}

/// Where to try a request, best first.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    Local,
    Peer(String),
}

/// Orders the candidates: the local node (when it has the model) and peers
/// (id, load, round trip). Local stays first unless a peer is clearly sooner.
pub fn rank(
    local: Option<Load>,
    peers: &[(String, Load, Duration)],
    prompt: u32,
    max_tokens: u32,
) -> Vec<Route> {
    // A node not measured yet is assumed as fast as this one (same model),
    // not faster: an optimistic guess would pull work to unknown nodes.
    let prior = local
        .as_ref()
        .map(|l| l.decode_tps)
        .filter(|t| *t > 0.0)
        .unwrap_or(ASSUMED_TPS);
    let local_eta = local
        .as_ref()
        .and_then(|l| eta(l, prompt, max_tokens, Duration::ZERO, prior));
    let mut peer_etas: Vec<(f64, &String)> = peers
        .iter()
        .filter_map(|(id, l, rtt)| eta(l, prompt, max_tokens, *rtt, prior).map(|e| (e, id)))
        .collect();
    peer_etas.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(b.1)));
    let mut routes = Vec::new();
    let mut local_placed = local.is_none();
    for (e, id) in &peer_etas {
        if !local_placed
            && let Some(l) = local_eta
            && *e * 1.1 + 0.05 >= l
        {
            routes.push(Route::Local);
            local_placed = true;
        }
        routes.push(Route::Peer((*id).clone()));
    }
    if !local_placed {
        // Full here (or nobody else): local last, where it answers 429.
        routes.push(Route::Local);
    }
    routes
}

/// `model: "auto"`: the tier for a request of `tokens` (prompt + max_tokens):
/// the smallest text model up to `small`, the largest above. `models` are
/// (name, size MB) of every text model in reach.
pub fn auto_model(models: &[(String, u32)], tokens: u32, small: u32) -> Option<String> {
    let by_size = |a: &&(String, u32), b: &&(String, u32)| a.1.cmp(&b.1).then(b.0.cmp(&a.0));
    let pick = if tokens <= small {
        models.iter().min_by(by_size)
    } else {
        models.iter().max_by(by_size)
    };
    pick.map(|(n, _)| n.clone())
}

/// A request's work, as it travels.
pub fn work(prompt: &Prompt, options: &GenerateOptions) -> Result<Work, ApiError> {
    let mut stop = heapless::Vec::new();
    for s in &options.stop {
        let s = wire::bounded("stop string", s).map_err(|e| {
            ApiError::bad_request(format!("{e}; it cannot be sent to a peer")).param("stop")
        })?;
        let _ = stop.push(s);
    }
    let o = &options.sampling;
    let options = Options {
        max_tokens: options.max_tokens.unwrap_or(256).min(u32::MAX as usize) as u32,
        temperature: o.temperature,
        top_p: o.top_p,
        top_k: o.top_k.min(u32::MAX as usize) as u32,
        repetition_penalty: o.repetition_penalty,
        seed: o.seed,
        stop,
    };
    Ok(match prompt {
        Prompt::Chat(messages) => Work::Chat {
            messages: messages
                .iter()
                .map(|m| {
                    Ok(ChatTurn {
                        role: wire::bounded("role", &m.role).map_err(ApiError::bad_request)?,
                        content: m.content.clone(),
                    })
                })
                .collect::<Result<_, ApiError>>()?,
            options,
        },
        Prompt::Text(t) => Work::Completion {
            prompt: t.clone(),
            options,
        },
    })
}

fn unwork(work: Work) -> Option<(Prompt, GenerateOptions)> {
    let (prompt, o) = match work {
        Work::Chat { messages, options } => (
            Prompt::Chat(
                messages
                    .into_iter()
                    .map(|t| ChatMessage::new(t.role.to_string(), t.content))
                    .collect(),
            ),
            options,
        ),
        Work::Completion { prompt, options } => (Prompt::Text(prompt), options),
        Work::Audio { .. } => return None,
    };
    Some((
        prompt,
        GenerateOptions {
            sampling: SamplingParams {
                temperature: o.temperature,
                top_k: o.top_k as usize,
                top_p: o.top_p,
                repetition_penalty: o.repetition_penalty,
                seed: o.seed,
            },
            max_tokens: Some(o.max_tokens as usize),
            stop: o.stop.iter().map(|s| s.to_string()).collect(),
            ignore_eos: false,
        },
    ))
}

fn finish_from_wire(f: wire::Finish) -> Finish {
    Finish::Model(match f {
        wire::Finish::Stop => FinishReason::Stop,
        wire::Finish::Length => FinishReason::Length,
        wire::Finish::ContextFull => FinishReason::ContextFull,
    })
}

fn finish_to_wire(f: Finish) -> wire::Finish {
    match f {
        Finish::Model(FinishReason::Stop) => wire::Finish::Stop,
        Finish::Model(FinishReason::ContextFull) => wire::Finish::ContextFull,
        Finish::Model(FinishReason::Length) | Finish::Cut => wire::Finish::Length,
    }
}

fn job_error(code: FailCode, message: String) -> JobError {
    match code {
        FailCode::BadRequest => JobError::BadRequest(message),
        FailCode::ContextLength => JobError::ContextLength(message),
        FailCode::Model => JobError::Model(message),
        FailCode::Busy | FailCode::NotFound | FailCode::ShuttingDown | FailCode::Unavailable => {
            JobError::Unavailable(message)
        }
    }
}

/// Starts a delegated request: tries `peers` in order (at most
/// [`MAX_ATTEMPTS`]) until one runs it, and streams its events into `tx`.
/// Before the client has seen a token, a failed or silent peer is replaced
/// by the next (a `restartable` request, one answered in a single piece,
/// is restarted even mid-answer, after `TextEvent::Restart`); once the
/// client has seen tokens, a failure is the stream's last event. Never
/// hangs: every wait has a deadline.
pub fn delegate(
    mesh: Arc<Mesh>,
    model: String,
    work: Work,
    peers: Vec<String>,
    restartable: bool,
    tx: mpsc::Sender<TextEvent>,
) {
    tokio::spawn(async move {
        let mut started = false;
        let mut streamed = false;
        let mut last_error = format!("no peer could run model `{model}`");
        for (attempt, peer) in peers.iter().take(MAX_ATTEMPTS).enumerate() {
            if attempt > 0 {
                mesh.stats
                    .delegation_retries
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = %peer, attempt = attempt + 1, previous = %last_error, "mesh: retrying the request on the next node");
            }
            if streamed && restartable {
                // The answer so far is dropped; the next node starts over.
                if tx.send(TextEvent::Restart).await.is_err() {
                    return;
                }
                streamed = false;
            }
            let mut progress = Progress {
                started,
                streamed,
                restartable,
            };
            let outcome = attempt_on(&mesh, peer, &model, &work, &tx, &mut progress).await;
            (started, streamed) = (progress.started, progress.streamed);
            match outcome {
                Attempt::Done => {
                    mesh.stats.delegated_ok.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Attempt::ClientGone => return,
                Attempt::Retry(why) => last_error = why,
                Attempt::Fatal(e) => {
                    mesh.stats.delegated_failed.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(TextEvent::Failed(e)).await;
                    return;
                }
            }
            if streamed && !restartable {
                break;
            }
        }
        mesh.stats.delegated_failed.fetch_add(1, Ordering::Relaxed);
        let _ = tx
            .send(TextEvent::Failed(JobError::Unavailable(last_error)))
            .await;
    });
}

/// How far a delegated request got, across attempts.
struct Progress {
    /// `Started` went to the client.
    started: bool,
    /// Text went to the client (in this attempt, for restartable requests).
    streamed: bool,
    /// The answer goes out in one piece: it can start over on another node.
    restartable: bool,
}

enum Attempt {
    Done,
    ClientGone,
    Retry(String),
    Fatal(JobError),
}

async fn attempt_on(
    mesh: &Arc<Mesh>,
    peer: &str,
    model: &str,
    work: &Work,
    tx: &mpsc::Sender<TextEvent>,
    progress: &mut Progress,
) -> Attempt {
    let restartable = progress.restartable;
    let Progress {
        started, streamed, ..
    } = progress;
    // Whether a failure now can still be retried elsewhere.
    let retry_ok = |streamed: bool| !streamed || restartable;
    let id = mesh.next_job_id();
    let (etx, mut erx) = mpsc::channel(EVENT_BUFFER);
    // Between brokers (a move, a failed host) the link comes back within
    // seconds: wait for it, as long as a peer may take to accept.
    let deadline = Instant::now() + Duration::from_millis(mesh.config.accept_timeout_ms);
    let client = loop {
        if let Some(c) = mesh.client.lock().ok().and_then(|c| c.clone()) {
            break c;
        }
        if Instant::now() >= deadline || tx.is_closed() {
            return Attempt::Retry("not connected to an MQTT broker".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (Ok(from), Ok(model_name)) = (
        wire::bounded("node", &mesh.id),
        wire::bounded("model", model),
    ) else {
        return Attempt::Fatal(JobError::BadRequest(format!(
            "model name `{model}` is too long for the mesh"
        )));
    };
    let frame = match wire::encode(&Message::Job(Box::new(JobRequest {
        id,
        from,
        model: model_name,
        work: work.clone(),
    }))) {
        Ok(f) => f,
        Err(e) => {
            return Attempt::Fatal(JobError::BadRequest(format!(
                "the request cannot be delegated: {e}"
            )));
        }
    };
    if let Ok(mut p) = mesh.pending.lock() {
        p.insert(
            id,
            Pending {
                peer: peer.to_string(),
                events: etx,
            },
        );
    }
    struct Unregister<'a>(&'a Mesh, u64);
    impl Drop for Unregister<'_> {
        fn drop(&mut self) {
            if let Ok(mut p) = self.0.pending.lock() {
                p.remove(&self.1);
            }
        }
    }
    let _unregister = Unregister(mesh, id);
    let sent = Instant::now();
    if let Err(e) = client
        .publish(wire::topic(peer, "jobs"), QoS::AtLeastOnce, false, frame)
        .await
    {
        return Attempt::Retry(format!("sending to {peer}: {e}"));
    }
    tracing::debug!(peer, job = id, model, "mesh: request delegated");
    let cancel = |why: &str| {
        tracing::info!(
            peer,
            job = id,
            why,
            "mesh: cancelling the delegated request"
        );
        if let Ok(from) = wire::bounded("node", &mesh.id)
            && let Ok(f) = wire::encode(&Message::Cancel { from, job: id })
        {
            let _ = client.try_publish(wire::topic(peer, "jobs"), QoS::AtLeastOnce, false, f);
        }
    };
    let accept = Duration::from_millis(mesh.config.accept_timeout_ms);
    let idle = Duration::from_secs(mesh.config.idle_timeout_secs);
    let mut accepted = false;
    loop {
        let wait = if accepted { idle } else { accept };
        let event = tokio::select! {
            e = tokio::time::timeout(wait, erx.recv()) => e,
            _ = tx.closed() => {
                cancel("the client went away");
                return Attempt::ClientGone;
            }
        };
        let kind = match event {
            Ok(Some(k)) => k,
            Ok(None) => return Attempt::Retry(format!("{peer}: the event channel closed")),
            Err(_) if retry_ok(*streamed) => {
                cancel("no answer in time");
                return Attempt::Retry(format!(
                    "{peer} did not answer within {} ms",
                    wait.as_millis()
                ));
            }
            Err(_) => {
                cancel("silent mid-answer");
                return Attempt::Fatal(JobError::Unavailable(format!(
                    "node {peer} went silent for {} s mid-answer",
                    wait.as_secs()
                )));
            }
        };
        let forward = match kind {
            EventKind::Accepted => {
                if !accepted {
                    mesh.record_rtt(peer, sent.elapsed());
                }
                accepted = true;
                None
            }
            EventKind::Started { prompt_tokens } => {
                accepted = true;
                if *started {
                    None
                } else {
                    *started = true;
                    Some(TextEvent::Started {
                        prompt_tokens: prompt_tokens as usize,
                        node: Some(peer.to_string()),
                    })
                }
            }
            EventKind::Text(t) => {
                *streamed = true;
                Some(TextEvent::Text(t))
            }
            EventKind::Done {
                finish,
                completion_tokens,
            } => {
                let _ = tx
                    .send(TextEvent::Done {
                        finish: finish_from_wire(finish),
                        completion_tokens: completion_tokens as usize,
                    })
                    .await;
                return Attempt::Done;
            }
            EventKind::Failed { code, message } => {
                if retry_ok(*streamed) && code.retryable() {
                    return Attempt::Retry(format!("{peer}: {message}"));
                }
                return Attempt::Fatal(if *streamed {
                    JobError::Unavailable(format!("node {peer} failed mid-answer: {message}"))
                } else {
                    job_error(code, message)
                });
            }
            EventKind::Intent { .. } => {
                return Attempt::Retry(format!("{peer} answered a text request with an intent"));
            }
        };
        if let Some(ev) = forward
            && tx.send(ev).await.is_err()
        {
            cancel("the client went away");
            return Attempt::ClientGone;
        }
    }
}

/// An event from a peer for a job this node delegated.
pub fn deliver(mesh: &Mesh, ev: JobEvent) {
    let Ok(pending) = mesh.pending.lock() else {
        return;
    };
    let Some(p) = pending.get(&ev.job) else {
        return; // finished, cancelled or timed out here already
    };
    if p.peer != ev.node.as_str() {
        drop(pending);
        mesh.dropped("replies", 0, "an event from a node the job was not sent to");
        return;
    }
    if p.events.try_send(ev.kind).is_err() {
        tracing::warn!(
            job = ev.job,
            "mesh: a delegated request cannot keep up with its events; ending it"
        );
        let _ = p.events.try_send(EventKind::Failed {
            code: FailCode::Unavailable,
            message: "events arrived faster than the client read them".into(),
        });
    }
}

/// Cancels a job run here for `from`.
pub fn cancel(mesh: &Mesh, from: &str, job: u64) {
    if let Some(h) = mesh
        .serving
        .lock()
        .ok()
        .and_then(|mut s| s.remove(&(from.to_string(), job)))
    {
        h.abort();
        tracing::info!(peer = from, job, "mesh: a peer cancelled its request");
    }
}

/// Runs a job for a peer, here (never passed on: one hop), streaming its
/// events to the peer's `replies` topic.
pub fn serve(mesh: Arc<Mesh>, state: Arc<AppState>, client: AsyncClient, job: JobRequest) {
    let key = (job.from.to_string(), job.id);
    let m = mesh.clone();
    let handle = tokio::spawn(async move {
        let mesh = m;
        let reply_topic = wire::topic(job.from.as_str(), "replies");
        let mut seq = 0u32;
        let node = wire::node_id(&mesh.id);
        let send = |kind: EventKind, seq: &mut u32| {
            let ev = JobEvent {
                job: job.id,
                node: node.clone(),
                seq: *seq,
                kind,
            };
            *seq += 1;
            let frame = wire::encode(&Message::Event(ev));
            let client = client.clone();
            let topic = reply_topic.clone();
            async move {
                match frame {
                    Ok(f) => client
                        .publish(topic, QoS::AtLeastOnce, false, f)
                        .await
                        .is_ok(),
                    Err(e) => {
                        tracing::error!(error = %e, "mesh: an event does not fit a frame");
                        false
                    }
                }
            }
        };
        let fail = |code: FailCode, message: String| EventKind::Failed { code, message };
        let _guard = match state.admit() {
            Ok(g) => g,
            Err(_) => {
                send(
                    fail(
                        FailCode::ShuttingDown,
                        format!("node {} is shutting down", mesh.id),
                    ),
                    &mut seq,
                )
                .await;
                return;
            }
        };
        let Some((prompt, options)) = unwork(job.work) else {
            send(
                fail(
                    FailCode::NotFound,
                    format!("node {} has no speech-to-intent model", mesh.id),
                ),
                &mut seq,
            )
            .await;
            return;
        };
        let worker = match state.local_text_worker(job.model.as_str()) {
            Ok(w) => w,
            Err(e) => {
                send(fail(FailCode::NotFound, e.message), &mut seq).await;
                return;
            }
        };
        let (tx, mut rx) = mpsc::channel(32);
        if let Err(busy) = worker.submit(Job {
            prompt,
            options,
            events: tx,
        }) {
            send(
                fail(
                    FailCode::Busy,
                    format!(
                        "node {} is busy (retry in {} s)",
                        mesh.id,
                        busy.retry_after.as_secs()
                    ),
                ),
                &mut seq,
            )
            .await;
            return;
        }
        mesh.stats.served.fetch_add(1, Ordering::Relaxed);
        tracing::info!(peer = %job.from, job = job.id, model = %job.model, "mesh: running a request for a peer");
        if !send(EventKind::Accepted, &mut seq).await {
            return;
        }
        while let Some(ev) = rx.recv().await {
            let (kind, last) = match ev {
                // Local workers never restart a job.
                TextEvent::Restart => continue,
                TextEvent::Started { prompt_tokens, .. } => (
                    EventKind::Started {
                        prompt_tokens: prompt_tokens as u32,
                    },
                    false,
                ),
                TextEvent::Text(t) => (EventKind::Text(t), false),
                TextEvent::Done {
                    finish,
                    completion_tokens,
                } => (
                    EventKind::Done {
                        finish: finish_to_wire(finish),
                        completion_tokens: completion_tokens as u32,
                    },
                    true,
                ),
                TextEvent::Failed(e) => {
                    let code = match &e {
                        JobError::BadRequest(_) => FailCode::BadRequest,
                        JobError::ContextLength(_) => FailCode::ContextLength,
                        JobError::Model(_) => FailCode::Model,
                        JobError::ShuttingDown => FailCode::ShuttingDown,
                        JobError::Unavailable(_) => FailCode::Unavailable,
                    };
                    (fail(code, e.to_string()), true)
                }
            };
            if !send(kind, &mut seq).await || last {
                break;
            }
        }
    });
    let abort = handle.abort_handle();
    if let Ok(mut s) = mesh.serving.lock() {
        s.insert(key.clone(), abort);
    }
    tokio::spawn(async move {
        let _ = handle.await;
        if let Ok(mut s) = mesh.serving.lock() {
            s.remove(&key);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(queued: u32, busy: bool, tps: f64) -> Load {
        Load {
            loaded: true,
            queued,
            busy,
            capacity: 4,
            decode_tps: tps,
            service_s: 4.0,
        }
    }

    #[test]
    fn an_idle_node_answers_sooner_than_a_busy_one() {
        let idle = eta(&load(0, false, 25.0), 20, 50, Duration::ZERO, 20.0).unwrap();
        let busy = eta(&load(2, true, 25.0), 20, 50, Duration::ZERO, 20.0).unwrap();
        assert!(idle < busy);
        assert!((busy - idle - 12.0).abs() < 1e-9, "three jobs of 4 s ahead");
        assert_eq!(
            eta(&load(4, true, 25.0), 20, 50, Duration::ZERO, 20.0),
            None,
            "full queue"
        );
    }

    #[test]
    fn ties_stay_local_and_a_clearly_faster_peer_wins() {
        let peers = vec![(
            "jetson".to_string(),
            load(0, false, 25.0),
            Duration::from_millis(5),
        )];
        assert_eq!(
            rank(Some(load(0, false, 25.0)), &peers, 20, 50),
            vec![Route::Local, Route::Peer("jetson".into())]
        );
        // The same model four times faster on the Jetson: a long answer goes there.
        let fast = vec![(
            "jetson".to_string(),
            load(0, false, 100.0),
            Duration::from_millis(5),
        )];
        assert_eq!(
            rank(Some(load(0, false, 25.0)), &fast, 20, 500),
            vec![Route::Peer("jetson".into()), Route::Local]
        );
        // Busy here: the idle peer first.
        assert_eq!(
            rank(Some(load(3, true, 25.0)), &peers, 20, 50)[0],
            Route::Peer("jetson".into())
        );
        // No model here: peers only, best first.
        let two = vec![
            (
                "b".to_string(),
                load(1, true, 25.0),
                Duration::from_millis(5),
            ),
            (
                "c".to_string(),
                load(0, false, 25.0),
                Duration::from_millis(5),
            ),
        ];
        assert_eq!(
            rank(None, &two, 20, 50),
            vec![Route::Peer("c".into()), Route::Peer("b".into())]
        );
        // Full here and nowhere else: local last (it answers 429).
        assert_eq!(
            rank(Some(load(4, true, 25.0)), &[], 20, 50),
            vec![Route::Local]
        );
    }

    #[test]
    fn an_unmeasured_peer_is_assumed_as_fast_as_this_node_not_faster() {
        // This node measured 8 tok/s (a slow board, or a loaded one); the peer
        // has not served yet. A constant guess of 20 tok/s would send every
        // long request to the unknown node.
        let unmeasured = Load {
            decode_tps: 0.0,
            service_s: 0.0,
            ..load(0, false, 0.0)
        };
        let peers = vec![("new".to_string(), unmeasured, Duration::from_millis(5))];
        assert_eq!(
            rank(Some(load(0, false, 8.0)), &peers, 20, 400)[0],
            Route::Local
        );
    }

    #[test]
    fn auto_picks_the_tier_by_request_size() {
        let models = vec![
            ("smollm2-135m".to_string(), 130),
            ("qwen-1.5b".to_string(), 1100),
        ];
        assert_eq!(
            auto_model(&models, 300, 512).as_deref(),
            Some("smollm2-135m")
        );
        assert_eq!(auto_model(&models, 2000, 512).as_deref(), Some("qwen-1.5b"));
        assert_eq!(auto_model(&[], 10, 512), None);
    }

    #[test]
    fn work_round_trips_through_the_wire_types() {
        let prompt = Prompt::Chat(vec![ChatMessage::new("user".to_string(), "hi".to_string())]);
        let options = GenerateOptions {
            sampling: SamplingParams {
                temperature: 0.2,
                top_k: 5,
                top_p: 0.9,
                repetition_penalty: 1.1,
                seed: 42,
            },
            max_tokens: Some(7),
            stop: vec!["\n".into()],
            ignore_eos: false,
        };
        let w = work(&prompt, &options).unwrap();
        let (p, o) = unwork(w).unwrap();
        assert!(matches!(p, Prompt::Chat(ref m) if m.len() == 1 && m[0].content == "hi"));
        assert_eq!(
            (o.max_tokens, o.sampling.seed, o.stop.clone()),
            (Some(7), 42, vec!["\n".to_string()])
        );
        let long_stop = GenerateOptions {
            stop: vec!["x".repeat(65)],
            ..options
        };
        assert!(work(&prompt, &long_stop).is_err());
    }
}
