//! Scenario tests live in this crate's test targets (`speech.rs`); the
//! library is empty.
