//! Child processes: a clean environment, one line saying what is being done, and
//! errors that name the command that failed.

use std::ffi::OsStr;
use std::fmt::Display;
use std::process::{Command, ExitCode, ExitStatus};

use anyhow::{Context as _, bail};

/// Variables that `cargo run` and rustup set for xtask itself. Passed on, they would
/// pin the default toolchain or its libraries in the builds xtask starts.
/// `AYA_BUILD_SKIP` would embed an empty eBPF object, which xtask never wants.
const NOT_INHERITED: &[&str] = &[
    "AYA_BUILD_SKIP",
    "CARGO",
    "LD_LIBRARY_PATH",
    "RUSTUP_TOOLCHAIN",
    "RUSTUP_TOOLCHAIN_SOURCE",
    "RUST_RECURSION_COUNT",
];

/// A command for `program` with the variables above removed.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    for name in NOT_INHERITED {
        command.env_remove(name);
    }
    command
}

/// Tells the user, in one line, what xtask is doing.
pub fn say(what: impl Display) {
    eprintln!("xtask: {what}");
}

/// Runs `command` and fails unless it exits 0.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = status(command)?;
    if !status.success() {
        bail!("`{}` failed: {status}", describe(command));
    }
    Ok(())
}

/// Runs `command` and returns how it ended.
pub fn status(command: &mut Command) -> anyhow::Result<ExitStatus> {
    command
        .status()
        .with_context(|| format!("failed to run `{}`", describe(command)))
}

/// Runs `command` and returns its standard output; fails unless it exits 0.
pub fn output(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("failed to run `{}`", describe(command)))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        bail!(
            "`{}` failed: {}: {}",
            describe(command),
            output.status,
            stderr.trim()
        );
    }
    String::from_utf8(output.stdout)
        .with_context(|| format!("failed to read the output of `{}`", describe(command)))
}

/// The exit code that passes a child's status on: its own code, or 1 after a signal.
pub fn exit_code(status: ExitStatus) -> ExitCode {
    let code = status.code().and_then(|code| u8::try_from(code).ok());
    ExitCode::from(code.unwrap_or(1))
}

fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(
        command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned()),
    );
    words.join(" ")
}
