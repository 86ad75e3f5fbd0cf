//! The shipped unit, `systemd/kith.service`, run as systemd runs it: its
//! `ExecStart=` with the unit's `Environment=`, the variables the service
//! manager adds (`NOTIFY_SOCKET`, `WATCHDOG_USEC` from `WatchdogSec=`,
//! `WATCHDOG_PID`, the directories) and nothing else, reading the config the
//! packages install as `/etc/kith/kith.toml`.
//!
//! The process runs in a network namespace of its own (only loopback), so
//! the shipped config's fixed ports and its mesh stay off the host's
//! network. That needs root: the test says so and skips when not root.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A systemd unit file: section → key → every value given (keys repeat).
struct Unit(BTreeMap<(String, String), Vec<String>>);

impl Unit {
    fn read(path: &Path) -> Unit {
        let text = std::fs::read_to_string(path).expect("the unit file");
        let mut section = String::new();
        let mut keys: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_string();
                continue;
            }
            let (k, v) = line.split_once('=').expect("key=value");
            keys.entry((section.clone(), k.trim().to_string()))
                .or_default()
                .push(v.trim().to_string());
        }
        Unit(keys)
    }

    fn all(&self, key: &str) -> &[String] {
        self.0
            .get(&("Service".to_string(), key.to_string()))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    fn one(&self, key: &str) -> &str {
        match self.all(key) {
            [v] => v,
            other => panic!("[Service] {key}= should be set once, is {other:?}"),
        }
    }
}

