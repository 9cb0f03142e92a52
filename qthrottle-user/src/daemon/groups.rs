//! What the daemon knows about destinations: the domains it resolves (from the
//! configuration and learned from deliveries) and how they become groups.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, GroupConfig},
    dns::MailHosts,
    plan::{GroupInput, Source},
};

/// A domain's last good answer and when to ask again.
#[derive(Debug, Clone)]
pub struct Domain {
    pub hosts: Option<MailHosts>,
    pub refresh_at: Instant,
    /// A resolution is under way.
    pub pending: bool,
}

/// A domain learned from a delivery, and the relay smtproutes named for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Learned {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// When a delivery last asked about it (seconds since the epoch).
    #[serde(default)]
    pub last_used: u64,
}

/// What resolution a tracked name needs: a mail domain's MX set, or a relay
/// host's own addresses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Name {
    Mail(String),
    Relay(String),
}

/// All tracked names with their answers, and the learned domains.
#[derive(Debug, Default)]
pub struct Destinations {
    pub names: BTreeMap<Name, Domain>,
    pub learned: BTreeMap<String, Learned>,
}

impl Destinations {
    /// The names the configuration and the learned domains need resolved.
    pub fn wanted(&self, config: &Config) -> BTreeSet<Name> {
        let configured = config
            .groups
            .iter()
            .flat_map(|g| g.domains.iter().cloned().map(Name::Mail));
        let learned = self.learned.iter().map(|(domain, l)| match &l.relay {
            Some(relay) => Name::Relay(relay.clone()),
            None => Name::Mail(domain.clone()),
        });
        configured.chain(learned).collect()
    }

    /// The addresses a name resolved to (empty until it has resolved once).
    pub fn addresses(&self, name: &Name) -> BTreeSet<IpAddr> {
        self.names
            .get(name)
            .and_then(|d| d.hosts.as_ref())
            .map(|h| h.addresses.clone())
            .unwrap_or_default()
    }

    fn hosts(&self, name: &Name) -> Option<&MailHosts> {
        self.names.get(name).and_then(|d| d.hosts.as_ref())
    }

    /// Planner input: configured groups with their domains' addresses, the
    /// provider groups with the learned domains whose MX hosts match, and a
    /// group of its own (default limit) for every other learned destination.
    pub fn inputs(&self, config: &Config) -> Vec<GroupInput> {
        let mut groups: Vec<GroupInput> =
            config.groups.iter().map(|g| self.configured(g)).collect();
        let mut own: BTreeMap<String, GroupInput> = BTreeMap::new();
        for (domain, learned) in &self.learned {
            if config.groups.iter().any(|g| g.domains.contains(domain)) {
                continue;
            }
            let name = match &learned.relay {
                Some(relay) => Name::Relay(relay.clone()),
                None => Name::Mail(domain.clone()),
            };
            let Some(hosts) = self.hosts(&name) else {
                continue;
            };
            if hosts.addresses.is_empty() {
                continue;
            }
            if let Some(i) = provider_of(config, hosts).filter(|_| learned.relay.is_none()) {
                groups[i]
                    .domains
                    .insert(domain.clone(), (Source::Provider, hosts.addresses.clone()));
                continue;
            }
            let group = own_group_name(&name, hosts);
            let entry = own.entry(group.clone()).or_insert_with(|| GroupInput {
                name: group,
                limit: config.default_limit,
                addresses: Vec::new(),
                domains: BTreeMap::new(),
            });
            entry
                .domains
                .insert(domain.clone(), (Source::Learned, hosts.addresses.clone()));
        }
        // A learned destination already inside configured groups needs no group of its own.
        let configured = crate::plan::plan(&groups);
        own.retain(|_, g| {
            g.domains
                .values()
                .any(|(_, addrs)| addrs.iter().any(|a| configured.group_of(*a).is_none()))
        });
        groups.extend(own.into_values());
        groups
    }

    fn configured(&self, g: &GroupConfig) -> GroupInput {
        GroupInput {
            name: g.name.clone(),
            limit: g.limit,
            addresses: g.addresses.clone(),
            domains: g
                .domains
                .iter()
                .map(|d| {
                    (
                        d.clone(),
                        (Source::Domain, self.addresses(&Name::Mail(d.clone()))),
                    )
                })
                .collect(),
        }
    }

    /// Seconds a lookup answer for `name` may be cached.
    pub fn ttl(&self, name: &Name, now: Instant) -> u64 {
        self.names.get(name).map_or(60, |d| {
            d.refresh_at.saturating_duration_since(now).as_secs().max(1)
        })
    }
}

