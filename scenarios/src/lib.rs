//! cowsim scenarios: workloads, fault profiles and oracles.
