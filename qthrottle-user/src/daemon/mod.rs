//! The privileged daemon: loads or adopts the programs, owns the cgroup,
//! resolves destinations and keeps the kernel maps equal to the
//! configuration; serves the control socket; logs one line per event.

mod groups;
mod refusals;
pub mod socket;
pub mod state;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
    task::JoinSet,
};

use crate::{
    cgroup,
    config::{self, Config},
    control::{GroupDeliveries, Request, Response},
    dns::{DnsError, MailHosts, MailResolver},
    kernel::{self, Maps, Sizes},
    mounts,
    plan::{self, Plan},
    slots::{DEFAULT_NAME, Globals, Slots},
};
use groups::{Destinations, Domain, Learned, Name};

/// How long a learned domain is kept without a delivery asking about it.
const LEARNED_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// A finished resolution, sent back to the loop.
type Resolved = (Name, Result<MailHosts, DnsError>);

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(path: PathBuf, explicit: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(serve(path, explicit))
}

struct Daemon {
    path: PathBuf,
    explicit: bool,
    config: Config,
    maps: Maps,
    slots: Slots,
    resolver: Arc<MailResolver>,
    dest: Destinations,
    plan: Plan,
    limits: BTreeMap<String, u32>,
    deliveries: BTreeMap<String, GroupDeliveries>,
    waiting: BTreeMap<Name, Vec<(String, oneshot::Sender<Response>)>>,
    resolved: mpsc::Sender<Resolved>,
    logged: BTreeMap<String, String>,
    state_dirty: bool,
    /// Sizes of the kernel tables in force.
    sizes: Sizes,
    programs: kernel::Programs,
    cgroup: Cgroup,
    /// Learned groups left out because the group table is full.
    trimmed: usize,
    /// The groups as last planned.
    inputs: Vec<plan::GroupInput>,
}

async fn serve(path: PathBuf, explicit: bool) -> anyhow::Result<()> {
    // Signals first: a SIGHUP during the first resolutions must not kill us.
    let mut hangup = signal(SignalKind::hangup()).context("failed to handle SIGHUP")?;
    let mut term = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
    let config = config::load(&path, explicit)?;
    // The socket before anything else: a second daemon must stop here,
    // before it touches the kernel's tables.
    let listener = socket::bind(&config.socket, config.socket_group.as_deref())?;
    let cgroup = Cgroup::new(&config.cgroup)?;
    if mounts::ensure_bpffs(&config.pin_path)? {
        tracing::info!("mounted bpffs for {}", config.pin_path.display());
    }
    let loaded = kernel::load(&config.pin_path, &cgroup.dir, sizes(&config))?;
    let verb = if loaded.adopted {
        "adopted"
    } else {
        "attached"
    };
    tracing::info!(
        "start: programs {verb} on cgroup {} (pins in {})",
        cgroup.dir.display(),
        config.pin_path.display()
    );
    if loaded.sizes != sizes(&config).rounded() {
        tracing::warn!(
            "map sizes stay as pinned ({:?}) until `qthrottle unload`",
            loaded.sizes
        );
    }
    let (resolved_tx, mut resolved_rx) = mpsc::channel(1024);
    let resolver = MailResolver::new(&config.dns.nameservers, config.dns.timeout)
        .context("failed to set up the DNS resolver")?;
    let mut daemon = Daemon {
        slots: Slots::adopt(&loaded.maps, loaded.sizes.destinations)?,
        maps: loaded.maps,
        programs: loaded.programs,
        cgroup,
        resolver: Arc::new(resolver),
        dest: Destinations {
            learned: state::read_learned(&config.state_dir),
            ..Destinations::default()
        },
        path,
        explicit,
        config,
        plan: Plan::default(),
        limits: BTreeMap::new(),
        deliveries: BTreeMap::new(),
        waiting: BTreeMap::new(),
        resolved: resolved_tx,
        logged: BTreeMap::new(),
        state_dirty: true,
        sizes: loaded.sizes,
        trimmed: 0,
        inputs: Vec::new(),
    };
    // The programs write refusal events without waking anyone (a wakeup per
    // refusal is costly in the connect path); they are read on this timer.
    let mut events = loaded.events;
    let mut drain = tokio::time::interval(Duration::from_millis(250));
    daemon.resolve_now(daemon.dest.wanted(&daemon.config)).await;
    daemon.apply().context("failed to fill the kernel maps")?;
    let (calls_tx, mut calls) = mpsc::channel(1024);
    tokio::spawn(socket::serve(listener, calls_tx));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut refusals = refusals::RefusalLog::default();
    tracing::info!(
        "ready: groups={} control socket {}",
        daemon.limits.len(),
        daemon.config.socket.display()
    );
    loop {
        tokio::select! {
            _ = hangup.recv() => { let _ = daemon.reload().await; }
            _ = term.recv() => break,
            _ = interrupt.recv() => break,
            Some((request, reply)) = calls.recv() => daemon.handle(request, reply).await,
            Some((name, result)) = resolved_rx.recv() => daemon.resolved(name, result),
            _ = drain.tick() => refusals.drain(&mut events, |slot| daemon.slots.name(slot)),
            _ = tick.tick() => daemon.tick(),
        }
    }
    daemon.write_state();
    let _ = std::fs::remove_file(&daemon.config.socket);
    tracing::info!("stop: exiting; limits stay enforced by the pinned programs");
    Ok(())
}