/// The configured group (index) whose MX suffixes match every MX host.
fn provider_of(config: &Config, hosts: &MailHosts) -> Option<usize> {
    if hosts.mx_hosts.is_empty() {
        return None;
    }
    config.groups.iter().position(|g| {
        !g.mx_suffixes.is_empty()
            && hosts.mx_hosts.iter().all(|h| {
                g.mx_suffixes
                    .iter()
                    .any(|s| format!(".{h}").ends_with(s.as_str()))
            })
    })
}

/// The group of its own for a learned destination: named after its first MX
/// host (or relay), with a short digest of its address set so that two
/// destinations share a group exactly when they share their MX addresses.
fn own_group_name(name: &Name, hosts: &MailHosts) -> String {
    let (prefix, host) = match name {
        Name::Relay(relay) => ("relay-", relay.as_str()),
        Name::Mail(domain) => (
            "mx-",
            hosts
                .mx_hosts
                .first()
                .map_or(domain.as_str(), String::as_str),
        ),
    };
    let digest = fnv(hosts
        .addresses
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
        .as_bytes());
    let suffix = format!("-{:06x}", digest & 0xff_ffff);
    let clean: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let room = crate::config::MAX_GROUP_NAME - prefix.len() - suffix.len();
    let clean = if clean.len() > room {
        &clean[clean.len() - room..]
    } else {
        clean.as_str()
    };
    format!("{prefix}{clean}{suffix}")
}

/// FNV-1a: a stable, dependency-free digest for naming (not for security).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// When to refresh an answer with this TTL, within the configured bounds.
pub fn refresh_after(config: &Config, ttl: Duration) -> Duration {
    crate::dns::next_refresh(ttl, config.dns.min_ttl, config.dns.max_ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(mx: &[&str], addrs: &[&str]) -> MailHosts {
        MailHosts {
            mx_hosts: mx.iter().map(|s| s.to_string()).collect(),
            addresses: addrs.iter().map(|a| a.parse().expect("addr")).collect(),
            null_mx: false,
            nxdomain: false,
            ttl: Duration::from_secs(300),
        }
    }

    fn resolved(d: &mut Destinations, domain: &str, h: MailHosts) {
        d.names.insert(
            Name::Mail(domain.into()),
            Domain {
                hosts: Some(h),
                refresh_at: Instant::now(),
                pending: false,
            },
        );
        d.learned.insert(domain.into(), Learned::default());
    }

    #[test]
    fn learned_domains_with_the_same_mx_set_share_one_group() {
        let mut d = Destinations::default();
        resolved(
            &mut d,
            "a.example",
            hosts(&["mx.shared.example"], &["192.0.2.1", "192.0.2.2"]),
        );
        resolved(
            &mut d,
            "b.example",
            hosts(&["mx.shared.example"], &["192.0.2.2", "192.0.2.1"]),
        );
        resolved(
            &mut d,
            "c.example",
            hosts(&["mx.other.example"], &["192.0.2.3"]),
        );
        let inputs = d.inputs(&Config::default());
        assert_eq!(inputs.len(), 2);
        let shared = inputs
            .iter()
            .find(|g| g.domains.contains_key("a.example"))
            .expect("group");
        assert!(shared.domains.contains_key("b.example"));
        assert_eq!(shared.limit, Config::default().default_limit);
        assert!(shared.name.starts_with("mx-mx.shared.example-"));
    }

    #[test]
    fn provider_suffix_must_match_every_mx_host() {
        let mut config = Config::default();
        config.groups.push(GroupConfig {
            name: "yahoo".into(),
            limit: 4,
            domains: vec![],
            mx_suffixes: vec![".yahoodns.net".into()],
            addresses: vec![],
            line: 1,
        });
        let mut d = Destinations::default();
        resolved(
            &mut d,
            "y.example",
            hosts(
                &["mta5.am0.yahoodns.net", "mta6.am0.yahoodns.net"],
                &["192.0.2.9"],
            ),
        );
        resolved(
            &mut d,
            "z.example",
            hosts(&["mta5.am0.yahoodns.net", "mx.z.example"], &["192.0.2.10"]),
        );
        let inputs = d.inputs(&config);
        assert!(inputs[0].domains.contains_key("y.example"));
        assert!(!inputs[0].domains.contains_key("z.example"));
        assert!(
            inputs
                .iter()
                .any(|g| g.domains.contains_key("z.example") && g.name.starts_with("mx-"))
        );
    }

    #[test]
    fn own_group_names_fit_the_kernel() {
        let long = format!("{}.example", "m".repeat(90));
        let name = own_group_name(&Name::Mail("d".into()), &hosts(&[&long], &["192.0.2.1"]));
        assert!(name.len() <= crate::config::MAX_GROUP_NAME, "{name}");
    }
}
