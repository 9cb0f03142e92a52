//! From configuration text to a validated [`Config`], section by section.

use std::collections::HashMap;
use std::path::Path;

use ipnet::IpNet;
use toml_edit::{Document, Item, TableLike};

use super::reader::{Entry, Field, Reader, syntax_problem};
use super::{Config, ConfigError, DnsConfig, GroupConfig, MAX_LIMIT, RspawnConfig, check};

const ROOT_KEYS: &[&str] = &[
    "ports",
    "default_limit",
    "cgroup",
    "pin_path",
    "socket",
    "socket_group",
    "state_dir",
    "map_full",
    "max_groups",
    "max_destinations",
    "max_addresses",
    "max_connections",
    "dns",
    "rspawn",
    "group",
];
const DNS_KEYS: &[&str] = &["nameservers", "min_ttl", "max_ttl", "timeout"];
const RSPAWN_KEYS: &[&str] = &[
    "qmail_dir",
    "wire",
    "concurrency",
    "hold_timeout",
    "hold_queue",
];
const GROUP_KEYS: &[&str] = &["name", "limit", "domains", "mx_suffixes", "addresses"];

/// Largest kernel map a configuration may ask for.
const MAX_MAP_ENTRIES: u64 = 1 << 24;
/// Longest TTL bound and hold time, in seconds: one week.
const MAX_SECS: u64 = 7 * 86_400;
const MAX_DNS_TIMEOUT: u64 = 300;
const MAX_HOLD_QUEUE: u64 = 1_000_000;

pub(super) fn parse_document(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let doc = Document::parse(text).map_err(|e| ConfigError::Invalid {
        path: path.to_path_buf(),
        problems: vec![syntax_problem(text, &e)],
    })?;
    let mut reader = Reader::new(text);
    let config = root(&mut reader, doc.as_table());
    reader.finish(path, config)
}

/// Sets `slot` when a value was read.
fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}

fn root(r: &mut Reader, table: &dyn TableLike) -> Config {
    let mut c = Config::default();
    let mut lines = HashMap::new();
    let mut groups = Vec::new();
    r.each_key(table, "", 1, ROOT_KEYS, |r, key, f, item| {
        lines.insert(key.to_owned(), f.line);
        match key {
            "ports" => set(&mut c.ports, ports(r, f, item)),
            "default_limit" => set(&mut c.default_limit, r.int(f, item, 0, MAX_LIMIT.into())),
            "cgroup" => set(&mut c.cgroup, r.parsed(f, item, check::cgroup)),
            "pin_path" => set(&mut c.pin_path, r.parsed(f, item, check::absolute_path)),
            "socket" => set(&mut c.socket, r.parsed(f, item, check::socket_path)),
            "socket_group" => c.socket_group = r.parsed(f, item, check::unix_group),
            "state_dir" => set(&mut c.state_dir, r.parsed(f, item, check::absolute_path)),
            "map_full" => set(&mut c.map_full, r.parsed(f, item, check::map_full)),
            "max_groups" => set(&mut c.max_groups, r.int(f, item, 1, MAX_MAP_ENTRIES)),
            "max_destinations" => set(&mut c.max_destinations, r.int(f, item, 1, MAX_MAP_ENTRIES)),
            "max_addresses" => set(&mut c.max_addresses, r.int(f, item, 1, MAX_MAP_ENTRIES)),
            "max_connections" => set(&mut c.max_connections, r.int(f, item, 1, MAX_MAP_ENTRIES)),
            "dns" => set(&mut c.dns, r.table(f, item).map(|t| dns(r, f, t))),
            "rspawn" => set(&mut c.rspawn, r.table(f, item).map(|t| rspawn(r, f, t))),
            "group" => groups = group_list(r, f, item),
            _ => return false,
        }
        true
    });
    c.groups = check_groups(r, groups);
    check_sizes(r, &c, &lines);
    c
}

/// The limited ports: at least one, each a TCP port, none twice.
fn ports(r: &mut Reader, f: &Field, item: &Item) -> Option<Vec<u16>> {
    let entries = r.int_list::<u16>(f, item, 1, u16::MAX.into())?;
    if item.as_array().is_some_and(|a| a.is_empty()) {
        r.report(f, "must list at least one port");
    }
    let mut seen = Vec::with_capacity(entries.len());
    for entry in entries {
        if seen.contains(&entry.value) {
            r.report_at(
                entry.line,
                &f.name,
                format!("port {} is listed twice", entry.value),
            );
        }
        seen.push(entry.value);
    }
    Some(seen)
}