/// The cgroup the programs are attached to, and how to tell that it was
/// removed (or removed and made again) behind the daemon's back.
struct Cgroup {
    dir: PathBuf,
    inode: u64,
}

impl Cgroup {
    fn new(setting: &str) -> anyhow::Result<Self> {
        let dir = cgroup::resolve(setting)?;
        cgroup::create(&dir)?;
        let inode = inode(&dir).with_context(|| format!("failed to stat {}", dir.display()))?;
        Ok(Self { dir, inode })
    }

    /// True when the directory is still the one the programs are attached to.
    fn intact(&self) -> bool {
        inode(&self.dir).ok() == Some(self.inode)
    }
}

fn inode(dir: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(dir).map(|m| m.ino())
}

fn sizes(config: &Config) -> Sizes {
    Sizes {
        groups: config.max_groups,
        destinations: config.max_destinations,
        addresses: config.max_addresses,
        connections: config.max_connections,
    }
}

impl Daemon {
    /// Re-reads the configuration; an invalid file changes nothing.
    async fn reload(&mut self) -> Result<(), String> {
        let config = match config::load(&self.path, self.explicit) {
            Ok(config) => config,
            Err(err) => {
                let message = error_chain(&err);
                tracing::error!("reload rejected, previous configuration stays: {message}");
                return Err(message);
            }
        };
        let config = self.keep_restart_settings(config);
        if config.dns != self.config.dns {
            match MailResolver::new(&config.dns.nameservers, config.dns.timeout) {
                Ok(resolver) => self.resolver = Arc::new(resolver),
                Err(err) => {
                    let message = format!(
                        "failed to set up the new DNS settings: {}",
                        error_chain(&err)
                    );
                    tracing::error!("reload rejected, previous configuration stays: {message}");
                    return Err(message);
                }
            }
        }
        let previous = std::mem::replace(&mut self.config, config);
        let new_names: BTreeSet<Name> = self
            .dest
            .wanted(&self.config)
            .into_iter()
            .filter(|n| !self.dest.names.contains_key(n))
            .collect();
        self.resolve_now(new_names).await;
        if let Err(err) = self.apply() {
            tracing::error!("reload failed, previous configuration stays: {err:#}");
            self.config = previous;
            let _ = self.apply();
            return Err(format!("{err:#}"));
        }
        tracing::info!(
            "reload: {} applied, groups={}",
            self.path.display(),
            self.config.groups.len()
        );
        Ok(())
    }

