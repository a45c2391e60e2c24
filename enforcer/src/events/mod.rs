//! Kernel -> ring buffer -> decode -> enrich -> sink. Every denied call becomes one JSON line;
//! losses counted by the kernel become `events.lost` lines and a warning, never silence.

pub mod decode;
pub mod record;
mod sink;

pub use sink::Sink;
