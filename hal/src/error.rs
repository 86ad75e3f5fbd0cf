use std::path::PathBuf;

/// Why audio could not be read. Each variant names the source and the fix where one exists.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is empty (0 bytes): expected a WAV file")]
    Empty { path: PathBuf },
    #[error(
        "{path} is not a WAV file ({reason}); convert it with e.g. `sox in.mp3 -r 16000 -c 1 out.wav`"
    )]
    NotWav { path: PathBuf, reason: String },
    #[error("{path} uses an unsupported WAV encoding: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error(
        "{path} is truncated: its header promises {declared_ms} ms of audio but the file ends after {read_ms} ms (all audio present was delivered)"
    )]
    Truncated {
        path: PathBuf,
        declared_ms: u64,
        read_ms: u64,
    },
    #[error("reading {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("resampling {from_hz} Hz to 16000 Hz: {reason}")]
    Resample { from_hz: u32, reason: String },
    #[error("microphone: {0}")]
    Mic(String),
}
