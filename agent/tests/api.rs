//! `kith up` as clients and systemd meet it: a real process on loopback,
//! real HTTP, the official `openai` Python client, real signals and a real
//! notify socket. Needs `smollm2-135m` and the audio models in
//! `$KITH_MODELS_DIR`, espeak-ng, and the Python venv with `openai` (the
//! README's test command sets all of these up).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod support;
use support::{Answer, exchange, models_dir, next_data, open_stream_on};

const MODEL: &str = "smollm2-135m";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The venv's Python (with `openai`), as the README's setup makes it.
fn python() -> PathBuf {
    let py = std::env::var_os("KITH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    let ok = Command::new(&py)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import openai: run the README's test command (scripts/test)",
        py.display()
    );
    py
}

/// A running `kith up` on a free loopback port, stopped when dropped.
struct Agent {
    child: Child,
    addr: SocketAddr,
    stderr_log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts kith with `config` (TOML) and extra environment; waits until it serves.
    fn start(config: &str, env: &[(&str, &str)]) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("kith.toml");
        std::fs::write(&config_path, config).expect("write config");
        let stderr_log = dir.path().join("stderr.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kith"));
        cmd.arg("--models-dir")
            .arg(models_dir())
            .args(["up", "--api", "127.0.0.1:0", "--config"])
            .arg(&config_path)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env("KITH_LOG", "info")
            // One node alone: the mesh has its own tests, in network namespaces.
            .env("KITH_MESH_ENABLED", "false")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).expect("log file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("kith starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("API on http://").nth(1) {
                        break rest.trim().parse().expect("address");
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "kith up did not announce its address: {}",
                        std::fs::read_to_string(&stderr_log).unwrap_or_default()
                    );
                }
            }
        };
        Agent {
            child,
            addr,
            stderr_log,
            _dir: dir,
        }
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig}");
    }

    /// Waits for the process to exit, at most `limit`.
    fn wait(&mut self, limit: Duration) -> Option<(ExitStatus, Duration)> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some((status, started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The value of one series in `GET /metrics` (`name{labels}` exactly).
    fn metric(&self, series: &str) -> Option<f64> {
        let text = http(self.addr, "GET", "/metrics", None, b"").body;
        text.lines().find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
    }

    fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("proc status");
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> Answer {
    let s = TcpStream::connect(addr).expect("connect");
    exchange(s, method, path, content_type, body)
}

fn post_json(addr: SocketAddr, path: &str, body: &Value) -> Answer {
    http(
        addr,
        "POST",
        path,
        Some("application/json"),
        body.to_string().as_bytes(),
    )
}

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0})
}

/// Opens a streaming chat request and returns the reader positioned after the headers.
fn open_stream(addr: SocketAddr, body: &Value) -> BufReader<TcpStream> {
    open_stream_on(TcpStream::connect(addr).expect("connect"), body)
}

const BASE_CONFIG: &str = "[models]\nqueue_depth = 4\n";

