//! The agent's configuration: one TOML file, overridden by `KITH_*`
//! environment variables, overridden by command-line flags. Everything is
//! checked before anything starts, and every error names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The commented default configuration (`kith config init` writes it).
pub const DEFAULT_TOML: &str = include_str!("../kith.toml");

/// Everything `kith up` reads.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub api: ApiConfig,
    pub models: ModelsConfig,
    pub generation: GenerationConfig,
    pub audio: AudioConfig,
    pub mesh: MeshConfig,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Empty: the host name.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// `ADDR:PORT` of the HTTP API.
    pub listen: String,
    /// Largest request body, in bytes.
    pub max_body_bytes: u64,
    /// How long accepted requests may run after a stop signal.
    pub drain_timeout_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// Empty: the default models directory.
    pub dir: String,
    /// Language models loaded at start.
    pub preload: Vec<String>,
    /// Matrix-product threads per language model.
    pub threads: u32,
    /// Requests that may wait per model.
    pub queue_depth: u32,
    /// Serve the `echo` pseudo-model.
    pub echo: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationConfig {
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AudioConfig {
    pub mic: bool,
    pub device: String,
    pub wav: String,
    pub wake: Vec<String>,
    pub threshold: f32,
    /// Speech-to-intent model directory (`kith intent train` writes one);
    /// empty: wake words only.
    pub intent: String,
    /// Silence that ends a spoken command, ms.
    pub command_end_silence_ms: u32,
    /// Longest spoken command, ms.
    pub command_max_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// Find peers (mDNS) and work with them (MQTT).
    pub enabled: bool,
    /// Interfaces to advertise and browse on; empty: every LAN interface
    /// that is not a container or VM bridge.
    pub interfaces: Vec<String>,
    /// `mqtt://HOST:PORT` or `mqtts://HOST:PORT`; empty: find or host one.
    pub mqtt_url: String,
    /// PEM files for `mqtts://`: the CA, and this node's certificate and key.
    pub mqtt_ca: String,
    pub mqtt_cert: String,
    pub mqtt_key: String,
    /// MQTT keep-alive, seconds: a silent node is declared dead after 1.5 ×.
    pub mqtt_keep_alive_secs: u64,
    /// This node may host the embedded broker.
    pub broker: bool,
    /// The embedded broker's TCP port.
    pub broker_port: u16,
    /// Forward requests to peers that can serve them sooner.
    pub delegate: bool,
    /// `model: "auto"`: up to this many tokens (prompt + max_tokens) the
    /// smallest text model serves; above, the largest in the mesh.
    pub auto_small_tokens: u32,
    /// Seconds between state publications.
    pub state_interval_secs: u64,
    /// A peer silent this long (no state, no mDNS) is dropped.
    pub peer_timeout_secs: u64,
    /// A delegated request not accepted within this time goes elsewhere.
    pub accept_timeout_ms: u64,
    /// A delegated request silent this long after its start is an error.
    pub idle_timeout_secs: u64,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            enabled: true,
            interfaces: Vec::new(),
            mqtt_url: String::new(),
            mqtt_ca: String::new(),
            mqtt_cert: String::new(),
            mqtt_key: String::new(),
            mqtt_keep_alive_secs: 5,
            broker: true,
            broker_port: 8711,
            delegate: true,
            auto_small_tokens: 512,
            state_interval_secs: 2,
            peer_timeout_secs: 10,
            accept_timeout_ms: 3000,
            idle_timeout_secs: 30,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: "127.0.0.1:8710".into(),
            max_body_bytes: 8 << 20,
            drain_timeout_secs: 10,
        }
    }
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            dir: String::new(),
            preload: Vec::new(),
            threads: 1,
            queue_depth: 4,
            echo: false,
        }
    }
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_tokens: 256,
            temperature: 0.2,
            top_p: 0.9,
        }
    }
}

impl Default for AudioConfig {
    fn default() -> Self {
        AudioConfig {
            mic: false,
            device: String::new(),
            wav: String::new(),
            wake: Vec::new(),
            threshold: 0.5,
            intent: String::new(),
            command_end_silence_ms: 640,
            command_max_ms: 6000,
        }
    }
}

/// Values given on the command line; they win over the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub api: Option<String>,
    pub models_dir: Option<PathBuf>,
    pub node_name: Option<String>,
    pub listen_wav: Option<PathBuf>,
    pub mic: bool,
    pub intent: Option<PathBuf>,
}

