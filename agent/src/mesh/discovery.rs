//! mDNS: this node advertises `_kith._tcp.local.` and browses for peers and
//! for MQTT brokers (`_mqtt._tcp.local.`).
//!
//! mdns-sd runs its own thread; this module turns its events into updates
//! of the [`PeerTable`](super::peers::PeerTable) and the list of LAN
//! brokers, and wakes the MQTT link when either changes. The TXT record is
//! built here, and only here, and kept under [`MAX_TXT`] bytes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mdns_sd::{IfKind, IfPredicate, ServiceDaemon, ServiceEvent, ServiceInfo};

use super::wire::PROTOCOL;

/// kith's service type.
pub const KITH_SERVICE: &str = "_kith._tcp.local.";
/// The service type Mosquitto (with avahi) and other brokers advertise.
pub const MQTT_SERVICE: &str = "_mqtt._tcp.local.";
/// Bytes a TXT record may take (all `key=value` strings with their length bytes).
pub const MAX_TXT: usize = 200;

/// Interface name prefixes that are container, VM or VPN plumbing, never
/// the LAN: no multicast reaches other devices through them.
const VIRTUAL_PREFIXES: &[&str] = &[
    "docker",
    "br-",
    "veth",
    "virbr",
    "cni",
    "flannel",
    "podman",
    "lxcbr",
    "lxdbr",
    "vmnet",
    "vboxnet",
    "tailscale",
    "zt",
    "wg",
    "kube",
    "cali",
    "weave",
    "tun",
    "tap",
];

/// Whether mDNS uses an interface: the configured names, or by default
/// every non-loopback IPv4 interface that is not virtual plumbing.
pub fn interface_allowed(configured: &[String], name: &str, ip: IpAddr, loopback: bool) -> bool {
    if !ip.is_ipv4() {
        return false;
    }
    if !configured.is_empty() {
        return configured.iter().any(|c| c == name);
    }
    !loopback && !VIRTUAL_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// What this node says about itself in its TXT record.
#[derive(Debug, Clone, PartialEq)]
pub struct Advert {
    pub id: String,
    pub boot: u64,
    pub api_port: u16,
    /// `Some(port)`: may host the embedded broker on that port.
    pub broker_port: Option<u16>,
    /// Hosts the embedded broker now.
    pub hosting: bool,
    /// Text models installed (a summary: the table comes over MQTT).
    pub models: Vec<String>,
}

impl Advert {
    /// The TXT properties, at most [`MAX_TXT`] bytes: models that do not
    /// fit are counted (`more=N`) instead of listed.
    pub fn txt(&self) -> Vec<(String, String)> {
        let mut props = vec![
            ("id".to_string(), self.id.clone()),
            ("v".to_string(), PROTOCOL.to_string()),
            ("boot".to_string(), format!("{:x}", self.boot)),
        ];
        if let Some(p) = self.broker_port {
            props.push(("bp".into(), p.to_string()));
        }
        if self.hosting {
            props.push(("mq".into(), "1".into()));
        }
        let size = |props: &[(String, String)]| -> usize {
            props.iter().map(|(k, v)| 1 + k.len() + 1 + v.len()).sum()
        };
        let mut listed = Vec::new();
        for (i, m) in self.models.iter().enumerate() {
            let mut trial = listed.clone();
            trial.push(m.as_str());
            let more = self.models.len() - i - 1;
            let mut candidate = props.clone();
            candidate.push(("m".into(), trial.join(",")));
            if more > 0 {
                candidate.push(("more".into(), more.to_string()));
            }
            if size(&candidate) > MAX_TXT {
                break;
            }
            listed = trial;
        }
        if !listed.is_empty() {
            props.push(("m".into(), listed.join(",")));
        }
        if listed.len() < self.models.len() {
            props.push((
                "more".into(),
                (self.models.len() - listed.len()).to_string(),
            ));
        }
        props
    }
}

/// A node as mDNS shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sighting {
    pub id: String,
    pub boot: u64,
    pub addrs: Vec<IpAddr>,
    pub api_port: u16,
    pub protocol: u8,
    pub broker_port: Option<u16>,
    pub hosting: bool,
    pub models: Vec<String>,
}

/// A broker that advertises itself as `_mqtt._tcp` (not one of kith's).
#[derive(Debug, Clone, PartialEq)]
pub struct LanBroker {
    pub name: String,
    pub addr: IpAddr,
    pub port: u16,
}

/// What discovery tells the rest of the mesh.
pub trait DiscoverySink: Send + Sync + 'static {
    fn sighted(&self, s: Sighting);
    fn vanished(&self, id: &str);
    fn brokers(&self, brokers: Vec<LanBroker>);
}