#[test]
fn the_official_openai_client_lists_chats_streams_completes_and_sees_errors() {
    let agent = Agent::start(BASE_CONFIG, &[]);
    let out = Command::new(python())
        .arg(repo_root().join("tests/openai/client.py"))
        .args([&agent.base(), MODEL])
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai client checks failed:\n{stdout}\n{}\nkith log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

#[test]
fn more_concurrent_requests_than_the_queue_holds_get_429_memory_stays_flat_and_later_requests_succeed()
 {
    let agent = Agent::start(
        "[models]\nqueue_depth = 2\npreload = [\"smollm2-135m\"]\n",
        &[],
    );
    // Warm up: the model's first request sizes its buffers.
    assert_eq!(
        post_json(agent.addr, "/v1/chat/completions", &chat("Say hello.", 12)).status,
        200
    );
    let rss_before = agent.rss_kb();
    let out = Command::new(python())
        .arg(repo_root().join("tests/openai/load.py"))
        .args([
            &agent.base(),
            MODEL,
            &agent.child.id().to_string(),
            "24",
            "3",
        ])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("report json");
    let mut ok = 0;
    let mut busy = 0;
    for round in report["rounds"].as_array().expect("rounds") {
        for r in round.as_array().expect("round") {
            match r[0].as_u64() {
                Some(200) => ok += 1,
                Some(429) => {
                    busy += 1;
                    assert_eq!(r[2], "queue_full", "{r}");
                    let retry: u64 = r[1]
                        .as_str()
                        .and_then(|s| s.parse().ok())
                        .expect("Retry-After");
                    assert!((1..=60).contains(&retry), "{r}");
                }
                _ => panic!("a request neither served nor refused: {r}\n{}", agent.log()),
            }
        }
    }
    assert!(
        busy > 0,
        "24 concurrent requests on a queue of 2 must see 429s"
    );
    // One running and two queued per burst at least.
    assert!(
        ok >= 3 * 3,
        "each burst serves what the queue holds: {ok} served"
    );
    assert_eq!(
        report["after"],
        json!([200, 200, 200, 200]),
        "later requests succeed"
    );
    let rss: Vec<u64> = report["rss_kb"]
        .as_array()
        .expect("rss")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    let last = *rss.last().expect("rss");
    // Flat: three bursts of refused work cost no lasting memory.
    assert!(
        last < rss_before + 40 * 1024 && last <= rss[0] + 16 * 1024,
        "resident memory grew under load: before {rss_before} kB, after each burst {rss:?} kB"
    );
    let metrics = http(agent.addr, "GET", "/metrics", None, b"").body;
    assert!(
        metrics.contains("kith_http_requests_total{route=\"/v1/chat/completions\",status=\"429\"}"),
        "{metrics}"
    );
}

#[test]
fn sigterm_during_a_stream_ends_it_cleanly_new_requests_get_503_and_kith_exits_0_within_the_deadline()
 {
    let mut agent = Agent::start(
        "[api]\ndrain_timeout_secs = 2\n[models]\npreload = [\"smollm2-135m\"]\n",
        &[],
    );
    let body = json!({"model": MODEL, "stream": true, "max_tokens": 2000, "temperature": 0,
        "messages": [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]});
    let mut stream = open_stream(agent.addr, &body);
    let first = next_data(&mut stream).expect("a first chunk");
    assert!(first.contains("chat.completion.chunk"), "{first}");
    agent.signal("TERM");
    let signalled = Instant::now();
    // While draining, new work is refused with 503 and Retry-After.
    std::thread::sleep(Duration::from_millis(300));
    let refused = post_json(agent.addr, "/v1/chat/completions", &chat("Hi", 4));
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.error_code(), "draining");
    assert!(refused.header("retry-after").is_some());
    let mut chunks = vec![first];
    while let Some(d) = next_data(&mut stream) {
        chunks.push(d);
    }
    assert_eq!(
        chunks.last().map(String::as_str),
        Some("[DONE]"),
        "the stream ends with [DONE]"
    );
    let last: Value = serde_json::from_str(&chunks[chunks.len() - 2]).expect("final chunk");
    assert_eq!(
        last["choices"][0]["finish_reason"], "length",
        "cut at the deadline: {last}"
    );
    assert!(
        chunks.len() > 10,
        "tokens kept streaming during the drain: {}",
        chunks.len()
    );
    let (status, _) = agent.wait(Duration::from_secs(10)).expect("kith exits");
    assert!(status.success(), "exit status {status}: {}", agent.log());
    assert!(
        signalled.elapsed() < Duration::from_secs(2 + 4),
        "exit within the 2 s deadline plus the cut: {:?}",
        signalled.elapsed()
    );
    let log = agent.log();
    assert!(log.contains("drain deadline passed"), "{log}");
}

