//! Installs what building qthrottle needs: the host toolchain, the nightly that
//! compiles the eBPF programs (with rust-src), and a bpf-linker built against that
//! nightly's own LLVM, kept per nightly under the user's data directory.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context as _, bail};

use crate::process::{self, say};

/// The toolchain that builds and tests the userspace crates (aya 0.16 needs 1.98).
pub const HOST: &str = "1.99.1";
const HOST_COMPONENTS: &[&str] = &["clippy", "rustfmt"];
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src"];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Names the nightly; the eBPF crate's build script reads the same file.
const NIGHTLY_FILE: &str = "qthrottle-ebpf/rust-toolchain.toml";

/// The installed toolchains, ready to build.
pub struct Toolchains {
    linker_dir: PathBuf,
}

impl Toolchains {
    /// PATH with bpf-linker's directory first, for builds that link eBPF programs.
    pub fn build_path(&self) -> anyhow::Result<OsString> {
        let inherited = env::var_os("PATH").unwrap_or_default();
        let dirs = [self.linker_dir.clone()]
            .into_iter()
            .chain(env::split_paths(&inherited));
        env::join_paths(dirs).context("failed to build PATH with bpf-linker's directory")
    }
}

/// Installs whatever is missing, saying so in one line per step.
pub fn ensure(workspace: &Path) -> anyhow::Result<Toolchains> {
    let nightly = nightly_name(workspace)?;
    ensure_toolchain(HOST, HOST_COMPONENTS)?;
    ensure_toolchain(&nightly, NIGHTLY_COMPONENTS)?;
    let linker_dir = ensure_bpf_linker(&nightly)?;
    say(format!(
        "toolchains ready: {HOST}, {nightly}, bpf-linker {BPF_LINKER_VERSION}"
    ));
    Ok(Toolchains { linker_dir })
}

/// The `toolchain.channel` of the eBPF crate's rust-toolchain.toml.
fn nightly_name(workspace: &Path) -> anyhow::Result<String> {
    let path = workspace.join(NIGHTLY_FILE);
    let text =
        fs::read_to_string(&path).with_context(|| format!("failed to read {}", path.display()))?;
    let file: toml::Table = text
        .parse()
        .with_context(|| format!("failed to parse {}", path.display()))?;
    let channel = file.get("toolchain").and_then(|table| table.get("channel"));
    match channel.and_then(toml::Value::as_str) {
        Some(name) => Ok(name.to_owned()),
        None => bail!("{}: no toolchain.channel", path.display()),
    }
}

/// Installs toolchain `name` with `components`, or adds the components it lacks.
fn ensure_toolchain(name: &str, components: &[&str]) -> anyhow::Result<()> {
    let toolchains = process::output(rustup().args(["toolchain", "list"]))?;
    if !listed(&toolchains, name) {
        say(format!(
            "installing Rust {name} with {}",
            components.join(", ")
        ));
        let components = components.join(",");
        let install = ["toolchain", "install", name, "--profile", "minimal"];
        return process::run(rustup().args(install).args(["--component", &components]));
    }
    let missing = missing_components(name, components)?;
    if missing.is_empty() {
        return Ok(());
    }
    say(format!("adding {} to Rust {name}", missing.join(", ")));
    let mut add = rustup();
    add.args(["component", "add", "--toolchain", name])
        .args(missing);
    process::run(&mut add)
}

fn missing_components<'a>(toolchain: &str, wanted: &[&'a str]) -> anyhow::Result<Vec<&'a str>> {
    let list = ["component", "list", "--installed", "--toolchain", toolchain];
    let installed = process::output(rustup().args(list))?;
    let absent = wanted
        .iter()
        .filter(|component| !listed(&installed, component));
    Ok(absent.copied().collect())
}

fn rustup() -> std::process::Command {
    let mut command = process::command("rustup");
    command.stdin(Stdio::null());
    command
}

/// Whether a rustup listing has `name`, alone or followed by a target triple.
fn listed(listing: &str, name: &str) -> bool {
    listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .any(|item| {
            item.strip_prefix(name)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
        })
}

/// Builds bpf-linker for `nightly` unless a working one is there; returns its directory.
fn ensure_bpf_linker(nightly: &str) -> anyhow::Result<PathBuf> {
    let root = data_dir()?.join("qthrottle/bpf-linker").join(nightly);
    let bin_dir = root.join("bin");
    if linker_works(&bin_dir.join("bpf-linker")) {
        return Ok(bin_dir);
    }
    say(format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the LLVM of {nightly} into {} \
         (about a minute)",
        root.display()
    ));
    let llvm_major = link_llvm(nightly, &root.join("llvm"))?;
    install_linker(nightly, &root, llvm_major)?;
    Ok(bin_dir)
}

