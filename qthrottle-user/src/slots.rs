//! Keeps the kernel maps equal to a [`Plan`]: one group slot per group name,
//! destination entries written before stale ones are removed, and slots of
//! removed groups kept until their open count drains to zero.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, bail};
use aya::maps::{MapError, lpm_trie::Key};
use ipnet::IpNet;
use qthrottle_common::{
    Address, Counters, DEFAULT_SLOT, Destination, FLAG_FAIL_CLOSED, GroupSlot, NAME_LEN,
    PORT_WORDS, SLOT_ACTIVE, SLOT_DRAINING, SLOT_FREE, Settings,
};

use crate::{
    config::MapFull,
    kernel::Maps,
    plan::{Plan, host},
};

/// The name the default slot carries.
pub const DEFAULT_NAME: &str = "(default)";

/// What the kernel enforces beside the groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Globals {
    pub ports: Vec<u16>,
    pub default_limit: u32,
    pub map_full: MapFull,
    /// Entries of the kernel's socket table minus one.
    pub socket_mask: u32,
    /// Entries of the kernel's per-address counters minus one.
    pub address_mask: u32,
}

/// Group name ↔ slot, mirrored from the kernel's group table.
#[derive(Debug, Default)]
pub struct Slots {
    active: BTreeMap<String, u32>,
    draining: BTreeMap<u32, String>,
    capacity: u32,
    /// Size of the kernel's destination table.
    destinations: u32,
}

/// What an apply changed, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub written: usize,
    pub removed: usize,
    pub retired: Vec<String>,
    pub freed: Vec<String>,
}

impl Slots {
    /// Reads the slots the kernel already has (a restarted daemon keeps them).
    pub fn adopt(maps: &Maps, destinations: u32) -> anyhow::Result<Self> {
        let mut slots = Slots {
            capacity: maps.groups.len(),
            destinations,
            ..Slots::default()
        };
        for slot in 1..slots.capacity {
            let g = maps
                .groups
                .get(&slot, 0)
                .context("failed to read the group table")?;
            match g.state {
                SLOT_ACTIVE => {
                    slots.active.insert(name_of(&g), slot);
                }
                SLOT_DRAINING => {
                    slots.draining.insert(slot, name_of(&g));
                }
                _ => {}
            }
        }
        Ok(slots)
    }

    /// The group name of a slot, active or draining.
    pub fn name(&self, slot: u32) -> String {
        if slot == DEFAULT_SLOT {
            return DEFAULT_NAME.to_string();
        }
        self.active
            .iter()
            .find(|(_, s)| **s == slot)
            .map(|(n, _)| n.clone())
            .or_else(|| self.draining.get(&slot).cloned())
            .unwrap_or_else(|| format!("slot-{slot}"))
    }

    /// The slot of an active group.
    pub fn slot(&self, name: &str) -> Option<u32> {
        self.active.get(name).copied()
    }

    /// Makes the kernel enforce `plan` with the given limits.
    pub fn apply(
        &mut self,
        maps: &mut Maps,
        globals: &Globals,
        limits: &BTreeMap<String, u32>,
        plan: &Plan,
    ) -> anyhow::Result<Changes> {
        if limits.len() as u64 >= u64::from(self.capacity) {
            bail!(
                "{} groups do not fit in the kernel's group table of {} (max_groups)",
                limits.len(),
                self.capacity - 1
            );
        }
        if plan.entries.len() as u64 > u64::from(self.destinations) {
            bail!(
                "{} addresses and ranges do not fit in the kernel's destination table of {} (max_destinations)",
                plan.entries.len(),
                self.destinations
            );
        }
        write_globals(maps, globals)?;
        let mut changes = Changes::default();
        for (name, limit) in limits {
            let slot = self.assign(name)?;
            maps.groups
                .set(slot, &group_slot(name, *limit, SLOT_ACTIVE), 0)
                .with_context(|| format!("failed to write group {name}"))?;
        }
        let wanted = self.entries(plan)?;
        let (written, removed) = sync_destinations(maps, &wanted)?;
        changes.written = written;
        changes.removed = removed;
        // Retire after the entries pointing at a slot are gone; free only
        // slots retired on an earlier apply, so no program still holding an
        // old lookup can count into a slot that is handed to another group.
        changes.freed = self.free_drained(maps)?;
        changes.retired = self.retire(maps, limits)?;
        Ok(changes)
    }