#[test]
fn systemd_sees_ready_then_watchdog_pings_then_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut agent = Agent::start(
        BASE_CONFIG,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().expect("utf-8")),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut buf = [0u8; 512];
    let mut recv = || {
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert!(first.starts_with("READY=1"), "{first}");
    assert!(
        first.contains(&agent.addr.to_string()),
        "STATUS names the address: {first}"
    );
    let pings = (0..3).map(|_| recv()).collect::<Vec<_>>();
    assert!(pings.iter().all(|p| p == "WATCHDOG=1"), "{pings:?}");
    agent.signal("TERM");
    let mut seen = Vec::new();
    loop {
        let m = recv();
        if m.starts_with("STOPPING=1") {
            break;
        }
        assert_eq!(m, "WATCHDOG=1", "only pings between READY and STOPPING");
        seen.push(m);
        assert!(seen.len() < 100, "no STOPPING=1 after SIGTERM");
    }
    let (status, _) = agent.wait(Duration::from_secs(15)).expect("exits");
    assert!(status.success(), "{}", agent.log());
}

#[test]
fn malformed_huge_mistyped_and_misrouted_requests_get_openai_shaped_errors_and_lose_nothing() {
    let agent = Agent::start("[api]\nmax_body_bytes = 65536\n", &[]);
    let a = agent.addr;
    let bad_json = http(
        a,
        "POST",
        "/v1/chat/completions",
        Some("application/json"),
        b"{\"model\": ",
    );
    assert_eq!(bad_json.status, 400, "{}", bad_json.body);
    bad_json.error_code();
    assert!(
        bad_json.body.contains("EOF") || bad_json.body.contains("line 1"),
        "{}",
        bad_json.body
    );

    let wrong_shape = post_json(
        a,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": "hello"}),
    );
    assert_eq!(wrong_shape.status, 400, "{}", wrong_shape.body);
    assert!(
        wrong_shape.body.contains("messages") || wrong_shape.body.contains("sequence"),
        "{}",
        wrong_shape.body
    );

    let huge = vec![b' '; 200_000];
    let too_large = http(
        a,
        "POST",
        "/v1/chat/completions",
        Some("application/json"),
        &huge,
    );
    assert_eq!(too_large.status, 413, "{}", too_large.body);
    assert_eq!(too_large.error_code(), "request_too_large");

    let text = http(
        a,
        "POST",
        "/v1/chat/completions",
        Some("text/plain"),
        chat("Hi", 2).to_string().as_bytes(),
    );
    assert_eq!(text.status, 415, "{}", text.body);
    assert!(
        text.json()["error"]["message"]
            .as_str()
            .expect("message")
            .contains("application/json")
    );
    let none = http(a, "POST", "/v1/completions", None, b"{}");
    assert_eq!(none.status, 415, "{}", none.body);

    let unknown = http(a, "GET", "/v2/everything", None, b"");
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.error_code(), "unknown_route");
    let wrong_method = http(a, "GET", "/v1/chat/completions", None, b"");
    assert_eq!(wrong_method.status, 405, "{}", wrong_method.body);
    assert_eq!(wrong_method.error_code(), "method_not_allowed");

    let no_model = post_json(
        a,
        "/v1/chat/completions",
        &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
    );
    assert_eq!(no_model.status, 404);
    assert_eq!(no_model.error_code(), "model_not_found");
    assert!(
        no_model.body.contains(MODEL),
        "the error lists what is installed: {}",
        no_model.body
    );
    let audio_model = post_json(
        a,
        "/v1/completions",
        &json!({"model": "alexa", "prompt": "x"}),
    );
    assert_eq!(audio_model.status, 400, "{}", audio_model.body);
    assert!(
        audio_model.body.contains("wake-word"),
        "{}",
        audio_model.body
    );

    let bad_role = post_json(
        a,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}),
    );
    assert_eq!(bad_role.status, 400);
    assert_eq!(bad_role.json()["error"]["param"], "messages[0].role");
    let long_prompt = post_json(
        a,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "word ".repeat(9000)}),
    );
    assert_eq!(long_prompt.status, 400, "{}", long_prompt.body);
    assert_eq!(long_prompt.error_code(), "context_length_exceeded");

    // After all that, the agent still answers.
    let fine = post_json(
        a,
        "/v1/chat/completions",
        &chat("What is the capital of France?", 12),
    );
    assert_eq!(fine.status, 200, "{}", fine.body);
    assert!(
        fine.json()["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .contains("Paris")
    );
    let health = http(a, "GET", "/health", None, b"").json();
    assert_eq!(health["status"], "ok");
}

