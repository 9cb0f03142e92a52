//! The daemon's state file (`<state_dir>/state.json`): what `qthrottle
//! status` shows beside the kernel's counters — each group's domains with
//! their addresses, its conflicts and the spawner's deliveries — and the
//! domains learned from deliveries, which a restarted daemon places again.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::groups::Learned;
use crate::{
    control::GroupDeliveries,
    plan::{GroupInput, Plan},
};

/// One group as the state file records it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GroupState {
    pub limit: u32,
    /// Domain → the addresses it resolved to.
    pub domains: BTreeMap<String, BTreeSet<IpAddr>>,
    pub conflicts: Vec<String>,
}

/// The whole file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub groups: BTreeMap<String, GroupState>,
    pub deliveries: BTreeMap<String, GroupDeliveries>,
    pub learned: BTreeMap<String, Learned>,
}

const FILE: &str = "state.json";

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

impl State {
    /// The file's contents: each planned group with the domains it claims
    /// (an empty address set means the domain has not resolved to any).
    pub fn build(
        inputs: &[GroupInput],
        plan: &Plan,
        learned: &BTreeMap<String, Learned>,
        deliveries: &BTreeMap<String, GroupDeliveries>,
    ) -> Self {
        let groups = inputs
            .iter()
            .map(|g| {
                let state = GroupState {
                    limit: g.limit,
                    domains: g
                        .domains
                        .iter()
                        .map(|(d, (_, a))| (d.clone(), a.clone()))
                        .collect(),
                    conflicts: plan
                        .groups
                        .get(&g.name)
                        .map(|p| p.conflicts.clone())
                        .unwrap_or_default(),
                };
                (g.name.clone(), state)
            })
            .collect();
        Self {
            groups,
            deliveries: deliveries.clone(),
            learned: learned.clone(),
        }
    }

    /// Writes the file atomically (temporary file, then rename).
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        let tmp = dir.join(format!(".{FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self).context("failed to encode state")?;
        let mut file = std::fs::File::create(&tmp)
            .with_context(|| format!("failed to create {}", tmp.display()))?;
        file.write_all(&text)
            .with_context(|| format!("failed to write {}", tmp.display()))?;
        std::fs::rename(&tmp, path(dir))
            .with_context(|| format!("failed to replace {}", path(dir).display()))
    }

    /// Reads the file; `None` when there is none.
    pub fn read(dir: &Path) -> anyhow::Result<Option<Self>> {
        let file = path(dir);
        match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("failed to parse {}", file.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("failed to read {}", file.display())),
        }
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The learned domains of an earlier run (empty when there is no state).
pub fn read_learned(dir: &Path) -> BTreeMap<String, Learned> {
    match State::read(dir) {
        // Entries of an older file without a time count from now.
        Ok(state) => state
            .map(|s| s.learned)
            .unwrap_or_default()
            .into_iter()
            .map(|(d, l)| {
                let last_used = if l.last_used == 0 { now() } else { l.last_used };
                (d, Learned { last_used, ..l })
            })
            .collect(),
        Err(err) => {
            tracing::warn!("ignoring the state file: {err:#}");
            BTreeMap::new()
        }
    }
}
