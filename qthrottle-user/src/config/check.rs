//! Checks of single configuration values; each returns the value in its
//! normalized form or says what is wrong with it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use ipnet::{IpNet, Ipv4Net};

use super::{DNS_PORT, MAX_GROUP_NAME, MapFull, Wire};

/// Longest socket path the kernel accepts (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Longest DNS name in presentation form, without the trailing dot.
const MAX_DOMAIN: usize = 253;
const MAX_LABEL: usize = 63;

pub(super) fn group_name(s: &str) -> Result<String, String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    if s.is_empty() || s.len() > MAX_GROUP_NAME {
        return Err(format!(
            "must be 1 to {MAX_GROUP_NAME} bytes long, found {}",
            s.len()
        ));
    }
    if let Some(c) = s.chars().find(|c| !ok(*c)) {
        return Err(format!(
            "{s:?} contains {c:?}; use only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(s.to_owned())
}

/// A domain name, lowercased, without its trailing dot.
pub(super) fn domain(s: &str) -> Result<String, String> {
    let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    if name.is_empty() {
        return Err(format!("{s:?} is not a domain name"));
    }
    if !name.is_ascii() {
        return Err(format!(
            "{s:?} is not ASCII; write it in its xn-- (punycode) form"
        ));
    }
    if name.len() > MAX_DOMAIN {
        return Err(format!("{s:?} is longer than {MAX_DOMAIN} characters"));
    }
    name.split('.')
        .try_for_each(|label| check_label(s, label))?;
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "{s:?} looks like an address; list it under addresses"
        ));
    }
    Ok(name)
}

fn check_label(s: &str, label: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if label.is_empty() || label.len() > MAX_LABEL {
        return Err(format!(
            "{s:?} has a label that is empty or over {MAX_LABEL} characters"
        ));
    }
    if let Some(c) = label.chars().find(|c| !ok(*c)) {
        return Err(format!(
            "{s:?} contains {c:?}, which a domain name cannot hold"
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("{s:?} has a label that starts or ends with '-'"));
    }
    Ok(())
}

/// An MX host suffix, normalized to a lowercase domain with a leading dot,
/// so that `google.com` matches `aspmx.l.google.com` but not `notgoogle.com`.
pub(super) fn mx_suffix(s: &str) -> Result<String, String> {
    let name = domain(s.strip_prefix('.').unwrap_or(s))?;
    Ok(format!(".{name}"))
}

/// An address or CIDR range. A bare address is a /32 or /128; a range with
/// host bits set is refused (it is ambiguous); an IPv4-mapped IPv6 address
/// or range becomes IPv4, as the kernel counts it.
pub(super) fn address(s: &str) -> Result<IpNet, String> {
    let net = match (s.parse::<IpNet>(), s.parse::<IpAddr>()) {
        (Ok(net), _) if net.trunc() != net => {
            return Err(format!(
                "{s} has host bits set; the range is {}",
                net.trunc()
            ));
        }
        (Ok(net), _) => net,
        (_, Ok(ip)) => IpNet::from(ip),
        _ => return Err(format!("{s:?} is not an IP address or CIDR range")),
    };
    Ok(unmap(net))
}

fn unmap(net: IpNet) -> IpNet {
    let IpNet::V6(v6) = net else { return net };
    match (v6.addr().to_ipv4_mapped(), v6.prefix_len().checked_sub(96)) {
        (Some(v4), Some(len)) => Ipv4Net::new(v4, len).map_or(net, IpNet::V4),
        _ => net,
    }
}

/// `IP`, `IP:PORT` or `[IPv6]:PORT`; the port defaults to 53.
pub(super) fn nameserver(s: &str) -> Result<SocketAddr, String> {
    let bare = s
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(s);
    let addr = match (s.parse::<SocketAddr>(), bare.parse::<IpAddr>()) {
        (Ok(addr), _) => addr,
        (_, Ok(ip)) => SocketAddr::new(ip, DNS_PORT),
        _ => return Err(format!("{s:?} is not IP or IP:PORT")),
    };
    if addr.port() == 0 {
        return Err(format!("{s:?} has port 0"));
    }
    Ok(addr)
}

pub(super) fn absolute_path(s: &str) -> Result<PathBuf, String> {
    if !s.starts_with('/') {
        return Err(format!("{s:?} is not an absolute path"));
    }
    if s.contains('\0') {
        return Err("contains a NUL character".to_owned());
    }
    Ok(PathBuf::from(s))
}

pub(super) fn socket_path(s: &str) -> Result<PathBuf, String> {
    if s.len() > MAX_SOCKET_PATH {
        return Err(format!(
            "is longer than the {MAX_SOCKET_PATH} bytes a socket path may have"
        ));
    }
    absolute_path(s)
}

/// A cgroup relative to the cgroup2 mount, or an absolute path.
pub(super) fn cgroup(s: &str) -> Result<String, String> {
    let relative = s.trim_start_matches('/');
    if relative.is_empty() {
        return Err("must name a cgroup below the cgroup2 mount, not the root".to_owned());
    }
    if s.contains('\0') || relative.split('/').any(|c| c == "..") {
        return Err(format!("{s:?} must not contain '..' or NUL"));
    }
    Ok(s.to_owned())
}

/// A Unix group name.
pub(super) fn unix_group(s: &str) -> Result<String, String> {
    let bad = |c: char| c == ':' || c == '/' || c == '\0' || c.is_whitespace();
    if s.is_empty() || s.chars().any(bad) {
        return Err(format!("{s:?} is not a group name"));
    }
    Ok(s.to_owned())
}

pub(super) fn map_full(s: &str) -> Result<MapFull, String> {
    match s {
        "open" => Ok(MapFull::Open),
        "closed" => Ok(MapFull::Closed),
        _ => Err(format!("{s:?} is neither \"open\" nor \"closed\"")),
    }
}

pub(super) fn wire(s: &str) -> Result<Wire, String> {
    match s {
        "one-byte" => Ok(Wire::OneByte),
        "two-byte" => Ok(Wire::TwoByte),
        _ => Err(format!("{s:?} is neither \"one-byte\" nor \"two-byte\"")),
    }
}
