//! This node's MQTT connection: choose a broker (see [`election`]), host
//! the embedded one when chosen, connect with a last will, publish the
//! state, dispatch what arrives, and move when the broker fails.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS, Transport};

use super::broker::{Broker, MAX_PACKET};
use super::election::{self, Choice, Host};
use super::until_set;
use super::wire::{self, Message};
use super::{BrokerStatus, Mesh, delegate};
use crate::api::AppState;

/// How long a node starting up listens for peers before choosing a broker.
const SETTLE: Duration = Duration::from_millis(1200);
/// A broker unreachable this long (at least twice) is marked failed.
const FAIL_AFTER: Duration = Duration::from_secs(2);
/// Pause between connection attempts.
const RETRY: Duration = Duration::from_millis(300);
/// How long a failed LAN broker is left out.
const LAN_FAIL_HOLD: Duration = Duration::from_secs(60);

/// `mqtt://HOST:PORT` or `mqtts://HOST:PORT`.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl BrokerUrl {
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err("expected mqtt://HOST:PORT or mqtts://HOST:PORT".into());
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("port {p:?} is not a number"))?,
            ),
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("no host".into());
        }
        Ok(BrokerUrl {
            tls,
            host: host.to_string(),
            port,
        })
    }
}

/// Where to connect, and how.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    choice: Choice,
    host: String,
    port: u16,
    tls: bool,
    /// Key in the failure table.
    key: String,
}

/// Why a session ended.
enum End {
    Shutdown,
    /// The rule now picks another broker.
    Moved,
    Failed(String),
}

/// The link's life: runs until the agent shuts down.
pub async fn run(mesh: Arc<Mesh>, state: Arc<AppState>) {
    let mut shutdown = state.shutdown.clone();
    let mut hosted: Option<Broker> = None;
    // Consecutive failures per target: (count, first failure).
    let mut failures: HashMap<String, (u32, Instant)> = HashMap::new();
    // Failed targets: peer id → its boot when it failed; LAN name → when.
    let mut failed_peers: HashMap<String, u64> = HashMap::new();
    let mut failed_lan: HashMap<String, Instant> = HashMap::new();
    let configured = (!mesh.config.mqtt_url.is_empty())
        .then(|| BrokerUrl::parse(&mesh.config.mqtt_url).ok())
        .flatten();
    if configured.is_none() {
        // Let simultaneous starters see each other before anyone chooses.
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            if someone_hosts(&mesh) {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = mesh.changed.notified() => {}
                _ = until_set(&mut shutdown) => return,
            }
        }
    }
    loop {
        let stopping = *shutdown.borrow();
        if stopping {
            break;
        }
        failed_lan.retain(|_, t| t.elapsed() < LAN_FAIL_HOLD);
        let target = match choose(
            &mesh,
            configured.as_ref(),
            &failed_peers,
            &failed_lan,
            hosted.is_some(),
        ) {
            Some(t) => t,
            None => {
                set_status(&mesh, None, false, hosted.is_some());
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = mesh.changed.notified() => {}
                    _ = until_set(&mut shutdown) => break,
                }
                continue;
            }
        };
        if target.choice == Choice::HostHere && hosted.is_none() {
            let bind = SocketAddr::from(([0, 0, 0, 0], mesh.config.broker_port));
            match Broker::start(bind).await {
                Ok(b) => {
                    tracing::info!(
                        port = b.addr.port(),
                        "mesh: this node hosts the embedded MQTT broker (lowest id among the nodes that may)"
                    );
                    hosted = Some(b);
                    if let Some(d) = mesh.discovery() {
                        d.set_hosting(true);
                    }
                }
                Err(e) => {
                    tracing::error!(port = mesh.config.broker_port, error = %e, "mesh: cannot host the embedded broker (port in use?); another node must");
                    failed_peers.insert(mesh.id.clone(), mesh.boot);
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            }
        } else if target.choice != Choice::HostHere && hosted.is_some() {
            tracing::info!("mesh: another node's broker is the one to use; no longer hosting");
            hosted = None;
            if let Some(d) = mesh.discovery() {
                d.set_hosting(false);
            }
        }
        set_status(&mesh, Some(&target), false, hosted.is_some());
        let end = session(
            &mesh,
            &state,
            &target,
            &configured,
            &failed_peers,
            &failed_lan,
            hosted.is_some(),
        )
        .await;
        if let Ok(mut c) = mesh.client.lock() {
            *c = None;
        }
        set_status(&mesh, Some(&target), false, hosted.is_some());
        match end {
            End::Shutdown => break,
            End::Moved => {
                mesh.fail_pending(None, "the mesh moved to another MQTT broker");
                failures.remove(&target.key);
            }
            End::Failed(reason) => {
                mesh.fail_pending(None, "the MQTT broker connection was lost");
                let (count, since) = failures
                    .entry(target.key.clone())
                    .and_modify(|(c, _)| *c += 1)
                    .or_insert((1, Instant::now()));
                if *count == 1 {
                    tracing::warn!(broker = %target.key, reason, "mesh: MQTT broker unreachable; retrying");
                } else {
                    tracing::debug!(broker = %target.key, reason, attempt = *count, "mesh: MQTT broker still unreachable");
                }
                if *count >= 2 && since.elapsed() >= FAIL_AFTER {
                    match &target.choice {
                        Choice::Peer { id, .. } => {
                            let boot = mesh
                                .peers
                                .lock()
                                .ok()
                                .and_then(|p| {
                                    p.get(id).and_then(|p| p.sighting.as_ref().map(|s| s.boot))
                                })
                                .unwrap_or(0);
                            tracing::warn!(host = %id, "mesh: the embedded broker's node is gone; choosing the next host");
                            failed_peers.insert(id.clone(), boot);
                        }
                        Choice::Lan { name, .. } => {
                            tracing::warn!(broker = %name, "mesh: the LAN broker is gone; choosing another");
                            failed_lan.insert(name.clone(), Instant::now());
                        }
                        _ => {}
                    }
                    failures.remove(&target.key);
                }
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = until_set(&mut shutdown) => break,
                }
            }
        }
        // A failed peer that came back with a new boot is a candidate again.
        if let Ok(peers) = mesh.peers.lock() {
            failed_peers.retain(|id, boot| {
                id == &mesh.id
                    || peers
                        .get(id)
                        .and_then(|p| p.sighting.as_ref())
                        .is_none_or(|s| s.boot == *boot)
            });
        }
    }
    drop(hosted);
    if let Some(d) = mesh.discovery() {
        d.stop();
    }
}

