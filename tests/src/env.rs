//! A test environment: its own cgroup, pin path, control socket, state
//! directory and configuration file, removed again when it is dropped.
//!
//! Each environment also owns a loopback network `127.0.NET.0/24` chosen by
//! the test, so that listeners of tests running in parallel never share an
//! address. The kernel tests use NET numbers from 100 to 149; the benchmark
//! uses 250.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The `qthrottle` binary under test: `$QTHROTTLE_BIN`, else the workspace's
/// `target/release/qthrottle`.
pub fn qthrottle_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("QTHROTTLE_BIN") {
        return PathBuf::from(path);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().unwrap_or(manifest);
    workspace.join("target/release/qthrottle")
}

/// True when running as root. Prints why a test is skipped when not.
pub fn have_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipping {test}: needs root (cgroups, bpf programs and bpffs)");
    false
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context("failed to read /proc/self/mountinfo")?;
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mount) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mount));
        }
    }
    bail!("failed to find a cgroup2 mount in /proc/self/mountinfo")
}

/// One destination group of the configuration.
#[derive(Debug, Clone, Default)]
pub struct Group {
    pub name: String,
    pub limit: u32,
    pub domains: Vec<String>,
    pub mx_suffixes: Vec<String>,
    pub addresses: Vec<String>,
}

impl Group {
    pub fn new(name: &str, limit: u32) -> Group {
        Group {
            name: name.to_owned(),
            limit,
            ..Group::default()
        }
    }

    /// Adds a literal address or CIDR range.
    pub fn address(mut self, address: impl ToString) -> Group {
        self.addresses.push(address.to_string());
        self
    }

    pub fn domain(mut self, domain: &str) -> Group {
        self.domains.push(domain.to_owned());
        self
    }

    pub fn mx_suffix(mut self, suffix: &str) -> Group {
        self.mx_suffixes.push(suffix.to_owned());
        self
    }
}

/// What goes into an environment's configuration file besides its paths.
#[derive(Debug, Clone)]
pub struct Setup {
    pub net: u8,
    pub ports: Vec<u16>,
    pub default_limit: u32,
    pub nameservers: Vec<String>,
    pub groups: Vec<Group>,
}

impl Setup {
    /// Port 25 only, default limit 10, no groups, on `127.0.NET.0/24`.
    pub fn new(net: u8) -> Setup {
        Setup {
            net,
            ports: vec![25],
            default_limit: 10,
            nameservers: vec![],
            groups: vec![],
        }
    }

    pub fn ports(mut self, ports: &[u16]) -> Setup {
        self.ports = ports.to_vec();
        self
    }

    pub fn default_limit(mut self, limit: u32) -> Setup {
        self.default_limit = limit;
        self
    }

    /// A nameserver as "IP" or "IP:PORT".
    pub fn nameserver(mut self, server: impl ToString) -> Setup {
        self.nameservers.push(server.to_string());
        self
    }

    pub fn group(mut self, group: Group) -> Setup {
        self.groups.push(group);
        self
    }

    /// Creates the environment's directory and writes its configuration.
    pub fn build(self) -> Result<TestEnv> {
        TestEnv::create(self)
    }
}

/// One group as `qthrottle status --json` shows it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct GroupStatus {
    pub name: String,
    pub limit: u64,
    pub open: u64,
    pub allowed: u64,
    pub refused: u64,
    pub domains: Vec<String>,
    pub addresses: Vec<String>,
    pub conflicts: serde_json::Value,
}

/// Counts at or above this are a counter that went below zero.
pub const WRAPPED: u64 = 1 << 31;

impl GroupStatus {
    /// Whether `address` is a member, written as a host address with or
    /// without its /32 or /128.
    pub fn has_address(&self, address: &str) -> bool {
        self.addresses.iter().any(|a| same_address(a, address))
    }
}

fn same_address(shown: &str, wanted: &str) -> bool {
    let strip = |s: &str| -> String {
        let s = s.trim();
        let s = s
            .strip_suffix("/32")
            .or_else(|| s.strip_suffix("/128"))
            .unwrap_or(s);
        s.strip_prefix("::ffff:")
            .filter(|v4| v4.contains('.'))
            .unwrap_or(s)
            .to_owned()
    };
    strip(shown) == strip(wanted)
}

