//! Which address goes to which group: turns the configured groups, their
//! resolved domains and the groups learned from deliveries into the one set
//! of kernel map entries, resolving claims on the same address by SPEC §3's
//! rule (literal address, then CIDR by prefix length, then domain, then
//! provider; equal rank goes to the lower limit) and recording every conflict.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;

/// Why a group claims an address, most specific first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// A single address written in the configuration.
    Literal,
    /// A range written in the configuration.
    Range,
    /// An MX address of one of the group's domains.
    Domain,
    /// An MX address of a domain whose MX hosts match the group's suffix.
    Provider,
    /// An MX address of a domain learned from deliveries, in a group of its own.
    Learned,
}

impl Source {
    fn word(self) -> &'static str {
        match self {
            Source::Literal => "literal address",
            Source::Range => "range",
            Source::Domain => "domain",
            Source::Provider => "provider",
            Source::Learned => "learned domain",
        }
    }
}

/// A group as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInput {
    pub name: String,
    pub limit: u32,
    /// Configured addresses and ranges.
    pub addresses: Vec<IpNet>,
    /// Domains with the addresses they resolved to, and why they are here.
    pub domains: BTreeMap<String, (Source, BTreeSet<IpAddr>)>,
}

/// One group's share of the result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupPlan {
    pub conflicts: Vec<String>,
}

/// The result: kernel entries (network → group name) and per-group conflicts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub entries: BTreeMap<IpNet, String>,
    pub groups: BTreeMap<String, GroupPlan>,
}

#[derive(Debug, Clone)]
struct Claim<'a> {
    net: IpNet,
    source: Source,
    group: &'a GroupInput,
    origin: &'a str,
}

impl Claim<'_> {
    /// Lower wins: source rank, longer prefix, lower limit, then name.
    fn key(&self) -> (Source, Reverse<u8>, u32, &str) {
        (
            self.source,
            Reverse(self.net.prefix_len()),
            self.group.limit,
            &self.group.name,
        )
    }
}

/// Builds the plan.
pub fn plan(groups: &[GroupInput]) -> Plan {
    let mut out = Plan {
        entries: BTreeMap::new(),
        groups: groups
            .iter()
            .map(|g| (g.name.clone(), GroupPlan::default()))
            .collect(),
    };
    let (configured, resolved) = claims(groups);
    let explicit = settle(configured, &mut out);
    let covered: Vec<Claim<'_>> = resolved
        .into_iter()
        .filter(|claim| !overridden(claim, &explicit, &mut out))
        .collect();
    settle(covered, &mut out);
    out
}

fn claims(groups: &[GroupInput]) -> (Vec<Claim<'_>>, Vec<Claim<'_>>) {
    let mut configured = Vec::new();
    let mut resolved = Vec::new();
    for group in groups {
        for net in &group.addresses {
            let net = net.trunc();
            let source = if net.prefix_len() == net.max_prefix_len() {
                Source::Literal
            } else {
                Source::Range
            };
            configured.push(Claim {
                net,
                source,
                group,
                origin: "",
            });
        }
        for (domain, (source, addrs)) in &group.domains {
            for addr in addrs {
                resolved.push(Claim {
                    net: IpNet::from(*addr),
                    source: *source,
                    group,
                    origin: domain,
                });
            }
        }
    }
    (configured, resolved)
}

/// Keeps one winner per network; returns the winners.
fn settle<'a>(claims: Vec<Claim<'a>>, out: &mut Plan) -> Vec<Claim<'a>> {
    let mut by_net: BTreeMap<IpNet, Vec<Claim<'a>>> = BTreeMap::new();
    for claim in claims {
        by_net.entry(claim.net).or_default().push(claim);
    }
    let mut winners = Vec::new();
    for (net, mut rivals) in by_net {
        rivals.sort_by(|a, b| a.key().cmp(&b.key()));
        rivals.dedup_by(|a, b| a.group.name == b.group.name);
        let winner = rivals.remove(0);
        for loser in &rivals {
            conflict(out, &winner, loser, net);
        }
        out.entries.insert(net, winner.group.name.clone());
        winners.push(winner);
    }
    winners
}