/// Where a configuration came from, for the log.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// The file read, if any.
    pub file: Option<PathBuf>,
    /// `KITH_*` variables that changed a key.
    pub env_keys: Vec<String>,
}

/// The file kith reads when none is given: the user's, else the system's.
pub fn default_path() -> Option<PathBuf> {
    [user_path(), Some(PathBuf::from("/etc/kith/kith.toml"))]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
}

/// `$XDG_CONFIG_HOME/kith/kith.toml`, else `~/.config/kith/kith.toml`.
pub fn user_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("kith/kith.toml"));
    }
    std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(|h| PathBuf::from(h).join(".config/kith/kith.toml"))
}

impl Config {
    /// Parses a configuration file's text; errors name the key and the line.
    pub fn parse(text: &str, origin: &Path) -> Result<Config> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", origin.display()))
    }

    /// Reads `file` (or the default file when `None`), applies the `KITH_*`
    /// variables from `env` and then `flags`, and validates the result.
    pub fn load(
        file: Option<&Path>,
        env: &[(String, String)],
        flags: &Overrides,
    ) -> Result<Loaded> {
        let file = match file {
            Some(p) => Some(p.to_path_buf()),
            None => default_path(),
        };
        let mut config = match &file {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!(
                        "reading the configuration {} (`kith config init` writes one)",
                        path.display()
                    )
                })?;
                Config::parse(&text, path)?
            }
            None => Config::default(),
        };
        let env_keys = config.apply_env(env)?;
        config.apply_flags(flags);
        config.validate()?;
        Ok(Loaded {
            config,
            file,
            env_keys,
        })
    }

    /// Applies `KITH_<SECTION>_<KEY>` variables. Each value is read as the
    /// key's type (lists: comma-separated). Returns the keys changed.
    pub fn apply_env(&mut self, env: &[(String, String)]) -> Result<Vec<String>> {
        let mut table = toml::Table::try_from(&*self).context("encoding the configuration")?;
        let mut changed = Vec::new();
        for (section, keys) in table.iter_mut() {
            let Some(keys) = keys.as_table_mut() else {
                continue;
            };
            for (key, value) in keys.iter_mut() {
                let var = format!("KITH_{section}_{key}").to_uppercase();
                let Some((_, raw)) = env.iter().find(|(k, _)| *k == var) else {
                    continue;
                };
                *value = env_value(value, raw)
                    .with_context(|| format!("{var}={raw:?} (key `{section}.{key}`)"))?;
                changed.push(format!("{section}.{key}"));
            }
        }
        *self = table
            .try_into()
            .context("applying KITH_* environment variables")?;
        Ok(changed)
    }

    fn apply_flags(&mut self, flags: &Overrides) {
        if let Some(a) = &flags.api {
            self.api.listen = a.clone();
        }
        if let Some(d) = &flags.models_dir {
            self.models.dir = d.to_string_lossy().into_owned();
        }
        if let Some(n) = &flags.node_name {
            self.node.name = n.clone();
        }
        if let Some(w) = &flags.listen_wav {
            self.audio.wav = w.to_string_lossy().into_owned();
            self.audio.mic = false;
        }
        if flags.mic {
            self.audio.mic = true;
            self.audio.wav.clear();
        }
        if let Some(i) = &flags.intent {
            self.audio.intent = i.to_string_lossy().into_owned();
        }
    }

    /// Checks what types alone cannot; errors name the key.
    pub fn validate(&self) -> Result<()> {
        self.listen_addr()?;
        if self.api.max_body_bytes < 1024 {
            bail!(
                "api.max_body_bytes = {}: too small to hold a request (at least 1024)",
                self.api.max_body_bytes
            );
        }
        if self.api.drain_timeout_secs > 3600 {
            bail!(
                "api.drain_timeout_secs = {}: at most 3600",
                self.api.drain_timeout_secs
            );
        }
        if !(1..=64).contains(&self.models.threads) {
            bail!("models.threads = {}: must be 1..=64", self.models.threads);
        }
        if !(1..=1024).contains(&self.models.queue_depth) {
            bail!(
                "models.queue_depth = {}: must be 1..=1024",
                self.models.queue_depth
            );
        }
        if self.generation.max_tokens == 0 {
            bail!("generation.max_tokens = 0: must be at least 1");
        }
        if !(0.0..=2.0).contains(&self.generation.temperature) {
            bail!(
                "generation.temperature = {}: must be within 0..=2",
                self.generation.temperature
            );
        }
        if !(self.generation.top_p > 0.0 && self.generation.top_p <= 1.0) {
            bail!(
                "generation.top_p = {}: must be within (0, 1]",
                self.generation.top_p
            );
        }
        if !(0.0..=1.0).contains(&self.audio.threshold) {
            bail!(
                "audio.threshold = {}: must be within 0..=1",
                self.audio.threshold
            );
        }
        self.validate_mesh()?;
        if !(160..=5000).contains(&self.audio.command_end_silence_ms) {
            bail!(
                "audio.command_end_silence_ms = {}: must be within 160..=5000",
                self.audio.command_end_silence_ms
            );
        }
        if !(1000..=30_000).contains(&self.audio.command_max_ms) {
            bail!(
                "audio.command_max_ms = {}: must be within 1000..=30000",
                self.audio.command_max_ms
            );
        }
        if self.audio.mic && !self.audio.wav.is_empty() {
            bail!("audio.mic = true and audio.wav are both set: choose one audio source");
        }
        Ok(())
    }

    fn validate_mesh(&self) -> Result<()> {
        let m = &self.mesh;
        if !m.mqtt_url.is_empty() {
            crate::mesh::link::BrokerUrl::parse(&m.mqtt_url)
                .map_err(|e| anyhow::anyhow!("mesh.mqtt_url = {:?}: {e}", m.mqtt_url))?;
        }
        for (key, path) in [
            ("mqtt_ca", &m.mqtt_ca),
            ("mqtt_cert", &m.mqtt_cert),
            ("mqtt_key", &m.mqtt_key),
        ] {
            if !path.is_empty() && !Path::new(path).is_file() {
                bail!("mesh.{key} = {path:?}: no such file");
            }
        }
        if m.mqtt_cert.is_empty() != m.mqtt_key.is_empty() {
            bail!("mesh.mqtt_cert and mesh.mqtt_key go together: set both or neither");
        }
        if !(1..=600).contains(&m.mqtt_keep_alive_secs) {
            bail!(
                "mesh.mqtt_keep_alive_secs = {}: must be 1..=600",
                m.mqtt_keep_alive_secs
            );
        }
        if !(1..=300).contains(&m.state_interval_secs) {
            bail!(
                "mesh.state_interval_secs = {}: must be 1..=300",
                m.state_interval_secs
            );
        }
        if m.peer_timeout_secs < 2 * m.state_interval_secs {
            bail!(
                "mesh.peer_timeout_secs = {}: must be at least twice mesh.state_interval_secs ({})",
                m.peer_timeout_secs,
                m.state_interval_secs
            );
        }
        if !(100..=600_000).contains(&m.accept_timeout_ms) {
            bail!(
                "mesh.accept_timeout_ms = {}: must be 100..=600000",
                m.accept_timeout_ms
            );
        }
        if !(1..=3600).contains(&m.idle_timeout_secs) {
            bail!(
                "mesh.idle_timeout_secs = {}: must be 1..=3600",
                m.idle_timeout_secs
            );
        }
        Ok(())
    }

    /// `api.listen` as a socket address.
    pub fn listen_addr(&self) -> Result<SocketAddr> {
        self.api.listen.parse().map_err(|e| {
            anyhow::anyhow!(
                "api.listen = {:?}: {e} (expected ADDRESS:PORT, e.g. 127.0.0.1:8710)",
                self.api.listen
            )
        })
    }

    /// The models directory this configuration names.
    pub fn models_dir(&self) -> PathBuf {
        if self.models.dir.is_empty() {
            crate::store::default_models_dir()
        } else {
            PathBuf::from(&self.models.dir)
        }
    }

    /// The node's name: `node.name`, else the host name.
    pub fn node_name(&self) -> String {
        if !self.node.name.is_empty() {
            return self.node.name.clone();
        }
        host_name()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "kith".into())
    }
}

