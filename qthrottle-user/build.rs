//! Builds the eBPF object, for embedding, with the nightly named in
//! `qthrottle-ebpf/rust-toolchain.toml`. `cargo xtask` installs that nightly and
//! puts a matching `bpf-linker` on PATH.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1") {
        // Userspace-only builds (unit tests of the configuration and the
        // spawner): embed an empty object; loading it fails with a clear error.
        let out = std::env::var("OUT_DIR").context("OUT_DIR not set")?;
        std::fs::write(format!("{out}/qthrottle-ebpf"), b"")
            .context("failed to write placeholder")?;
        return Ok(());
    }
    let toolchain = bpf_toolchain()?;
    // aya-build sets CARGO_ENCODED_RUSTFLAGS for the nested build, which wins
    // over every other rustflags setting; profile rustflags still apply. The
    // programs need BPF CPU v3 for atomics that return the old value. Build
    // scripts inside the nested build run on the host and must not get it.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe {
        std::env::set_var("CARGO_UNSTABLE_PROFILE_RUSTFLAGS", "true");
        std::env::set_var("CARGO_PROFILE_RELEASE_RUSTFLAGS", "-Ctarget-cpu=v3");
        std::env::set_var("CARGO_PROFILE_RELEASE_BUILD_OVERRIDE_RUSTFLAGS", "");
    }
    let ebpf = Package {
        name: "qthrottle-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../qthrottle-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::Custom(&toolchain))
        .context("failed to build the eBPF programs")
}

/// The `channel` line of the eBPF crate's rust-toolchain.toml.
fn bpf_toolchain() -> anyhow::Result<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../qthrottle-ebpf/rust-toolchain.toml"
    );
    println!("cargo::rerun-if-changed={path}");
    let text = std::fs::read_to_string(path).with_context(|| format!("failed to read {path}"))?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_string())
        .next()
        .ok_or_else(|| anyhow!("{path}: no channel line"))
}
