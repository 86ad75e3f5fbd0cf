//! The mesh on a real network: every node is a `kith up` process in its own
//! network namespace, joined to the others by veth pairs on a bridge, as
//! devices on one LAN switch. Discovery is real multicast mDNS; the brokers
//! are kith's embedded one and Mosquitto. Needs root (network namespaces):
//! without it every test here says SKIPPED on stderr and passes.
//! Needs `smollm2-135m` in `$KITH_MODELS_DIR`, `ip`, `mosquitto`,
//! `mosquitto_pub`/`mosquitto_sub` and `openssl` (the README's test command
//! installs them).

use std::fs::File;
use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod support;
use support::{Answer, exchange, models_dir, next_data, open_stream_on};

const MODEL: &str = "smollm2-135m";
const API_PORT: u16 = 8710;

/// One scenario at a time: each runs three to four processes on two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// A LAN of network namespaces: a switch (a bridge in its own namespace)
/// and hosts `10.77.0.1`, `10.77.0.2`… each with an `eth0` on it.
/// Everything is deleted on drop.
struct Lan {
    prefix: String,
    hosts: usize,
}

static LANS: AtomicUsize = AtomicUsize::new(0);

impl Lan {
    /// `None` (and a loud SKIPPED) when not root.
    fn new(test: &str, hosts: usize) -> Option<Lan> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED {test}: network namespaces need root (run the test suite as root)");
            return None;
        }
        let prefix = format!(
            "kith{}x{}",
            std::process::id() % 100_000,
            LANS.fetch_add(1, Ordering::SeqCst)
        );
        let lan = Lan { prefix, hosts: 0 };
        let sw = lan.switch();
        ip(&["netns", "add", &sw]);
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        let mut lan = lan;
        for _ in 0..hosts {
            lan.add_host();
        }
        Some(lan)
    }

    fn switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    fn ns(&self, host: usize) -> String {
        format!("{}-h{host}", self.prefix)
    }

    fn addr(&self, host: usize) -> String {
        format!("10.77.0.{}", host + 1)
    }

    /// Adds a host; returns its index.
    fn add_host(&mut self) -> usize {
        let i = self.hosts;
        let (ns, sw, port) = (self.ns(i), self.switch(), format!("p{i}"));
        ip(&["netns", "add", &ns]);
        ip(&[
            "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", self.addr(i)),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        self.hosts += 1;
        i
    }

    /// A TCP connection opened from inside `host`'s namespace, if one opens within `timeout`.
    fn try_connect(&self, host: usize, addr: SocketAddr, timeout: Duration) -> Option<TcpStream> {
        let path = format!("/run/netns/{}", self.ns(host));
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on a namespace file we hold open, in a thread
            // of our own that only opens this one connection.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}");
            TcpStream::connect_timeout(&addr, timeout).ok()
        })
        .join()
        .expect("connect thread")
    }

    fn connect(&self, host: usize, addr: SocketAddr) -> TcpStream {
        self.try_connect(host, addr, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("connect to {addr} from host {host}"))
    }

    /// Waits until something listens at `addr` (at most `limit`).
    fn listening(&self, host: usize, addr: SocketAddr, limit: Duration) -> bool {
        poll(limit, || {
            self.try_connect(host, addr, Duration::from_millis(200))
                .is_some()
        })
    }

    fn exec(&self, host: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host), program]);
        c
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for i in 0..self.hosts {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch()])
            .status();
    }
}

/// A `kith up` on one host of the LAN.
struct Node {
    name: String,
    host: usize,
    child: Option<Child>,
    log: PathBuf,
    dir: tempfile::TempDir,
}

/// Mesh settings that make failures show within a test's patience; a
/// node's extra configuration follows (more `[mesh]` keys, then tables).
const TEST_MESH: &str = "[mesh]\nstate_interval_secs = 1\npeer_timeout_secs = 4\naccept_timeout_ms = 1500\nidle_timeout_secs = 5\n";

