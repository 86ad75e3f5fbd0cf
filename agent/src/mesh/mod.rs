//! The mesh: kith nodes on one LAN find each other (mDNS), share their
//! state and pass work to each other (MQTT).
//!
//! - [`wire`]: the bytes between nodes (postcard frames, versioned, bounded).
//! - [`discovery`]: `_kith._tcp` adverts and browsing, `_mqtt._tcp` brokers.
//! - [`election`]: the rule that picks one broker for everyone.
//! - [`broker`]: the embedded MQTT broker one node hosts.
//! - [`link`]: this node's MQTT connection: state out, peers' states and
//!   jobs in, reconnection and broker moves.
//! - [`peers`]: the peer table.
//! - [`delegate`]: where a request runs (estimated completion time), and
//!   the delegated job on both ends.

pub mod broker;
pub mod delegate;
pub mod discovery;
pub mod election;
pub mod link;
pub mod peers;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use crate::api::AppState;
use crate::config::MeshConfig;
use discovery::{Advert, Discovery, DiscoverySink, LanBroker, Sighting};
use peers::{Change, PeerTable};
use wire::{EventKind, FailCode, ModelState, NodeState, Task};

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct MeshStats {
    /// Frames on kith topics that did not decode (or did not belong there).
    pub frames_dropped: AtomicU64,
    /// Requests this node sent to peers, by outcome.
    pub delegated_ok: AtomicU64,
    pub delegated_failed: AtomicU64,
    /// Attempts that moved on to another node before the first token.
    pub delegation_retries: AtomicU64,
    /// Jobs this node ran for peers.
    pub served: AtomicU64,
    /// Times this node connected to a broker.
    pub broker_connects: AtomicU64,
}

/// Which broker this node uses now.
#[derive(Debug, Clone, Default)]
pub struct BrokerStatus {
    /// "configured", "lan", "embedded".
    pub kind: String,
    /// The node hosting it (embedded), or the LAN instance / URL.
    pub name: String,
    pub addr: String,
    pub connected: bool,
    pub hosted_here: bool,
}

/// A job this node delegated, waiting for its events.
struct Pending {
    peer: String,
    events: mpsc::Sender<EventKind>,
}

