//! cowsim's deterministic world: the executor and its schedulers, the NVMe
//! and memory models, the runner, and everything behind the `sim` command.

pub mod compare;
pub mod determinism;
pub mod device;
pub mod memory;
pub mod pool;
pub mod report;
pub mod runner;
pub mod scheduler;
pub mod seedfile;
pub mod shrink;
pub mod swarm;
pub mod sweep;
pub mod trace;
pub mod world;
