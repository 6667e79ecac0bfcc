//! The benchmarks of `cordon-bench`, as a library so tests can run them.

pub mod fleet;