#[test]
fn a_client_that_hangs_up_mid_stream_stops_the_generation() {
    let agent = Agent::start("[models]\npreload = [\"smollm2-135m\"]\n", &[]);
    let body = json!({"model": MODEL, "stream": true, "max_tokens": 1000, "temperature": 0,
        "messages": [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]});
    let mut stream = open_stream(agent.addr, &body);
    for _ in 0..5 {
        next_data(&mut stream).expect("chunk");
    }
    drop(stream);
    let abandoned = |agent: &Agent| {
        agent
            .metric("kith_jobs_abandoned_total{model=\"smollm2-135m\"}")
            .unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while abandoned(&agent) == 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(abandoned(&agent), 1.0, "{}", agent.log());
    let tokens = agent
        .metric("kith_generated_tokens_total{model=\"smollm2-135m\"}")
        .expect("token counter");
    assert!(
        tokens < 200.0,
        "generation stopped soon after the hang-up, not at 1000 tokens: {tokens}"
    );
}

fn speak(dir: &Path, text: &str) -> PathBuf {
    let wav = dir.join("speech.wav");
    let ok = Command::new("espeak-ng")
        .args(["-v", "en-gb", "-s", "160", "-w"])
        .arg(&wav)
        .arg(text)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "espeak-ng is not installed: `apt-get install espeak-ng` (the README's test command does)"
    );
    wav
}

#[test]
fn wake_words_heard_in_the_configured_audio_reach_the_log_the_event_stream_and_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wav = speak(dir.path(), "hey jarvis. what's the weather.");
    let agent = Agent::start(
        &format!(
            "[audio]\nwav = {:?}\nwake = [\"hey_jarvis\", \"weather\"]\n",
            wav.to_str().expect("utf-8")
        ),
        &[],
    );
    let mut s = TcpStream::connect(agent.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("write");
    let mut r = BufReader::new(s);
    let mut models = Vec::new();
    while models.len() < 2 {
        let data = next_data(&mut r).expect("an event");
        let v: Value = serde_json::from_str(&data).expect("event json");
        assert_eq!(v["event"], "wake", "{v}");
        models.push(v["model"].as_str().expect("model").to_string());
    }
    assert_eq!(models, vec!["hey_jarvis", "weather"]);
    assert!(agent.log().contains("wake word heard"), "{}", agent.log());
    let rtf = agent.metric("kith_audio_rtf").expect("rtf");
    assert!(
        rtf > 0.0 && rtf < 1.0,
        "audio RTF measured and faster than real time: {rtf}"
    );
}

#[test]
fn audio_intents_reads_the_wav_and_answers_that_no_intent_model_is_installed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wav = std::fs::read(speak(dir.path(), "turn on the kitchen lights")).expect("wav");
    let agent = Agent::start(BASE_CONFIG, &[]);
    let a = agent.addr;
    let answer = http(a, "POST", "/v1/audio/intents", Some("audio/wav"), &wav);
    assert_eq!(answer.status, 404, "{}", answer.body);
    assert_eq!(answer.error_code(), "model_not_found");
    assert!(answer.body.contains("speech-to-intent"), "{}", answer.body);

    let cut = http(
        a,
        "POST",
        "/v1/audio/intents",
        Some("audio/wav"),
        &wav[..wav.len() / 2],
    );
    assert_eq!(cut.status, 400, "{}", cut.body);
    assert!(cut.body.contains("truncated"), "{}", cut.body);
    let not_wav = http(
        a,
        "POST",
        "/v1/audio/intents",
        Some("audio/wav"),
        b"RIFF....not a wave file at all",
    );
    assert_eq!(not_wav.status, 400, "{}", not_wav.body);

    let boundary = "kithboundary";
    let mut form = Vec::new();
    form.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nsmart-home\r\n"
        )
        .as_bytes(),
    );
    form.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes());
    form.extend_from_slice(&wav);
    form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let multipart = http(
        a,
        "POST",
        "/v1/audio/intents",
        Some(&format!("multipart/form-data; boundary={boundary}")),
        &form,
    );
    assert_eq!(multipart.status, 404, "{}", multipart.body);
    assert_eq!(multipart.error_code(), "model_not_found");

    let json_body = post_json(a, "/v1/audio/intents", &json!({"file": "x"}));
    assert_eq!(json_body.status, 415, "{}", json_body.body);
}

