//! The embedded MQTT broker: what one node of a mesh without a broker runs
//! so that the others have one.
//!
//! MQTT 3.1.1 on plain TCP, as much as kith needs and exactly as the
//! standard says it: clean sessions, QoS 0 and 1 (granted at most 1;
//! QoS 1 is acknowledged, and a subscriber that cannot keep up is
//! disconnected rather than silently skipped), retained messages (an empty
//! retained payload clears one), last wills (published when a client goes
//! without DISCONNECT, or stays silent for 1.5 × its keep-alive), `+` and
//! `#` filters. Packets are parsed by rumqttc's codec, the same the client
//! uses. The same tests run against Mosquitto, which a fleet that outgrows
//! this broker uses instead.
//!
//! Why not rumqttd: it pulls a second HTTP stack, a config-file framework and
//! a metrics exporter into a binary meant for a Raspberry Pi, and it cannot
//! be stopped once started.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{QoS, matches, valid_filter, valid_topic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::until_set;

/// Largest packet accepted (a job frame with audio fits well).
pub const MAX_PACKET: usize = 1 << 20;
/// Packets queued for one subscriber before it counts as too slow.
const CLIENT_QUEUE: usize = 1024;
/// Time a new connection has to send CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Clients at once.
const MAX_CLIENTS: usize = 256;

/// A running broker; dropping it (or [`Broker::stop`]) closes it.
pub struct Broker {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
}

impl Broker {
    /// Binds `addr` and serves until stopped.
    pub async fn start(addr: SocketAddr) -> std::io::Result<Broker> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let shared = Arc::new(Mutex::new(Shared::default()));
        tokio::spawn(accept(listener, shared, stopped));
        tracing::info!(%addr, "embedded MQTT broker listening");
        Ok(Broker { addr, stop })
    }

    /// Closes the listener and every connection.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Default)]
struct Shared {
    clients: HashMap<String, Client>,
    retained: BTreeMap<String, Publish>,
    next_conn: u64,
}

struct Client {
    /// Tells a takeover from the connection it replaced.
    conn: u64,
    tx: mpsc::Sender<Packet>,
    filters: Vec<(String, QoS)>,
}

