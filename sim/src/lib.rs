//! cowsim's deterministic world.