impl Node {
    /// Starts `name` on `host`, with the model when `with_model`, and
    /// extra configuration appended to the test mesh settings.
    fn start(lan: &Lan, host: usize, name: &str, with_model: bool, extra: &str) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("kith.toml");
        std::fs::write(&config, format!("{TEST_MESH}{extra}")).expect("config");
        let models = if with_model {
            models_dir()
        } else {
            dir.path().join("no-models")
        };
        let log = dir.path().join("kith.log");
        let child = lan
            .exec(host, env!("CARGO_BIN_EXE_kith"))
            .arg("--models-dir")
            .arg(&models)
            .args([
                "up",
                "--api",
                &format!("0.0.0.0:{API_PORT}"),
                "--node-name",
                name,
                "--config",
            ])
            .arg(&config)
            .env("KITH_LOG", "info,mdns_sd=warn")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log"))
            .spawn()
            .expect("kith starts");
        Node {
            name: name.into(),
            host,
            child: Some(child),
            log,
            dir,
        }
    }

    fn api(&self, lan: &Lan) -> SocketAddr {
        format!("{}:{API_PORT}", lan.addr(self.host))
            .parse()
            .expect("addr")
    }

    fn get(&self, lan: &Lan, path: &str) -> Answer {
        exchange(
            lan.connect(self.host, self.api(lan)),
            "GET",
            path,
            None,
            b"",
        )
    }

    fn post(&self, lan: &Lan, body: &Value) -> Answer {
        exchange(
            lan.connect(self.host, self.api(lan)),
            "POST",
            "/v1/chat/completions",
            Some("application/json"),
            body.to_string().as_bytes(),
        )
    }

    fn stream(&self, lan: &Lan, body: &Value) -> BufReader<TcpStream> {
        open_stream_on(lan.connect(self.host, self.api(lan)), body)
    }

    fn peers(&self, lan: &Lan) -> Value {
        let a = self.get(lan, "/v1/mesh/peers");
        assert_eq!(a.status, 200, "{}", a.body);
        a.json()
    }

    fn metric(&self, lan: &Lan, series: &str) -> f64 {
        let text = self.get(lan, "/metrics").body;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in /metrics"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the API answers (at most 30 s).
    fn wait_serving(&self, lan: &Lan) {
        let ok = lan.listening(self.host, self.api(lan), Duration::from_secs(30));
        assert!(ok, "{} does not serve:\n{}", self.name, self.log());
    }

    /// SIGKILL: a crash, a pulled plug. Nothing is said to anyone.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            run(Command::new("kill").args([&format!("-{sig}"), &c.id().to_string()]));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.kill();
        let _ = &self.dir;
    }
}

/// The scenario's LAN, one scenario at a time (each runs three or four
/// processes on two cores); `None`, after a loud SKIPPED, when not root.
fn scenario(test: &str, hosts: usize) -> Option<(std::sync::MutexGuard<'static, ()>, Lan)> {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    Lan::new(test, hosts).map(|lan| (serial, lan))
}

/// Streams a long answer from `asker`, kills `victim` (the node running it)
/// after a few chunks, and checks that the stream ends with an error event
/// and `[DONE]` soon after; returns how soon.
fn killed_mid_stream(lan: &Lan, asker: &Node, victim: &mut Node) -> Duration {
    let mut r = asker.stream(
        lan,
        &json!({"model": MODEL, "stream": true, "max_tokens": 400, "temperature": 0.7, "seed": 3,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]}),
    );
    for _ in 0..4 {
        assert!(next_data(&mut r).is_some());
    }
    let killed = Instant::now();
    victim.kill();
    let mut error = None;
    let mut done = false;
    while let Some(d) = next_data(&mut r) {
        if d == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(&d).expect("chunk");
        if v.get("error").is_some() {
            error = Some(v);
        }
    }
    let ended = killed.elapsed();
    let error = error.expect("an error event");
    assert!(done, "the stream ends with [DONE]");
    assert_eq!(error["error"]["code"], "mesh_unavailable", "{error}");
    assert!(
        ended < Duration::from_secs(6),
        "the stream ended {ended:?} after the kill"
    );
    ended
}

/// Waits until every node serves and all of them are connected through
/// broker `broker` and see each other alive.
fn mesh_up(lan: &Lan, nodes: &[&Node], broker: &str) {
    for n in nodes {
        n.wait_serving(lan);
    }
    let all: Vec<String> = nodes.iter().map(|n| n.peers(lan).to_string()).collect();
    assert!(
        converged(lan, nodes, broker, Duration::from_secs(10)),
        "no convergence on {broker}:\n{}",
        all.join("\n")
    );
}

/// Asks `node` a question it can only answer with the model, and checks
/// that node `by` answered it, correctly.
fn answered_by(lan: &Lan, node: &Node, by: &str) {
    let a = node.post(lan, &chat("What is the capital of France?", 12));
    assert_eq!(
        (a.status, a.header("x-kith-node").as_deref()),
        (200, Some(by)),
        "{}\n{}",
        a.body,
        node.log()
    );
    let text = a.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(text.contains("Paris"), "{text}");
}

/// Calls `f` every 100 ms until it is true or `limit` passes.
fn poll(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn peer<'a>(table: &'a Value, id: &str) -> Option<&'a Value> {
    table["peers"].as_array()?.iter().find(|p| p["id"] == id)
}

fn up_with_mqtt(table: &Value, id: &str) -> bool {
    peer(table, id).is_some_and(|p| p["status"] == "up" && p["mqtt"] == true)
}

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0})
}