/// The mesh side of one node.
pub struct Mesh {
    /// This node's id on the mesh (its name, made wire-safe).
    pub id: String,
    /// Random per start: peers tell a restart from a reconnect.
    pub boot: u64,
    pub config: MeshConfig,
    /// Where the HTTP API listens (advertised).
    pub api_port: u16,
    peers: Mutex<PeerTable>,
    lan_brokers: Mutex<Vec<LanBroker>>,
    /// Wakes the link when discovery saw something that may change the broker.
    changed: Notify,
    discovery: OnceLock<Discovery>,
    broker: Mutex<BrokerStatus>,
    /// The MQTT client while connected.
    client: Mutex<Option<rumqttc::AsyncClient>>,
    pending: Mutex<HashMap<u64, Pending>>,
    /// Jobs run for peers, by (peer, job id), to cancel them.
    serving: Mutex<HashMap<(String, u64), tokio::task::AbortHandle>>,
    /// Round trip to each peer (job sent → accepted), µs, moving average.
    rtt_micros: Mutex<HashMap<String, u64>>,
    next_job: AtomicU64,
    pub stats: MeshStats,
    started: Instant,
    /// Start → first peer seen.
    first_peer: OnceLock<Duration>,
    /// When the last malformed frame was logged (rate limit), ms since start.
    last_drop_log_ms: AtomicU64,
    /// The link task, to wait for its clean leave at shutdown.
    link_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Mesh {
    /// The mesh state of a node that has not started discovery or its link yet.
    fn new(id: String, boot: u64, config: MeshConfig, api_port: u16) -> Mesh {
        Mesh {
            id,
            boot,
            peers: Mutex::new(PeerTable::new(Duration::from_secs(
                config.peer_timeout_secs,
            ))),
            config,
            api_port,
            lan_brokers: Mutex::new(Vec::new()),
            changed: Notify::new(),
            discovery: OnceLock::new(),
            broker: Mutex::new(BrokerStatus::default()),
            client: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            serving: Mutex::new(HashMap::new()),
            rtt_micros: Mutex::new(HashMap::new()),
            next_job: AtomicU64::new(random_u64() >> 16),
            stats: MeshStats::default(),
            started: Instant::now(),
            first_peer: OnceLock::new(),
            last_drop_log_ms: AtomicU64::new(0),
            link_task: Mutex::new(None),
        }
    }

    /// Starts discovery and the MQTT link. Needs a tokio runtime.
    pub fn start(state: &Arc<AppState>, api_port: u16) -> anyhow::Result<Arc<Mesh>> {
        let config = state.config.mesh.clone();
        let id = wire::node_id(&state.node).to_string();
        if id != state.node {
            tracing::info!(node = %state.node, mesh_id = %id, "the node's name is not a valid mesh id; using a cleaned-up one");
        }
        let boot = random_u64();
        let mesh = Arc::new(Mesh::new(id.clone(), boot, config, api_port));
        let advert = Advert {
            id,
            boot,
            api_port,
            broker_port: mesh.config.broker.then_some(mesh.config.broker_port),
            hosting: false,
            models: state.text_model_names(),
        };
        let sink: Arc<dyn DiscoverySink> = Arc::new(SinkOf(mesh.clone()));
        let discovery = Discovery::start(&mesh.config.interfaces, advert, sink)?;
        let _ = mesh.discovery.set(discovery);
        let task = tokio::spawn(link::run(mesh.clone(), state.clone()));
        if let Ok(mut t) = mesh.link_task.lock() {
            *t = Some(task);
        }
        tracing::info!(
            node = %mesh.id,
            boot = format!("{boot:x}"),
            interfaces = if mesh.config.interfaces.is_empty() { "LAN (default)".to_string() } else { mesh.config.interfaces.join(",") },
            "mesh: advertising _kith._tcp and browsing for peers"
        );
        Ok(mesh)
    }

    /// Withdraws the mDNS advert (the MQTT link leaves on the shutdown signal).
    pub fn stop_discovery(&self) {
        if let Some(d) = self.discovery.get() {
            d.stop();
        }
    }

    /// Waits (at most `limit`) for the link to leave the broker after the
    /// shutdown signal.
    pub async fn wait_stopped(&self, limit: Duration) {
        let task = self.link_task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task
            && tokio::time::timeout(limit, task).await.is_err()
        {
            tracing::warn!("mesh: the MQTT link did not close in time");
            self.stop_discovery();
        }
    }

    fn discovery(&self) -> Option<&Discovery> {
        self.discovery.get()
    }

    /// Time from start to the first peer seen.
    pub fn first_peer_after(&self) -> Option<Duration> {
        self.first_peer.get().copied()
    }

    /// Peers alive on MQTT that serve text model `model`, with its state there.
    pub fn peers_with(&self, model: &str) -> Vec<(String, ModelState)> {
        let mut found = self.peer_models();
        found.retain(|(_, m)| m.name.as_str() == model);
        found
    }

    /// (peer, model) for every text model peers serve now.
    pub fn peer_models(&self) -> Vec<(String, ModelState)> {
        let Ok(peers) = self.peers.lock() else {
            return Vec::new();
        };
        peers
            .alive()
            .flat_map(|(p, s)| {
                s.models
                    .iter()
                    .filter(|m| m.task == Task::Text)
                    .map(|m| (p.id.clone(), m.clone()))
            })
            .collect()
    }

    /// The measured round trip to `peer` (5 ms until measured).
    pub fn rtt(&self, peer: &str) -> Duration {
        let micros = self
            .rtt_micros
            .lock()
            .ok()
            .and_then(|r| r.get(peer).copied())
            .unwrap_or(5_000);
        Duration::from_micros(micros)
    }

    fn record_rtt(&self, peer: &str, rtt: Duration) {
        if let Ok(mut r) = self.rtt_micros.lock() {
            let new = rtt.as_micros() as u64;
            let e = r.entry(peer.to_string()).or_insert(new);
            *e = (*e * 7 + new) / 8;
        }
    }

    /// `GET /v1/mesh/peers`.
    pub fn to_json(&self) -> Value {
        let now = Instant::now();
        let peers: Vec<Value> = self
            .peers
            .lock()
            .map(|p| p.all().map(|p| p.to_json(now)).collect())
            .unwrap_or_default();
        let b = self.broker.lock().map(|b| b.clone()).unwrap_or_default();
        json!({
            "node": self.id,
            "boot": format!("{:x}", self.boot),
            "broker": {
                "kind": b.kind, "name": b.name, "address": b.addr,
                "connected": b.connected, "hosted_here": b.hosted_here,
            },
            "first_peer_ms": self.first_peer_after().map(|d| d.as_millis() as u64),
            "peers": peers,
        })
    }

    /// Requests sent to peers and not yet finished (for metrics).
    pub fn delegations_in_flight(&self) -> usize {
        self.pending.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Peers alive now (for metrics).
    pub fn alive_count(&self) -> usize {
        self.peers.lock().map(|p| p.alive().count()).unwrap_or(0)
    }

    pub fn broker_status(&self) -> BrokerStatus {
        self.broker.lock().map(|b| b.clone()).unwrap_or_default()
    }

    fn set_broker(&self, status: BrokerStatus) {
        if let Ok(mut b) = self.broker.lock() {
            *b = status;
        }
    }

    /// The next job id (unique per boot).
    fn next_job_id(&self) -> u64 {
        self.next_job.fetch_add(1, Ordering::Relaxed)
    }

    /// Ends every delegated job waiting on `peer` (or on any peer when
    /// `None`: the broker went away) with a retryable failure.
    fn fail_pending(&self, peer: Option<&str>, why: &str) {
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        pending.retain(|_, p| {
            if peer.is_none_or(|id| id == p.peer) {
                let _ = p.events.try_send(EventKind::Failed {
                    code: FailCode::Unavailable,
                    message: format!("{why} (node {})", p.peer),
                });
                false
            } else {
                true
            }
        });
    }

    /// Logs a dropped frame (at most one line a second) and counts it.
    fn dropped(&self, topic: &str, bytes: usize, reason: &str) {
        self.stats.frames_dropped.fetch_add(1, Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_drop_log_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000 || last == 0 {
            self.last_drop_log_ms.store(now.max(1), Ordering::Relaxed);
            tracing::warn!(
                topic,
                bytes,
                reason,
                "mesh: dropped a message that is not a valid kith frame"
            );
        }
    }

    /// This node's state, as peers see it.
    pub fn snapshot(&self, state: &AppState, seq: u64) -> NodeState {
        let workers = state.workers();
        let mut models = heapless::Vec::new();
        for name in state.text_model_names() {
            let Ok(model_name) = wire::bounded("model", &name) else {
                continue;
            };
            let worker = workers.iter().find(|w| w.name == name);
            let stats = worker.map(|w| &w.stats);
            let m = ModelState {
                name: model_name,
                task: Task::Text,
                loaded: stats.is_some_and(|s| s.loaded.load(Ordering::Relaxed)),
                queued: stats.map_or(0, |s| {
                    s.queued.load(Ordering::Relaxed).min(u16::MAX as usize) as u16
                }),
                busy: stats.is_some_and(|s| s.busy.load(Ordering::Relaxed)),
                capacity: state.config.models.queue_depth.min(u32::from(u16::MAX)) as u16,
                decode_milli_tps: stats.map_or(0, |s| {
                    s.tokens_per_s_milli
                        .load(Ordering::Relaxed)
                        .min(u64::from(u32::MAX)) as u32
                }),
                service_ms: stats.map_or(0, |s| {
                    s.service_ms
                        .load(Ordering::Relaxed)
                        .min(u64::from(u32::MAX)) as u32
                }),
                size_mb: state.model_size_mb(&name),
            };
            if models.push(m).is_err() {
                break;
            }
        }
        let device = kith_hal::telemetry::Telemetry::default().read();
        NodeState {
            node: wire::node_id(&self.id),
            boot: self.boot,
            seq,
            api_port: self.api_port,
            models,
            free_memory_mb: device
                .available_memory_bytes
                .map_or(0, |b| (b >> 20).min(u64::from(u32::MAX)) as u32),
            temperature_mc: device.temperature_c.map(|t| (t * 1000.0) as i32),
            throttled: device.throttled,
            audio_rtf_micro: state.audio.running.load(Ordering::Relaxed).then(|| {
                state
                    .audio
                    .rtf_micro
                    .load(Ordering::Relaxed)
                    .min(u64::from(u32::MAX)) as u32
            }),
            draining: state.draining.load(Ordering::SeqCst),
        }
    }
}

/// Discovery's view into the mesh.
struct SinkOf(Arc<Mesh>);

impl DiscoverySink for SinkOf {
    fn sighted(&self, s: Sighting) {
        let mesh = &self.0;
        if s.protocol != wire::PROTOCOL {
            tracing::warn!(peer = %s.id, protocol = s.protocol, ours = wire::PROTOCOL, "mesh: a peer speaks another protocol version; ignored");
            return;
        }
        let (id, addrs) = (s.id.clone(), s.addrs.clone());
        let change = match mesh.peers.lock() {
            Ok(mut p) => p.sighted(s, Instant::now()),
            Err(_) => return,
        };
        match change {
            Change::New => {
                let after = mesh.started.elapsed();
                if mesh.first_peer.set(after).is_ok() {
                    tracing::info!(peer = %id, ?addrs, after_ms = after.as_millis() as u64, "mesh: first peer found");
                } else {
                    tracing::info!(peer = %id, ?addrs, "mesh: peer found");
                }
            }
            Change::Restarted => tracing::info!(peer = %id, ?addrs, "mesh: peer restarted"),
            _ => {}
        }
        mesh.changed.notify_one();
    }

    fn vanished(&self, id: &str) {
        let mesh = &self.0;
        if let Ok(mut p) = mesh.peers.lock() {
            p.vanished(id);
        }
        tracing::info!(peer = id, "mesh: peer withdrew its advert");
        mesh.changed.notify_one();
    }

    fn brokers(&self, brokers: Vec<LanBroker>) {
        let mesh = &self.0;
        if let Ok(mut b) = mesh.lan_brokers.lock() {
            *b = brokers;
        }
        mesh.changed.notify_one();
    }
}

/// Resolves once the watched flag is set (the guard `wait_for` returns is
/// dropped here, so the caller's future stays `Send`).
async fn until_set(flag: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = flag.wait_for(|s| *s).await;
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one((std::process::id(), Instant::now()))
}
