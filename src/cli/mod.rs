//! The CLI's commands for waves and imports (the binary's own modules; `main.rs` parses).

pub mod import;
pub mod waves;