/// The smart-home intent model kith ships.
fn shipped_intent_model() -> PathBuf {
    repo_root().join("models/intents/smart-home")
}

/// A 16 kHz mono 16-bit WAV of `seconds` of silence.
fn silent_wav(seconds: u32) -> Vec<u8> {
    let data = seconds * 16_000 * 2;
    let mut w = Vec::with_capacity(44 + data as usize);
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&16_000u32.to_le_bytes());
    w.extend_from_slice(&32_000u32.to_le_bytes());
    w.extend_from_slice(&2u16.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data.to_le_bytes());
    w.resize(44 + data as usize, 0);
    w
}

#[test]
fn audio_intents_understands_a_spoken_command_with_the_configured_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a_dir).expect("mkdir");
    std::fs::create_dir_all(&b_dir).expect("mkdir");
    let command = std::fs::read(speak(&a_dir, "turn off the kitchen lights")).expect("wav");
    let chatter = std::fs::read(speak(
        &b_dir,
        "my grandmother grew tomatoes behind the old railway station",
    ))
    .expect("wav");
    let agent = Agent::start(
        &format!(
            "{BASE_CONFIG}[audio]\nintent = {:?}\n",
            shipped_intent_model().to_str().expect("utf-8")
        ),
        &[],
    );
    let a = agent.addr;
    assert!(
        agent.log().contains("speech-to-intent model loaded"),
        "{}",
        agent.log()
    );

    let answer = http(a, "POST", "/v1/audio/intents", Some("audio/wav"), &command);
    assert_eq!(answer.status, 200, "{}", answer.body);
    let v: Value = serde_json::from_str(&answer.body).expect("json");
    assert_eq!(v["model"], "smart-home", "{v}");
    assert!(v["duration_ms"].as_u64().expect("duration") > 500, "{v}");
    assert_eq!(v["understood"], true, "{v}");
    assert_eq!(v["intent"], "changeLightState", "{v}");
    assert_eq!(
        v["slots"],
        json!({"state": "off", "location": "kitchen"}),
        "{v}"
    );
    let score = v["score"].as_f64().expect("score");
    assert!(score > 0.0 && score <= 1.0, "{v}");

    // Speech outside the grammar is not understood, and says nothing more.
    let other = http(a, "POST", "/v1/audio/intents", Some("audio/wav"), &chatter);
    assert_eq!(other.status, 200, "{}", other.body);
    let v: Value = serde_json::from_str(&other.body).expect("json");
    assert_eq!(v["understood"], false, "{v}");
    assert!(v.get("intent").is_none(), "{v}");

    // A model this node does not have, by query parameter.
    let wrong = http(
        a,
        "POST",
        "/v1/audio/intents?model=coffee",
        Some("audio/wav"),
        &command,
    );
    assert_eq!(wrong.status, 404, "{}", wrong.body);
    assert_eq!(wrong.error_code(), "model_not_found");
    assert!(
        wrong.body.contains("installed: smart-home"),
        "{}",
        wrong.body
    );

    // A minute and more is no command: refused before any inference.
    let long = http(
        a,
        "POST",
        "/v1/audio/intents",
        Some("audio/wav"),
        &silent_wav(61),
    );
    assert_eq!(long.status, 400, "{}", long.body);
    assert!(long.body.contains("longer than 60 s"), "{}", long.body);

    // The node still answers after all that.
    let again = http(a, "POST", "/v1/audio/intents", Some("audio/wav"), &command);
    assert_eq!(again.status, 200, "{}", again.body);
}

