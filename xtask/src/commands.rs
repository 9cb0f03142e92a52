//! The `cargo xtask` commands: set up, build with the host toolchain, then run the
//! daemon, the tests, a benchmark or the linters.

use std::env;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use clap::ValueEnum;

use crate::packages;
use crate::process::{self, say};
use crate::toolchain::{self, HOST, Toolchains};

/// Every package built for the host. The eBPF crate is left out: its host build is a
/// stub whose binary would overwrite `target/release/qthrottle`, the real one having
/// the same name; its programs are built for BPF by qthrottle-user's build script.
const HOST_PACKAGES: &[&str] = &["--workspace", "--exclude", "qthrottle-ebpf"];

const CLIPPY_ARGS: &[&str] = &[
    "clippy",
    "--workspace",
    "--all-targets",
    "--",
    "-D",
    "warnings",
];

/// The benchmarks, each a binary of the tests crate.
#[derive(Clone, Copy, ValueEnum)]
pub enum Bench {
    /// Per-call cost of the eBPF programs and connect() overhead.
    Kernel,
    /// Spawner throughput, CPU and memory per delivery.
    Spawner,
}

impl Bench {
    fn binary(self) -> &'static str {
        match self {
            Bench::Kernel => "bench-kernel",
            Bench::Spawner => "bench-spawner",
        }
    }
}

/// `cargo xtask run`: builds the `qthrottle` binary and becomes its daemon.
pub fn run(debug: bool, daemon_args: &[String]) -> anyhow::Result<ExitCode> {
    require_root("run")?;
    let (workspace, toolchains) = set_up()?;
    let profile = if debug { "debug" } else { "release" };
    say(format!("building qthrottle ({profile})"));
    let mut build = workspace.cargo(&toolchains)?;
    build.args(["build", "--package", "qthrottle-user"]);
    if !debug {
        build.arg("--release");
    }
    process::run(&mut build)?;
    let binary = workspace.target.join(profile).join("qthrottle");
    say(format!("running {} daemon", binary.display()));
    let err = process::command(&binary)
        .arg("daemon")
        .args(daemon_args)
        .exec();
    Err(err).with_context(|| format!("failed to run {}", binary.display()))
}

/// `cargo xtask test`: builds everything and runs the unit and kernel tests.
pub fn test(cargo_args: &[String]) -> anyhow::Result<ExitCode> {
    require_root("test")?;
    let (workspace, toolchains) = set_up()?;
    packages::ensure_test_packages()?;
    workspace.build_release_binaries(&toolchains)?;
    say("running the tests");
    let mut test = workspace.cargo(&toolchains)?;
    test.args(["test", "--release"])
        .args(test_packages(cargo_args))
        .args(cargo_args);
    workspace.test_env(&mut test);
    let (status, tally) = process::test_status(&mut test)?;
    println!(
        "tests: {} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.ignored
    );
    Ok(process::exit_code(status))
}

/// `cargo xtask bench`: builds everything and runs one benchmark program.
pub fn bench(which: Bench, bench_args: &[String]) -> anyhow::Result<ExitCode> {
    require_root("bench")?;
    let (workspace, toolchains) = set_up()?;
    let source = format!("tests/src/bin/{}.rs", which.binary());
    if !workspace.root.join(&source).is_file() {
        bail!(
            "no {} benchmark yet: {source} does not exist",
            which.binary()
        );
    }
    workspace.build_release_binaries(&toolchains)?;
    let binary = workspace.release().join(which.binary());
    say(format!("running {}", binary.display()));
    let mut bench = process::command(&binary);
    bench.args(bench_args);
    workspace.test_env(&mut bench);
    Ok(process::exit_code(process::status(&mut bench)?))
}

/// `cargo xtask lint`: rustfmt check and clippy with warnings denied.
pub fn lint() -> anyhow::Result<ExitCode> {
    let (workspace, toolchains) = set_up()?;
    say("checking formatting");
    let mut fmt = workspace.cargo(&toolchains)?;
    let fmt_ok = process::status(fmt.args(["fmt", "--all", "--check"]))?.success();
    say("running clippy");
    let mut clippy = workspace.cargo(&toolchains)?;
    clippy.args(CLIPPY_ARGS);
    let clippy_ok = process::status(&mut clippy)?.success();
    Ok(if fmt_ok && clippy_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// [`HOST_PACKAGES`], unless the caller names packages itself (`-- -p NAME`):
/// with `--workspace`, cargo would ignore them.
fn test_packages(cargo_args: &[String]) -> &'static [&'static str] {
    let cargo_own = cargo_args.iter().take_while(|arg| *arg != "--");
    let mut names = cargo_own.map(String::as_str);
    if names.any(|arg| arg.starts_with("--package") || arg.starts_with("-p")) {
        return &[];
    }
    HOST_PACKAGES
}

fn require_root(command: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    bail!("`cargo xtask {command}` must run as root: it loads eBPF programs into the kernel")
}

fn set_up() -> anyhow::Result<(Workspace, Toolchains)> {
    let workspace = Workspace::locate()?;
    let toolchains = toolchain::ensure(&workspace.root)?;
    Ok((workspace, toolchains))
}

/// Where the workspace and its build output are.
struct Workspace {
    root: PathBuf,
    /// Absolute; `CARGO_TARGET_DIR` if set, else the workspace's `target`.
    target: PathBuf,
}

impl Workspace {
    fn locate() -> anyhow::Result<Self> {
        let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir
            .parent()
            .context("failed to find the workspace root")?;
        let target = match env::var_os("CARGO_TARGET_DIR").filter(|dir| !dir.is_empty()) {
            Some(dir) => env::current_dir()
                .context("failed to read the current directory")?
                .join(dir),
            None => root.join("target"),
        };
        let root = root.to_owned();
        Ok(Workspace { root, target })
    }

    fn release(&self) -> PathBuf {
        self.target.join("release")
    }

    /// `cargo +HOST` in the workspace, with bpf-linker on PATH.
    fn cargo(&self, toolchains: &Toolchains) -> anyhow::Result<Command> {
        let mut cargo = process::command("cargo");
        cargo
            .arg(format!("+{HOST}"))
            .current_dir(&self.root)
            .env("PATH", toolchains.build_path()?)
            .env("CARGO_TARGET_DIR", &self.target);
        Ok(cargo)
    }

    fn build_release_binaries(&self, toolchains: &Toolchains) -> anyhow::Result<()> {
        say("building all binaries (release)");
        let mut build = self.cargo(toolchains)?;
        build
            .args(["build", "--release", "--bins"])
            .args(HOST_PACKAGES);
        process::run(&mut build)
    }

    /// Tells the tests and benchmarks where the built binaries are.
    fn test_env(&self, command: &mut Command) {
        command
            .env("QTHROTTLE_BIN", self.release().join("qthrottle"))
            .env("QTHROTTLE_TARGET_DIR", self.release());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(args: &[&str]) -> Vec<String> {
        args.iter().map(|arg| arg.to_string()).collect()
    }

    #[test]
    fn tests_cover_the_workspace_unless_packages_are_named() {
        assert_eq!(test_packages(&args(&["limit"])), HOST_PACKAGES);
        assert!(test_packages(&args(&["-p", "qthrottle-user", "--lib"])).is_empty());
        assert!(test_packages(&args(&["--package=qthrottle-tests"])).is_empty());
        assert!(test_packages(&args(&["-pqthrottle-user"])).is_empty());
        let for_the_test_binary = args(&["spawner", "--", "-p"]);
        assert_eq!(test_packages(&for_the_test_binary), HOST_PACKAGES);
    }
}
