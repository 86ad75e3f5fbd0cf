//! `kith up`: the long-running agent. Binds the API, starts model workers
//! and the audio pipeline, tells systemd when it is ready and alive, and on
//! SIGTERM/SIGINT drains accepted requests before exiting 0.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kith_hal::{AudioError, AudioSource, WavSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};

use crate::api::{self, AppState};
use crate::config::Loaded;
use crate::listen::{self, CommandListener, CommandOptions, ListenOptions};
use crate::notify::{self, Notifier};
use crate::store::ModelStore;

/// Runs the agent until a stop signal; returns after a clean drain.
pub fn up(loaded: Loaded, store: ModelStore) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kith-io")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(loaded, store))
}

async fn serve(loaded: Loaded, store: ModelStore) -> Result<()> {
    // Before anything else, and so before READY=1: a SIGTERM that systemd
    // sends right after READY must drain, not kill the process with the
    // default action.
    let mut signals = StopSignals::install()?;
    let config = loaded.config.clone();
    let node = config.node_name();
    let addr = config.listen_addr()?;
    tracing::info!(
        node = %node,
        config = %loaded.file.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "built-in defaults".into()),
        env_overrides = ?loaded.env_keys,
        models_dir = %store.dir().display(),
        "starting"
    );
    let (events_tx, _) = broadcast::channel(64);
    let (stop_tx, stop_rx) = watch::channel(false);
    let state = Arc::new(AppState::new(
        node.clone(),
        config.clone(),
        store,
        events_tx,
        stop_rx.clone(),
    ));

    // Everything that can fail on bad configuration fails before we serve.
    for name in &config.models.preload {
        state
            .start_worker(name, true)
            .with_context(|| format!("models.preload: `{name}`"))?;
    }
    if config.models.echo {
        state.start_worker("echo", false)?;
    }
    if !config.audio.intent.is_empty() {
        let dir = std::path::Path::new(&config.audio.intent);
        let engine = crate::intent::IntentEngine::load(&state.store, dir)
            .with_context(|| format!("audio.intent = {:?}", config.audio.intent))?;
        tracing::info!(model = %engine.name, dir = %dir.display(), "speech-to-intent model loaded");
        state.set_intent(Arc::new(engine));
    }
    start_audio(&state)?;
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!(
            "binding the API to {addr} (api.listen): is another kith or service using that port?"
        )
    })?;
    let local = listener.local_addr().context("reading the API's address")?;

    let app = api::router(state.clone());
    let mut shutdown = stop_rx.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            })
            .await
    });

    if config.mesh.enabled {
        let mesh = crate::mesh::Mesh::start(&state, local.port())
            .context("starting the mesh (mDNS + MQTT); set mesh.enabled = false to run alone")?;
        state.set_mesh(mesh);
    }
    let notifier = Arc::new(Notifier::from_env());
    announce(local, &state);
    notifier.notify(&format!("READY=1\nSTATUS=serving on http://{local}"));
    tracing::info!(api = %format!("http://{local}"), systemd = notifier.enabled(), "serving");
    if let Some(interval) = notify::watchdog_interval() {
        tokio::spawn(watchdog(state.clone(), notifier.clone(), local, interval));
    }

    let signal = signals.next().await;
    tracing::info!(
        signal,
        in_flight = state.in_flight(),
        "stopping: draining accepted requests"
    );
    state.draining.store(true, Ordering::SeqCst);
    notifier.notify("STOPPING=1\nSTATUS=draining");
    tokio::spawn(async move {
        let signal = signals.next().await;
        tracing::warn!(signal, "second stop signal: exiting without draining");
        std::process::exit(1);
    });

    let deadline = Duration::from_secs(config.api.drain_timeout_secs);
    if !wait_idle(&state, deadline).await {
        tracing::warn!(
            in_flight = state.in_flight(),
            drain_timeout_secs = config.api.drain_timeout_secs,
            "drain deadline passed: cutting the remaining requests short"
        );
        state.cut.store(true, Ordering::SeqCst);
        // A cut generation ends at its next token; prefill cannot be interrupted.
        wait_idle(&state, Duration::from_secs(5)).await;
    }
    let _ = stop_tx.send(true);
    match tokio::time::timeout(Duration::from_secs(3), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the HTTP server ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "the HTTP server task failed"),
        Err(_) => tracing::warn!("connections still open after the drain; closing them"),
    }
    if let Some(mesh) = state.mesh() {
        // The link leaves the broker (clearing this node's state) and withdraws the advert.
        mesh.wait_stopped(Duration::from_secs(2)).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// An address this host can connect to: loopback for a wildcard listener.
fn reachable(local: SocketAddr) -> SocketAddr {
    match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), local.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), local.port())
        }
        _ => local,
    }
}

