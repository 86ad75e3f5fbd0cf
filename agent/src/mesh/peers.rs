//! The peer table: every node this one knows of, from mDNS (where it is)
//! and MQTT (what it can do now, and whether it is alive).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::discovery::Sighting;
use super::wire::{NodeState, Task};

/// One peer.
#[derive(Debug, Clone)]
pub struct Peer {
    pub id: String,
    /// The latest mDNS record, while it exists.
    pub sighting: Option<Sighting>,
    /// The latest state from MQTT, while the node is alive.
    pub state: Option<NodeState>,
    /// When the state last arrived.
    pub state_at: Option<Instant>,
    /// When anything was last heard of this peer.
    pub seen_at: Instant,
    /// When the peer was first seen (this boot of it).
    pub first_seen: Instant,
    /// MQTT said it died (its last will), and nothing since.
    pub dead: bool,
}

/// What an update changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    New,
    Restarted,
    Updated,
    Died,
    None,
}

impl Change {
    fn of(new: bool, restarted: bool) -> Change {
        match (new, restarted) {
            (true, _) => Change::New,
            (false, true) => Change::Restarted,
            (false, false) => Change::Updated,
        }
    }
}

pub struct PeerTable {
    peers: BTreeMap<String, Peer>,
    /// A peer silent this long is dropped (`mesh.peer_timeout_secs`).
    timeout: Duration,
}

impl PeerTable {
    pub fn new(timeout: Duration) -> PeerTable {
        PeerTable {
            peers: BTreeMap::new(),
            timeout,
        }
    }

    fn entry(&mut self, id: &str, now: Instant) -> (&mut Peer, bool) {
        let new = !self.peers.contains_key(id);
        let p = self.peers.entry(id.to_string()).or_insert_with(|| Peer {
            id: id.to_string(),
            sighting: None,
            state: None,
            state_at: None,
            seen_at: now,
            first_seen: now,
            dead: false,
        });
        (p, new)
    }

    /// An mDNS record appeared or changed.
    pub fn sighted(&mut self, s: Sighting, now: Instant) -> Change {
        let (p, new) = self.entry(&s.id.clone(), now);
        let restarted = p.sighting.as_ref().is_some_and(|old| old.boot != s.boot)
            || p.state.as_ref().is_some_and(|st| st.boot != s.boot);
        p.seen_at = now;
        if restarted {
            p.first_seen = now;
            p.state = None;
            p.state_at = None;
            p.dead = false;
        }
        p.sighting = Some(s);
        Change::of(new, restarted)
    }

    /// The mDNS record was withdrawn (the node said goodbye).
    pub fn vanished(&mut self, id: &str) -> Change {
        match self.peers.get_mut(id) {
            Some(p) => {
                p.sighting = None;
                if p.state.is_none() {
                    self.peers.remove(id);
                }
                Change::Died
            }
            None => Change::None,
        }
    }

    /// A state arrived over MQTT; `None` is the node's last will (it died).
    pub fn state(&mut self, id: &str, state: Option<NodeState>, now: Instant) -> Change {
        match state {
            Some(s) => {
                let (p, new) = self.entry(id, now);
                let restarted =
                    p.state.as_ref().is_some_and(|old| old.boot != s.boot) || (p.dead && !new);
                p.seen_at = now;
                if restarted {
                    p.first_seen = now;
                }
                p.state = Some(s);
                p.state_at = Some(now);
                p.dead = false;
                Change::of(new, restarted)
            }
            None => match self.peers.get_mut(id) {
                Some(p) if !p.dead => {
                    p.dead = true;
                    p.state = None;
                    p.state_at = None;
                    Change::Died
                }
                _ => Change::None,
            },
        }
    }

