//! Debian packages the tests run: installed with apt-get when their command is missing.

use std::env;
use std::process::Stdio;

use anyhow::bail;

use crate::process::{self, say};

/// A program the tests run, and the Debian package that ships it.
struct Package {
    command: &'static str,
    package: &'static str,
}

const TEST_PACKAGES: &[Package] = &[Package {
    command: "swaks",
    package: "swaks",
}];

/// Installs the packages whose command is not on PATH.
pub fn ensure_test_packages() -> anyhow::Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    say(format!("installing Debian packages: {}", missing.join(" ")));
    apt_get(&["update", "-qq"])?;
    let install = ["install", "-y", "-qq", "--no-install-recommends"];
    apt_get(&[&install[..], &missing].concat())?;
    if let Some(package) = missing_packages().first() {
        bail!("failed to find the command of package {package} after installing it");
    }
    Ok(())
}

/// The packages whose command is not on PATH.
fn missing_packages() -> Vec<&'static str> {
    let absent = TEST_PACKAGES
        .iter()
        .filter(|package| !on_path(package.command));
    absent.map(|package| package.package).collect()
}

fn apt_get(args: &[&str]) -> anyhow::Result<()> {
    let mut command = process::command("apt-get");
    command
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    process::run(&mut command)
}

fn on_path(command: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|path| env::split_paths(&path).any(|dir| dir.join(command).is_file()))
}
