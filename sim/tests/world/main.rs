//! Integration tests of the simulated world, one binary with submodules.

mod cli;
mod determinism;
mod engine;
mod executor;
mod reclaim;
