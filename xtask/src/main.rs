//! `cargo xtask`: sets up the toolchains qthrottle needs, builds it, and runs the
//! daemon, the tests, a benchmark or the linters.

mod commands;
mod packages;
mod process;
mod toolchain;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use commands::Bench;

/// Build and run qthrottle. Installs missing toolchains and a matching bpf-linker first.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build qthrottle and run its daemon in the foreground (needs root).
    Run {
        /// Build the debug profile instead of release.
        #[arg(long)]
        debug: bool,
        /// Arguments for `qthrottle daemon`, after `--`.
        #[arg(last = true, value_name = "DAEMON ARGS")]
        daemon_args: Vec<String>,
    },
    /// Build everything and run the unit and kernel tests (needs root).
    Test {
        /// Arguments for `cargo test`, after `--` (a filter, `-p PACKAGE`, `-- --nocapture`).
        #[arg(last = true, value_name = "CARGO TEST ARGS")]
        cargo_args: Vec<String>,
    },
    /// Build everything and run a benchmark (needs root).
    Bench {
        /// Which benchmark to run.
        #[arg(value_enum, default_value_t = Bench::Kernel)]
        which: Bench,
        /// Arguments for the benchmark program, after `--`.
        #[arg(last = true, value_name = "BENCH ARGS")]
        bench_args: Vec<String>,
    },
    /// Check formatting and run clippy on the whole workspace.
    Lint,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { debug, daemon_args } => commands::run(debug, &daemon_args),
        Command::Test { cargo_args } => commands::test(&cargo_args),
        Command::Bench { which, bench_args } => commands::bench(which, &bench_args),
        Command::Lint => commands::lint(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Command {
        let argv = ["cargo xtask"].iter().chain(args);
        Cli::try_parse_from(argv).expect("arguments parse").command
    }

    #[test]
    fn test_passes_everything_after_the_separator_to_cargo() {
        let Command::Test { cargo_args } = parse(&["test", "--", "limit", "--", "--nocapture"])
        else {
            panic!("not the test command");
        };
        assert_eq!(cargo_args, ["limit", "--", "--nocapture"]);
    }

    #[test]
    fn run_takes_daemon_arguments_after_the_separator() {
        let parsed = parse(&["run", "--debug", "--", "--config", "/tmp/q.toml"]);
        let Command::Run { debug, daemon_args } = parsed else {
            panic!("not the run command");
        };
        assert!(debug);
        assert_eq!(daemon_args, ["--config", "/tmp/q.toml"]);
    }

    #[test]
    fn bench_defaults_to_the_kernel() {
        let Command::Bench { which, .. } = parse(&["bench"]) else {
            panic!("not the bench command");
        };
        assert!(matches!(which, Bench::Kernel));
    }

    #[test]
    fn unknown_benchmark_is_bad_usage() {
        assert!(Cli::try_parse_from(["cargo xtask", "bench", "disk"]).is_err());
    }
}