    /// Frees draining slots whose connections have all closed.
    pub fn free_drained(&mut self, maps: &mut Maps) -> anyhow::Result<Vec<String>> {
        let mut freed = Vec::new();
        for (slot, name) in std::mem::take(&mut self.draining) {
            let open = maps
                .counters
                .get(&slot, 0)
                .context("failed to read counters")?
                .open;
            if open != 0 {
                self.draining.insert(slot, name);
                continue;
            }
            maps.counters
                .set(slot, &Counters::default(), 0)
                .context("failed to reset counters")?;
            maps.groups
                .set(slot, &GroupSlot::EMPTY, 0)
                .context("failed to free group slot")?;
            freed.push(name);
        }
        Ok(freed)
    }

    fn retire(
        &mut self,
        maps: &mut Maps,
        limits: &BTreeMap<String, u32>,
    ) -> anyhow::Result<Vec<String>> {
        let gone: Vec<String> = self
            .active
            .keys()
            .filter(|n| !limits.contains_key(*n))
            .cloned()
            .collect();
        for name in &gone {
            let Some(slot) = self.active.remove(name) else {
                continue;
            };
            let mut g = maps
                .groups
                .get(&slot, 0)
                .context("failed to read group slot")?;
            g.state = SLOT_DRAINING;
            maps.groups
                .set(slot, &g, 0)
                .context("failed to retire group slot")?;
            self.draining.insert(slot, name.clone());
        }
        Ok(gone)
    }

    /// The slot for `name`: its own, the one it left draining, or a free one.
    fn assign(&mut self, name: &str) -> anyhow::Result<u32> {
        if let Some(slot) = self.active.get(name) {
            return Ok(*slot);
        }
        let revived = self
            .draining
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .map(|(s, _)| *s);
        let slot = match revived {
            Some(slot) => {
                self.draining.remove(&slot);
                slot
            }
            None => {
                let used: BTreeSet<u32> = self
                    .active
                    .values()
                    .chain(self.draining.keys())
                    .copied()
                    .collect();
                (1..self.capacity)
                    .find(|s| !used.contains(s))
                    .context("no free group slot (max_groups)")?
            }
        };
        self.active.insert(name.to_string(), slot);
        Ok(slot)
    }

    fn entries(&self, plan: &Plan) -> anyhow::Result<BTreeMap<IpNet, u32>> {
        plan.entries
            .iter()
            .map(|(net, name)| {
                let slot = self
                    .slot(name)
                    .with_context(|| format!("group {name} has no slot"))?;
                Ok((*net, slot))
            })
            .collect()
    }
}

/// Writes the new and changed destination entries, then removes stale ones,
/// so a grouped address is never briefly ungrouped.
fn sync_destinations(
    maps: &mut Maps,
    wanted: &BTreeMap<IpNet, u32>,
) -> anyhow::Result<(usize, usize)> {
    let current = destinations(maps)?;
    let mut written = 0;
    for (net, slot) in wanted {
        if current.get(net) != Some(slot) {
            maps.destinations
                .insert(&lpm_key(*net), &Destination { slot: *slot }, 0)
                .map_err(full)
                .with_context(|| format!("failed to write destination {}", host(*net)))?;
            written += 1;
        }
    }
    let mut removed = 0;
    for net in current.keys().filter(|n| !wanted.contains_key(*n)) {
        maps.destinations
            .remove(&lpm_key(*net))
            .with_context(|| format!("failed to remove destination {}", host(*net)))?;
        removed += 1;
    }
    Ok((written, removed))
}

/// Every destination entry in the kernel: network → group slot.
pub fn destinations(maps: &Maps) -> anyhow::Result<BTreeMap<IpNet, u32>> {
    let mut current = BTreeMap::new();
    for item in maps.destinations.iter() {
        let (key, dest) = item.context("failed to read the destination map")?;
        current.insert(key_net(&key), dest.slot);
    }
    Ok(current)
}