    /// Drops peers silent longer than the timeout; returns their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let timeout = self.timeout;
        let mut gone = Vec::new();
        for p in self.peers.values_mut() {
            let stale = p.state_at.is_some_and(|t| now.duration_since(t) > timeout);
            if stale {
                p.state = None;
                p.state_at = None;
                p.dead = true;
                gone.push(p.id.clone());
            }
        }
        self.peers.retain(|_, p| {
            !(p.dead && p.sighting.is_none() && now.duration_since(p.seen_at) > timeout)
        });
        gone
    }

    /// Forgets MQTT states (a new broker: everyone republishes).
    pub fn forget_states(&mut self) {
        for p in self.peers.values_mut() {
            p.state = None;
            p.state_at = None;
        }
    }

    /// Peers alive on MQTT and taking work.
    pub fn alive(&self) -> impl Iterator<Item = (&Peer, &NodeState)> {
        self.peers.values().filter_map(|p| {
            p.state
                .as_ref()
                .filter(|s| !s.draining && !p.dead)
                .map(|s| (p, s))
        })
    }

    pub fn get(&self, id: &str) -> Option<&Peer> {
        self.peers.get(id)
    }

    pub fn all(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values()
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

impl Peer {
    /// The JSON object `GET /v1/mesh/peers` shows.
    pub fn to_json(&self, now: Instant) -> Value {
        let sighting = self.sighting.as_ref();
        let state = self.state.as_ref();
        let status = if self.dead {
            "dead"
        } else if state.is_some_and(|s| s.draining) {
            "draining"
        } else if state.is_some() {
            "up"
        } else {
            "seen"
        };
        let models: Vec<Value> = match state {
            Some(s) => s
                .models
                .iter()
                .map(|m| {
                    json!({
                        "name": m.name.as_str(),
                        "task": match m.task { Task::Text => "text-generation", Task::Intent => "speech-to-intent" },
                        "loaded": m.loaded, "queued": m.queued, "busy": m.busy, "capacity": m.capacity,
                        "tokens_per_s": f64::from(m.decode_milli_tps) / 1000.0,
                        "service_ms": m.service_ms, "size_mb": m.size_mb,
                    })
                })
                .collect(),
            None => sighting
                .map(|s| s.models.iter().map(|m| json!({"name": m})).collect())
                .unwrap_or_default(),
        };
        json!({
            "id": self.id,
            "status": status,
            "addresses": sighting.map(|s| s.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>()).unwrap_or_default(),
            "api_port": sighting.map(|s| s.api_port).or(state.map(|s| s.api_port)),
            "protocol": sighting.map(|s| s.protocol),
            "boot": state.map(|s| s.boot).or(sighting.map(|s| s.boot)).map(|b| format!("{b:x}")),
            "mdns": sighting.is_some(),
            "mqtt": state.is_some(),
            "hosts_broker": sighting.is_some_and(|s| s.hosting),
            "models": models,
            "free_memory_mb": state.map(|s| s.free_memory_mb),
            "temperature_c": state.and_then(|s| s.temperature_mc).map(|t| f64::from(t) / 1000.0),
            "throttled": state.and_then(|s| s.throttled),
            "audio_rtf": state.and_then(|s| s.audio_rtf_micro).map(|r| f64::from(r) / 1e6),
            "last_seen_ms": now.duration_since(self.seen_at).as_millis() as u64,
            "known_for_ms": now.duration_since(self.first_seen).as_millis() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::wire::node_id;

    fn sighting(id: &str, boot: u64) -> Sighting {
        Sighting {
            id: id.into(),
            boot,
            addrs: vec!["10.0.0.2".parse().unwrap()],
            api_port: 8710,
            protocol: 1,
            broker_port: Some(8711),
            hosting: false,
            models: vec![],
        }
    }

    fn state(id: &str, boot: u64) -> NodeState {
        NodeState {
            node: node_id(id),
            boot,
            seq: 0,
            api_port: 8710,
            models: heapless::Vec::new(),
            free_memory_mb: 100,
            temperature_mc: None,
            throttled: None,
            audio_rtf_micro: None,
            draining: false,
        }
    }

    #[test]
    fn a_peer_lives_dies_and_comes_back() {
        let t0 = Instant::now();
        let mut table = PeerTable::new(Duration::from_secs(10));
        assert_eq!(table.sighted(sighting("b", 1), t0), Change::New);
        assert_eq!(table.alive().count(), 0, "mDNS alone is not alive");
        assert_eq!(table.state("b", Some(state("b", 1)), t0), Change::Updated);
        assert_eq!(table.alive().count(), 1);
        assert_eq!(table.state("b", None, t0), Change::Died);
        assert_eq!(table.alive().count(), 0);
        assert_eq!(
            table.state("b", None, t0),
            Change::None,
            "a will is reported once"
        );
        // The same id, a new boot: a restart.
        assert_eq!(table.sighted(sighting("b", 2), t0), Change::Restarted);
        assert_eq!(table.state("b", Some(state("b", 2)), t0), Change::Updated);
        assert_eq!(table.alive().count(), 1);
    }

    #[test]
    fn a_silent_peer_expires() {
        let t0 = Instant::now();
        let mut table = PeerTable::new(Duration::from_secs(10));
        table.state("b", Some(state("b", 1)), t0);
        assert!(table.expire(t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(
            table.expire(t0 + Duration::from_secs(11)),
            vec!["b".to_string()]
        );
        assert_eq!(table.alive().count(), 0);
        // Without an mDNS record it is forgotten after another timeout.
        table.expire(t0 + Duration::from_secs(30));
        assert!(table.is_empty());
    }
}
