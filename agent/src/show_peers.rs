//! `kith peers`: the peer table of the local node, read from its API
//! (`GET /v1/mesh/peers`), as a table or as JSON.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Reads `GET /v1/mesh/peers` from the API at `base` (`http://HOST:PORT`).
pub fn fetch(base: &str) -> Result<Value> {
    let hostport = base
        .strip_prefix("http://")
        .context("the API address must start with http://")?
        .trim_end_matches('/');
    let addr = hostport
        .to_socket_addrs()
        .with_context(|| format!("resolving {hostport}"))?
        .next()
        .with_context(|| format!("{hostport} resolves to no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).with_context(|| {
        format!("connecting to kith at {base}: is `kith up` running? (`--api` names another address)")
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET /v1/mesh/peers HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the answer of {base}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the answer is not HTTP")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!("{base}/v1/mesh/peers answered {status}: {body}");
    }
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    serde_json::from_str(&body).context("the answer is not JSON")
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// The table `kith peers` prints.
pub fn render(v: &Value) -> String {
    let mut out = String::new();
    if v["enabled"] == Value::Bool(false) {
        return format!(
            "node {}: the mesh is off (mesh.enabled = false)\n",
            v["node"].as_str().unwrap_or("?")
        );
    }
    let broker = &v["broker"];
    out.push_str(&format!(
        "node {} · broker: {} {} at {} ({})\n",
        v["node"].as_str().unwrap_or("?"),
        broker["kind"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or("none"),
        broker["name"].as_str().unwrap_or(""),
        broker["address"].as_str().unwrap_or("-"),
        if broker["connected"] == Value::Bool(true) {
            "connected"
        } else {
            "not connected"
        },
    ));
    let peers = v["peers"].as_array().cloned().unwrap_or_default();
    if peers.is_empty() {
        out.push_str("no peers seen yet\n");
        return out;
    }
    let rows: Vec<[String; 6]> = peers
        .iter()
        .map(|p| {
            let addr = p["addresses"][0].as_str().unwrap_or("-");
            let api = p["api_port"]
                .as_u64()
                .map(|port| format!("{addr}:{port}"))
                .unwrap_or_else(|| addr.to_string());
            let models: Vec<String> = p["models"]
                .as_array()
                .map(|ms| {
                    ms.iter()
                        .map(|m| {
                            let name = m["name"].as_str().unwrap_or("?");
                            match (m["queued"].as_u64(), m["busy"].as_bool()) {
                                (Some(q), Some(b)) => {
                                    format!("{name} (queue {})", q + u64::from(b))
                                }
                                _ => name.to_string(),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            let temp = p["temperature_c"]
                .as_f64()
                .map(|t| format!("{t:.0}°C"))
                .unwrap_or_else(|| "-".into());
            [
                p["id"].as_str().unwrap_or("?").to_string()
                    + if p["hosts_broker"] == Value::Bool(true) {
                        " *"
                    } else {
                        ""
                    },
                p["status"].as_str().unwrap_or("?").to_string(),
                api,
                if models.is_empty() {
                    "-".into()
                } else {
                    models.join(", ")
                },
                temp,
                format!(
                    "{:.1} s",
                    p["last_seen_ms"].as_f64().unwrap_or(0.0) / 1000.0
                ),
            ]
        })
        .collect();
    let header = ["NODE", "STATUS", "API", "MODELS", "TEMP", "LAST SEEN"];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    out.push_str(&line(&header.map(String::from)));
    for r in &rows {
        out.push_str(&line(r));
    }
    out.push_str("(* hosts the embedded MQTT broker)\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_each_peer_its_models_and_the_broker() {
        let v = serde_json::json!({
            "node": "pi", "broker": {"kind": "embedded", "name": "jetson", "address": "10.0.0.3:8711", "connected": true},
            "peers": [{"id": "jetson", "status": "up", "addresses": ["10.0.0.3"], "api_port": 8710,
                       "hosts_broker": true, "temperature_c": 51.2, "last_seen_ms": 400,
                       "models": [{"name": "smollm2-135m", "queued": 1, "busy": true}]}]
        });
        let t = render(&v);
        assert!(
            t.contains("broker: embedded jetson at 10.0.0.3:8711 (connected)"),
            "{t}"
        );
        assert!(t.contains("jetson *"), "{t}");
        assert!(t.contains("10.0.0.3:8710"), "{t}");
        assert!(t.contains("smollm2-135m (queue 2)"), "{t}");
        assert!(t.contains("51°C") && t.contains("0.4 s"), "{t}");
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }
}
