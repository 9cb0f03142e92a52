//! Where the cgroup2 and bpf filesystems are mounted, read from
//! /proc/self/mountinfo, and mounting bpffs when it is missing.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// One line of /proc/self/mountinfo: its mount point and filesystem type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub point: PathBuf,
    pub fstype: String,
}

/// Parses mountinfo text (see proc(5)): field 5 is the mount point, and the
/// filesystem type follows the lone `-` separator.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let point = fields.nth(4)?;
            let fstype = fields.skip_while(|f| *f != "-").nth(1)?;
            Some(Mount {
                point: PathBuf::from(unescape(point)),
                fstype: fstype.to_string(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|o| o.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(o)) => {
                out.push(
                    o.iter()
                        .fold(0u8, |acc, b| acc.wrapping_mul(8) + (b - b'0')),
                );
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mounts() -> anyhow::Result<Vec<Mount>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context("failed to read /proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text))
}

/// The cgroup v2 mount point: /sys/fs/cgroup on a unified system,
/// /sys/fs/cgroup/unified on a hybrid one.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let all = mounts()?;
    all.iter()
        .filter(|m| m.fstype == "cgroup2")
        .min_by_key(|m| m.point.components().count())
        .map(|m| m.point.clone())
        .context("no cgroup2 filesystem is mounted (see /proc/self/mountinfo)")
}

/// The mount whose point is the longest prefix of `path`.
fn mount_of<'a>(all: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    all.iter()
        .filter(|m| path.starts_with(&m.point))
        .max_by_key(|m| m.point.components().count())
}

/// Makes sure `pin_dir` lies on a bpf filesystem, mounting one at
/// /sys/fs/bpf when the pin directory is under it and nothing is mounted
/// there. Returns true when it mounted one. A pin directory elsewhere must
/// already be on bpffs: mounting over an arbitrary parent would hide it.
pub fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<bool> {
    let all = mounts()?;
    if mount_of(&all, pin_dir).is_some_and(|m| m.fstype == "bpf") {
        return Ok(false);
    }
    let default = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(default) {
        bail!(
            "pin_path {} is not on a bpf filesystem: put it under /sys/fs/bpf or mount bpffs there first",
            pin_dir.display()
        );
    }
    if let Some(m) = all.iter().find(|m| m.point == default) {
        bail!("{} is a {} mount, not bpf", default.display(), m.fstype);
    }
    std::fs::create_dir_all(default)
        .with_context(|| format!("failed to create {}", default.display()))?;
    let flags = nix::mount::MsFlags::MS_NOSUID
        | nix::mount::MsFlags::MS_NODEV
        | nix::mount::MsFlags::MS_NOEXEC;
    nix::mount::mount(Some("bpf"), default, Some("bpf"), flags, None::<&str>)
        .with_context(|| format!("failed to mount bpffs on {}", default.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
41 30 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
42 30 0:39 / /sys/fs/cgroup/cpu,cpuacct rw shared:11 - cgroup cgroup rw,cpu,cpuacct
50 22 0:40 / /mnt/with\\040space rw shared:12 opt:1 - bpf bpf rw
";

    #[test]
    fn finds_cgroup2_on_hybrid_layout() {
        let all = parse_mountinfo(HYBRID);
        let cg2: Vec<_> = all.iter().filter(|m| m.fstype == "cgroup2").collect();
        assert_eq!(cg2.len(), 1);
        assert_eq!(cg2[0].point, Path::new("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn unescapes_mount_points_and_skips_optional_fields() {
        let all = parse_mountinfo(HYBRID);
        let bpf = all.iter().find(|m| m.fstype == "bpf").expect("bpf mount");
        assert_eq!(bpf.point, Path::new("/mnt/with space"));
    }

    #[test]
    fn longest_prefix_wins() {
        let all = parse_mountinfo(HYBRID);
        let m = mount_of(&all, Path::new("/sys/fs/cgroup/unified/qthrottle")).expect("mount");
        assert_eq!(m.fstype, "cgroup2");
        let m = mount_of(&all, Path::new("/sys/fs/bpf/qthrottle")).expect("mount");
        assert_eq!(m.fstype, "ext4");
    }
}