/// The kernel's host name, by gethostname(2): it works where /proc/sys is
/// hidden (systemd's ProtectProc/ProcSubset sandboxing).
fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length; gethostname writes at
    // most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).trim().to_string())
}

/// `raw` read as the type of `current`.
fn env_value(current: &toml::Value, raw: &str) -> Result<toml::Value> {
    use toml::Value;
    Ok(match current {
        Value::String(_) => Value::String(raw.to_string()),
        Value::Integer(_) => Value::Integer(
            raw.trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("expected an integer: {e}"))?,
        ),
        Value::Float(_) => Value::Float(
            raw.trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("expected a number: {e}"))?,
        ),
        Value::Boolean(_) => Value::Boolean(match raw.trim() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" => false,
            _ => bail!("expected true or false"),
        }),
        Value::Array(_) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        other => bail!("cannot be set from the environment ({})", other.type_str()),
    })
}

/// The process's `KITH_*` variables.
pub fn kith_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("KITH_"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_commented_default_file_is_the_built_in_default() {
        let parsed = Config::parse(DEFAULT_TOML, Path::new("kith.toml")).expect("parses");
        assert_eq!(parsed, Config::default());
        parsed.validate().expect("valid");
    }

    #[test]
    fn environment_variables_override_keys_of_every_type() {
        let mut c = Config::default();
        let changed = c
            .apply_env(&env(&[
                ("KITH_API_LISTEN", "0.0.0.0:9000"),
                ("KITH_MODELS_QUEUE_DEPTH", "9"),
                ("KITH_MODELS_ECHO", "true"),
                ("KITH_GENERATION_TOP_P", "0.5"),
                ("KITH_MODELS_PRELOAD", "a, b"),
                ("KITH_LOG", "debug"),
            ]))
            .expect("applies");
        assert_eq!(c.api.listen, "0.0.0.0:9000");
        assert_eq!(c.models.queue_depth, 9);
        assert!(c.models.echo);
        assert_eq!(c.generation.top_p, 0.5);
        assert_eq!(c.models.preload, vec!["a", "b"]);
        assert_eq!(changed.len(), 5);
    }

    #[test]
    fn a_bad_environment_value_names_the_variable_and_the_key() {
        let mut c = Config::default();
        let e = c
            .apply_env(&env(&[("KITH_MODELS_QUEUE_DEPTH", "lots")]))
            .expect_err("rejected");
        let msg = format!("{e:#}");
        assert!(msg.contains("KITH_MODELS_QUEUE_DEPTH"), "{msg}");
        assert!(msg.contains("models.queue_depth"), "{msg}");
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it_and_its_line() {
        let e = Config::parse(
            "[api]\nlisten = \"127.0.0.1:1\"\nqueue = 3\n",
            Path::new("k.toml"),
        )
        .expect_err("rejected");
        let msg = format!("{e:#}");
        assert!(msg.contains("queue"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn a_wrong_type_is_an_error_naming_the_key() {
        let e = Config::parse("[models]\nthreads = \"two\"\n", Path::new("k.toml"))
            .expect_err("rejected");
        let msg = format!("{e:#}");
        assert!(msg.contains("threads"), "{msg}");
    }

    #[test]
    fn validation_names_the_key_and_the_reason() {
        let mut c = Config::default();
        c.api.listen = "localhost".into();
        assert!(format!("{:#}", c.validate().expect_err("bad")).contains("api.listen"));
        let mut c = Config::default();
        c.models.queue_depth = 0;
        assert!(format!("{:#}", c.validate().expect_err("bad")).contains("models.queue_depth"));
        let mut c = Config::default();
        c.audio.mic = true;
        c.audio.wav = "a.wav".into();
        assert!(format!("{:#}", c.validate().expect_err("bad")).contains("audio.wav"));
    }

    #[test]
    fn flags_win_over_the_environment() {
        let flags = Overrides {
            api: Some("127.0.0.1:0".into()),
            node_name: Some("pi".into()),
            ..Overrides::default()
        };
        let loaded = Config::load(
            Some(&write_temp("[api]\nlisten = \"127.0.0.1:1\"\n")),
            &env(&[("KITH_API_LISTEN", "127.0.0.1:2")]),
            &flags,
        )
        .expect("loads");
        assert_eq!(loaded.config.api.listen, "127.0.0.1:0");
        assert_eq!(loaded.config.node_name(), "pi");
        assert_eq!(loaded.env_keys, vec!["api.listen"]);
    }

    #[test]
    fn an_unnamed_node_takes_the_kernels_host_name() {
        let loaded =
            Config::load(Some(&write_temp("")), &env(&[]), &Overrides::default()).expect("loads");
        let kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
        assert_eq!(loaded.config.node_name(), kernel.trim());
    }

    fn write_temp(text: &str) -> PathBuf {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        let path = dir.join("kith.toml");
        std::fs::write(&path, text).expect("write");
        path
    }
}
