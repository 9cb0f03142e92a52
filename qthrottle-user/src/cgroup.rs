//! The cgroup qmail runs in: finding it, creating it, and moving processes in.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use crate::mounts;

/// The cgroup directory for a configured `cgroup` setting: an absolute path is
/// taken as it is (it must lie under the cgroup2 mount), anything else is
/// relative to the cgroup2 mount.
pub fn resolve(setting: &str) -> anyhow::Result<PathBuf> {
    let mount = mounts::cgroup2_mount()?;
    let path = Path::new(setting);
    if path.is_absolute() {
        if !path.starts_with(&mount) {
            bail!(
                "cgroup {} is not under the cgroup2 mount {}",
                path.display(),
                mount.display()
            );
        }
        return Ok(path.to_path_buf());
    }
    if path
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        bail!("cgroup {setting:?} must be a plain relative path or an absolute one");
    }
    Ok(mount.join(path))
}

/// Creates the cgroup directory if it does not exist yet.
pub fn create(dir: &Path) -> anyhow::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("failed to create cgroup {}", dir.display())),
    }
}

/// Moves process `pid` (0: the caller) into the cgroup.
pub fn attach(dir: &Path, pid: u32) -> anyhow::Result<()> {
    let procs = dir.join("cgroup.procs");
    if !dir.is_dir() {
        bail!(
            "cgroup {} does not exist: is the daemon running?",
            dir.display()
        );
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .with_context(|| format!("failed to open {}", procs.display()))?;
    file.write_all(format!("{pid}\n").as_bytes())
        .with_context(|| format!("failed to move process {pid} into {}", dir.display()))
}

/// Removes the cgroup when it is empty; a cgroup with processes stays.
pub fn remove_if_empty(dir: &Path) -> anyhow::Result<bool> {
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("failed to remove cgroup {}", dir.display())),
    }
}