/// The running mDNS side: the advert and the browsers.
pub struct Discovery {
    daemon: ServiceDaemon,
    advert: Mutex<Advert>,
    hostname: String,
    started: Instant,
}

impl Discovery {
    /// Starts mDNS on the chosen interfaces, advertises `advert`, browses
    /// for peers and brokers.
    pub fn start(
        interfaces: &[String],
        advert: Advert,
        sink: Arc<dyn DiscoverySink>,
    ) -> anyhow::Result<Discovery> {
        let daemon = ServiceDaemon::new().map_err(|e| anyhow::anyhow!("starting mDNS: {e}"))?;
        let configured = interfaces.to_vec();
        daemon
            .disable_interface(IfKind::All)
            .and_then(|_| {
                daemon.enable_interface(IfKind::Predicate(IfPredicate::new(move |intf| {
                    interface_allowed(&configured, &intf.name, intf.ip(), intf.is_loopback())
                })))
            })
            .map_err(|e| anyhow::anyhow!("choosing mDNS interfaces: {e}"))?;
        let hostname = format!("kith-{}.local.", advert.id);
        let discovery = Discovery {
            daemon,
            advert: Mutex::new(advert),
            hostname,
            started: Instant::now(),
        };
        discovery.register()?;
        let peers = discovery
            .daemon
            .browse(KITH_SERVICE)
            .map_err(|e| anyhow::anyhow!("browsing {KITH_SERVICE}: {e}"))?;
        let brokers = discovery
            .daemon
            .browse(MQTT_SERVICE)
            .map_err(|e| anyhow::anyhow!("browsing {MQTT_SERVICE}: {e}"))?;
        let own = discovery.own_id();
        let sink2 = sink.clone();
        std::thread::Builder::new()
            .name("kith-mdns-peers".into())
            .spawn(move || {
                while let Ok(event) = peers.recv() {
                    match event {
                        ServiceEvent::ServiceResolved(info) => match sighting(&info) {
                            Some(s) if s.id == own => {}
                            Some(s) => sink.sighted(s),
                            None => tracing::warn!(
                                service = info.get_fullname(),
                                "mDNS: a _kith._tcp record without a valid id; ignored"
                            ),
                        },
                        ServiceEvent::ServiceRemoved(_, fullname) => {
                            if let Some(id) = instance_id(&fullname)
                                && id != own
                            {
                                sink.vanished(&id);
                            }
                        }
                        _ => {}
                    }
                }
            })?;
        std::thread::Builder::new()
            .name("kith-mdns-brokers".into())
            .spawn(move || {
                let mut known: BTreeMap<String, LanBroker> = BTreeMap::new();
                while let Ok(event) = brokers.recv() {
                    match event {
                        ServiceEvent::ServiceResolved(info) => {
                            let addr =
                                best_addr(info.get_addresses().iter().map(|a| a.to_ip_addr()));
                            if let Some(addr) = addr {
                                known.insert(
                                    info.get_fullname().to_string(),
                                    LanBroker {
                                        name: info.get_fullname().to_string(),
                                        addr,
                                        port: info.get_port(),
                                    },
                                );
                            }
                        }
                        ServiceEvent::ServiceRemoved(_, fullname) => {
                            known.remove(&fullname);
                        }
                        _ => continue,
                    }
                    sink2.brokers(known.values().cloned().collect());
                }
            })?;
        Ok(discovery)
    }

    fn own_id(&self) -> String {
        self.advert.lock().map(|a| a.id.clone()).unwrap_or_default()
    }

    fn register(&self) -> anyhow::Result<()> {
        let advert = self
            .advert
            .lock()
            .map_err(|_| anyhow::anyhow!("advert poisoned"))?
            .clone();
        let txt = advert.txt();
        let mut info = ServiceInfo::new(
            KITH_SERVICE,
            &advert.id,
            &self.hostname,
            "",
            advert.api_port,
            &txt[..],
        )
        .map_err(|e| anyhow::anyhow!("building the mDNS record: {e}"))?
        .enable_addr_auto();
        // Node ids are unique by configuration; probing would only delay
        // the first announcement by ~750 ms.
        info.set_requires_probe(false);
        self.daemon
            .register(info)
            .map_err(|e| anyhow::anyhow!("advertising {KITH_SERVICE}: {e}"))
    }

    /// Re-advertises with `hosting` changed.
    pub fn set_hosting(&self, hosting: bool) {
        let changed = match self.advert.lock() {
            Ok(mut a) if a.hosting != hosting => {
                a.hosting = hosting;
                true
            }
            _ => false,
        };
        if changed && let Err(e) = self.register() {
            tracing::warn!(error = %e, "mDNS: re-advertising failed");
        }
    }

