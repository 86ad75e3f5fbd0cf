//! Which MQTT broker a node uses: one deterministic rule, so that nodes
//! starting at the same moment, knowing the same peers, choose the same one.
//!
//! 1. `mesh.mqtt_url`, when configured: nothing else is considered.
//! 2. Else a broker advertised on the LAN as `_mqtt._tcp`: the first by
//!    instance name, of those not marked failed.
//! 3. Else the embedded broker of a kith node that hosts one now (TXT
//!    `mq=1`): the lowest node id among them. A running broker is kept
//!    even when a node with a lower id joins later (no needless moves).
//! 4. Else the lowest node id among the nodes that may host (TXT `bp`,
//!    this node included when `mesh.broker` is on): if that is this node,
//!    it starts the broker; the others connect to its `bp` port.
//!
//! A broker that cannot be reached twice in a row is marked failed (until
//! its node reappears with a new boot, or a timeout); every node that used
//! it sees the same failure and moves, by the same rule, to the next.
//! A node hosting a broker that sees another host with a lower id stops
//! hosting: two brokers (after a network partition heals) become one.

use std::net::{IpAddr, SocketAddr};

/// A candidate host, from mDNS (or this node itself).
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    pub id: String,
    pub addr: Option<IpAddr>,
    pub broker_port: u16,
    pub hosting: bool,
}

/// What the rule chose.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// The configured URL.
    Configured,
    /// A LAN broker (`_mqtt._tcp`).
    Lan { name: String, addr: SocketAddr },
    /// This node hosts the embedded broker.
    HostHere,
    /// Another node's embedded broker.
    Peer { id: String, addr: SocketAddr },
    /// Nothing to connect to yet.
    None,
}

/// Everything the rule looks at.
pub struct Inputs<'a> {
    pub me: &'a str,
    pub configured: bool,
    /// `_mqtt._tcp` brokers not marked failed: (instance name, address).
    pub lan: &'a [(String, SocketAddr)],
    /// This node, when it may host.
    pub me_host: Option<Host>,
    /// Peers that may host, not marked failed.
    pub peers: &'a [Host],
}

/// The rule above.
pub fn choose(i: &Inputs) -> Choice {
    if i.configured {
        return Choice::Configured;
    }
    if let Some((name, addr)) = i.lan.iter().min_by(|a, b| a.0.cmp(&b.0)) {
        return Choice::Lan {
            name: name.clone(),
            addr: *addr,
        };
    }
    let candidates = i
        .peers
        .iter()
        .filter(|h| h.addr.is_some() && h.id != i.me)
        .chain(i.me_host.iter());
    let pick = |hosting_only: bool| {
        candidates
            .clone()
            .filter(|h| !hosting_only || h.hosting)
            .min_by(|a, b| a.id.cmp(&b.id))
    };
    let Some(host) = pick(true).or_else(|| pick(false)) else {
        return Choice::None;
    };
    if host.id == i.me {
        return Choice::HostHere;
    }
    match host.addr {
        Some(ip) => Choice::Peer {
            id: host.id.clone(),
            addr: SocketAddr::new(ip, host.broker_port),
        },
        None => Choice::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, hosting: bool) -> Host {
        Host {
            id: id.into(),
            addr: Some(format!("10.0.0.{}", id.len()).parse().unwrap()),
            broker_port: 8711,
            hosting,
        }
    }

    fn choose_as(me: &str, all: &[Host]) -> Choice {
        let peers: Vec<Host> = all.iter().filter(|h| h.id != me).cloned().collect();
        choose(&Inputs {
            me,
            configured: false,
            lan: &[],
            me_host: all.iter().find(|h| h.id == me).cloned(),
            peers: &peers,
        })
    }

    #[test]
    fn nodes_starting_together_agree_on_the_lowest_id() {
        let all = [
            host("kitchen", false),
            host("attic", false),
            host("jetson", false),
        ];
        assert_eq!(choose_as("attic", &all), Choice::HostHere);
        for me in ["kitchen", "jetson"] {
            assert!(
                matches!(choose_as(me, &all), Choice::Peer { ref id, .. } if id == "attic"),
                "{me}"
            );
        }
    }

    #[test]
    fn a_running_broker_is_kept_when_a_lower_id_joins() {
        let all = [
            host("kitchen", true),
            host("attic", false),
            host("jetson", false),
        ];
        assert!(matches!(choose_as("attic", &all), Choice::Peer { ref id, .. } if id == "kitchen"));
        assert_eq!(choose_as("kitchen", &all), Choice::HostHere);
    }

    #[test]
    fn two_hosts_become_one() {
        let all = [host("kitchen", true), host("attic", true)];
        assert_eq!(choose_as("attic", &all), Choice::HostHere);
        assert!(matches!(choose_as("kitchen", &all), Choice::Peer { ref id, .. } if id == "attic"));
    }

    #[test]
    fn a_failed_host_is_replaced_by_the_next_lowest() {
        // "attic" failed: the caller leaves it out of `peers`.
        let all = [host("kitchen", false), host("jetson", false)];
        assert!(
            matches!(choose_as("kitchen", &all), Choice::Peer { ref id, .. } if id == "jetson")
        );
        assert_eq!(choose_as("jetson", &all), Choice::HostHere);
    }

    #[test]
    fn configuration_and_lan_brokers_come_first() {
        let lan = [
            (
                "mosquitto-b._mqtt._tcp.local.".to_string(),
                "10.0.0.9:1883".parse().unwrap(),
            ),
            (
                "mosquitto-a._mqtt._tcp.local.".to_string(),
                "10.0.0.8:1883".parse().unwrap(),
            ),
        ];
        let me = Some(host("a", false));
        let i = Inputs {
            me: "a",
            configured: false,
            lan: &lan,
            me_host: me.clone(),
            peers: &[],
        };
        assert!(
            matches!(choose(&i), Choice::Lan { ref name, .. } if name.starts_with("mosquitto-a"))
        );
        let i = Inputs {
            me: "a",
            configured: true,
            lan: &lan,
            me_host: me,
            peers: &[],
        };
        assert_eq!(choose(&i), Choice::Configured);
        // A node that may not host, alone: nothing yet.
        let i = Inputs {
            me: "a",
            configured: false,
            lan: &[],
            me_host: None,
            peers: &[],
        };
        assert_eq!(choose(&i), Choice::None);
    }
}
