//! Benchmarks live in this crate's bench targets (`wake.rs`,
//! `intent_train.rs`) and in the comparison scripts (`compare_*.py`,
//! `intent.sh`); the library is empty.