fn full(err: MapError) -> anyhow::Error {
    let text = err.to_string();
    anyhow::Error::new(err).context(if text.contains("No space") || text.contains("E2BIG") {
        "the destination map is full (max_destinations)"
    } else {
        "map update refused"
    })
}

fn write_globals(maps: &mut Maps, globals: &Globals) -> anyhow::Result<()> {
    let flags = if globals.map_full == MapFull::Closed {
        FLAG_FAIL_CLOSED
    } else {
        0
    };
    let settings = Settings {
        default_limit: globals.default_limit,
        flags,
        socket_mask: globals.socket_mask,
        address_mask: globals.address_mask,
    };
    maps.settings
        .set(0, &settings, 0)
        .context("failed to write settings")?;
    maps.groups
        .set(
            DEFAULT_SLOT,
            &group_slot(DEFAULT_NAME, globals.default_limit, SLOT_ACTIVE),
            0,
        )
        .context("failed to write the default group")?;
    let mut words = vec![0u64; PORT_WORDS as usize];
    for port in &globals.ports {
        words[usize::from(*port >> 6)] |= 1 << (port & 63);
    }
    for (i, word) in (0u32..).zip(words) {
        if maps.ports.get(&i, 0).context("failed to read ports")? != word {
            maps.ports
                .set(i, &word, 0)
                .context("failed to write ports")?;
        }
    }
    Ok(())
}

/// The kernel's key for a network: IPv4 in its IPv4-mapped form.
pub fn lpm_key(net: IpNet) -> Key<Address> {
    match net {
        IpNet::V4(n) => Key::new(
            96 + u32::from(n.prefix_len()),
            qthrottle_common::ipv4_mapped(n.network().octets()),
        ),
        IpNet::V6(n) => Key::new(u32::from(n.prefix_len()), n.network().octets()),
    }
}

/// The network a kernel key stands for.
pub fn key_net(key: &Key<Address>) -> IpNet {
    let v6 = std::net::Ipv6Addr::from(key.data());
    let len = key.prefix_len();
    match v6.to_ipv4_mapped() {
        Some(v4) if len >= 96 => {
            IpNet::new(v4.into(), (len - 96) as u8).unwrap_or(IpNet::from(std::net::IpAddr::V4(v4)))
        }
        _ => IpNet::new(v6.into(), len.min(128) as u8)
            .unwrap_or(IpNet::from(std::net::IpAddr::V6(v6))),
    }
}

fn group_slot(name: &str, limit: u32, state: u32) -> GroupSlot {
    let mut slot = GroupSlot {
        limit,
        state,
        name: [0; NAME_LEN],
    };
    let bytes = name.as_bytes();
    let n = bytes.len().min(NAME_LEN - 1);
    slot.name[..n].copy_from_slice(&bytes[..n]);
    slot
}

/// The name stored in a slot.
pub fn name_of(slot: &GroupSlot) -> String {
    let end = slot.name.iter().position(|b| *b == 0).unwrap_or(NAME_LEN);
    String::from_utf8_lossy(&slot.name[..end]).into_owned()
}

/// True for a slot that is in use (active or draining).
pub fn in_use(slot: &GroupSlot) -> bool {
    slot.state != SLOT_FREE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_for_both_families() {
        for s in [
            "192.0.2.0/24",
            "127.0.0.1/32",
            "2001:db8::/32",
            "::1/128",
            "0.0.0.0/0",
        ] {
            let net: IpNet = s.parse().expect("net");
            assert_eq!(key_net(&lpm_key(net)), net, "{s}");
        }
    }

    #[test]
    fn names_are_kept_nul_terminated() {
        let long = "x".repeat(80);
        let slot = group_slot(&long, 3, SLOT_ACTIVE);
        assert_eq!(name_of(&slot).len(), NAME_LEN - 1);
        assert_eq!(name_of(&group_slot("google", 5, SLOT_ACTIVE)), "google");
    }
}