    /// Settings that only a restart can change keep their running values; a
    /// warning says so when the file changed them.
    fn keep_restart_settings(&self, mut new: Config) -> Config {
        let old = &self.config;
        let changed = [
            ("cgroup", old.cgroup != new.cgroup),
            ("pin_path", old.pin_path != new.pin_path),
            ("socket", old.socket != new.socket),
            ("socket_group", old.socket_group != new.socket_group),
            ("state_dir", old.state_dir != new.state_dir),
            ("max_* sizes", sizes(old) != sizes(&new)),
        ];
        for (what, _) in changed.iter().filter(|(_, c)| *c) {
            tracing::warn!("reload: {what} changed; it takes effect when the daemon restarts");
        }
        new.cgroup.clone_from(&old.cgroup);
        new.pin_path.clone_from(&old.pin_path);
        new.socket.clone_from(&old.socket);
        new.socket_group.clone_from(&old.socket_group);
        new.state_dir.clone_from(&old.state_dir);
        (new.max_groups, new.max_destinations) = (old.max_groups, old.max_destinations);
        (new.max_addresses, new.max_connections) = (old.max_addresses, old.max_connections);
        new
    }

    /// Resolves names and waits for the answers (start and reload).
    async fn resolve_now(&mut self, names: BTreeSet<Name>) {
        let mut set = JoinSet::new();
        for name in names {
            let resolver = Arc::clone(&self.resolver);
            set.spawn(async move {
                let result = resolve(&resolver, &name).await;
                (name, result)
            });
        }
        while let Some(joined) = set.join_next().await {
            if let Ok((name, result)) = joined {
                self.record(name, result);
            }
        }
    }

    /// Starts a resolution in the background; its answer comes back to the loop.
    fn resolve_later(&mut self, name: Name) {
        let entry = self
            .dest
            .names
            .entry(name.clone())
            .or_insert_with(|| Domain {
                hosts: None,
                refresh_at: Instant::now(),
                pending: false,
            });
        if entry.pending {
            return;
        }
        entry.pending = true;
        let resolver = Arc::clone(&self.resolver);
        let back = self.resolved.clone();
        tokio::spawn(async move {
            let result = resolve(&resolver, &name).await;
            let _ = back.send((name, result)).await;
        });
    }

    fn resolved(&mut self, name: Name, result: Result<MailHosts, DnsError>) {
        let before = self.dest.addresses(&name);
        self.record(name.clone(), result);
        if self.dest.addresses(&name) != before
            && let Err(err) = self.apply()
        {
            tracing::error!("failed to apply new addresses of {}: {err:#}", show(&name));
        }
        for (domain, reply) in self.waiting.remove(&name).unwrap_or_default() {
            let _ = reply.send(self.answer(&domain, &name));
        }
    }

    /// Stores an answer; a failure keeps the last good one.
    fn record(&mut self, name: Name, result: Result<MailHosts, DnsError>) {
        let now = Instant::now();
        let entry = self.dest.names.entry(name.clone()).or_insert(Domain {
            hosts: None,
            refresh_at: now,
            pending: false,
        });
        entry.pending = false;
        match result {
            Ok(hosts) => {
                entry.refresh_at = now + groups::refresh_after(&self.config, hosts.ttl);
                if hosts.addresses.is_empty() {
                    let why = if hosts.null_mx {
                        "null MX"
                    } else if hosts.nxdomain {
                        "no such domain"
                    } else {
                        "no address"
                    };
                    tracing::warn!("dns: {} has no mail address ({why})", show(&name));
                }
                entry.hosts = Some(hosts);
            }
            Err(err) => {
                entry.refresh_at = now + self.config.dns.min_ttl;
                let kept = if entry.hosts.is_some() {
                    "keeping the last good answer"
                } else {
                    "no answer yet"
                };
                tracing::warn!(
                    "dns: failed to resolve {}: {}; {kept}",
                    show(&name),
                    error_chain(&err)
                );
            }
        }
    }

