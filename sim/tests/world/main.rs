//! Integration tests of the simulated world, one binary with submodules.

mod cli;
mod compare;
mod corpus;
mod determinism;
mod engine;
mod executor;
mod fsstress;
mod reclaim;
mod reports;
mod shrink;
mod sweep;