fn someone_hosts(mesh: &Mesh) -> bool {
    let lan = mesh
        .lan_brokers
        .lock()
        .map(|b| !b.is_empty())
        .unwrap_or(false);
    lan || mesh
        .peers
        .lock()
        .map(|p| {
            p.all()
                .any(|p| p.sighting.as_ref().is_some_and(|s| s.hosting))
        })
        .unwrap_or(false)
}

/// Applies the election rule to what this node knows now.
fn choose(
    mesh: &Mesh,
    configured: Option<&BrokerUrl>,
    failed_peers: &HashMap<String, u64>,
    failed_lan: &HashMap<String, Instant>,
    hosting: bool,
) -> Option<Target> {
    if let Some(url) = configured {
        return Some(Target {
            choice: Choice::Configured,
            host: url.host.clone(),
            port: url.port,
            tls: url.tls,
            key: format!("{}:{}", url.host, url.port),
        });
    }
    let lan: Vec<(String, SocketAddr)> = mesh
        .lan_brokers
        .lock()
        .map(|b| {
            b.iter()
                .filter(|b| !failed_lan.contains_key(&b.name))
                .map(|b| (b.name.clone(), SocketAddr::new(b.addr, b.port)))
                .collect()
        })
        .unwrap_or_default();
    let peers: Vec<Host> = mesh
        .peers
        .lock()
        .map(|t| {
            t.all()
                .filter(|p| !failed_peers.contains_key(&p.id) && !p.dead)
                .filter_map(|p| {
                    let s = p.sighting.as_ref()?;
                    Some(Host {
                        id: p.id.clone(),
                        addr: s
                            .addrs
                            .iter()
                            .find(|a| a.is_ipv4())
                            .or(s.addrs.first())
                            .copied(),
                        broker_port: s.broker_port?,
                        hosting: s.hosting,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let me_host = (mesh.config.broker && !failed_peers.contains_key(&mesh.id)).then(|| Host {
        id: mesh.id.clone(),
        addr: None,
        broker_port: mesh.config.broker_port,
        hosting,
    });
    let choice = election::choose(&election::Inputs {
        me: &mesh.id,
        configured: false,
        lan: &lan,
        me_host,
        peers: &peers,
    });
    let (host, port, key) = match &choice {
        Choice::Lan { name, addr } => (addr.ip().to_string(), addr.port(), format!("lan:{name}")),
        Choice::HostHere => (
            "127.0.0.1".to_string(),
            mesh.config.broker_port,
            format!("peer:{}", mesh.id),
        ),
        Choice::Peer { id, addr } => (addr.ip().to_string(), addr.port(), format!("peer:{id}")),
        Choice::Configured | Choice::None => return None,
    };
    Some(Target {
        choice,
        host,
        port,
        tls: false,
        key,
    })
}

fn set_status(mesh: &Mesh, target: Option<&Target>, connected: bool, hosted_here: bool) {
    let status = match target {
        None => BrokerStatus {
            hosted_here,
            ..BrokerStatus::default()
        },
        Some(t) => {
            let (kind, name) = match &t.choice {
                Choice::Configured => ("configured", mesh.config.mqtt_url.clone()),
                Choice::Lan { name, .. } => ("lan", name.clone()),
                Choice::HostHere => ("embedded", mesh.id.clone()),
                Choice::Peer { id, .. } => ("embedded", id.clone()),
                Choice::None => ("", String::new()),
            };
            BrokerStatus {
                kind: kind.into(),
                name,
                addr: format!("{}:{}", t.host, t.port),
                connected,
                hosted_here,
            }
        }
    };
    mesh.set_broker(status);
}

fn options(mesh: &Mesh, target: &Target) -> anyhow::Result<MqttOptions> {
    let client_id = format!("kith-{}-{:08x}", mesh.id, mesh.boot as u32);
    let mut o = MqttOptions::new(client_id, target.host.clone(), target.port);
    o.set_keep_alive(Duration::from_secs(mesh.config.mqtt_keep_alive_secs));
    o.set_clean_session(true);
    o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    o.set_last_will(LastWill::new(
        wire::topic(&mesh.id, "state"),
        Vec::<u8>::new(),
        QoS::AtLeastOnce,
        true,
    ));
    if target.tls {
        o.set_transport(Transport::tls_with_config(tls_config(&mesh.config)?));
    }
    Ok(o)
}

/// rustls with the ring provider: the configured CA (else the system's
/// roots), and the client certificate when one is configured.
fn tls_config(c: &crate::config::MeshConfig) -> anyhow::Result<rumqttc::TlsConfiguration> {
    use anyhow::Context;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    if c.mqtt_ca.is_empty() {
        let native = rustls_native_certs();
        anyhow::ensure!(
            !native.is_empty(),
            "mesh.mqtt_ca is empty and the system has no CA certificates"
        );
        for cert in native {
            let _ = roots.add(cert);
        }
    } else {
        for cert in read_certs(&c.mqtt_ca)? {
            roots.add(cert).with_context(|| {
                format!("mesh.mqtt_ca {}: a certificate is not usable", c.mqtt_ca)
            })?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let config = if c.mqtt_cert.is_empty() {
        builder.with_no_client_auth()
    } else {
        let certs = read_certs(&c.mqtt_cert)?;
        let key = {
            let mut r = std::io::BufReader::new(
                std::fs::File::open(&c.mqtt_key)
                    .with_context(|| format!("opening mesh.mqtt_key {}", c.mqtt_key))?,
            );
            rustls_pemfile::private_key(&mut r)
                .with_context(|| format!("reading mesh.mqtt_key {}", c.mqtt_key))?
                .with_context(|| format!("mesh.mqtt_key {}: no private key in it", c.mqtt_key))?
        };
        builder.with_client_auth_cert(certs, key).with_context(|| {
            format!(
                "mesh.mqtt_cert {} with mesh.mqtt_key {} cannot be used",
                c.mqtt_cert, c.mqtt_key
            )
        })?
    };
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
}

fn read_certs(path: &str) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use anyhow::Context;
    let mut r = std::io::BufReader::new(
        std::fs::File::open(path).with_context(|| format!("opening {path}"))?,
    );
    let certs: Vec<_> = rustls_pemfile::certs(&mut r)
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading certificates from {path}"))?;
    anyhow::ensure!(!certs.is_empty(), "{path}: no PEM certificate in it");
    Ok(certs)
}

fn rustls_native_certs() -> Vec<rustls::pki_types::CertificateDer<'static>> {
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ]
    .iter()
    .find_map(|p| read_certs(p).ok())
    .unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
async fn session(
    mesh: &Arc<Mesh>,
    state: &Arc<AppState>,
    target: &Target,
    configured: &Option<BrokerUrl>,
    failed_peers: &HashMap<String, u64>,
    failed_lan: &HashMap<String, Instant>,
    hosting: bool,
) -> End {
    let options = match options(mesh, target) {
        Ok(o) => o,
        Err(e) => return End::Failed(format!("{e:#}")),
    };
    let (client, mut events) = AsyncClient::new(options, 256);
    events.network_options.set_connection_timeout(3);
    // Tokens are small messages: Nagle plus delayed ACKs would add ~40 ms to each.
    events.network_options.set_tcp_nodelay(true);
    let mut shutdown = state.shutdown.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(mesh.config.state_interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut was_draining = false;
    // The connection first, with nothing but shutdown able to interrupt it:
    // rumqttc's `poll` is not cancel-safe while it connects, so a wake-up
    // that dropped it there would open a second connection with the same
    // client id, and whichever CONNECT the broker handles last closes the
    // other (a spurious "connection closed" right after connecting).
    let first = tokio::select! {
        ev = events.poll() => ev,
        _ = until_set(&mut shutdown) => return End::Shutdown,
    };
    match first {
        Ok(Event::Incoming(Packet::ConnAck(_))) => {}
        Ok(other) => return End::Failed(format!("expected CONNACK, got {other:?}")),
        Err(e) => return End::Failed(e.to_string()),
    }
    mesh.stats.broker_connects.fetch_add(1, Ordering::Relaxed);
    set_status(mesh, Some(target), true, hosting);
    if let Ok(mut c) = mesh.client.lock() {
        *c = Some(client.clone());
    }
    tracing::info!(broker = %target.key, address = format!("{}:{}", target.host, target.port), "mesh: connected to the MQTT broker");
    for (topic, qos) in [
        (format!("{}/+/state", wire::TOPIC_ROOT), QoS::AtLeastOnce),
        (wire::topic(&mesh.id, "jobs"), QoS::AtLeastOnce),
        (wire::topic(&mesh.id, "replies"), QoS::AtLeastOnce),
    ] {
        if client.try_subscribe(topic, qos).is_err() {
            return End::Failed("subscribing".into());
        }
    }
    // The first tick (immediate) publishes the state.
    loop {
        tokio::select! {
            ev = events.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    // Only a reconnection sends another, and a lost
                    // connection ends the session before one could.
                    return End::Failed("unexpected second CONNACK".into());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => incoming(mesh, state, &client, p),
                Ok(_) => {}
                Err(e) => return End::Failed(e.to_string()),
            },
            _ = tick.tick() => {
                publish_state(mesh, state, &client, &mut seq);
                expire(mesh);
                if moved(mesh, target, configured, failed_peers, failed_lan, hosting) {
                    leave(mesh, &client, &mut events).await;
                    return End::Moved;
                }
            }
            _ = mesh.changed.notified() => {
                if moved(mesh, target, configured, failed_peers, failed_lan, hosting) {
                    leave(mesh, &client, &mut events).await;
                    return End::Moved;
                }
            }
            _ = wait_draining(state), if !was_draining => {
                // Tell peers at once: send nothing new here.
                was_draining = true;
                publish_state(mesh, state, &client, &mut seq);
            }
            _ = until_set(&mut shutdown) => {
                leave(mesh, &client, &mut events).await;
                return End::Shutdown;
            }
        }
    }
}

async fn wait_draining(state: &AppState) {
    while !state.draining.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The rule now picks a different broker than `target`.
fn moved(
    mesh: &Mesh,
    target: &Target,
    configured: &Option<BrokerUrl>,
    failed_peers: &HashMap<String, u64>,
    failed_lan: &HashMap<String, Instant>,
    hosting: bool,
) -> bool {
    match choose(mesh, configured.as_ref(), failed_peers, failed_lan, hosting) {
        Some(now) if now.key != target.key => {
            tracing::info!(from = %target.key, to = %now.key, "mesh: the election rule picks another broker; moving");
            true
        }
        _ => false,
    }
}

/// Leaves a broker cleanly: the retained state is cleared, no will fires.
async fn leave(mesh: &Mesh, client: &AsyncClient, events: &mut rumqttc::EventLoop) {
    let _ = client.try_publish(
        wire::topic(&mesh.id, "state"),
        QoS::AtLeastOnce,
        true,
        Vec::<u8>::new(),
    );
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while events.poll().await.is_ok() {}
    })
    .await;
}

fn publish_state(mesh: &Mesh, state: &AppState, client: &AsyncClient, seq: &mut u64) {
    *seq += 1;
    let snapshot = mesh.snapshot(state, *seq);
    match wire::encode(&Message::State(Box::new(snapshot))) {
        Ok(frame) => {
            if client
                .try_publish(
                    wire::topic(&mesh.id, "state"),
                    QoS::AtLeastOnce,
                    true,
                    frame,
                )
                .is_err()
            {
                tracing::debug!("mesh: the MQTT queue is full; state not published this time");
            }
        }
        Err(e) => tracing::error!(error = %e, "mesh: this node's state does not fit a frame"),
    }
}

fn expire(mesh: &Mesh) {
    let gone = mesh
        .peers
        .lock()
        .map(|mut p| p.expire(Instant::now()))
        .unwrap_or_default();
    for id in gone {
        tracing::warn!(peer = %id, timeout_s = mesh.config.peer_timeout_secs, "mesh: peer silent too long; considered gone");
        mesh.fail_pending(Some(&id), "the peer went silent");
    }
}

/// One message from the broker.
fn incoming(mesh: &Arc<Mesh>, state: &Arc<AppState>, client: &AsyncClient, p: rumqttc::Publish) {
    let Some((node, leaf)) = wire::parse_topic(&p.topic) else {
        return;
    };
    match leaf {
        // An old will of ours (a previous boot) cleared our state: say it again.
        "state" if node == mesh.id && p.payload.is_empty() => {
            let mut seq = u64::MAX / 2;
            publish_state(mesh, state, client, &mut seq);
        }
        "state" if node == mesh.id => {}
        "state" => {
            let change = if p.payload.is_empty() {
                mesh.peers
                    .lock()
                    .map(|mut t| t.state(node, None, Instant::now()))
            } else {
                match wire::decode_state(&p.payload) {
                    Ok(s) if s.node.as_str() == node => mesh
                        .peers
                        .lock()
                        .map(|mut t| t.state(node, Some(s), Instant::now())),
                    Ok(s) => {
                        mesh.dropped(
                            &p.topic,
                            p.payload.len(),
                            &format!("state of node {} on another node's topic", s.node),
                        );
                        return;
                    }
                    Err(e) => {
                        mesh.dropped(&p.topic, p.payload.len(), &e.to_string());
                        return;
                    }
                }
            };
            match change {
                Ok(super::peers::Change::Died) => {
                    tracing::warn!(peer = node, "mesh: peer died (its last will arrived)");
                    mesh.fail_pending(Some(node), "the peer died");
                }
                Ok(super::peers::Change::New) => {
                    let after = mesh.started.elapsed();
                    let _ = mesh.first_peer.set(after);
                    tracing::info!(peer = node, "mesh: peer joined over MQTT");
                }
                Ok(super::peers::Change::Restarted) => {
                    tracing::info!(peer = node, "mesh: peer is back")
                }
                _ => {}
            }
        }
        "jobs" if node == mesh.id => match wire::decode(&p.payload) {
            Ok(Message::Job(job)) => {
                if job.from.as_str() == mesh.id {
                    mesh.dropped(&p.topic, p.payload.len(), "a job from this node to itself");
                    return;
                }
                delegate::serve(mesh.clone(), state.clone(), client.clone(), *job);
            }
            Ok(Message::Cancel { from, job }) => delegate::cancel(mesh, from.as_str(), job),
            Ok(_) => mesh.dropped(&p.topic, p.payload.len(), "not a job or a cancellation"),
            Err(e) => mesh.dropped(&p.topic, p.payload.len(), &e.to_string()),
        },
        "replies" if node == mesh.id => match wire::decode(&p.payload) {
            Ok(Message::Event(ev)) => delegate::deliver(mesh, ev),
            Ok(_) => mesh.dropped(&p.topic, p.payload.len(), "not a job event"),
            Err(e) => mesh.dropped(&p.topic, p.payload.len(), &e.to_string()),
        },
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A TCP relay in front of a broker that holds the broker's first bytes
    /// (its CONNACK) back for `delay`, as a loaded broker would; it counts
    /// the connections clients open through it.
    async fn slow_relay(broker: SocketAddr, delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let opened = Arc::new(AtomicUsize::new(0));
        let count = opened.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let Ok(upstream) = TcpStream::connect(broker).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut uw).await;
                });
                tokio::spawn(async move {
                    let mut first = [0u8; 64];
                    let Ok(n) = ur.read(&mut first).await else {
                        return;
                    };
                    tokio::time::sleep(delay).await;
                    if n == 0 || cw.write_all(&first[..n]).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy(&mut ur, &mut cw).await;
                });
            }
        });
        (addr, opened)
    }

    /// Discovery wakes the link whenever it sees anything. Wake-ups that
    /// come while the node is still connecting must not make it drop that
    /// connection and open another with the same client id: the broker
    /// would then close one of the two, and the node would log a lost
    /// connection right after connecting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wakeups_while_connecting_keep_one_connection() {
        let broker = Broker::start(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("embedded broker");
        let (relay, opened) = slow_relay(broker.addr, Duration::from_millis(300)).await;
        let mut config = crate::config::Config::default();
        config.mesh.mqtt_url = format!("mqtt://{relay}");
        let models = tempfile::tempdir().expect("temp dir");
        let store = crate::store::ModelStore::new(
            models.path().to_path_buf(),
            crate::catalog::Catalog::builtin().expect("catalog"),
        );
        let (events, _) = tokio::sync::broadcast::channel(4);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let state = Arc::new(AppState::new(
            "n1".into(),
            config.clone(),
            store,
            events,
            stopped,
        ));
        let mesh = Arc::new(Mesh::new("n1".into(), 7, config.mesh, 0));
        let link = tokio::spawn(run(mesh.clone(), state));
        // Wake the link every 10 ms for longer than the CONNACK takes.
        for _ in 0..50 {
            mesh.changed.notify_one();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let connected = || mesh.broker.lock().map(|b| b.connected).unwrap_or(false);
        for _ in 0..100 {
            if connected() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(connected(), "the node never connected through the relay");
        // Long enough for a closed connection to show and be retried.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(connected(), "the connection was lost after connecting");
        assert_eq!(opened.load(Ordering::SeqCst), 1, "connections opened");
        assert_eq!(mesh.stats.broker_connects.load(Ordering::Relaxed), 1);
        let _ = stop.send(true);
        assert!(
            tokio::time::timeout(Duration::from_secs(3), link)
                .await
                .is_ok(),
            "the link did not stop"
        );
    }

    #[test]
    fn broker_urls() {
        assert_eq!(
            BrokerUrl::parse("mqtt://10.0.0.5:1883").unwrap(),
            BrokerUrl {
                tls: false,
                host: "10.0.0.5".into(),
                port: 1883
            }
        );
        assert_eq!(
            BrokerUrl::parse("mqtts://broker.lan").unwrap(),
            BrokerUrl {
                tls: true,
                host: "broker.lan".into(),
                port: 8883
            }
        );
        assert_eq!(BrokerUrl::parse("mqtt://[::1]:1884").unwrap().host, "::1");
        assert!(BrokerUrl::parse("http://x:1").is_err());
        assert!(BrokerUrl::parse("mqtt://x:port").is_err());
        assert!(BrokerUrl::parse("mqtt://:1883").is_err());
    }
}
