//! `GET /metrics` in Prometheus' text format, written by hand (a few
//! counters and gauges do not need a metrics crate).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::AppState;

/// Request counts by route and status.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
}

impl Metrics {
    pub fn count(&self, route: &'static str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route, status)).or_default() += 1;
        }
    }
}

/// The route a path belongs to, from a fixed set (so label values stay bounded).
pub fn route_label(path: &str) -> &'static str {
    match path {
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/v1/models" => "/v1/models",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/audio/intents" => "/v1/audio/intents",
        "/v1/events" => "/v1/events",
        "/v1/mesh/peers" => "/v1/mesh/peers",
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        _ => "unknown",
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn render(State(state): State<Arc<AppState>>) -> Response {
    let mut out = String::with_capacity(4096);
    let _ = write_metrics(&state, &mut out);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

fn write_metrics(state: &AppState, out: &mut String) -> std::fmt::Result {
    writeln!(
        out,
        "# HELP kith_http_requests_total HTTP requests answered, by route and status."
    )?;
    writeln!(out, "# TYPE kith_http_requests_total counter")?;
    if let Ok(m) = state.metrics.requests.lock() {
        for ((route, status), n) in m.iter() {
            writeln!(
                out,
                "kith_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            )?;
        }
    }
    writeln!(
        out,
        "# HELP kith_requests_in_flight Requests admitted and not yet answered."
    )?;
    writeln!(out, "# TYPE kith_requests_in_flight gauge")?;
    writeln!(out, "kith_requests_in_flight {}", state.in_flight())?;

    let workers = state.workers();
    let gauge = |out: &mut String,
                 name: &str,
                 help: &str,
                 kind: &str,
                 value: &dyn Fn(&crate::worker::ModelWorker) -> f64|
     -> std::fmt::Result {
        writeln!(out, "# HELP {name} {help}")?;
        writeln!(out, "# TYPE {name} {kind}")?;
        for w in &workers {
            writeln!(out, "{name}{{model=\"{}\"}} {}", escape(&w.name), value(w))?;
        }
        Ok(())
    };
    gauge(
        out,
        "kith_queue_depth",
        "Requests waiting for or running on a model.",
        "gauge",
        &|w| w.depth() as f64,
    )?;
    gauge(
        out,
        "kith_model_loaded",
        "1 when the model is in memory.",
        "gauge",
        &|w| f64::from(u8::from(w.stats.loaded.load(Ordering::Relaxed))),
    )?;
    gauge(
        out,
        "kith_generated_tokens_total",
        "Tokens generated.",
        "counter",
        &|w| w.stats.tokens.load(Ordering::Relaxed) as f64,
    )?;
    gauge(
        out,
        "kith_jobs_total",
        "Jobs a model finished, whatever the outcome.",
        "counter",
        &|w| w.stats.jobs.load(Ordering::Relaxed) as f64,
    )?;
    gauge(
        out,
        "kith_jobs_abandoned_total",
        "Jobs stopped because the client went away.",
        "counter",
        &|w| w.stats.abandoned.load(Ordering::Relaxed) as f64,
    )?;
    gauge(
        out,
        "kith_decode_tokens_per_second",
        "Decode speed of the model's last request.",
        "gauge",
        &|w| w.stats.tokens_per_s_milli.load(Ordering::Relaxed) as f64 / 1000.0,
    )?;

    writeln!(
        out,
        "# HELP kith_audio_rtf Audio pipeline real-time factor (processing time / audio time)."
    )?;
    writeln!(out, "# TYPE kith_audio_rtf gauge")?;
    writeln!(
        out,
        "kith_audio_rtf {}",
        state.audio.rtf_micro.load(Ordering::Relaxed) as f64 / 1e6
    )?;
    writeln!(out, "# HELP kith_audio_detections_total Wake words heard.")?;
    writeln!(out, "# TYPE kith_audio_detections_total counter")?;
    writeln!(
        out,
        "kith_audio_detections_total {}",
        state.audio.detections.load(Ordering::Relaxed)
    )?;

    if let Some(m) = kith_hal::telemetry::process_memory() {
        writeln!(
            out,
            "# HELP kith_resident_memory_bytes Resident memory of the kith process."
        )?;
        writeln!(out, "# TYPE kith_resident_memory_bytes gauge")?;
        writeln!(out, "kith_resident_memory_bytes {}", m.resident_bytes)?;
        writeln!(
            out,
            "# HELP kith_peak_resident_memory_bytes Largest resident memory so far."
        )?;
        writeln!(out, "# TYPE kith_peak_resident_memory_bytes gauge")?;
        writeln!(
            out,
            "kith_peak_resident_memory_bytes {}",
            m.peak_resident_bytes
        )?;
    }
    if let Some(mesh) = state.mesh() {
        let st = &mesh.stats;
        let broker = mesh.broker_status();
        for (name, help, kind, value) in [
            (
                "kith_mesh_peers",
                "Peers alive on MQTT.",
                "gauge",
                mesh.alive_count() as u64,
            ),
            (
                "kith_mesh_delegations_in_flight",
                "Requests sent to a peer and not yet finished there.",
                "gauge",
                mesh.delegations_in_flight() as u64,
            ),
            (
                "kith_mesh_broker_connected",
                "1 while connected to the MQTT broker.",
                "gauge",
                u64::from(broker.connected),
            ),
            (
                "kith_mesh_broker_hosted",
                "1 while this node hosts the embedded broker.",
                "gauge",
                u64::from(broker.hosted_here),
            ),
            (
                "kith_mesh_broker_connects_total",
                "Connections made to a broker.",
                "counter",
                st.broker_connects.load(Ordering::Relaxed),
            ),
            (
                "kith_mesh_frames_dropped_total",
                "Messages on kith topics dropped as malformed or misplaced.",
                "counter",
                st.frames_dropped.load(Ordering::Relaxed),
            ),
            (
                "kith_mesh_delegated_ok_total",
                "Requests delegated to peers that completed.",
                "counter",
                st.delegated_ok.load(Ordering::Relaxed),
            ),
            (
                "kith_mesh_delegated_failed_total",
                "Requests delegated to peers that ended in an error.",
                "counter",
                st.delegated_failed.load(Ordering::Relaxed),
            ),
            (
                "kith_mesh_delegation_retries_total",
                "Delegated requests moved to another node before their first token.",
                "counter",
                st.delegation_retries.load(Ordering::Relaxed),
            ),
            (
                "kith_mesh_served_total",
                "Requests this node ran for peers.",
                "counter",
                st.served.load(Ordering::Relaxed),
            ),
        ] {
            writeln!(out, "# HELP {name} {help}")?;
            writeln!(out, "# TYPE {name} {kind}")?;
            writeln!(out, "{name} {value}")?;
        }
    }
    writeln!(
        out,
        "# HELP kith_uptime_seconds Seconds since the agent started."
    )?;
    writeln!(out, "# TYPE kith_uptime_seconds gauge")?;
    writeln!(
        out,
        "kith_uptime_seconds {}",
        state.started.elapsed().as_secs()
    )?;
    Ok(())
}