async fn accept(
    listener: TcpListener,
    shared: Arc<Mutex<Shared>>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = until_set(&mut stopped) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let stopped = stopped.clone();
                tokio::spawn(async move {
                    if let Err(reason) = serve(stream, shared, stopped).await {
                        tracing::debug!(%peer, reason, "MQTT connection closed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "MQTT accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Reads one packet; `Ok(None)` at a clean end of stream.
async fn read_packet(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Option<Packet>, String> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(p) => return Ok(Some(p)),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("bad packet: {e:?}")),
        }
        buf.reserve(4096);
        let n = stream
            .read_buf(buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err("connection closed mid-packet".into())
            };
        }
    }
}

async fn write_packet(
    stream: &mut TcpStream,
    out: &mut BytesMut,
    packet: &Packet,
) -> Result<(), String> {
    out.clear();
    packet
        .write(out, MAX_PACKET)
        .map_err(|e| format!("encode: {e:?}"))?;
    stream
        .write_all(out)
        .await
        .map_err(|e| format!("write: {e}"))
}

async fn serve(
    mut stream: TcpStream,
    shared: Arc<Mutex<Shared>>,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), String> {
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = BytesMut::with_capacity(4096);
    let connect =
        match tokio::time::timeout(CONNECT_TIMEOUT, read_packet(&mut stream, &mut buf)).await {
            Ok(Ok(Some(Packet::Connect(c)))) => c,
            Ok(Ok(Some(_))) => return Err("first packet is not CONNECT".into()),
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("no CONNECT in time".into()),
        };
    let (tx, mut rx) = mpsc::channel(CLIENT_QUEUE);
    let client_id = if connect.client_id.is_empty() {
        format!("anon-{}", std::process::id())
    } else {
        connect.client_id.clone()
    };
    let registered = {
        let mut s = shared.lock().map_err(|_| "broker state poisoned")?;
        if s.clients.len() >= MAX_CLIENTS && !s.clients.contains_key(&client_id) {
            None
        } else {
            s.next_conn += 1;
            let conn = s.next_conn;
            // A second connection with the same id takes over (dropping the
            // old sender closes the old connection).
            s.clients.insert(
                client_id.clone(),
                Client {
                    conn,
                    tx,
                    filters: Vec::new(),
                },
            );
            Some(conn)
        }
    };
    let Some(conn) = registered else {
        let refuse = Packet::ConnAck(ConnAck::new(ConnectReturnCode::ServiceUnavailable, false));
        let _ = write_packet(&mut stream, &mut out, &refuse).await;
        return Err("too many clients".into());
    };
    let will = connect.last_will.clone();
    let keep_alive = match connect.keep_alive {
        0 => Duration::from_secs(24 * 3600),
        s => Duration::from_millis(u64::from(s) * 1500),
    };
    let ack = Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false));
    write_packet(&mut stream, &mut out, &ack).await?;
    let mut next_pkid: u16 = 0;
    let mut clean = false;
    let outcome: Result<(), String> = async {
        loop {
            tokio::select! {
                packet = tokio::time::timeout(keep_alive, read_packet(&mut stream, &mut buf)) => {
                    let packet = match packet {
                        Err(_) => return Err("keep-alive expired".to_string()),
                        Ok(Ok(None)) => return Err("connection closed without DISCONNECT".into()),
                        Ok(Err(e)) => return Err(e),
                        Ok(Ok(Some(p))) => p,
                    };
                    match packet {
                        Packet::Publish(p) => {
                            if !valid_topic(&p.topic) {
                                return Err(format!("invalid topic {:?}", p.topic));
                            }
                            if p.qos == QoS::ExactlyOnce {
                                return Err("QoS 2 is not supported".into());
                            }
                            let pkid = p.pkid;
                            let qos = p.qos;
                            route(&shared, p);
                            if qos == QoS::AtLeastOnce {
                                write_packet(&mut stream, &mut out, &Packet::PubAck(PubAck::new(pkid))).await?;
                            }
                        }
                        Packet::Subscribe(sub) => {
                            let mut codes = Vec::with_capacity(sub.filters.len());
                            let mut retained = Vec::new();
                            {
                                let mut s = shared.lock().map_err(|_| "broker state poisoned")?;
                                for f in &sub.filters {
                                    if !valid_filter(&f.path) {
                                        codes.push(SubscribeReasonCode::Failure);
                                        continue;
                                    }
                                    let qos = if f.qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
                                    codes.push(SubscribeReasonCode::Success(qos));
                                    for (topic, p) in s.retained.iter() {
                                        if matches(topic, &f.path) {
                                            let mut p = p.clone();
                                            p.qos = p.qos.min_qos(qos);
                                            p.retain = true;
                                            retained.push(p);
                                        }
                                    }
                                    if let Some(c) = s.clients.get_mut(&client_id).filter(|c| c.conn == conn) {
                                        c.filters.retain(|(path, _)| path != &f.path);
                                        c.filters.push((f.path.clone(), qos));
                                    }
                                }
                            }
                            write_packet(&mut stream, &mut out, &Packet::SubAck(SubAck::new(sub.pkid, codes))).await?;
                            for mut p in retained {
                                p.pkid = if p.qos == QoS::AtMostOnce { 0 } else { next(&mut next_pkid) };
                                write_packet(&mut stream, &mut out, &Packet::Publish(p)).await?;
                            }
                        }
                        Packet::Unsubscribe(u) => {
                            if let Ok(mut s) = shared.lock()
                                && let Some(c) = s.clients.get_mut(&client_id).filter(|c| c.conn == conn)
                            {
                                c.filters.retain(|(path, _)| !u.topics.contains(path));
                            }
                            write_packet(&mut stream, &mut out, &Packet::UnsubAck(UnsubAck::new(u.pkid))).await?;
                        }
                        Packet::PingReq => write_packet(&mut stream, &mut out, &Packet::PingResp).await?,
                        Packet::Disconnect => {
                            clean = true;
                            return Ok(());
                        }
                        Packet::PubAck(_) => {}
                        Packet::Connect(_) => return Err("second CONNECT".into()),
                        other => return Err(format!("unexpected packet {other:?}")),
                    }
                }
                outgoing = rx.recv() => {
                    let Some(Packet::Publish(mut p)) = outgoing else {
                        return Err("taken over, or too slow to keep up".into());
                    };
                    p.pkid = if p.qos == QoS::AtMostOnce { 0 } else { next(&mut next_pkid) };
                    write_packet(&mut stream, &mut out, &Packet::Publish(p)).await?;
                }
                _ = until_set(&mut stopped) => {
                    clean = true;
                    return Ok(());
                }
            }
        }
    }
    .await;
    // A newer connection with the same client id took this one over: the
    // client is alive, so its will must not declare it dead.
    let mut taken_over = false;
    if let Ok(mut s) = shared.lock() {
        match s.clients.get(&client_id) {
            Some(c) if c.conn == conn => {
                s.clients.remove(&client_id);
            }
            Some(_) => taken_over = true,
            None => {}
        }
    }
    if !clean
        && !taken_over
        && let Some(will) = will
    {
        let mut p = Publish::new(
            will.topic,
            will.qos.min_qos(QoS::AtLeastOnce),
            will.message.to_vec(),
        );
        p.retain = will.retain;
        if valid_topic(&p.topic) {
            route(&shared, p);
        }
    }
    outcome
}