/// systemd's time spans as used in the unit: `30s`, `2min`, `500ms`, `1min 30s`.
fn timespan(s: &str) -> Duration {
    let mut total = Duration::ZERO;
    for part in s.split_whitespace() {
        let split = part
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(part.len());
        let (n, unit) = part.split_at(split);
        let n: u64 = n.parse().expect("a number");
        total += match unit {
            "" | "s" | "sec" => Duration::from_secs(n),
            "ms" | "msec" => Duration::from_millis(n),
            "min" | "m" => Duration::from_secs(60 * n),
            other => panic!("time unit {other} in {s}"),
        };
    }
    total
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `kith.service` started as systemd starts it (see the module doc), with
/// the notify socket it reports to.
struct Service {
    unit: Unit,
    child: std::process::Child,
    sock: UnixDatagram,
    stderr_log: PathBuf,
    started: Instant,
    /// Holds the socket, the state and runtime directories and the log.
    _dir: tempfile::TempDir,
}

impl Service {
    fn start() -> Service {
        let root = repo_root();
        let unit = Unit::read(&root.join("systemd/kith.service"));
        assert_eq!(unit.one("Type"), "notify");
        let watchdog = timespan(unit.one("WatchdogSec"));

        // ExecStart with the binary under test in place of /usr/bin/kith, and the
        // config the packages install at /etc/kith/kith.toml.
        let exec: Vec<String> = unit
            .one("ExecStart")
            .split_whitespace()
            .map(String::from)
            .collect();
        assert_eq!(exec[0], "/usr/bin/kith", "the packages install kith there");
        let args: Vec<String> = exec[1..]
            .iter()
            .map(|a| {
                if a == "/etc/kith/kith.toml" {
                    root.join("systemd/kith.toml").display().to_string()
                } else {
                    a.clone()
                }
            })
            .collect();
        assert!(
            args.iter().any(|a| a.ends_with("systemd/kith.toml")),
            "ExecStart reads /etc/kith/kith.toml: {exec:?}"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let sock_path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
        let state = dir.path().join("state");
        let runtime = dir.path().join("runtime");
        std::fs::create_dir_all(&state).expect("state dir");
        std::fs::create_dir_all(&runtime).expect("runtime dir");
        let stderr_log = dir.path().join("stderr.log");

        let mut cmd = Command::new("unshare");
        // A fresh network namespace; loopback up; WATCHDOG_PID is the pid that
        // `exec` hands to kith, as systemd sets it to the main process.
        cmd.args([
            "--net",
            "--",
            "sh",
            "-c",
            "ip link set lo up && WATCHDOG_PID=$$ && export WATCHDOG_PID && exec \"$0\" \"$@\"",
            env!("CARGO_BIN_EXE_kith"),
        ])
        .args(&args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LANG", "C.UTF-8")
        .env("USER", "kith")
        .env("LOGNAME", "kith")
        .env("HOME", &state)
        .env("SHELL", "/usr/sbin/nologin")
        .env("INVOCATION_ID", "5d1ab2c7e1f94c9bb3c7a3f0d7e6c101")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", watchdog.as_micros().to_string())
        .env("STATE_DIRECTORY", &state)
        .env("CONFIGURATION_DIRECTORY", "/etc/kith")
        .env("RUNTIME_DIRECTORY", &runtime)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_log).expect("log file"));
        let mut environment = Vec::new();
        for line in unit.all("Environment") {
            for assignment in line.split_whitespace() {
                let (k, v) = assignment.split_once('=').expect("NAME=value");
                environment.push(k.to_string());
                cmd.env(k, v);
            }
        }
        assert!(
            environment.iter().all(|k| k != "KITH_MODELS_DIR"),
            "the models directory belongs in /etc/kith/kith.toml, where the user can change it"
        );
        let child = cmd.spawn().expect("unshare starts");
        Service {
            unit,
            child,
            sock,
            stderr_log,
            started: Instant::now(),
            _dir: dir,
        }
    }

    fn timespan(&self, key: &str) -> Duration {
        timespan(self.unit.one(key))
    }

    /// kith's stderr so far: what the journal would hold.
    fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stderr_log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The next notification, if one comes `within`.
    fn recv(&self, within: Duration) -> Option<(String, Instant)> {
        let mut buf = [0u8; 1024];
        self.sock.set_read_timeout(Some(within)).expect("timeout");
        let n = self.sock.recv(&mut buf).ok()?;
        Some((
            String::from_utf8_lossy(&buf[..n]).into_owned(),
            Instant::now(),
        ))
    }

    /// READY=1 within TimeoutStartSec, naming the shipped config's API.
    fn ready(&mut self) -> Instant {
        let Some((ready, ready_at)) = self.recv(self.timespan("TimeoutStartSec")) else {
            let _ = self.child.kill();
            panic!("no READY=1 within TimeoutStartSec: {}", self.log());
        };
        assert!(ready.starts_with("READY=1"), "{ready}");
        assert!(
            ready.contains("127.0.0.1:8710"),
            "STATUS names the API of the shipped config: {ready}"
        );
        ready_at
    }

    /// `systemctl stop`: SIGTERM to the main process, then STOPPING=1
    /// (watchdog pings may come before it) and exit 0 within TimeoutStopSec.
    fn stop(&mut self) {
        let stop_timeout = self.timespan("TimeoutStopSec");
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid");
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM");
        let mut stopping = false;
        for _ in 0..10 {
            match self.recv(stop_timeout) {
                Some((m, _)) if m.starts_with("STOPPING=1") => {
                    stopping = true;
                    break;
                }
                Some((m, _)) => assert_eq!(m, "WATCHDOG=1", "only pings before STOPPING"),
                None => break,
            }
        }
        assert!(stopping, "STOPPING=1 after SIGTERM: {}", self.log());
        let deadline = Instant::now() + stop_timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("still running TimeoutStopSec after SIGTERM: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "exit status {status}: {}", self.log());

        // The journal gets plain lines that explain themselves: no colour codes.
        let log = self.log();
        assert!(
            !log.contains('\u{1b}'),
            "ANSI escapes in the journal: {log}"
        );
        assert!(log.contains("serving"), "{log}");
        assert!(log.contains("stopping: draining"), "{log}");
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn skip_unless_root() -> bool {
    if is_root() {
        return false;
    }
    eprintln!(
        "SKIPPED: this test runs kith.service's ExecStart in a network namespace of its own, which needs root"
    );
    true
}

#[test]
fn the_units_exec_start_tells_systemd_ready_pings_the_watchdog_and_stops_cleanly() {
    if skip_unless_root() {
        return;
    }
    let mut service = Service::start();
    let ready_at = service.ready();
    // systemd kills a service whose pings stop for WatchdogSec.
    let watchdog = service.timespan("WatchdogSec");
    let Some((ping, ping_at)) = service.recv(watchdog) else {
        panic!(
            "no WATCHDOG=1 within WatchdogSec after READY: {}",
            service.log()
        );
    };
    assert_eq!(ping, "WATCHDOG=1");
    assert!(ping_at.duration_since(ready_at) < watchdog);
    service.stop();
    eprintln!(
        "READY after {:?}; first watchdog ping {:?} after READY",
        ready_at.duration_since(service.started),
        ping_at.duration_since(ready_at)
    );
}

#[test]
fn a_stop_the_moment_the_service_is_ready_still_drains_and_exits_0() {
    // systemd may send SIGTERM as soon as READY=1 arrives (a stop queued
    // during start-up): the handler must be in place before READY, or the
    // default action kills kith without STOPPING=1 or a drain.
    if skip_unless_root() {
        return;
    }
    let mut service = Service::start();
    service.ready();
    service.stop();
}

#[test]
fn the_device_config_is_the_default_one_with_the_models_in_the_state_directory() {
    let path = repo_root().join("systemd/kith.toml");
    let device = std::fs::read_to_string(&path).expect("systemd/kith.toml");
    let config = kith::config::Config::parse(&device, &path).expect("parses");
    config.validate().expect("valid");
    assert_eq!(config.models_dir(), Path::new("/var/lib/kith/models"));

    // Every other line as `kith config init` writes it, so the two cannot
    // drift apart: the device file differs in its header and models.dir only.
    let body = |text: &str| -> Vec<String> {
        text.lines()
            .skip_while(|l| l.starts_with('#'))
            .filter(|l| !l.starts_with("dir = "))
            .map(String::from)
            .collect()
    };
    assert_eq!(
        body(&device),
        body(kith::config::DEFAULT_TOML),
        "systemd/kith.toml has drifted from agent/kith.toml: copy it and set models.dir = \"/var/lib/kith/models\""
    );
}
