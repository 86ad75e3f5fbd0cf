//! kith, the agent: the one crate that knows about files on disk, package
//! registries, command lines and (later) the network. It wires `kith-models`
//! (inference) and `kith-hal` (the device) together.

pub mod catalog;
pub mod generate;
pub mod listen;
pub mod store;