    /// Recomputes the plan and writes it into the kernel.
    fn apply(&mut self) -> anyhow::Result<()> {
        let mut inputs = self.dest.inputs(&self.config);
        // Learned groups come after the configured ones; those that do not
        // fit the group table stay under the per-address default.
        let room = (self.sizes.groups as usize)
            .saturating_sub(1)
            .max(self.config.groups.len());
        let trimmed = inputs.len().saturating_sub(room);
        inputs.truncate(room);
        if trimmed != self.trimmed {
            if trimmed > 0 {
                tracing::warn!(
                    "group table full (max_groups): {trimmed} learned destinations stay under the default limit"
                );
            }
            self.trimmed = trimmed;
        }
        let plan = plan::plan(&inputs);
        let limits: BTreeMap<String, u32> =
            inputs.iter().map(|g| (g.name.clone(), g.limit)).collect();
        let globals = Globals {
            ports: self.config.ports.clone(),
            default_limit: self.config.default_limit,
            map_full: self.config.map_full,
            socket_mask: self.sizes.connections - 1,
            address_mask: self.sizes.addresses - 1,
        };
        let changes = self.slots.apply(&mut self.maps, &globals, &limits, &plan)?;
        for name in &changes.retired {
            tracing::info!("group {name} removed; its slot drains as its connections close");
        }
        self.plan = plan;
        self.limits = limits;
        self.log_groups(&inputs);
        self.inputs = inputs;
        self.state_dirty = true;
        Ok(())
    }

    /// One line per group whose limit, members or conflicts changed.
    fn log_groups(&mut self, inputs: &[plan::GroupInput]) {
        for g in inputs {
            let addresses: Vec<String> = self
                .plan
                .entries
                .iter()
                .filter(|(_, n)| **n == g.name)
                .map(|(net, _)| plan::host(*net))
                .collect();
            let domains: Vec<&str> = g.domains.keys().map(String::as_str).collect();
            let conflicts = self
                .plan
                .groups
                .get(&g.name)
                .map(|p| p.conflicts.clone())
                .unwrap_or_default();
            let line = format!(
                "group {} limit={} addresses={} domains={}",
                g.name,
                g.limit,
                list(&addresses),
                list(&domains)
            );
            if self.logged.get(&g.name) != Some(&line) {
                tracing::info!("{line}");
                for c in &conflicts {
                    tracing::warn!("conflict in group {}: {c}", g.name);
                }
                self.logged.insert(g.name.clone(), line);
            }
        }
        self.logged
            .retain(|name, _| inputs.iter().any(|g| &g.name == name));
    }

    async fn handle(&mut self, request: Request, reply: oneshot::Sender<Response>) {
        let response = match request {
            Request::Reload => match self.reload().await {
                Ok(()) => Response::Ok,
                Err(message) => Response::Error { message },
            },
            Request::Deliveries { groups } => {
                self.deliveries = groups;
                self.state_dirty = true;
                Response::Ok
            }
            Request::Lookup { domain, relay } => return self.lookup(domain, relay, reply),
        };
        let _ = reply.send(response);
    }

    /// Answers which group a recipient domain's mail goes to, resolving and
    /// placing a domain never seen before first.
    fn lookup(&mut self, domain: String, relay: Option<String>, reply: oneshot::Sender<Response>) {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let relay = relay.map(|r| r.trim_end_matches('.').to_ascii_lowercase());
        if relay.is_none()
            && let Some(g) = self
                .config
                .groups
                .iter()
                .find(|g| g.domains.contains(&domain))
        {
            let ttl = self.dest.ttl(&Name::Mail(domain.clone()), Instant::now());
            let _ = reply.send(Response::Group {
                group: g.name.clone(),
                limit: g.limit,
                ttl,
            });
            return;
        }
        let name = match &relay {
            Some(r) => Name::Relay(r.clone()),
            None => Name::Mail(domain.clone()),
        };
        let learned = Learned {
            relay,
            last_used: state::now(),
        };
        let stale = self
            .dest
            .learned
            .get(&domain)
            .is_none_or(|l| l.relay != learned.relay || learned.last_used > l.last_used + 3600);
        if stale {
            self.dest.learned.insert(domain.clone(), learned);
            self.state_dirty = true;
        }
        let known = self
            .dest
            .names
            .get(&name)
            .is_some_and(|d| d.hosts.is_some());
        if known {
            if !self.plan_places(&name)
                && let Err(err) = self.apply()
            {
                tracing::error!("failed to place {domain}: {err:#}");
            }
            let _ = reply.send(self.answer(&domain, &name));
            return;
        }
        self.waiting
            .entry(name.clone())
            .or_default()
            .push((domain, reply));
        self.resolve_later(name);
    }

