//! Architecture-specific CPU and memory setup.

pub mod x86_64;