/// Where the API listens, and one command to try it.
fn announce(local: SocketAddr, state: &AppState) {
    let host = reachable(local);
    let models = state.text_model_names();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "kith {}: OpenAI-compatible API on http://{local}",
        state.node
    );
    match models.first() {
        Some(model) => {
            let _ = writeln!(
                out,
                "try: curl http://{host}/v1/chat/completions -H 'Content-Type: application/json' -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of France?\"}}]}}'"
            );
        }
        None => {
            let _ = writeln!(
                out,
                "no text model is installed (run `kith models fetch smollm2-135m`); try: curl http://{host}/v1/models"
            );
        }
    }
    let _ = out.flush();
}

/// SIGTERM (systemctl stop) and SIGINT (Ctrl-C), caught from the moment
/// they are installed: a signal that arrives before anyone waits is kept.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// The next stop signal's name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Waits until no request is in flight, at most `limit`; true when idle.
async fn wait_idle(state: &AppState, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while state.in_flight() > 0 {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(api::DRAIN_POLL).await;
    }
    true
}

/// Pings systemd's watchdog only while the agent really works: the API
/// answers a request through the same listener and router clients use,
/// and every model worker thread is running.
async fn watchdog(
    state: Arc<AppState>,
    notifier: Arc<Notifier>,
    local: SocketAddr,
    interval: Duration,
) {
    let target = reachable(local);
    let mut shutdown = state.shutdown.clone();
    loop {
        let api_ok = probe(target, interval).await;
        let workers_ok = state.workers_alive();
        if api_ok && workers_ok {
            notifier.notify("WATCHDOG=1");
        } else {
            tracing::error!(
                api_ok,
                workers_ok,
                "liveness check failed: not pinging the systemd watchdog"
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// `GET /health` over loopback; any HTTP answer (200, or 503 while draining) proves liveness.
async fn probe(target: SocketAddr, limit: Duration) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(target).await?;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: kith\r\nConnection: close\r\n\r\n")
            .await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        Ok::<_, std::io::Error>(
            head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.1 503"),
        )
    };
    matches!(tokio::time::timeout(limit, attempt).await, Ok(Ok(true)))
}

/// Starts the wake-word pipeline when `audio.mic` or `audio.wav` is set.
/// The source is opened and the models loaded before this returns, so a bad
/// device or file fails the start.
fn start_audio(state: &Arc<AppState>) -> Result<()> {
    let audio = &state.config.audio;
    if !audio.mic && audio.wav.is_empty() {
        return Ok(());
    }
    let options = ListenOptions {
        wake: audio.wake.clone(),
        threshold: audio.threshold,
        ..ListenOptions::default()
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<String>>(1);
    let thread_state = state.clone();
    std::thread::Builder::new()
        .name("audio".into())
        .spawn(move || {
            let state = thread_state;
            let audio = &state.config.audio;
            let opened: Result<(Box<dyn AudioSource>, u32)> = if audio.mic {
                open_mic(&audio.device)
            } else {
                WavSource::open(std::path::Path::new(&audio.wav))
                    .map(|s| (Box::new(Paced::new(s)) as Box<dyn AudioSource>, 1000))
                    .with_context(|| "audio.wav".to_string())
            };
            let (mut source, pad_ms) = match opened {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut pipeline = match listen::load_pipeline(&state.store, &options) {
                Ok((p, _)) => p,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.context("loading the audio models")));
                    return;
                }
            };
            let mut commands = if audio.intent.is_empty() {
                None
            } else {
                let opts = CommandOptions {
                    end_silence_ms: audio.command_end_silence_ms,
                    max_ms: audio.command_max_ms,
                    ..CommandOptions::default()
                };
                match CommandListener::load(&state.store, std::path::Path::new(&audio.intent), opts) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.context(format!("audio.intent = {:?}", audio.intent))));
                        return;
                    }
                }
            };
            let heads: Vec<String> = pipeline.heads().iter().map(|h| h.name().to_string()).collect();
            let then = if commands.is_some() { ", then the command's intent" } else { "" };
            let _ = ready_tx.send(Ok(format!("{} for {}{then}", source.describe(), heads.join(", "))));
            state.audio.running.store(true, Ordering::SeqCst);
            let mut metered = Metered::new(source.as_mut(), &state);
            let result = listen::run(&mut pipeline, commands.as_mut(), &mut metered, pad_ms, &mut |event| {
                match &event {
                    listen::ListenEvent::Wake(wake) => {
                        state.audio.detections.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(model = %wake.model, score = %wake.score, t_ms = wake.t_ms, "wake word heard");
                    }
                    listen::ListenEvent::Intent(i) if i.understood => tracing::info!(
                        intent = i.intent.as_deref().unwrap_or(""),
                        slots = %i.slots.clone().map(serde_json::Value::Object).unwrap_or_default(),
                        score = %i.score.map(|s| format!("{s:.4}")).unwrap_or_default(),
                        ended_by = i.ended_by,
                        "command understood"
                    ),
                    listen::ListenEvent::Intent(i) => tracing::info!(
                        ended_by = i.ended_by,
                        "command not understood (out of the grammar, or too unsure)"
                    ),
                }
                if let Ok(json) = serde_json::to_string(&event) {
                    state.publish(json);
                }
            });
            state.audio.running.store(false, Ordering::SeqCst);
            match result {
                Ok(stats) => tracing::info!(
                    rtf = %format!("{:.4}", state.audio.rtf_micro.load(Ordering::Relaxed) as f64 / 1e6),
                    audio_ms = stats.audio_ms,
                    "audio source ended"
                ),
                Err(e) => tracing::error!(error = %format!("{e:#}"), "audio pipeline stopped"),
            }
        })
        .context("starting the audio thread")?;
    match ready_rx.recv() {
        Ok(Ok(what)) => {
            tracing::info!(source = %what, "listening");
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => bail!("the audio thread stopped while starting"),
    }
}

