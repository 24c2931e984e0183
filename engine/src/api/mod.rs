//! The public handles: [`Engine`] and [`Capsule`] (with [`Commands`]). They hold the
//! engine's parts and delegate every step to [`crate::lifecycle`] and [`crate::command`].

mod capsule;
mod engine;
mod files;

pub use capsule::{Capsule, Commands};
pub use engine::Engine;
pub use files::Files;