/// The output of one `qthrottle` command.
#[derive(Debug)]
pub struct CliOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    fn from_output(output: Output) -> CliOutput {
        CliOutput {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Fails with the whole output unless the command exited 0.
    pub fn ok(self) -> Result<CliOutput> {
        if self.code != Some(0) {
            bail!(
                "qthrottle exited with {:?}: {}{}",
                self.code,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A cgroup, pin path, socket, state directory and configuration file of
/// one test. Dropping it runs `qthrottle unload`, kills whatever is left in
/// the cgroup, and removes the cgroup, the pins and the directory.
#[derive(Debug)]
pub struct TestEnv {
    setup: Setup,
    name: String,
    dir: PathBuf,
    cgroup: PathBuf,
    pin_path: PathBuf,
}

impl TestEnv {
    fn create(setup: Setup) -> Result<TestEnv> {
        let name = format!(
            "qt-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(&name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).context("failed to remove an old test directory")?;
        }
        std::fs::create_dir_all(dir.join("state"))
            .with_context(|| format!("failed to create {}", dir.display()))?;
        let env = TestEnv {
            cgroup: cgroup2_mount()?.join(&name),
            pin_path: PathBuf::from("/sys/fs/bpf").join(&name),
            setup,
            name,
            dir,
        };
        env.write_config()?;
        Ok(env)
    }

    /// The unique name: cgroup name and last part of the pin path.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `127.0.NET.HOST`.
    pub fn addr(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, self.setup.net, host)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("qthrottle.toml")
    }

    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup
    }

    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    pub fn socket_path(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    pub fn setup(&self) -> &Setup {
        &self.setup
    }

    /// The configuration file text for this environment's setup.
    pub fn config_text(&self) -> String {
        let s = &self.setup;
        let mut text = String::new();
        let ports: Vec<String> = s.ports.iter().map(u16::to_string).collect();
        let _ = writeln!(text, "# qthrottle test configuration for {}", self.name);
        let _ = writeln!(text, "ports = [{}]", ports.join(", "));
        let _ = writeln!(text, "default_limit = {}", s.default_limit);
        let _ = writeln!(text, "cgroup = {}", quote(&self.name));
        let _ = writeln!(
            text,
            "pin_path = {}",
            quote(&self.pin_path.to_string_lossy())
        );
        let _ = writeln!(
            text,
            "socket = {}",
            quote(&self.socket_path().to_string_lossy())
        );
        let state = self.dir.join("state");
        let _ = writeln!(text, "state_dir = {}", quote(&state.to_string_lossy()));
        if !s.nameservers.is_empty() {
            let _ = writeln!(text, "\n[dns]\nnameservers = {}", list(&s.nameservers));
            let _ = writeln!(text, "timeout = 2");
        }
        for group in &s.groups {
            text.push_str(&group_text(group));
        }
        text
    }

    /// Writes the configuration file from the setup.
    pub fn write_config(&self) -> Result<()> {
        self.write_config_text(&self.config_text())
    }

    /// Replaces the configuration file with `text`.
    pub fn write_config_text(&self, text: &str) -> Result<()> {
        let path = self.config_path();
        std::fs::write(&path, text).with_context(|| format!("failed to write {}", path.display()))
    }

    /// Runs `qthrottle ARGS... --config PATH` and collects its output.
    pub fn cli(&self, args: &[&str]) -> Result<CliOutput> {
        let output = self
            .command()
            .args(args)
            .arg("--config")
            .arg(self.config_path())
            .output()
            .with_context(|| format!("failed to run {} {args:?}", qthrottle_bin().display()))?;
        Ok(CliOutput::from_output(output))
    }

    /// A `qthrottle` command with `QTHROTTLE_CONFIG` set to this
    /// environment's file; the caller adds the arguments.
    pub fn command(&self) -> Command {
        let mut command = Command::new(qthrottle_bin());
        command.env("QTHROTTLE_CONFIG", self.config_path());
        command
    }

    /// Sends one JSON request line to the daemon's control socket and
    /// returns its one-line answer, parsed.
    pub fn control(&self, request: &serde_json::Value) -> Result<serde_json::Value> {
        let path = self.socket_path();
        let stream = UnixStream::connect(&path)
            .with_context(|| format!("failed to connect to {}", path.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        writeln!(&stream, "{request}").context("failed to send a control request")?;
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .context("failed to read the answer")?;
        serde_json::from_str(&line).with_context(|| format!("failed to parse answer {line:?}"))
    }

    /// `qthrottle status --json`, parsed.
    pub fn status(&self) -> Result<Vec<GroupStatus>> {
        let out = self.cli(&["status", "--json"])?.ok()?;
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("failed to parse status output: {}", out.stdout))
    }

    /// The status of one group; an error if it is not shown.
    pub fn group_status(&self, name: &str) -> Result<GroupStatus> {
        let all = self.status()?;
        let names: Vec<&str> = all.iter().map(|g| g.name.as_str()).collect();
        let found = all.iter().find(|g| g.name == name).cloned();
        found.with_context(|| format!("group {name} not in status (groups: {names:?})"))
    }

    /// Polls the status of group `name` until `ready` holds, for at most
    /// `timeout`; returns the last status seen either way, and whether it held.
    pub fn wait_group(
        &self,
        name: &str,
        timeout: Duration,
        ready: impl Fn(&GroupStatus) -> bool,
    ) -> Result<(GroupStatus, bool)> {
        let start = Instant::now();
        loop {
            let status = self.group_status(name);
            if let Ok(s) = &status
                && ready(s)
            {
                return Ok((s.clone(), true));
            }
            if start.elapsed() >= timeout {
                return status.map(|s| (s, false));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn cleanup(&self) {
        if self.pin_path.exists()
            && let Ok(out) = self.cli(&["unload"])
            && out.code != Some(0)
        {
            eprintln!(
                "{}: qthrottle unload: {}{}",
                self.name, out.stdout, out.stderr
            );
        }
        remove_cgroup(&self.cgroup);
        if self.pin_path.exists() {
            let _ = std::fs::remove_dir_all(&self.pin_path);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Kills every process left in `cgroup` and removes it.
pub fn remove_cgroup(cgroup: &Path) {
    if !cgroup.exists() {
        return;
    }
    let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
    for _ in 0..100 {
        if std::fs::remove_dir(cgroup).is_ok() || !cgroup.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("failed to remove cgroup {}", cgroup.display());
}

fn group_text(group: &Group) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "\n[[group]]");
    let _ = writeln!(text, "name = {}", quote(&group.name));
    let _ = writeln!(text, "limit = {}", group.limit);
    for (key, values) in [
        ("domains", &group.domains),
        ("mx_suffixes", &group.mx_suffixes),
        ("addresses", &group.addresses),
    ] {
        if !values.is_empty() {
            let _ = writeln!(text, "{key} = {}", list(values));
        }
    }
    text
}

fn quote(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn list(values: &[String]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| quote(v)).collect();
    format!("[{}]", quoted.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_text_has_paths_and_groups() {
        let env = Setup::new(9)
            .default_limit(2)
            .nameserver("127.0.0.1:5300")
            .group(
                Group::new("g", 3)
                    .address("127.0.9.1")
                    .address("127.0.9.0/28"),
            )
            .build()
            .expect("build env");
        let value: toml::Table = toml::from_str(&env.config_text()).expect("valid toml");
        assert_eq!(value["default_limit"].as_integer(), Some(2));
        assert_eq!(value["ports"][0].as_integer(), Some(25));
        assert_eq!(value["cgroup"].as_str(), Some(env.name()));
        assert_eq!(value["group"][0]["limit"].as_integer(), Some(3));
        assert_eq!(
            value["group"][0]["addresses"][1].as_str(),
            Some("127.0.9.0/28")
        );
        assert_eq!(
            value["dns"]["nameservers"][0].as_str(),
            Some("127.0.0.1:5300")
        );
        assert!(env.config_path().exists());
    }

    #[test]
    fn addresses_compare_without_host_prefix() {
        assert!(same_address("127.0.1.1/32", "127.0.1.1"));
        assert!(same_address("::1/128", "::1"));
        assert!(same_address("::ffff:127.0.1.1", "127.0.1.1"));
        assert!(!same_address("127.0.1.0/24", "127.0.1.0"));
    }

    #[test]
    fn finds_cgroup2_mount() {
        let mount = cgroup2_mount().expect("cgroup2 mount");
        assert!(mount.join("cgroup.procs").exists());
    }
}