fn dns(r: &mut Reader, f: &Field, table: &dyn TableLike) -> DnsConfig {
    let mut d = DnsConfig::default();
    let mut min_line = None;
    r.each_key(table, &f.name, f.line, DNS_KEYS, |r, key, f, item| {
        match key {
            "nameservers" => {
                let list = r.list(f, item, check::nameserver);
                set(&mut d.nameservers, list.map(values));
            }
            "min_ttl" => {
                min_line = Some(f.line);
                set(&mut d.min_ttl, r.secs(f, item, 1, MAX_SECS));
            }
            "max_ttl" => set(&mut d.max_ttl, r.secs(f, item, 1, MAX_SECS)),
            "timeout" => set(&mut d.timeout, r.secs(f, item, 1, MAX_DNS_TIMEOUT)),
            _ => return false,
        }
        true
    });
    if d.min_ttl > d.max_ttl {
        let (min, max) = (d.min_ttl.as_secs(), d.max_ttl.as_secs());
        let message = format!("{min} is more than max_ttl ({max})");
        r.report_at(
            min_line.unwrap_or(f.line),
            &format!("{}.min_ttl", f.name),
            message,
        );
    }
    d
}

fn rspawn(r: &mut Reader, f: &Field, table: &dyn TableLike) -> RspawnConfig {
    let mut s = RspawnConfig::default();
    let mut concurrency_line = None;
    r.each_key(table, &f.name, f.line, RSPAWN_KEYS, |r, key, f, item| {
        match key {
            "qmail_dir" => set(&mut s.qmail_dir, r.parsed(f, item, check::absolute_path)),
            "wire" => set(&mut s.wire, r.parsed(f, item, check::wire)),
            "concurrency" => {
                concurrency_line = Some(f.line);
                set(&mut s.concurrency, r.int(f, item, 1, u16::MAX.into()));
            }
            "hold_timeout" => set(&mut s.hold_timeout, r.secs(f, item, 0, MAX_SECS)),
            "hold_queue" => set(&mut s.hold_queue, r.int(f, item, 0, MAX_HOLD_QUEUE)),
            _ => return false,
        }
        true
    });
    let max = s.wire.max_concurrency();
    if s.concurrency > max {
        let message = format!(
            "{} is more than the wire format allows ({max})",
            s.concurrency
        );
        let line = concurrency_line.unwrap_or(f.line);
        r.report_at(line, &format!("{}.concurrency", f.name), message);
    }
    s
}

fn values<T>(entries: Vec<Entry<T>>) -> Vec<T> {
    entries.into_iter().map(|e| e.value).collect()
}

/// A group as read, with the lines its checks across groups need.
struct Draft {
    name: Option<Entry<String>>,
    limit: Option<u32>,
    domains: Vec<Entry<String>>,
    mx_suffixes: Vec<Entry<String>>,
    addresses: Vec<Entry<IpNet>>,
    line: usize,
}

/// The `[[group]]` tables (or an array of inline tables).
fn group_list(r: &mut Reader, f: &Field, item: &Item) -> Vec<Draft> {
    let tables: Vec<(&dyn TableLike, usize)> = match item {
        Item::ArrayOfTables(array) => array
            .iter()
            .map(|t| (t as &dyn TableLike, r.line(t.span(), f.line)))
            .collect(),
        Item::Value(value) if value.is_array() => return inline_groups(r, f, item),
        _ => {
            r.report(
                f,
                format!("expected [[group]] tables, found {}", item.type_name()),
            );
            return Vec::new();
        }
    };
    let mut drafts = Vec::with_capacity(tables.len());
    for (index, (table, line)) in tables.into_iter().enumerate() {
        drafts.push(group(r, index, table, line));
    }
    drafts
}

/// `group = [{ name = ..., limit = ... }, ...]`.
fn inline_groups(r: &mut Reader, f: &Field, item: &Item) -> Vec<Draft> {
    let Some(array) = item.as_array() else {
        return Vec::new();
    };
    let mut drafts = Vec::with_capacity(array.len());
    for (index, value) in array.iter().enumerate() {
        let line = r.line(value.span(), f.line);
        match value.as_inline_table() {
            Some(table) => drafts.push(group(r, index, table, line)),
            None => r.report_at(line, &format!("group[{index}]"), "expected a table"),
        }
    }
    drafts
}

