use std::path::PathBuf;

/// What can go wrong in inference. Each variant names the model and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file could not be read, parsed or planned by tract.
    #[error("loading model {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    /// The model loaded but its inputs or outputs are not what this pipeline needs.
    #[error("model {model} has an unexpected shape: {reason}")]
    Shape { model: String, reason: String },
    /// tract failed while running the plan.
    #[error("running model {model}: {reason}")]
    Run { model: String, reason: String },
    /// A prompt (with what was generated) does not fit the model's context window.
    #[error(
        "the prompt needs {tokens} tokens but the model's context window holds {context}: shorten the prompt or the conversation"
    )]
    ContextOverflow { tokens: usize, context: usize },
    /// The caller passed data the pipeline cannot take.
    #[error("invalid input: {0}")]
    Input(String),
}

/// Flattens a tract (anyhow) error with its whole chain: tract's outer
/// messages are often empty and the real cause sits deeper.
pub(crate) fn reason(e: &tract_onnx::prelude::TractError) -> String {
    let parts: Vec<String> = e
        .chain()
        .map(|c| c.to_string())
        .filter(|s| !s.trim().is_empty())
        .collect();
    if parts.is_empty() {
        "unknown tract error".to_string()
    } else {
        parts.join(": ")
    }
}
