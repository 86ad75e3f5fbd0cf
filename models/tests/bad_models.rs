//! Model files that are not what the pipeline needs fail with an error that
//! names the file and the reason, never a panic.

use std::path::PathBuf;

use kith_models::{EmbeddingMode, ModelError, SpeechFrontEnd, Vad, WakeHead};

fn installed(name: &str) -> PathBuf {
    let dir = std::env::var_os("KITH_MODELS_DIR")
        .map(PathBuf::from)
        .expect("KITH_MODELS_DIR (run the README's test command)");
    dir.join(format!("{name}.onnx"))
}

#[test]
fn a_corrupt_onnx_file_is_a_load_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("alexa.onnx");
    let mut bytes = std::fs::read(installed("alexa")).expect("model");
    bytes.truncate(bytes.len() / 3);
    std::fs::write(&path, bytes).expect("write");
    let err = WakeHead::load("alexa", &path, &[])
        .err()
        .expect("must fail");
    assert!(matches!(err, ModelError::Load { .. }), "{err}");
    assert!(err.to_string().contains("alexa.onnx"), "{err}");

    std::fs::write(&path, b"definitely not protobuf").expect("write");
    assert!(WakeHead::load("alexa", &path, &[]).is_err());
    assert!(Vad::load(&path).is_err());
}

#[test]
fn a_model_of_the_wrong_kind_is_refused_with_its_shape() {
    // The mel model takes audio, not [batch, N, 96] embeddings.
    let err = WakeHead::load("mel", &installed("melspectrogram"), &[])
        .err()
        .expect("must fail");
    assert!(matches!(err, ModelError::Shape { .. }), "{err}");
    assert!(err.to_string().contains("[batch, N, 96]"), "{err}");
}

#[test]
fn a_multi_class_head_with_the_wrong_number_of_labels_is_refused() {
    let labels: Vec<String> = vec!["one".into(), "two".into()];
    let err = WakeHead::load("timer", &installed("timer"), &labels)
        .err()
        .expect("must fail");
    assert!(
        err.to_string().contains("7 output classes but 2 labels"),
        "{err}"
    );
}

#[test]
fn a_missing_embedding_model_names_the_missing_file() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::copy(
        installed("melspectrogram"),
        dir.path().join("melspectrogram.onnx"),
    )
    .expect("copy");
    let err = SpeechFrontEnd::load(dir.path(), 16, EmbeddingMode::Streaming)
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("embedding_model.onnx"), "{err}");
}

#[test]
fn chunks_of_the_wrong_size_are_input_errors() {
    let dir = installed("melspectrogram")
        .parent()
        .expect("dir")
        .to_path_buf();
    let mut front = SpeechFrontEnd::load(&dir, 16, EmbeddingMode::Windowed).expect("front end");
    let err = front.push_chunk(&[0i16; 1000]).expect_err("must fail");
    assert!(matches!(err, ModelError::Input(_)), "{err}");
    // And the front end still works afterwards.
    assert!(front.push_chunk(&[0i16; 1280]).expect("a good chunk"));
}
