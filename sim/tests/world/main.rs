//! Integration tests of the simulated world, one binary with submodules.

mod cli;
mod compare;
mod determinism;
mod engine;
mod executor;
mod reclaim;
mod sweep;
