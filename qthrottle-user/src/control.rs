//! The daemon's control socket: one JSON request per line, one JSON response
//! per line. The CLI uses it to ask for a reload; the spawner uses it to learn
//! each recipient domain's destination group and to report what it holds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Re-read the configuration file and apply it.
    Reload,
    /// Which destination group does mail for `domain` go to? The daemon
    /// resolves a domain it has not seen and puts its addresses in the kernel
    /// map before it answers. With `relay` (from qmail's smtproutes), the
    /// destination is that host (its A/AAAA, or an address literal) instead
    /// of the domain's MX hosts.
    Lookup {
        domain: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        relay: Option<String>,
    },
    /// The spawner's deliveries per group, replacing its previous report.
    Deliveries {
        groups: BTreeMap<String, GroupDeliveries>,
    },
}

/// Deliveries of one group, as the spawner reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupDeliveries {
    pub in_flight: u64,
    pub held: u64,
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    Ok,
    Error {
        message: String,
    },
    /// The group a domain's mail goes to, its limit, and how many seconds
    /// the answer may be cached.
    Group {
        group: String,
        limit: u32,
        ttl: u64,
    },
}