trait MinQos {
    fn min_qos(self, other: QoS) -> QoS;
}

impl MinQos for QoS {
    fn min_qos(self, other: QoS) -> QoS {
        if (self as u8) <= (other as u8) {
            self
        } else {
            other
        }
    }
}

fn next(pkid: &mut u16) -> u16 {
    *pkid = pkid.wrapping_add(1).max(1);
    *pkid
}

/// Stores (or clears) a retained message and delivers `p` to every matching subscriber.
fn route(shared: &Mutex<Shared>, mut p: Publish) {
    let Ok(mut s) = shared.lock() else {
        return;
    };
    if p.retain {
        if p.payload.is_empty() {
            s.retained.remove(&p.topic);
        } else {
            s.retained.insert(p.topic.clone(), p.clone());
        }
        // Live subscribers get it as a normal message.
        p.retain = false;
    }
    let mut slow = Vec::new();
    for (id, c) in s.clients.iter() {
        let Some(qos) = c
            .filters
            .iter()
            .filter(|(f, _)| matches(&p.topic, f))
            .map(|(_, q)| *q)
            .max_by_key(|q| *q as u8)
        else {
            continue;
        };
        let mut out = p.clone();
        out.qos = p.qos.min_qos(qos);
        out.dup = false;
        if c.tx.try_send(Packet::Publish(out)).is_err() {
            slow.push(id.clone());
        }
    }
    for id in slow {
        tracing::warn!(client = %id, "MQTT subscriber too slow (queue full): disconnecting it");
        s.clients.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet as P};

    async fn client(
        addr: SocketAddr,
        id: &str,
        will: Option<LastWill>,
    ) -> (AsyncClient, rumqttc::EventLoop) {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(5));
        if let Some(w) = will {
            o.set_last_will(w);
        }
        AsyncClient::new(o, 16)
    }

    /// The next publish an event loop receives, within 3 s.
    async fn next_publish(el: &mut rumqttc::EventLoop) -> Option<Publish> {
        tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(P::Publish(p))) => return Some(p),
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// A client with the state topic's will (an empty retained payload).
    fn will() -> Option<LastWill> {
        Some(LastWill::new(
            "kith/v1/nodes/a/state",
            Vec::<u8>::new(),
            rumqttc::QoS::AtLeastOnce,
            true,
        ))
    }

    /// Polls an event loop in the background until it fails (at most 50 events).
    fn drive(mut el: rumqttc::EventLoop) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            for _ in 0..50 {
                if el.poll().await.is_err() {
                    break;
                }
            }
        })
    }

    async fn until_suback(el: &mut rumqttc::EventLoop) {
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                if let Ok(Event::Incoming(P::SubAck(_))) = el.poll().await {
                    return;
                }
            }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retained_messages_wildcards_and_wills() {
        let broker = Broker::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        // A publisher with a will leaves a retained state, then dies.
        let (a, a_loop) = client(broker.addr, "a", will()).await;
        a.publish(
            "kith/v1/nodes/a/state",
            rumqttc::QoS::AtLeastOnce,
            true,
            b"up".to_vec(),
        )
        .await
        .unwrap();
        let a_task = drive(a_loop);
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A late subscriber gets the retained state, flagged retained.
        let (b, mut b_loop) = client(broker.addr, "b", None).await;
        b.subscribe("kith/v1/nodes/+/state", rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        let p = next_publish(&mut b_loop).await.expect("retained state");
        assert_eq!(
            (p.topic.as_str(), &p.payload[..], p.retain),
            ("kith/v1/nodes/a/state", &b"up"[..], true)
        );
        // Something outside the filter is not delivered; something inside is.
        b.subscribe("kith/v1/nodes/b/#", rumqttc::QoS::AtMostOnce)
            .await
            .unwrap();
        until_suback(&mut b_loop).await;
        a.publish(
            "other/topic",
            rumqttc::QoS::AtMostOnce,
            false,
            b"no".to_vec(),
        )
        .await
        .unwrap();
        a.publish(
            "kith/v1/nodes/b/jobs",
            rumqttc::QoS::AtMostOnce,
            false,
            b"yes".to_vec(),
        )
        .await
        .unwrap();
        let p = next_publish(&mut b_loop).await.expect("job");
        assert_eq!(&p.payload[..], b"yes");
        // A dies without DISCONNECT: its will (empty, retained) clears the state.
        a_task.abort();
        drop(a);
        let p = next_publish(&mut b_loop).await.expect("will");
        assert_eq!(p.topic, "kith/v1/nodes/a/state");
        assert!(p.payload.is_empty());
        // A newcomer finds no retained state for A any more.
        let (c, mut c_loop) = client(broker.addr, "c", None).await;
        c.subscribe("kith/v1/nodes/+/state", rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        until_suback(&mut c_loop).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(500), next_publish(&mut c_loop))
                .await
                .ok()
                .flatten()
                .is_none()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_taken_over_by_the_same_client_id_does_not_send_its_will() {
        let broker = Broker::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let (w, mut w_loop) = client(broker.addr, "watcher", None).await;
        w.subscribe("kith/v1/nodes/+/state", rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        until_suback(&mut w_loop).await;
        let (_a1, a1_loop) = client(broker.addr, "a", will()).await;
        let first = drive(a1_loop);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (a2, a2_loop) = client(broker.addr, "a", will()).await;
        a2.publish(
            "kith/v1/nodes/a/state",
            rumqttc::QoS::AtLeastOnce,
            true,
            b"up".to_vec(),
        )
        .await
        .unwrap();
        let second = drive(a2_loop);
        let p = next_publish(&mut w_loop).await.expect("the new state");
        assert_eq!(&p.payload[..], b"up");
        // The first connection is closed by the takeover; no empty will follows.
        let after = tokio::time::timeout(Duration::from_millis(700), next_publish(&mut w_loop))
            .await
            .ok()
            .flatten();
        assert!(after.is_none(), "unexpected {after:?}");
        first.abort();
        second.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_and_oversized_packets_close_only_their_connection() {
        let broker = Broker::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let mut raw = TcpStream::connect(broker.addr).await.unwrap();
        let mut garbage = b"GET / HTTP/1.1\r\nHost: broker\r\n".to_vec();
        garbage.resize(300, b'x');
        raw.write_all(&garbage).await.unwrap();
        let mut sink = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(3), raw.read(&mut sink))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "garbage must close the connection");
        // A CONNECT announcing a 2 MiB packet is refused before it is read.
        let mut raw = TcpStream::connect(broker.addr).await.unwrap();
        raw.write_all(&[0x10, 0x80, 0x80, 0x80, 0x01])
            .await
            .unwrap();
        let n = tokio::time::timeout(Duration::from_secs(3), raw.read(&mut sink))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0);
        // The broker still serves.
        let (c, mut el) = client(broker.addr, "ok", None).await;
        c.subscribe("t", rumqttc::QoS::AtLeastOnce).await.unwrap();
        until_suback(&mut el).await;
        c.publish("t", rumqttc::QoS::AtLeastOnce, false, b"x".to_vec())
            .await
            .unwrap();
        assert_eq!(
            &next_publish(&mut el).await.expect("publish").payload[..],
            b"x"
        );
    }
}
