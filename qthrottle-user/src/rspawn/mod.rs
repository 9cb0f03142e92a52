//! qmail-rspawn mode.

/// Runs the spawner (not built yet).
pub fn main() -> std::process::ExitCode {
    std::process::ExitCode::FAILURE
}