#[test]
fn a_wake_word_then_a_command_in_the_configured_audio_becomes_an_intent_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The wake word, a short pause, the command (SSML for the pause).
    let wav = dir.path().join("command.wav");
    let ok = Command::new("espeak-ng")
        .args(["-m", "-v", "en-us", "-s", "150", "-w"])
        .arg(&wav)
        .arg("hey jarvis. <break time='300ms'/> turn on the kitchen lights.")
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "espeak-ng is not installed: `apt-get install espeak-ng`"
    );
    let agent = Agent::start(
        &format!(
            "[audio]\nwav = {:?}\nwake = [\"hey_jarvis\"]\nintent = {:?}\n",
            wav.to_str().expect("utf-8"),
            shipped_intent_model().to_str().expect("utf-8")
        ),
        &[],
    );
    let mut s = TcpStream::connect(agent.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("write");
    let mut r = BufReader::new(s);
    let wake: Value = serde_json::from_str(&next_data(&mut r).expect("an event")).expect("json");
    assert_eq!(wake["event"], "wake", "{wake}");
    let intent: Value = serde_json::from_str(&next_data(&mut r).expect("an event")).expect("json");
    assert_eq!(intent["event"], "intent", "{intent}");
    assert_eq!(intent["wake"], "hey_jarvis", "{intent}");
    assert_eq!(intent["understood"], true, "{intent}");
    assert_eq!(intent["intent"], "changeLightState", "{intent}");
    assert_eq!(
        intent["slots"],
        json!({"state": "on", "location": "kitchen"}),
        "{intent}"
    );
    assert!(
        agent.log().contains("command understood"),
        "{}",
        agent.log()
    );
}

#[test]
fn a_broken_intent_model_directory_stops_the_start_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args(["up", "--api", "127.0.0.1:0", "--intent"])
        .arg(dir.path())
        .env("KITH_MODELS_DIR", models_dir())
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("audio.intent"), "{err}");
    assert!(err.contains("kith intent train"), "{err}");
}

#[test]
fn an_invalid_configuration_is_refused_before_anything_starts_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kith.toml");
    std::fs::write(&path, "[models]\nqueue_depth = 0\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args(["up", "--api", "127.0.0.1:0", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("models.queue_depth"), "{err}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("API on"),
        "nothing was served"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args(["up", "--api", "127.0.0.1:0"])
        .env("KITH_CONFIG", &path)
        .env("KITH_API_DRAIN_TIMEOUT_SECS", "soon")
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("KITH_API_DRAIN_TIMEOUT_SECS") && err.contains("api.drain_timeout_secs"),
        "{err}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args([
            "--models-dir",
            "/nonexistent-kith-models",
            "up",
            "--api",
            "127.0.0.1:0",
        ])
        .env("KITH_MODELS_PRELOAD", "smollm2-135m")
        .env("KITH_CONFIG", dir.path().join("missing.toml"))
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing.toml"),
        "a named config file that is missing is an error: {err}"
    );
}

#[test]
fn config_init_writes_the_commented_default_that_config_show_reads_back_with_overrides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("etc/kith.toml");
    let kith = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kith"));
        c.args(args).stdin(Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("runs")
    };
    let p = path.to_str().expect("utf-8");
    assert!(
        kith(&["config", "init", "--output", p], &[])
            .status
            .success()
    );
    let text = std::fs::read_to_string(&path).expect("written");
    assert!(text.contains("# ") && text.contains("[api]") && text.contains("queue_depth"));
    let again = kith(&["config", "init", "--output", p], &[]);
    assert!(
        !again.status.success(),
        "an existing file is not replaced without --force"
    );
    let show = kith(
        &["config", "show", "--config", p],
        &[("KITH_MODELS_QUEUE_DEPTH", "7")],
    );
    assert!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(shown.contains("queue_depth = 7"), "{shown}");
    assert!(shown.contains("listen = \"127.0.0.1:8710\""), "{shown}");
}