    /// True when every address of `name` already has a kernel entry.
    fn plan_places(&self, name: &Name) -> bool {
        self.dest
            .addresses(name)
            .iter()
            .all(|a| self.plan.group_of(*a).is_some())
    }

    fn answer(&self, domain: &str, name: &Name) -> Response {
        let addresses = self.dest.addresses(name);
        let Some(first) = addresses.iter().next() else {
            return Response::Error {
                message: format!("no mail exchanger address for {domain}"),
            };
        };
        let group = self
            .plan
            .group_of(*first)
            .unwrap_or(DEFAULT_NAME)
            .to_string();
        let limit = self
            .limits
            .get(&group)
            .copied()
            .unwrap_or(self.config.default_limit);
        Response::Group {
            group,
            limit,
            ttl: self.dest.ttl(name, Instant::now()),
        }
    }

    fn tick(&mut self) {
        self.watch_cgroup();
        self.expire_learned();
        let now = Instant::now();
        let due: Vec<Name> = self
            .dest
            .wanted(&self.config)
            .into_iter()
            .filter(|n| {
                self.dest
                    .names
                    .get(n)
                    .is_none_or(|d| !d.pending && d.refresh_at <= now)
            })
            .collect();
        for name in due {
            self.resolve_later(name);
        }
        match self.slots.free_drained(&mut self.maps) {
            Ok(freed) => {
                for name in freed {
                    tracing::info!("group {name}: slot freed, all its connections closed");
                }
            }
            Err(err) => tracing::error!("failed to free drained slots: {err:#}"),
        }
        if self.state_dirty {
            self.write_state();
        }
    }

    /// Re-attaches the programs when the cgroup was removed (systemd removes
    /// a service's cgroup when it stops) or removed and made again.
    fn watch_cgroup(&mut self) {
        if self.cgroup.intact() {
            return;
        }
        tracing::warn!(
            "cgroup {} was removed; making it again and re-attaching",
            self.cgroup.dir.display()
        );
        let result = Cgroup::new(&self.config.cgroup).and_then(|cgroup| {
            self.programs.reattach(&cgroup.dir, &self.config.pin_path)?;
            self.cgroup = cgroup;
            Ok(())
        });
        if let Err(err) = result {
            tracing::error!(
                "failed to re-attach to {}: {err:#}",
                self.cgroup.dir.display()
            );
        }
    }

    /// Forgets learned domains no delivery has asked about for a while.
    fn expire_learned(&mut self) {
        let horizon = state::now().saturating_sub(LEARNED_LIFETIME.as_secs());
        let before = self.dest.learned.len();
        self.dest.learned.retain(|_, l| l.last_used >= horizon);
        if self.dest.learned.len() != before {
            let wanted = self.dest.wanted(&self.config);
            self.dest.names.retain(|n, _| wanted.contains(n));
            if let Err(err) = self.apply() {
                tracing::error!("failed to drop expired learned domains: {err:#}");
            }
        }
    }

    fn write_state(&mut self) {
        let snapshot = state::State::build(
            &self.inputs,
            &self.plan,
            &self.dest.learned,
            &self.deliveries,
        );
        match snapshot.write(&self.config.state_dir) {
            Ok(()) => self.state_dirty = false,
            Err(err) => tracing::warn!("failed to write state: {err:#}"),
        }
    }
}

async fn resolve(resolver: &MailResolver, name: &Name) -> Result<MailHosts, DnsError> {
    match name {
        Name::Mail(domain) => resolver.resolve(domain).await,
        Name::Relay(host) => resolver.resolve_host(host).await,
    }
}

fn show(name: &Name) -> String {
    match name {
        Name::Mail(d) => d.clone(),
        Name::Relay(r) => format!("relay {r}"),
    }
}

fn list<T: AsRef<str>>(items: &[T]) -> String {
    if items.is_empty() {
        return "-".into();
    }
    items
        .iter()
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(",")
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
