//! The public handles: [`Engine`] and [`Capsule`] (with [`Commands`] and [`Ptys`]), and
//! the handles of running commands ([`CommandHandle`], [`PtyHandle`]). They hold the
//! engine's parts and delegate every step to [`crate::lifecycle`] and [`crate::command`].

mod capsule;
mod engine;
mod files;
mod handles;

pub use capsule::{Capsule, Commands, Ptys};
pub use engine::Engine;
pub use files::Files;
pub use handles::{CommandHandle, OutputStream, PtyHandle};