#[cfg(feature = "mic")]
fn open_mic(device: &str) -> Result<(Box<dyn AudioSource>, u32)> {
    let device = (!device.is_empty()).then_some(device);
    let mic = kith_hal::MicSource::open(device).context("audio.mic")?;
    Ok((Box::new(mic), 0))
}

#[cfg(not(feature = "mic"))]
fn open_mic(_device: &str) -> Result<(Box<dyn AudioSource>, u32)> {
    bail!("audio.mic: this kith was built without microphone support (feature `mic`)")
}

/// An audio source that measures the real-time factor of whoever reads it:
/// time spent between reads is processing, samples delivered are audio.
struct Metered<'a> {
    inner: &'a mut dyn AudioSource,
    state: &'a AppState,
    samples: u64,
    busy: Duration,
    returned_at: Option<Instant>,
    next_report: u64,
}

impl<'a> Metered<'a> {
    fn new(inner: &'a mut dyn AudioSource, state: &'a AppState) -> Self {
        Metered {
            inner,
            state,
            samples: 0,
            busy: Duration::ZERO,
            returned_at: None,
            next_report: u64::from(kith_hal::SAMPLE_RATE),
        }
    }
}

impl AudioSource for Metered<'_> {
    fn read(&mut self, buf: &mut [i16]) -> Result<usize, AudioError> {
        if let Some(t) = self.returned_at {
            self.busy += t.elapsed();
        }
        let n = self.inner.read(buf)?;
        self.samples += n as u64;
        if self.samples >= self.next_report {
            let audio_s = self.samples as f64 / f64::from(kith_hal::SAMPLE_RATE);
            let rtf = self.busy.as_secs_f64() / audio_s;
            self.state
                .audio
                .rtf_micro
                .store((rtf * 1e6) as u64, Ordering::Relaxed);
            self.next_report = self.samples + u64::from(kith_hal::SAMPLE_RATE);
        }
        self.returned_at = Some(Instant::now());
        Ok(n)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Delivers a file's audio no faster than real time, as a microphone would.
struct Paced<S> {
    inner: S,
    started: Option<Instant>,
    samples: u64,
}

impl<S: AudioSource> Paced<S> {
    fn new(inner: S) -> Self {
        Paced {
            inner,
            started: None,
            samples: 0,
        }
    }
}

impl<S: AudioSource> AudioSource for Paced<S> {
    fn read(&mut self, buf: &mut [i16]) -> Result<usize, AudioError> {
        let started = *self.started.get_or_insert_with(Instant::now);
        let n = self.inner.read(buf)?;
        self.samples += n as u64;
        let due =
            Duration::from_micros(self.samples * 1_000_000 / u64::from(kith_hal::SAMPLE_RATE));
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        Ok(n)
    }

    fn describe(&self) -> String {
        format!("{} at real time", self.inner.describe())
    }
}
