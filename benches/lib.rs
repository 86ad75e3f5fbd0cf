//! Benchmarks live in this crate's bench targets (`wake.rs`) and in the
//! comparison script `compare_openwakeword.py`; the library is empty.