/// `$XDG_DATA_HOME`, or `~/.local/share`.
fn data_dir() -> anyhow::Result<PathBuf> {
    let xdg = env::var_os("XDG_DATA_HOME").map(PathBuf::from);
    if let Some(dir) = xdg.filter(|dir| dir.is_absolute()) {
        return Ok(dir);
    }
    let home = env::var_os("HOME").filter(|home| !home.is_empty());
    let home = home.context("failed to find the data directory: HOME is not set")?;
    Ok(PathBuf::from(home).join(".local/share"))
}

/// Whether `bin` runs and is the wanted version (it fails if its libLLVM is gone).
fn linker_works(bin: &Path) -> bool {
    let output = process::command(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    output.is_ok_and(|output| {
        output.status.success()
            && String::from_utf8_lossy(&output.stdout).contains(BPF_LINKER_VERSION)
    })
}

/// Makes `prefix/lib` hold the nightly's libLLVM as `libLLVM.so` and under its own
/// name, which is what bpf-linker's build looks for. Returns the LLVM major version.
fn link_llvm(nightly: &str, prefix: &Path) -> anyhow::Result<u32> {
    let sysroot = process::output(rustup().args(["run", nightly, "rustc", "--print", "sysroot"]))?;
    let library = find_libllvm(&Path::new(sysroot.trim()).join("lib"))?;
    let file_name = library.file_name().context("failed to name libLLVM")?;
    let lib_dir = prefix.join("lib");
    fs::create_dir_all(&lib_dir)
        .with_context(|| format!("failed to create {}", lib_dir.display()))?;
    for name in [OsString::from("libLLVM.so"), file_name.to_owned()] {
        replace_symlink(&library, &lib_dir.join(name))?;
    }
    llvm_major(&file_name.to_string_lossy())
}

/// The real shared library `libLLVM.so.<version>-rust-...` in a sysroot's lib/ (the
/// `libLLVM-<major>-rust-...so` next to it is a tiny linker script).
fn find_libllvm(lib_dir: &Path) -> anyhow::Result<PathBuf> {
    let entries =
        fs::read_dir(lib_dir).with_context(|| format!("failed to read {}", lib_dir.display()))?;
    let found = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("libLLVM.so.") && path.is_file()
        });
    found.with_context(|| format!("failed to find libLLVM.so.* in {}", lib_dir.display()))
}

fn replace_symlink(target: &Path, link: &Path) -> anyhow::Result<()> {
    match fs::remove_file(link) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            return Err(err).with_context(|| format!("failed to remove {}", link.display()));
        }
        _ => {}
    }
    symlink(target, link).with_context(|| format!("failed to create {}", link.display()))
}

/// `23` from `libLLVM.so.23.1-rust-1.101.0-nightly`.
fn llvm_major(file_name: &str) -> anyhow::Result<u32> {
    let version = file_name.strip_prefix("libLLVM.so.").unwrap_or_default();
    let major = version.split('.').next().unwrap_or_default();
    major
        .parse()
        .with_context(|| format!("failed to read the LLVM version from {file_name}"))
}

fn install_linker(nightly: &str, root: &Path, llvm_major: u32) -> anyhow::Result<()> {
    let mut cargo = process::command("cargo");
    cargo
        .arg(format!("+{nightly}"))
        .args([
            "install",
            "--quiet",
            "--locked",
            "--force",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{llvm_major}")])
        .arg("--root")
        .arg(root)
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .env("LLVM_PREFIX", root.join("llvm"))
        // Build in cargo's own scratch directory, not in a workspace's target dir.
        .env_remove("CARGO_TARGET_DIR")
        .stdin(Stdio::null());
    process::run(&mut cargo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_matches_whole_names_with_or_without_a_triple() {
        let listing = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                       1.99.10-x86_64-unknown-linux-gnu\n\
                       nightly-2026-10-29-x86_64-unknown-linux-gnu\n\
                       rust-src\n";
        assert!(listed(listing, "stable"));
        assert!(listed(listing, "nightly-2026-10-29"));
        assert!(listed(listing, "rust-src"));
        assert!(!listed(listing, "1.99.1"));
        assert!(!listed(listing, "rust-std"));
    }

    #[test]
    fn llvm_major_comes_from_the_library_name() {
        let major = llvm_major("libLLVM.so.23.1-rust-1.101.0-nightly").expect("a version");
        assert_eq!(major, 23);
        assert!(llvm_major("libLLVM.so").is_err());
    }

    #[test]
    fn libllvm_is_the_real_library_not_the_linker_script() {
        let dir = env::temp_dir().join(format!("xtask-libllvm-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("create a scratch lib dir");
        fs::write(dir.join("libLLVM-23-rust-1.101.0-nightly.so"), "INPUT(x)").expect("write");
        fs::write(dir.join("libLLVM.so.23.1-rust-1.101.0-nightly"), "ELF").expect("write");
        let found = find_libllvm(&dir);
        fs::remove_dir_all(&dir).expect("remove the scratch lib dir");
        let name = found
            .expect("found")
            .file_name()
            .map(|name| name.to_owned());
        assert_eq!(
            name.unwrap_or_default(),
            "libLLVM.so.23.1-rust-1.101.0-nightly"
        );
    }
}