    /// Seconds since discovery started.
    pub fn age(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Withdraws the advert (goodbye packets) and stops mDNS.
    pub fn stop(&self) {
        let fullname = format!("{}.{KITH_SERVICE}", self.own_id());
        if let Ok(rx) = self.daemon.unregister(&fullname) {
            let _ = rx.recv_timeout(std::time::Duration::from_millis(500));
        }
        let _ = self.daemon.shutdown();
    }
}

/// The instance name of a `_kith._tcp` full name.
fn instance_id(fullname: &str) -> Option<String> {
    fullname
        .strip_suffix(KITH_SERVICE)
        .and_then(|s| s.strip_suffix('.'))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// IPv4 first (what a LAN of devices uses), then IPv6.
fn best_addr(addrs: impl Iterator<Item = IpAddr>) -> Option<IpAddr> {
    let mut all: Vec<IpAddr> = addrs.collect();
    all.sort_by_key(|a| (!a.is_ipv4(), *a));
    all.into_iter().next()
}

fn sighting(info: &mdns_sd::ResolvedService) -> Option<Sighting> {
    let id = info.get_property_val_str("id")?.to_string();
    if id.is_empty() || id.len() > 32 {
        return None;
    }
    let mut addrs: Vec<IpAddr> = info
        .get_addresses()
        .iter()
        .map(|a| a.to_ip_addr())
        .collect();
    addrs.sort_by_key(|a| (!a.is_ipv4(), *a));
    addrs.dedup();
    Some(Sighting {
        id,
        boot: info
            .get_property_val_str("boot")
            .and_then(|b| u64::from_str_radix(b, 16).ok())
            .unwrap_or(0),
        addrs,
        api_port: info.get_port(),
        protocol: info
            .get_property_val_str("v")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        broker_port: info.get_property_val_str("bp").and_then(|p| p.parse().ok()),
        hosting: info.get_property_val_str("mq") == Some("1"),
        models: info
            .get_property_val_str("m")
            .map(|m| {
                m.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_and_vm_bridges_are_never_used_by_default() {
        let v4: IpAddr = "192.168.1.20".parse().unwrap();
        let none: &[String] = &[];
        assert!(interface_allowed(none, "eth0", v4, false));
        assert!(interface_allowed(none, "wlan0", v4, false));
        assert!(interface_allowed(none, "enp3s0", v4, false));
        for virt in [
            "docker0",
            "br-1a2b3c",
            "veth12ab",
            "virbr0",
            "cni0",
            "tailscale0",
            "wg0",
        ] {
            assert!(!interface_allowed(none, virt, v4, false), "{virt}");
        }
        assert!(!interface_allowed(
            none,
            "lo",
            "127.0.0.1".parse().unwrap(),
            true
        ));
        assert!(!interface_allowed(
            none,
            "eth0",
            "fe80::1".parse().unwrap(),
            false
        ));
        // Configured names win: a bridge that is the LAN can be chosen.
        let chosen = ["br0".to_string()];
        assert!(interface_allowed(&chosen, "br0", v4, false));
        assert!(!interface_allowed(&chosen, "eth0", v4, false));
    }

    fn txt_len(props: &[(String, String)]) -> usize {
        props.iter().map(|(k, v)| 1 + k.len() + 1 + v.len()).sum()
    }

    #[test]
    fn the_txt_record_stays_under_200_bytes() {
        let mut advert = Advert {
            id: "x".repeat(32),
            boot: u64::MAX,
            api_port: 8710,
            broker_port: Some(8711),
            hosting: true,
            models: vec!["smollm2-135m".into()],
        };
        let small = advert.txt();
        assert!(small.contains(&("m".into(), "smollm2-135m".into())));
        assert!(small.contains(&("mq".into(), "1".into())));
        advert.models = (0..40)
            .map(|i| format!("some-long-model-name-{i}"))
            .collect();
        let big = advert.txt();
        assert!(txt_len(&big) <= MAX_TXT, "{} bytes", txt_len(&big));
        let listed = big
            .iter()
            .find(|(k, _)| k == "m")
            .map(|(_, v)| v.split(',').count())
            .unwrap();
        let more: usize = big
            .iter()
            .find(|(k, _)| k == "more")
            .unwrap()
            .1
            .parse()
            .unwrap();
        assert!(listed >= 1);
        assert_eq!(listed + more, 40);
    }

    #[test]
    fn instance_names_and_addresses() {
        assert_eq!(instance_id("pi-5._kith._tcp.local."), Some("pi-5".into()));
        assert_eq!(instance_id("._kith._tcp.local."), None);
        let a: IpAddr = "fe80::1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(best_addr([a, b].into_iter()), Some(b));
    }
}
