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

/// Totals of the `test result:` lines of a cargo test run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Tally {
    /// Adds one `test result: ok. 3 passed; 0 failed; 1 ignored; ...` line.
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result:") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

/// Runs a cargo test `command`, passing its output through while adding up
/// the results of every test binary.
pub fn test_status(command: &mut Command) -> anyhow::Result<(ExitStatus, Tally)> {
    use std::io::{BufRead as _, BufReader, Write as _};
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to run `{}`", describe(command)))?;
    let mut tally = Tally::default();
    if let Some(stdout) = child.stdout.take() {
        let mut out = std::io::stdout().lock();
        for line in BufReader::new(stdout).lines() {
            let line = line.context("failed to read the test output")?;
            tally.add_line(&line);
            let _ = writeln!(out, "{line}");
        }
    }
    let status = child.wait().context("failed to wait for cargo test")?;
    Ok((status, tally))
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

#[cfg(test)]
mod tally_tests {
    use super::Tally;

    #[test]
    fn adds_up_test_result_lines() {
        let mut t = Tally::default();
        t.add_line("test result: ok. 25 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 10.18s");
        t.add_line("test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured");
        t.add_line("running 5 tests");
        assert_eq!(
            t,
            Tally {
                passed: 28,
                failed: 2,
                ignored: 1
            }
        );
    }
}
