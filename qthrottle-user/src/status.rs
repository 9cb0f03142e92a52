//! `qthrottle status`: one row per group from the pinned kernel maps (so it
//! works while the daemon is stopped), completed by the daemon's state file.

use std::collections::BTreeMap;

use anyhow::Context as _;
use ipnet::IpNet;
use qthrottle_common::{
    COUNTED_ADDRESS, DEFAULT_SLOT, SLOT_DRAINING, STAT_EVENTS_LOST, STAT_MAP_FULL, STAT_RETARGETED,
};
use serde::Serialize;

use crate::{
    config::Config,
    daemon::state::State,
    kernel::Maps,
    plan::host,
    slots::{self, DEFAULT_NAME},
};

/// One group's line of the status.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    pub name: String,
    pub limit: u32,
    pub open: u64,
    pub allowed: u64,
    pub refused: u64,
    pub in_flight: u64,
    pub held: u64,
    pub domains: Vec<String>,
    pub addresses: Vec<String>,
    pub conflicts: Vec<String>,
    /// Removed from the configuration, kept until its connections close.
    pub draining: bool,
    /// Kernel event counters, on the `(default)` row only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_events: Option<Events>,
}

/// Kernel event counters that are not per group.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Events {
    pub map_full: u64,
    pub events_lost: u64,
    pub retargeted: u64,
}

/// Reads everything `status` shows.
pub fn collect(config: &Config) -> anyhow::Result<(Vec<Row>, Events)> {
    let maps = Maps::open_pinned(&config.pin_path)?;
    let state = State::read(&config.state_dir).unwrap_or_else(|err| {
        eprintln!("qthrottle: warning: {err:#}; showing the kernel's counters only");
        None
    });
    let state = state.unwrap_or_default();
    let mut addresses: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (net, slot) in slots::destinations(&maps)? {
        addresses.entry(slot).or_default().push(host(net));
    }
    let mut rows = Vec::new();
    for slot in 0..maps.groups.len() {
        let g = maps
            .groups
            .get(&slot, 0)
            .context("failed to read the group table")?;
        if slot != DEFAULT_SLOT && !slots::in_use(&g) {
            continue;
        }
        let c = maps
            .counters
            .get(&slot, 0)
            .context("failed to read counters")?;
        let name = slots::name_of(&g);
        let known = state.groups.get(&name);
        let deliveries = state.deliveries.get(&name).copied().unwrap_or_default();
        rows.push(Row {
            limit: g.limit,
            open: c.open,
            allowed: c.allowed,
            refused: c.refused,
            in_flight: deliveries.in_flight,
            held: deliveries.held,
            domains: known.map(domain_list).unwrap_or_default(),
            addresses: addresses.remove(&slot).unwrap_or_default(),
            conflicts: known.map(|k| k.conflicts.clone()).unwrap_or_default(),
            draining: g.state == SLOT_DRAINING,
            kernel_events: None,
            name,
        });
    }
    let stat = |i: u32| maps.stats.get(&i, 0).unwrap_or(0);
    let events = Events {
        map_full: stat(STAT_MAP_FULL),
        events_lost: stat(STAT_EVENTS_LOST),
        retargeted: stat(STAT_RETARGETED),
    };
    if let Some(default) = rows.iter_mut().find(|r| r.name == DEFAULT_NAME) {
        default.addresses = open_addresses(&maps)?;
        default.kernel_events = Some(events.clone());
    }
    Ok((rows, events))
}

/// A group's domains; one that resolved to no address is marked.
fn domain_list(group: &crate::daemon::state::GroupState) -> Vec<String> {
    group
        .domains
        .iter()
        .map(|(d, addrs)| {
            if addrs.is_empty() {
                format!("{d} (unresolved)")
            } else {
                d.clone()
            }
        })
        .collect()
}

/// Addresses in no group that have connections open, with their counts,
/// from the kernel's table of counted sockets.
fn open_addresses(maps: &Maps) -> anyhow::Result<Vec<String>> {
    let mut open: BTreeMap<IpNet, u64> = BTreeMap::new();
    for item in maps.sockets.iter() {
        let s = item.context("failed to read the socket table")?;
        if s.cookie != 0 && s.kind == COUNTED_ADDRESS {
            let net = slots::key_net(&aya::maps::lpm_trie::Key::new(128, s.addr));
            *open.entry(net).or_default() += 1;
        }
    }
    Ok(open
        .into_iter()
        .map(|(net, n)| format!("{} ({n} open)", host(net)))
        .collect())
}

/// The table for people.
pub fn render(rows: &[Row], events: &Events) -> String {
    let header = [
        "GROUP",
        "LIMIT",
        "OPEN",
        "ALLOWED",
        "REFUSED",
        "IN-FLIGHT",
        "HELD",
        "DOMAINS",
        "ADDRESSES",
    ];
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in rows {
        let name = if r.draining {
            format!("{} (draining)", r.name)
        } else {
            r.name.clone()
        };
        lines.push(vec![
            name,
            r.limit.to_string(),
            r.open.to_string(),
            r.allowed.to_string(),
            r.refused.to_string(),
            r.in_flight.to_string(),
            r.held.to_string(),
            join(&r.domains),
            join(&r.addresses),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| lines.iter().map(|l| l[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if let Some(r) = i.checked_sub(1).and_then(|j| rows.get(j)) {
            for c in &r.conflicts {
                out.push_str(&format!("  conflict: {c}\n"));
            }
        }
    }
    if events.map_full + events.events_lost > 0 {
        out.push_str(&format!(
            "kernel events: map full {}, refusal events lost {}\n",
            events.map_full, events.events_lost
        ));
    }
    out
}

fn join(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}