fn group(r: &mut Reader, index: usize, table: &dyn TableLike, line: usize) -> Draft {
    let prefix = format!("group[{index}]");
    let mut g = Draft {
        name: None,
        limit: None,
        domains: Vec::new(),
        mx_suffixes: Vec::new(),
        addresses: Vec::new(),
        line,
    };
    r.each_key(table, &prefix, line, GROUP_KEYS, |r, key, f, item| {
        match key {
            "name" => g.name = r.parsed(f, item, check::group_name).map(|v| entry(v, f)),
            "limit" => g.limit = r.int(f, item, 0, MAX_LIMIT.into()),
            "domains" => set(&mut g.domains, r.list(f, item, check::domain)),
            "mx_suffixes" => set(&mut g.mx_suffixes, r.list(f, item, check::mx_suffix)),
            "addresses" => set(&mut g.addresses, r.list(f, item, check::address)),
            _ => return false,
        }
        true
    });
    for key in ["name", "limit"] {
        if !table.contains_key(key) {
            r.report_at(
                line,
                &format!("{prefix}.{key}"),
                "missing; every group needs one",
            );
        }
    }
    g
}

fn entry<T>(value: T, f: &Field) -> Entry<T> {
    Entry {
        value,
        line: f.line,
    }
}

/// Checks across groups (unique names, each domain and MX suffix in one group
/// only, no address twice in a group) and builds the groups.
fn check_groups(r: &mut Reader, drafts: Vec<Draft>) -> Vec<GroupConfig> {
    let mut names = HashMap::new();
    let mut domains = HashMap::new();
    let mut suffixes = HashMap::new();
    for (index, g) in drafts.iter().enumerate() {
        if let Some(name) = &g.name {
            claim(r, &mut names, &name.value, name.line, index, "name");
        }
        for d in &g.domains {
            claim(r, &mut domains, &d.value, d.line, index, "domains");
        }
        for s in &g.mx_suffixes {
            claim(r, &mut suffixes, &s.value, s.line, index, "mx_suffixes");
        }
        unique_addresses(r, index, &g.addresses);
    }
    drafts.into_iter().filter_map(finish_group).collect()
}

/// Records that group `index` holds `value`, reporting it if another
/// group (or the same one) already does.
fn claim<'a>(
    r: &mut Reader,
    owners: &mut HashMap<&'a str, (usize, usize)>,
    value: &'a str,
    line: usize,
    index: usize,
    field: &str,
) {
    let name = format!("group[{index}].{field}");
    match owners.get(value) {
        Some(&(owner, _)) if owner == index => {
            r.report_at(line, &name, format!("{value} is listed twice"));
        }
        Some(&(owner, owner_line)) => {
            let taken = if field == "name" { "the name of" } else { "in" };
            let message = format!("{value} is already {taken} group[{owner}] (line {owner_line})");
            r.report_at(line, &name, message);
        }
        None => {
            owners.insert(value, (index, line));
        }
    }
}

fn unique_addresses(r: &mut Reader, index: usize, addresses: &[Entry<IpNet>]) {
    for (i, a) in addresses.iter().enumerate() {
        if addresses[..i].iter().any(|b| b.value == a.value) {
            let field = format!("group[{index}].addresses");
            r.report_at(a.line, &field, format!("{} is listed twice", a.value));
        }
    }
}

/// The group, if it has its required fields (their absence is already reported).
fn finish_group(g: Draft) -> Option<GroupConfig> {
    Some(GroupConfig {
        name: g.name?.value,
        limit: g.limit?,
        domains: values(g.domains),
        mx_suffixes: values(g.mx_suffixes),
        addresses: values(g.addresses),
        line: g.line,
    })
}

/// The kernel maps must hold what the file lists: one group slot per group
/// plus the default, one destination entry per address or range.
fn check_sizes(r: &mut Reader, c: &Config, lines: &HashMap<String, usize>) {
    let first_group = c.groups.first().map_or(1, |g| g.line);
    let needed = c.groups.len() + 1;
    if needed > c.max_groups as usize {
        let line = lines.get("max_groups").copied().unwrap_or(first_group);
        let message = format!(
            "{} is too small for {} groups plus the default",
            c.max_groups,
            needed - 1
        );
        r.report_at(line, "max_groups", message);
    }
    let addresses: usize = c.groups.iter().map(|g| g.addresses.len()).sum();
    if addresses > c.max_destinations as usize {
        let line = lines
            .get("max_destinations")
            .copied()
            .unwrap_or(first_group);
        let message = format!(
            "{} is too small for {addresses} addresses",
            c.max_destinations
        );
        r.report_at(line, "max_destinations", message);
    }
}