/// Waits until every node sees every other alive over MQTT, through broker `broker`.
fn converged(lan: &Lan, nodes: &[&Node], broker: &str, limit: Duration) -> bool {
    poll(limit, || {
        nodes.iter().all(|n| {
            let t = n.peers(lan);
            t["broker"]["connected"] == true
                && t["broker"]["name"] == broker
                && nodes
                    .iter()
                    .filter(|o| o.name != n.name)
                    .all(|o| up_with_mqtt(&t, &o.name))
        })
    })
}

#[test]
fn three_nodes_find_each_other_agree_on_one_broker_and_the_node_without_the_model_is_answered_by_one_with_it()
 {
    let Some((_serial, lan)) = scenario("three_nodes_find_each_other", 3) else {
        return;
    };
    // Docker's bridge on the Jetson: kith must never advertise it.
    ip(&["-n", &lan.ns(1), "link", "add", "docker0", "type", "bridge"]);
    ip(&[
        "-n",
        &lan.ns(1),
        "addr",
        "add",
        "172.17.0.1/16",
        "dev",
        "docker0",
    ]);
    ip(&["-n", &lan.ns(1), "link", "set", "docker0", "up"]);
    // All three start at once.
    let pi = Node::start(&lan, 0, "n1-pi", false, "");
    let jetson = Node::start(&lan, 1, "n2-jetson", true, "");
    let box3 = Node::start(&lan, 2, "n3-box", true, "");
    let nodes = [&pi, &jetson, &box3];
    for n in nodes {
        n.wait_serving(&lan);
    }

    // Discovery: every node saw its first peer within 2 s of starting.
    for n in nodes {
        assert!(
            poll(Duration::from_secs(3), || n.peers(&lan)["peers"]
                .as_array()
                .is_some_and(|p| p.len() == 2)),
            "{} sees {}",
            n.name,
            n.peers(&lan)
        );
        let first = n.peers(&lan)["first_peer_ms"]
            .as_u64()
            .expect("first_peer_ms");
        assert!(first <= 2000, "{}: first peer after {first} ms", n.name);
    }
    // One broker for all: the lowest id hosts it.
    assert!(
        converged(&lan, &nodes, "n1-pi", Duration::from_secs(10)),
        "no convergence:\n{}\n{}\n{}",
        pi.peers(&lan),
        jetson.peers(&lan),
        box3.peers(&lan)
    );
    assert_eq!(pi.peers(&lan)["broker"]["hosted_here"], true);
    assert_eq!(jetson.peers(&lan)["broker"]["hosted_here"], false);
    // The Jetson is seen at its LAN address only, never at docker0's.
    let seen = pi.peers(&lan);
    let addrs = &peer(&seen, "n2-jetson").expect("jetson")["addresses"];
    assert_eq!(addrs, &json!(["10.77.0.2"]), "{seen}");
    // Peers' states carry their models.
    assert!(
        peer(&seen, "n3-box").unwrap()["models"]
            .to_string()
            .contains(MODEL),
        "{seen}"
    );

    // The Pi lists the models its peers serve (and `auto`): it answers for them.
    let listed = pi.get(&lan, "/v1/models").json();
    let model = listed["data"]
        .as_array()
        .and_then(|d| d.iter().find(|m| m["id"] == MODEL))
        .unwrap_or_else(|| panic!("{listed}"));
    let mut nodes: Vec<&str> = model["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    nodes.sort_unstable();
    assert_eq!(nodes, ["n2-jetson", "n3-box"], "{listed}");
    assert!(
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "auto"),
        "{listed}"
    );

    // The Pi has no model: the request is answered by a node that has it.
    let a = pi.post(&lan, &chat("What is the capital of France?", 16));
    assert_eq!(a.status, 200, "{}\n{}", a.body, pi.log());
    let by = a.header("x-kith-node").expect("x-kith-node");
    assert!(by == "n2-jetson" || by == "n3-box", "{by}");
    let v = a.json();
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .contains("Paris"),
        "{v}"
    );
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0,
        "{v}"
    );
    // Streaming too, chunk by chunk through the Pi's open response.
    let mut r = pi.stream(
        &lan,
        &json!({"model": MODEL, "stream": true, "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    );
    let mut text = String::new();
    let mut chunks = 0;
    while let Some(d) = next_data(&mut r) {
        if d == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&d).expect("chunk");
        assert!(v.get("error").is_none(), "{v}");
        text.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
        chunks += 1;
    }
    assert!(
        chunks > 3 && text.contains("Paris"),
        "{chunks} chunks: {text}"
    );
    // model "auto": a short request goes to the small tier (the one model here).
    let a = pi.post(
        &lan,
        &json!({"model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["model"], MODEL);
    // A model nobody has: 404, naming it.
    let a = pi.post(
        &lan,
        &json!({"model": "llama-70b", "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (404, "model_not_found")
    );
    assert_eq!(pi.metric(&lan, "kith_mesh_delegated_ok_total"), 3.0);

    // `kith peers` shows the table from the node's API, and --json the same data.
    let table = run(lan.exec(0, env!("CARGO_BIN_EXE_kith")).args([
        "peers",
        "--api",
        "http://127.0.0.1:8710",
    ]));
    assert!(
        table.contains("n2-jetson") && table.contains("10.77.0.2:8710") && table.contains(MODEL),
        "{table}"
    );
    let as_json: Value = serde_json::from_str(&run(lan
        .exec(0, env!("CARGO_BIN_EXE_kith"))
        .args(["peers", "--json", "--api", "http://127.0.0.1:8710"])))
    .expect("json");
    assert_eq!(as_json["peers"].as_array().map(Vec::len), Some(2));
}

#[test]
fn a_busy_node_hands_the_request_to_an_idle_peer_with_the_same_model() {
    let Some((_serial, lan)) = scenario("a_busy_node_hands_the_request", 2) else {
        return;
    };
    let a = Node::start(
        &lan,
        0,
        "a",
        true,
        "[models]\npreload = [\"smollm2-135m\"]\n",
    );
    let b = Node::start(
        &lan,
        1,
        "b",
        true,
        "[models]\npreload = [\"smollm2-135m\"]\n",
    );
    a.wait_serving(&lan);
    b.wait_serving(&lan);
    assert!(converged(&lan, &[&a, &b], "a", Duration::from_secs(10)));
    // Serving is not loaded: until a's preload ends, a peer that has the
    // model in memory is rightly sooner. Wait for both to hold it.
    let loaded = format!("kith_model_loaded{{model=\"{MODEL}\"}}");
    for n in [&a, &b] {
        assert!(
            poll(Duration::from_secs(60), || n.metric(&lan, &loaded) == 1.0),
            "{} never loaded {MODEL}:\n{}",
            n.name,
            n.log()
        );
    }
    // Idle: the request stays on the node asked.
    let r = a.post(&lan, &chat("Say hi.", 4));
    assert_eq!(
        (r.status, r.header("x-kith-node").as_deref()),
        (200, Some("a")),
        "{}",
        r.body
    );
    // Keep `a` busy with a long answer; the next request goes to `b`.
    let mut long = a.stream(
        &lan,
        &json!({"model": MODEL, "stream": true, "max_tokens": 400, "temperature": 0.7, "seed": 1,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]}),
    );
    assert!(next_data(&mut long).is_some());
    // Wait until b's view of a shows the running job (a publishes every second).
    assert!(poll(Duration::from_secs(5), || {
        peer(&b.peers(&lan), "a").is_some_and(|p| p["models"][0]["busy"] == true)
    }));
    let r = a.post(&lan, &chat("What is the capital of France?", 12));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("x-kith-node").as_deref(),
        Some("b"),
        "a busy node should delegate:\n{}",
        a.log()
    );
    assert!(
        r.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .contains("Paris")
    );
    drop(long);
}

#[test]
fn killing_the_serving_node_retries_before_the_first_token_errors_cleanly_after_and_a_restarted_node_rejoins()
 {
    let Some((_serial, lan)) = scenario("killing_the_serving_node", 3) else {
        return;
    };
    let pi = Node::start(&lan, 0, "n1", false, "");
    let mut n2 = Node::start(
        &lan,
        1,
        "n2",
        true,
        "[models]\npreload = [\"smollm2-135m\"]\n",
    );
    let mut n3 = Node::start(
        &lan,
        2,
        "n3",
        true,
        "[models]\npreload = [\"smollm2-135m\"]\n",
    );
    mesh_up(&lan, &[&pi, &n2, &n3], "n1");

    // Still all up a state interval later (no churn from the start-up).
    std::thread::sleep(Duration::from_millis(1500));
    assert!(converged(
        &lan,
        &[&pi, &n2, &n3],
        "n1",
        Duration::from_secs(5)
    ));
    // n2 (first by rank: same load, lower id) freezes, then dies, with the
    // request on its way: the Pi retries on n3 before any token.
    n2.signal("STOP");
    let asked = Instant::now();
    let pending = {
        let stream = lan.connect(0, pi.api(&lan));
        std::thread::spawn(move || {
            exchange(
                stream,
                "POST",
                "/v1/chat/completions",
                Some("application/json"),
                chat("What is the capital of France?", 12)
                    .to_string()
                    .as_bytes(),
            )
        })
    };
    // Once the job is on its way to n2 (frozen, it cannot accept), n2 dies.
    assert!(poll(Duration::from_secs(5), || pi
        .metric(&lan, "kith_mesh_delegations_in_flight")
        == 1.0));
    n2.kill();
    let a = pending.join().expect("request thread");
    assert_eq!(a.status, 200, "{}\n{}", a.body, pi.log());
    assert_eq!(a.header("x-kith-node").as_deref(), Some("n3"));
    assert!(asked.elapsed() < Duration::from_secs(10));
    assert_eq!(
        pi.metric(&lan, "kith_mesh_delegation_retries_total"),
        1.0,
        "{}",
        pi.log()
    );
    // The Pi knows n2 is dead.
    assert!(poll(Duration::from_secs(5), || peer(&pi.peers(&lan), "n2")
        .is_none_or(|p| p["status"] != "up")));

    // Mid-answer, the only node with the model dies: the stream ends with
    // an error event and [DONE], not a hang.
    killed_mid_stream(&lan, &pi, &mut n3);

    // n2 comes back with the same name: the Pi sees it again and uses it.
    let n2b = Node::start(&lan, 1, "n2", true, "");
    n2b.wait_serving(&lan);
    assert!(
        poll(Duration::from_secs(10), || up_with_mqtt(
            &pi.peers(&lan),
            "n2"
        )),
        "{}",
        pi.peers(&lan)
    );
    answered_by(&lan, &pi, "n2");
    assert!(
        pi.log().contains("peer"),
        "the Pi's log tells what happened"
    );
}

#[test]
fn when_the_broker_host_dies_the_others_move_to_the_next_lowest_id() {
    let Some((_serial, lan)) = scenario("when_the_broker_host_dies", 3) else {
        return;
    };
    let mut n1 = Node::start(&lan, 0, "n1", false, "");
    let n2 = Node::start(&lan, 1, "n2", false, "");
    let n3 = Node::start(&lan, 2, "n3", true, "");
    mesh_up(&lan, &[&n1, &n2, &n3], "n1");
    n1.kill();
    let t = Instant::now();
    assert!(
        converged(&lan, &[&n2, &n3], "n2", Duration::from_secs(10)),
        "{}\n{}",
        n2.peers(&lan),
        n3.peers(&lan)
    );
    eprintln!("broker moved to n2 in {:?}", t.elapsed());
    assert_eq!(n2.peers(&lan)["broker"]["hosted_here"], true);
    // The mesh works through the new broker.
    answered_by(&lan, &n2, "n3");
}

/// Publishes `payload` on `topic` through the broker at `broker`, from `host`.
fn publish(lan: &Lan, host: usize, broker: &str, topic: &str, payload: &[u8]) -> bool {
    let file = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(file.path(), payload).expect("write");
    let (h, p) = broker.split_once(':').expect("host:port");
    lan.exec(host, "mosquitto_pub")
        .args(["-h", h, "-p", p, "-q", "1", "-t", topic, "-f"])
        .arg(file.path())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn garbage_truncated_misplaced_and_oversized_payloads_on_kith_topics_are_dropped_and_the_node_keeps_serving()
 {
    let Some((_serial, lan)) = scenario("garbage_payloads", 2) else {
        return;
    };
    let n1 = Node::start(&lan, 0, "n1", false, "");
    let n2 = Node::start(&lan, 1, "n2", true, "");
    n1.wait_serving(&lan);
    n2.wait_serving(&lan);
    assert!(converged(&lan, &[&n1, &n2], "n1", Duration::from_secs(10)));
    let broker = "10.77.0.1:8711";
    // A real state frame, read off the broker, to truncate.
    let state = lan
        .exec(1, "mosquitto_sub")
        .args([
            "-h",
            "10.77.0.1",
            "-p",
            "8711",
            "-C",
            "1",
            "-W",
            "5",
            "-N",
            "-t",
            "kith/v1/nodes/n1/state",
        ])
        .output()
        .expect("mosquitto_sub")
        .stdout;
    assert!(state.len() > 10, "no retained state for n1");
    let before = n2.metric(&lan, "kith_mesh_frames_dropped_total");
    assert!(publish(
        &lan,
        1,
        broker,
        "kith/v1/nodes/n2/jobs",
        b"garbage, not postcard"
    ));
    assert!(publish(
        &lan,
        1,
        broker,
        "kith/v1/nodes/n9/state",
        &state[..state.len() / 2]
    ));
    assert!(
        publish(&lan, 1, broker, "kith/v1/nodes/n9/state", &state),
        "n1's state on n9's topic"
    );
    assert!(
        publish(&lan, 1, broker, "kith/v1/nodes/n2/replies", &[9u8; 16]),
        "a future protocol version"
    );
    assert!(
        publish(
            &lan,
            1,
            broker,
            "kith/v1/nodes/n2/jobs",
            &vec![1u8; 600 * 1024]
        ),
        "larger than a frame"
    );
    // Larger than the broker takes: it drops that client, nobody else.
    publish(
        &lan,
        1,
        broker,
        "kith/v1/nodes/n2/jobs",
        &vec![1u8; 2 << 20],
    );
    assert!(poll(Duration::from_secs(5), || n2
        .metric(&lan, "kith_mesh_frames_dropped_total")
        >= before + 3.0));
    assert!(n1.metric(&lan, "kith_mesh_frames_dropped_total") >= 2.0);
    assert!(
        n2.log()
            .contains("dropped a message that is not a valid kith frame"),
        "{}",
        n2.log()
    );
    // Nothing broke: both still serve, and delegation still works.
    answered_by(&lan, &n1, "n2");
    assert!(
        peer(&n1.peers(&lan), "n9").is_none(),
        "a truncated state made no peer"
    );
}

/// Mosquitto on its own host of the LAN, with `conf` added to a listener on `port`.
struct Mosquitto {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start(lan: &Lan, host: usize, port: u16, conf: &str) -> Mosquitto {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mosquitto.conf");
        std::fs::write(
            &path,
            format!(
                "listener {port} {}\nallow_anonymous true\n{conf}",
                lan.addr(host)
            ),
        )
        .expect("conf");
        let child = lan
            .exec(host, "mosquitto")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(File::create(dir.path().join("mosquitto.log")).expect("log"))
            .spawn()
            .expect("mosquitto (apt install mosquitto)");
        let addr: SocketAddr = format!("{}:{port}", lan.addr(host)).parse().expect("addr");
        assert!(
            lan.listening(host, addr, Duration::from_secs(10)),
            "mosquitto does not listen"
        );
        Mosquitto { child, _dir: dir }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn with_an_external_mosquitto_the_mesh_delegates_detects_a_dead_node_and_takes_it_back() {
    let Some((_serial, lan)) = scenario("external_mosquitto", 4) else {
        return;
    };
    let _mosquitto = Mosquitto::start(&lan, 3, 1883, "");
    let url = "mqtt_url = \"mqtt://10.77.0.4:1883\"\n";
    let pi = Node::start(&lan, 0, "pi", false, url);
    let mut jetson = Node::start(&lan, 1, "jetson", true, url);
    for n in [&pi, &jetson] {
        n.wait_serving(&lan);
    }
    assert!(converged(
        &lan,
        &[&pi, &jetson],
        "mqtt://10.77.0.4:1883",
        Duration::from_secs(10)
    ));
    assert_eq!(pi.peers(&lan)["broker"]["kind"], "configured");
    answered_by(&lan, &pi, "jetson");
    // Killed mid-answer: Mosquitto sends its last will, the stream ends
    // with an error event, and the Pi knows the Jetson is dead.
    let ended = killed_mid_stream(&lan, &pi, &mut jetson);
    eprintln!("stream ended {ended:?} after the kill, through Mosquitto");
    let t = Instant::now();
    assert!(poll(Duration::from_secs(5), || peer(
        &pi.peers(&lan),
        "jetson"
    )
    .is_some_and(|p| p["status"] == "dead")));
    eprintln!("dead peer detected in {:?} through Mosquitto", t.elapsed());
    let a = pi.post(&lan, &chat("What is the capital of France?", 12));
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (404, "model_not_found"),
        "nobody has the model now: {}",
        a.body
    );
    // Back with the same name.
    let jetson2 = Node::start(&lan, 1, "jetson", true, url);
    jetson2.wait_serving(&lan);
    assert!(poll(Duration::from_secs(10), || up_with_mqtt(
        &pi.peers(&lan),
        "jetson"
    )));
    answered_by(&lan, &pi, "jetson");
}

/// A CA, a server certificate for `server_ip`, and a client certificate, made by openssl.
fn make_pki(dir: &Path, server_ip: &str) {
    let sh = format!(
        "set -e; cd {d}
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=kith-test-ca -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=broker -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=IP:{server_ip}\\n' > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext -out server.pem 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=kith-node -keyout client.key -out client.csr 2>/dev/null
printf 'extendedKeyUsage=clientAuth\n' > client.ext
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile client.ext -out client.pem 2>/dev/null
chmod 644 *.key",
        d = dir.display()
    );
    run(Command::new("sh").args(["-c", &sh]));
}

#[test]
fn mqtt_over_tls_needs_a_client_certificate_when_mosquitto_requires_one() {
    let Some((_serial, lan)) = scenario("mqtt_over_tls", 3) else {
        return;
    };
    let pki = tempfile::tempdir().expect("tempdir");
    make_pki(pki.path(), "10.77.0.3");
    let p = |f: &str| pki.path().join(f).display().to_string();
    let _mosquitto = Mosquitto::start(
        &lan,
        2,
        8883,
        &format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            p("ca.pem"),
            p("server.pem"),
            p("server.key")
        ),
    );
    let with_cert = format!(
        "mqtt_url = \"mqtts://10.77.0.3:8883\"\nmqtt_ca = \"{}\"\nmqtt_cert = \"{}\"\nmqtt_key = \"{}\"\n",
        p("ca.pem"),
        p("client.pem"),
        p("client.key")
    );
    let without_cert = format!(
        "mqtt_url = \"mqtts://10.77.0.3:8883\"\nmqtt_ca = \"{}\"\n",
        p("ca.pem")
    );
    let good = Node::start(&lan, 0, "good", true, &with_cert);
    let bad = Node::start(&lan, 1, "bad", false, &without_cert);
    good.wait_serving(&lan);
    bad.wait_serving(&lan);
    assert!(
        poll(
            Duration::from_secs(10),
            || good.peers(&lan)["broker"]["connected"] == true
        ),
        "{}",
        good.log()
    );
    // The node without a certificate is refused: it never connects, and
    // the node with one never sees it over MQTT.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(bad.peers(&lan)["broker"]["connected"], false);
    assert!(bad.metric(&lan, "kith_mesh_broker_connects_total") == 0.0);
    assert!(
        bad.log().contains("MQTT broker unreachable"),
        "{}",
        bad.log()
    );
    assert!(!up_with_mqtt(&good.peers(&lan), "bad"));
    assert!(good.metric(&lan, "kith_mesh_broker_connects_total") >= 1.0);
}

/// The README's promise for a node that restarts: SIGTERM leaves cleanly
/// (its state is cleared at once, no timeout needed).
#[test]
fn a_node_stopped_with_sigterm_leaves_the_mesh_at_once() {
    let Some((_serial, lan)) = scenario("sigterm_leaves", 2) else {
        return;
    };
    let n1 = Node::start(&lan, 0, "n1", false, "");
    let mut n2 = Node::start(&lan, 1, "n2", false, "");
    n1.wait_serving(&lan);
    n2.wait_serving(&lan);
    assert!(converged(&lan, &[&n1, &n2], "n1", Duration::from_secs(10)));
    n2.signal("TERM");
    let t = Instant::now();
    let exited = poll(Duration::from_secs(10), || {
        n2.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some())
    });
    assert!(exited, "{}", n2.log());
    assert!(
        poll(Duration::from_secs(2), || !up_with_mqtt(
            &n1.peers(&lan),
            "n2"
        )),
        "{}",
        n1.peers(&lan)
    );
    eprintln!("n2 gone from n1's table {:?} after SIGTERM", t.elapsed());
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Client-side latency of `n` requests to `node`, ms, sorted.
fn latencies(lan: &Lan, node: &Node, body: &Value, n: usize) -> Vec<f64> {
    let mut ms: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            let a = node.post(lan, body);
            assert_eq!(a.status, 200, "{}", a.body);
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms
}

/// The figures of the mesh (time to first peer, delegation overhead,
/// dead-peer detection, a 200-request run with a node killed), printed for
/// the record. Not a pass/fail test: `benches/mesh.sh` runs it on a
/// release build.
#[test]
#[ignore = "benchmark: benches/mesh.sh runs it"]
fn mesh_figures() {
    let Some((_serial, lan)) = scenario("mesh_figures", 3) else {
        return;
    };
    let serve = "[models]\necho = true\npreload = [\"smollm2-135m\"]\n";
    let n1 = Node::start(&lan, 0, "n1", false, "");
    let mut n2 = Node::start(&lan, 1, "n2", true, serve);
    let n3 = Node::start(&lan, 2, "n3", true, serve);
    mesh_up(&lan, &[&n1, &n2, &n3], "n1");
    for n in [&n1, &n2, &n3] {
        println!(
            "time to first peer, {}: {} ms",
            n.name,
            n.peers(&lan)["first_peer_ms"]
        );
    }

    // Overhead: the same model asked on the node that has it (local) and
    // on the node without it (delegated over MQTT), same client path.
    let echo = json!({"model": "echo", "messages": [{"role": "user", "content": "one two three"}]});
    let one = chat("What is the capital of France?", 1);
    for (what, body, n) in [("echo", &echo, 300), ("smollm2-135m, 1 token", &one, 100)] {
        let _ = latencies(&lan, &n1, body, 10);
        let local = latencies(&lan, &n2, body, n);
        let delegated = latencies(&lan, &n1, body, n);
        println!(
            "{what}: local p50 {:.2} ms p99 {:.2} ms; delegated p50 {:.2} ms p99 {:.2} ms; overhead p50 {:.2} ms p99 {:.2} ms ({n} requests each)",
            percentile(&local, 0.5),
            percentile(&local, 0.99),
            percentile(&delegated, 0.5),
            percentile(&delegated, 0.99),
            percentile(&delegated, 0.5) - percentile(&local, 0.5),
            percentile(&delegated, 0.99) - percentile(&local, 0.99),
        );
    }

    // 200 requests through n1, four clients; n2 is killed after 60.
    let done = std::sync::Arc::new(AtomicUsize::new(0));
    let outcomes = std::sync::Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let streams: Vec<TcpStream> = (0..50).map(|_| lan.connect(0, n1.api(&lan))).collect();
            let done = done.clone();
            let outcomes = outcomes.clone();
            std::thread::spawn(move || {
                for (i, s) in streams.into_iter().enumerate() {
                    let body = chat(
                        &format!("Count from {} to {}.", c * 50 + i, c * 50 + i + 5),
                        24,
                    );
                    let a = exchange(
                        s,
                        "POST",
                        "/v1/chat/completions",
                        Some("application/json"),
                        body.to_string().as_bytes(),
                    );
                    let by = a.header("x-kith-node").unwrap_or_default();
                    outcomes.lock().expect("outcomes").push((
                        a.status,
                        by,
                        a.body.contains("\"error\""),
                    ));
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    assert!(poll(Duration::from_secs(300), || done
        .load(Ordering::SeqCst)
        >= 60));
    n2.kill();
    let killed = Instant::now();
    let detected = poll(Duration::from_secs(10), || {
        peer(&n1.peers(&lan), "n2").is_none_or(|p| p["status"] != "up")
    });
    println!(
        "dead peer detected by n1 in {:?} (SIGKILL, last will through the embedded broker): {detected}",
        killed.elapsed()
    );
    for c in clients {
        c.join().expect("client");
    }
    let outcomes = outcomes.lock().expect("outcomes");
    let ok = outcomes.iter().filter(|(s, _, _)| *s == 200).count();
    let errors: Vec<_> = outcomes.iter().filter(|(s, _, _)| *s != 200).collect();
    let by_n2 = outcomes.iter().filter(|(_, b, _)| b == "n2").count();
    let by_n3 = outcomes.iter().filter(|(_, b, _)| b == "n3").count();
    println!(
        "200-request run, n2 killed after 60: {} answered ({ok} ok: {by_n2} by n2, {by_n3} by n3), {} errors {:?}, retries {}, lost {}",
        outcomes.len(),
        errors.len(),
        errors.iter().map(|(s, _, _)| *s).collect::<Vec<_>>(),
        n1.metric(&lan, "kith_mesh_delegation_retries_total"),
        200 - outcomes.len(),
    );
}

/// Advertises a broker as `_mqtt._tcp` from `host`, as avahi does for a
/// Mosquitto; the advert lives as long as the returned daemon.
fn advertise_mqtt(lan: &Lan, host: usize, port: u16) -> mdns_sd::ServiceDaemon {
    let path = format!("/run/netns/{}", lan.ns(host));
    let addr = lan.addr(host);
    std::thread::spawn(move || {
        let ns = File::open(&path).expect("netns");
        // SAFETY: as in Lan::connect; the daemon's thread, started from this
        // thread, inherits its network namespace.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let daemon = mdns_sd::ServiceDaemon::new().expect("mdns");
        let info = mdns_sd::ServiceInfo::new(
            "_mqtt._tcp.local.",
            "mosquitto",
            "broker.local.",
            addr.as_str(),
            port,
            None::<std::collections::HashMap<String, String>>,
        )
        .expect("service");
        daemon.register(info).expect("register");
        daemon
    })
    .join()
    .expect("advertiser")
}

#[test]
fn a_broker_advertised_on_the_lan_as_mqtt_tcp_is_used_instead_of_hosting_one() {
    let Some((_serial, lan)) = scenario("lan_broker", 3) else {
        return;
    };
    let _mosquitto = Mosquitto::start(&lan, 2, 1883, "");
    let _advert = advertise_mqtt(&lan, 2, 1883);
    let pi = Node::start(&lan, 0, "pi", false, "");
    let jetson = Node::start(&lan, 1, "jetson", true, "");
    pi.wait_serving(&lan);
    jetson.wait_serving(&lan);
    assert!(
        converged(
            &lan,
            &[&pi, &jetson],
            "mosquitto._mqtt._tcp.local.",
            Duration::from_secs(10)
        ),
        "{}\n{}",
        pi.peers(&lan),
        jetson.peers(&lan)
    );
    for n in [&pi, &jetson] {
        let b = &n.peers(&lan)["broker"];
        assert_eq!(
            (b["kind"].as_str(), b["hosted_here"].as_bool()),
            (Some("lan"), Some(false)),
            "{b}"
        );
    }
    answered_by(&lan, &pi, "jetson");
}
