//! The configuration file: its typed form, where it lives, how it is read and
//! validated, and the in-place edits behind `qthrottle limit`.
//!
//! Every problem in a file is reported as `PATH:LINE: FIELD: what is wrong`, and
//! a file with any problem is rejected whole. Group fields are named by their
//! position in the file, counting from zero: `group[0].limit` is the limit of
//! the first `[[group]]`.

mod check;
mod edit;
mod layout;
mod parse;
mod reader;
#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

pub use edit::{remove_group, set_group};

/// Where the configuration is read from when neither flag nor environment names a file.
pub const DEFAULT_PATH: &str = "/etc/qthrottle/qthrottle.toml";
/// Environment variable naming the configuration file.
pub const ENV_VAR: &str = "QTHROTTLE_CONFIG";

pub const DEFAULT_PORTS: [u16; 1] = [25];
pub const DEFAULT_LIMIT: u32 = 10;
pub const DEFAULT_CGROUP: &str = "qthrottle";
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/qthrottle";
pub const DEFAULT_SOCKET: &str = "/run/qthrottle/control.sock";
pub const DEFAULT_STATE_DIR: &str = "/run/qthrottle";
pub const DEFAULT_MAX_GROUPS: u32 = 4096;
pub const DEFAULT_MAX_DESTINATIONS: u32 = 65536;
pub const DEFAULT_MAX_ADDRESSES: u32 = 65536;
/// Default size of the kernel's table of counted connections.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 65536;
pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(86_400);
pub const DEFAULT_DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Port used for a nameserver given without one.
pub const DNS_PORT: u16 = 53;
pub const DEFAULT_QMAIL_DIR: &str = "/var/qmail";
pub const DEFAULT_CONCURRENCY: u32 = 120;
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_HOLD_QUEUE: usize = 10_000;

/// Highest connection limit a group (or the default) may have.
pub const MAX_LIMIT: u32 = 1_000_000;
/// Longest group name in bytes: the kernel keeps names NUL-terminated.
pub const MAX_GROUP_NAME: usize = qthrottle_common::NAME_LEN - 1;

/// The whole configuration, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Limited TCP destination ports, without duplicates.
    pub ports: Vec<u16>,
    /// Limit per destination for destinations in no group.
    pub default_limit: u32,
    /// Relative to the cgroup2 mount, or absolute.
    pub cgroup: String,
    /// bpffs directory for the pinned maps and links.
    pub pin_path: PathBuf,
    /// The daemon's control socket.
    pub socket: PathBuf,
    /// Group given read and write access to the control socket.
    pub socket_group: Option<String>,
    /// Where the daemon keeps its state file.
    pub state_dir: PathBuf,
    /// What the kernel does with a connect it cannot count because a map is full.
    pub map_full: MapFull,
    /// Size of the kernel's group table, the default group included.
    pub max_groups: u32,
    /// Size of the kernel's destination (address and range) map.
    pub max_destinations: u32,
    /// Size of the kernel's per-address counters for destinations in no group.
    pub max_addresses: u32,
    /// Size of the kernel's table of counted open connections.
    pub max_connections: u32,
    pub dns: DnsConfig,
    pub rspawn: RspawnConfig,
    /// Groups in file order.
    pub groups: Vec<GroupConfig>,
}

/// Behaviour of the kernel programs when a map is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MapFull {
    /// Let the connect through uncounted.
    #[default]
    Open,
    /// Refuse the connect.
    Closed,
}

/// How names are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Nameservers to ask; empty means the system's (/etc/resolv.conf).
    pub nameservers: Vec<SocketAddr>,
    /// Floor for re-resolution.
    pub min_ttl: Duration,
    /// Ceiling for re-resolution.
    pub max_ttl: Duration,
    /// Time allowed per query.
    pub timeout: Duration,
}

/// The spawner (qmail-rspawn mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RspawnConfig {
    pub qmail_dir: PathBuf,
    pub wire: Wire,
    /// Concurrency announced to qmail-send; at most [`Wire::max_concurrency`].
    pub concurrency: u32,
    /// How long a delivery may wait for a slot before it ends with a Z report.
    pub hold_timeout: Duration,
    /// Most deliveries waiting per group.
    pub hold_queue: usize,
}

/// Size of the delivery numbers of qmail-send's spawn protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Wire {
    /// Stock qmail-send.
    #[default]
    OneByte,
    /// Big-concurrency qmail-send: little-endian two-byte numbers.
    TwoByte,
}

impl Wire {
    /// The highest concurrency the wire format can announce.
    pub fn max_concurrency(self) -> u32 {
        match self {
            Wire::OneByte => u32::from(u8::MAX),
            Wire::TwoByte => u32::from(u16::MAX),
        }
    }
}

