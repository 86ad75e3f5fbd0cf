//! kith, the agent: the one crate that knows about files on disk, package
//! registries, command lines, configuration and the network (the HTTP API, the mesh). It wires `kith-models`
//! (inference) and `kith-hal` (the device) together.

pub mod api;
pub mod catalog;
pub mod config;
pub mod generate;
pub mod intent;
pub mod listen;
pub mod mesh;
pub mod notify;
pub mod progress;
pub mod show_peers;
pub mod store;
pub mod up;
pub mod worker;