/// True when a configured address or range of another group covers the
/// claimed address: configured entries outrank anything resolved.
fn overridden(claim: &Claim<'_>, explicit: &[Claim<'_>], out: &mut Plan) -> bool {
    let Some(cover) = explicit
        .iter()
        .filter(|e| e.net.contains(&claim.net))
        .max_by_key(|e| e.net.prefix_len())
    else {
        return false;
    };
    if cover.group.name != claim.group.name {
        conflict(out, cover, claim, claim.net);
    }
    true
}

fn conflict(out: &mut Plan, winner: &Claim<'_>, loser: &Claim<'_>, net: IpNet) {
    let describe = |c: &Claim<'_>| {
        if c.origin.is_empty() {
            format!("{} ({})", c.group.name, c.source.word())
        } else {
            format!("{} ({} {})", c.group.name, c.source.word(), c.origin)
        }
    };
    let line = format!(
        "{}: {} wins over {}",
        host(net),
        describe(winner),
        describe(loser)
    );
    for name in [&winner.group.name, &loser.group.name] {
        if let Some(g) = out.groups.get_mut(name.as_str())
            && !g.conflicts.contains(&line)
        {
            g.conflicts.push(line.clone());
        }
    }
}

impl Plan {
    /// The group whose most specific entry holds `addr`.
    pub fn group_of(&self, addr: IpAddr) -> Option<&str> {
        self.entries
            .iter()
            .filter(|(net, _)| net.contains(&addr))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, name)| name.as_str())
    }
}

/// A network written as an address when it is a single one.
pub fn host(net: IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, limit: u32, addrs: &[&str]) -> GroupInput {
        GroupInput {
            name: name.into(),
            limit,
            addresses: addrs.iter().map(|a| a.parse().expect("net")).collect(),
            domains: BTreeMap::new(),
        }
    }

    fn with_domain(mut g: GroupInput, domain: &str, source: Source, addrs: &[&str]) -> GroupInput {
        let set = addrs.iter().map(|a| a.parse().expect("addr")).collect();
        g.domains.insert(domain.into(), (source, set));
        g
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    #[test]
    fn literal_beats_range_and_lower_limit_breaks_ties() {
        let p = plan(&[
            group("a", 5, &["10.0.0.0/8"]),
            group("b", 9, &["10.0.0.0/8", "10.1.1.1/32"]),
            group("c", 3, &["10.1.1.1/32"]),
        ]);
        assert_eq!(p.entries[&net("10.0.0.0/8")], "a");
        assert_eq!(p.entries[&net("10.1.1.1/32")], "c");
        assert_eq!(p.groups["a"].conflicts.len(), 1);
        assert_eq!(p.groups["b"].conflicts.len(), 2);
    }

    #[test]
    fn configured_range_beats_a_domain_address_inside_it() {
        let g1 = with_domain(
            group("mx", 2, &[]),
            "example.com",
            Source::Domain,
            &["192.0.2.7"],
        );
        let g2 = group("net", 10, &["192.0.2.0/24"]);
        let p = plan(&[g1, g2]);
        assert!(!p.entries.contains_key(&net("192.0.2.7/32")));
        assert_eq!(p.entries[&net("192.0.2.0/24")], "net");
        assert!(
            p.groups["mx"].conflicts[0]
                .contains("192.0.2.7: net (range) wins over mx (domain example.com)")
        );
    }

    #[test]
    fn domain_beats_provider_and_shared_mx_is_one_entry() {
        let g1 = with_domain(
            group("d", 5, &[]),
            "a.example",
            Source::Domain,
            &["2001:db8::1"],
        );
        let g1 = with_domain(g1, "b.example", Source::Domain, &["2001:db8::1"]);
        let g2 = with_domain(
            group("p", 1, &[]),
            "c.example",
            Source::Provider,
            &["2001:db8::1"],
        );
        let p = plan(&[g1, g2]);
        assert_eq!(p.entries.len(), 1);
        assert_eq!(p.entries[&net("2001:db8::1/128")], "d");
        assert_eq!(p.groups["p"].conflicts.len(), 1);
        assert!(
            p.groups["d"]
                .conflicts
                .iter()
                .all(|c| !c.contains("wins over d "))
        );
    }

    #[test]
    fn same_group_claims_are_not_conflicts() {
        let g = with_domain(
            group("g", 5, &["198.51.100.0/24"]),
            "x.example",
            Source::Domain,
            &["198.51.100.9"],
        );
        let p = plan(&[g]);
        assert_eq!(p.entries.len(), 1);
        assert!(p.groups["g"].conflicts.is_empty());
    }
}