/// One destination group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// 1 to [`MAX_GROUP_NAME`] bytes of `[A-Za-z0-9._-]`, unique.
    pub name: String,
    /// Most open connections toward the group; 0 refuses every connection.
    pub limit: u32,
    /// Lowercase, without a trailing dot.
    pub domains: Vec<String>,
    /// Lowercase, with a leading dot and without a trailing one (`.google.com`).
    pub mx_suffixes: Vec<String>,
    /// Networks; a bare address is a /32 or /128, an IPv4-mapped IPv6 range
    /// is stored as IPv4, and a range with host bits set is refused.
    pub addresses: Vec<IpNet>,
    /// Line of the group's `[[group]]` header.
    pub line: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ports: DEFAULT_PORTS.to_vec(),
            default_limit: DEFAULT_LIMIT,
            cgroup: DEFAULT_CGROUP.to_owned(),
            pin_path: PathBuf::from(DEFAULT_PIN_PATH),
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_group: None,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            map_full: MapFull::Open,
            max_groups: DEFAULT_MAX_GROUPS,
            max_destinations: DEFAULT_MAX_DESTINATIONS,
            max_addresses: DEFAULT_MAX_ADDRESSES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            dns: DnsConfig::default(),
            rspawn: RspawnConfig::default(),
            groups: Vec::new(),
        }
    }
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            min_ttl: DEFAULT_MIN_TTL,
            max_ttl: DEFAULT_MAX_TTL,
            timeout: DEFAULT_DNS_TIMEOUT,
        }
    }
}

impl Default for RspawnConfig {
    fn default() -> Self {
        RspawnConfig {
            qmail_dir: PathBuf::from(DEFAULT_QMAIL_DIR),
            wire: Wire::OneByte,
            concurrency: DEFAULT_CONCURRENCY,
            hold_timeout: DEFAULT_HOLD_TIMEOUT,
            hold_queue: DEFAULT_HOLD_QUEUE,
        }
    }
}

impl Config {
    /// The group with this name.
    pub fn group(&self, name: &str) -> Option<&GroupConfig> {
        self.groups.iter().find(|g| g.name == name)
    }
}

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    /// `ports`, `dns.min_ttl`, `group[2].addresses`, ...
    pub field: String,
    pub message: String,
}

/// Why a configuration could not be read, accepted or written.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is not valid; one `PATH:LINE: FIELD: what is wrong` line per problem.
    #[error("{}", Invalid(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
    #[error("failed to read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to {action} {}", path.display())]
    Write {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: no group named {name:?}", path.display())]
    NoSuchGroup { path: PathBuf, name: String },
}

/// Formats the problems of an invalid file, one line each.
struct Invalid<'a>(&'a Path, &'a [Problem]);

impl fmt::Display for Invalid<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.1.iter().enumerate() {
            let sep = if i == 0 { "" } else { "\n" };
            write!(
                f,
                "{sep}{}:{}: {}: {}",
                self.0.display(),
                p.line,
                p.field,
                p.message
            )?;
        }
        Ok(())
    }
}

/// The configuration file to use and whether it was named explicitly: the
/// flag, else the environment variable [`ENV_VAR`], else [`DEFAULT_PATH`].
pub fn resolve_path(flag: Option<&Path>) -> (PathBuf, bool) {
    resolve_path_from(flag, std::env::var_os(ENV_VAR))
}

fn resolve_path_from(flag: Option<&Path>, env: Option<OsString>) -> (PathBuf, bool) {
    match (flag, env) {
        (Some(path), _) => (path.to_path_buf(), true),
        (None, Some(env)) if !env.is_empty() => (PathBuf::from(env), true),
        _ => (PathBuf::from(DEFAULT_PATH), false),
    }
}

/// Reads and validates the configuration. A file named explicitly must exist;
/// when the default file does not exist, the built-in default is used.
pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !explicit => Ok(Config::default()),
        Err(source) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Validates configuration text; `path` only names the file in errors.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    parse::parse_document(path, text)
}

/// The groups of the configuration, in file order, for `qthrottle limit list`.
pub fn list_groups(path: &Path, explicit: bool) -> Result<Vec<GroupConfig>, ConfigError> {
    load(path, explicit).map(|config| config.groups)
}

/// The built-in default with the path settings (`cgroup`, `pin_path`,
/// `socket`, `state_dir`) taken from `path`, for commands that must work
/// while the file has errors elsewhere. `None` when the file is not even
/// TOML: its paths cannot be known, and the defaults may name another
/// instance.
pub fn paths_of(path: &Path) -> Option<Config> {
    let mut config = Config::default();
    let table = std::fs::read_to_string(path)
        .ok()?
        .parse::<toml::Table>()
        .ok()?;
    let text = |key: &str| {
        table
            .get(key)
            .and_then(toml::Value::as_str)
            .map(str::to_owned)
    };
    if let Some(cgroup) = text("cgroup") {
        config.cgroup = cgroup;
    }
    for (key, slot) in [
        ("pin_path", &mut config.pin_path),
        ("socket", &mut config.socket),
        ("state_dir", &mut config.state_dir),
    ] {
        if let Some(value) = text(key).filter(|v| v.starts_with('/')) {
            *slot = PathBuf::from(value);
        }
    }
    Some(config)
}
