//! qmail's `control/smtproutes`, read the way qmail-remote reads it, so that
//! the spawner asks the daemon about the same destination qmail-remote will
//! connect to.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::SystemTime;

/// The routes file and what it said when last read.
#[derive(Debug)]
pub struct Routes {
    path: PathBuf,
    /// Lowercased domain (or `.suffix`, or empty) to relay (maybe empty).
    map: HashMap<String, String>,
    stamp: Option<(SystemTime, u64)>,
}

impl Routes {
    pub fn new(path: PathBuf) -> Self {
        let mut routes = Routes {
            path,
            map: HashMap::new(),
            stamp: None,
        };
        routes.refresh();
        routes
    }

    /// Read the file again if it changed; true if it did.
    pub fn refresh(&mut self) -> bool {
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        if stamp == self.stamp {
            return false;
        }
        self.stamp = stamp;
        let text = std::fs::read(&self.path).unwrap_or_default();
        self.map = parse(&text);
        true
    }

    /// The relay host for mail to `host`, if a route names one.
    pub fn relay(&self, host: &str) -> Option<&str> {
        let found = suffixes(host).find_map(|key| self.map.get(key))?;
        let relay = found.split(':').next().unwrap_or("");
        (!relay.is_empty()).then_some(relay)
    }
}

/// The host, then each of its suffixes that starts with a dot, then the
/// empty string (a route for everything).
fn suffixes(host: &str) -> impl Iterator<Item = &str> {
    let dots = host
        .char_indices()
        .filter(|&(i, c)| i > 0 && c == '.')
        .map(|(i, _)| &host[i..]);
    std::iter::once(host).chain(dots).chain(std::iter::once(""))
}

/// Lines `domain:relay[:port]`; blank lines, comments and lines without a
/// colon are skipped; a later line for the same domain wins.
fn parse(text: &[u8]) -> HashMap<String, String> {
    let text = String::from_utf8_lossy(text);
    let mut map = HashMap::new();
    for line in text.lines().map(str::trim_end) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((domain, relay)) = line.split_once(':') {
            map.insert(domain.to_ascii_lowercase(), relay.to_string());
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(text: &str) -> Routes {
        Routes {
            path: PathBuf::new(),
            map: parse(text.as_bytes()),
            stamp: None,
        }
    }

    #[test]
    fn most_specific_route_wins_and_empty_relay_means_mx() {
        let r = routes("# c\n.example.com:relay.example.net:2525\nmx.example.com:\n:smart\n");
        assert_eq!(r.relay("a.example.com"), Some("relay.example.net"));
        assert_eq!(r.relay("mx.example.com"), None);
        assert_eq!(r.relay("other.org"), Some("smart"));
        assert_eq!(routes("").relay("other.org"), None);
    }

    #[test]
    fn later_line_wins() {
        assert_eq!(routes("a.org:one\na.org:two\n").relay("a.org"), Some("two"));
    }
}
