//! The spawner's event loop: commands in, each placed in its destination
//! group, held or handed to a worker, and exactly one report out for each.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::process::Child;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::time::MissedTickBehavior;

use super::hold::{Admission, Expired, GroupName, Holder};
use super::lookup::{Client, Directory, Known, Placement};
use super::routes::Routes;
use super::wire::{self, Command, Parser, Wire, answer};
use super::workers::Pool;
use crate::control::{Request, Response};

/// How often held deliveries are checked and the daemon told what is held.
const TICK: Duration = Duration::from_secs(1);
/// The daemon hears about held deliveries at least this often.
const REPORT_EVERY: Duration = Duration::from_secs(30);
/// Most events handled before the reports are flushed.
const BATCH: usize = 1024;

const LOST_WORKER: &[u8] = b"Zqmail-spawn lost the process that ran qmail-remote. \
Possible duplicate! (#4.3.0)\n";
const DAEMON_DOWN_NOTE: &[u8] =
    b"qthrottle could not reach its daemon; deliveries run without holding until it answers.\n";

/// Everything the event loop needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    pub wire: Wire,
    pub concurrency: u32,
    pub hold_timeout: Duration,
    pub hold_queue: usize,
    pub socket: PathBuf,
    pub routes: PathBuf,
    pub queue_uid: u32,
}

/// What the event loop reacts to.
#[derive(Debug)]
pub enum Event {
    Input(Vec<u8>),
    InputEnd,
    Done {
        worker: usize,
        id: u16,
        report: Vec<u8>,
    },
    WorkerGone(usize),
    Answer {
        domain: String,
        answer: io::Result<Response>,
    },
}

/// A delivery not yet running.
#[derive(Debug)]
struct Delivery {
    cmd: Command,
    domain: String,
}

#[derive(Debug)]
enum Slot {
    Free,
    Waiting,
    Running {
        worker: usize,
        group: Option<GroupName>,
        note: bool,
    },
}

struct Server {
    wire: Wire,
    concurrency: u32,
    slots: Vec<Slot>,
    busy: usize,
    reading: bool,
    parser: Parser,
    holder: Holder<Delivery>,
    directory: Directory,
    asking: HashMap<String, Vec<Delivery>>,
    routes: Routes,
    client: Rc<Client>,
    pool: Pool,
    events: UnboundedSender<Event>,
    out: Vec<u8>,
    reports: UnboundedSender<Vec<u8>>,
    /// When the daemon was last told about deliveries, if ever.
    reported: Option<Instant>,
    /// Deliveries let go by their group, to start.
    ready: Vec<(Delivery, Option<GroupName>)>,
}

/// Announce the concurrency, then serve commands until the input ends and
/// every delivery is reported. Must run inside a `LocalSet`. Returns the
/// worker processes, told to exit, for the caller to reap.
pub async fn serve(
    settings: Settings,
    events: UnboundedSender<Event>,
    mut incoming: UnboundedReceiver<Event>,
    reports: UnboundedSender<Vec<u8>>,
) -> Vec<Child> {
    let mut server = Server::new(&settings, events, reports);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while server.reading || server.busy > 0 {
        tokio::select! {
            Some(event) = incoming.recv() => {
                server.handle(event);
                for _ in 0..BATCH {
                    let Ok(event) = incoming.try_recv() else { break };
                    server.handle(event);
                }
            }
            _ = tick.tick() => server.tick(Instant::now()),
        }
        server.flush();
    }
    server.farewell().await;
    server.pool.close().await
}

impl Server {
    fn new(
        s: &Settings,
        events: UnboundedSender<Event>,
        reports: UnboundedSender<Vec<u8>>,
    ) -> Self {
        let concurrency = s.concurrency.clamp(1, s.wire.max_concurrency());
        let mut server = Server {
            wire: s.wire,
            concurrency,
            slots: (0..concurrency).map(|_| Slot::Free).collect(),
            busy: 0,
            reading: true,
            parser: Parser::new(s.wire),
            holder: Holder::new(s.hold_timeout, s.hold_queue),
            directory: Directory::default(),
            asking: HashMap::new(),
            routes: Routes::new(s.routes.clone()),
            client: Client::new(&s.socket),
            pool: Pool::new(s.queue_uid, events.clone()),
            events,
            out: Vec::new(),
            reports,
            reported: None,
            ready: Vec::new(),
        };
        wire::put_number(server.wire, &mut server.out, concurrency as u16);
        server.flush();
        server
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Input(data) => self.commands(&data),
            Event::InputEnd => self.reading = false,
            Event::Done { worker, id, report } => self.done(worker, id, report),
            Event::WorkerGone(worker) => self.worker_gone(worker),
            Event::Answer { domain, answer } => self.answered(domain, answer),
        }
        self.run_ready();
    }

    fn commands(&mut self, data: &[u8]) {
        let mut cmds = Vec::new();
        self.parser.feed(data, &mut cmds);
        for cmd in cmds {
            self.command(cmd);
        }
    }

    /// Check a command as qmail does; then place it.
    fn command(&mut self, cmd: Command) {
        let id = cmd.delnum;
        let in_use = self
            .slots
            .get(usize::from(id))
            .is_some_and(|s| !matches!(s, Slot::Free));
        if let Err(text) = wire::check(&cmd, self.concurrency, in_use) {
            self.write_report(id, text, false);
            return;
        }
        self.slots[usize::from(id)] = Slot::Waiting;
        self.busy += 1;
        let host = cmd.host().unwrap_or_default();
        let domain = String::from_utf8_lossy(host).to_ascii_lowercase();
        self.place(Delivery { cmd, domain });
    }

    /// Run, hold or look up a delivery according to what its domain is known as.
    fn place(&mut self, d: Delivery) {
        match self.directory.known(&d.domain, Instant::now()) {
            Known::Ask => self.ask(d),
            known => self.place_as(known, d),
        }
    }

    fn place_as(&mut self, known: Known, d: Delivery) {
        match known {
            Known::Placed(placement) => self.admit(placement, d),
            Known::Unplaced | Known::Ask => self.run(d, None, false),
            Known::DaemonDown => {
                let note = self.directory.note_down();
                self.run(d, None, note);
            }
        }
    }

    fn ask(&mut self, d: Delivery) {
        let waiting = self.asking.entry(d.domain.clone()).or_default();
        waiting.push(d);
        if waiting.len() > 1 {
            return;
        }
        let domain = waiting[0].domain.clone();
        let relay = self.routes.relay(&domain).map(str::to_string);
        let request = Request::Lookup {
            domain: domain.clone(),
            relay,
        };
        let (client, events) = (self.client.clone(), self.events.clone());
        tokio::task::spawn_local(async move {
            let answer = client.request(&request).await;
            let _ = events.send(Event::Answer { domain, answer });
        });
    }

    fn answered(&mut self, domain: String, answer: io::Result<Response>) {
        let known = self.directory.answered(&domain, answer, Instant::now());
        for d in self.asking.remove(&domain).unwrap_or_default() {
            let again = match &known {
                Known::Placed(p) => Known::Placed(p.clone()),
                Known::DaemonDown => Known::DaemonDown,
                _ => Known::Unplaced,
            };
            self.place_as(again, d);
        }
    }

    fn admit(&mut self, placement: Placement, d: Delivery) {
        let Placement { group, limit } = placement;
        let mut started = Vec::new();
        let admission = self
            .holder
            .admit(&group, limit, d, Instant::now(), &mut started);
        match admission {
            Admission::Start(d) => started.push(d),
            Admission::Held => {}
            Admission::QueueFull(d) => {
                let held = self.holder.held_in(&group);
                let text = format!(
                    "ZDestination group {group} is at its limit of {limit} connections \
                     with {held} deliveries already waiting. (#4.4.5)\n"
                );
                self.end(d.cmd.delnum, text.as_bytes(), None, false);
            }
        }
        self.ready
            .extend(started.into_iter().map(|d| (d, Some(group.clone()))));
    }

    /// Hand a delivery to a worker.
    fn run(&mut self, d: Delivery, group: Option<GroupName>, note: bool) {
        let id = d.cmd.delnum;
        match self.pool.start(id, &d.cmd.fields) {
            Ok(worker) => {
                self.slots[usize::from(id)] = Slot::Running {
                    worker,
                    group,
                    note,
                }
            }
            Err(_) => self.end(id, answer::CANNOT_FORK, group, note),
        }
    }

    fn done(&mut self, worker: usize, id: u16, report: Vec<u8>) {
        let Some(slot) = self.slots.get_mut(usize::from(id)) else {
            return;
        };
        let Slot::Running { worker: w, .. } = slot else {
            return;
        };
        if *w != worker {
            return;
        }
        let Slot::Running { group, note, .. } = std::mem::replace(slot, Slot::Waiting) else {
            return;
        };
        self.pool.done(worker);
        self.end(id, &report, group, note);
    }

    fn worker_gone(&mut self, worker: usize) {
        let lost: Vec<u16> = (0..self.slots.len())
            .filter(|&i| matches!(self.slots[i], Slot::Running { worker: w, .. } if w == worker))
            .map(|i| i as u16)
            .collect();
        for id in lost {
            self.done(worker, id, LOST_WORKER.to_vec());
        }
        self.pool.gone(worker);
    }

    /// Report a delivery, free its number, and start what its group allows.
    fn end(&mut self, id: u16, report: &[u8], group: Option<GroupName>, note: bool) {
        self.write_report(id, report, note);
        self.slots[usize::from(id)] = Slot::Free;
        self.busy -= 1;
        let Some(group) = group else { return };
        let mut started = Vec::new();
        self.holder.finish(&group, &mut started);
        self.ready
            .extend(started.into_iter().map(|d| (d, Some(group.clone()))));
    }

    /// Start the deliveries whose group let them go; starting one may fail
    /// and let the next go, so this loops rather than recursing.
    fn run_ready(&mut self) {
        while let Some((d, group)) = self.ready.pop() {
            self.run(d, group, false);
        }
    }

    fn write_report(&mut self, id: u16, report: &[u8], note: bool) {
        wire::put_number(self.wire, &mut self.out, id);
        self.out.extend_from_slice(report);
        if note {
            self.out.extend_from_slice(DAEMON_DOWN_NOTE);
        }
        self.out.push(0);
    }

    fn tick(&mut self, now: Instant) {
        for expired in self.holder.expire(now) {
            self.expire(expired);
        }
        if self.routes.refresh() {
            self.directory.clear();
        }
        self.directory.prune(now);
        self.tell_daemon();
        self.run_ready();
    }

    fn expire(&mut self, expired: Expired<Delivery>) {
        let Expired {
            group,
            limit,
            delivery,
        } = expired;
        let secs = self.holder.timeout().as_secs();
        let text = format!(
            "ZDestination group {group} is at its limit of {limit} connections; \
             the delivery waited {secs} seconds for a slot. (#4.4.5)\n"
        );
        self.end(delivery.cmd.delnum, text.as_bytes(), None, false);
    }

    /// Tell the daemon the deliveries in flight and held per group, when
    /// they changed or it has not heard for a while.
    fn tell_daemon(&mut self) {
        let stale = self.reported.is_some_and(|at| at.elapsed() >= REPORT_EVERY);
        let groups = match self.holder.take_changes() {
            Some(groups) => groups,
            None if stale => self.holder.snapshot(),
            None => return,
        };
        self.reported = Some(Instant::now());
        let client = self.client.clone();
        tokio::task::spawn_local(async move {
            let _ = client.request(&Request::Deliveries { groups }).await;
        });
    }

    /// Tell the daemon that nothing is in flight any more, if it was told
    /// anything before.
    async fn farewell(&mut self) {
        if self.reported.is_some() {
            let request = Request::Deliveries {
                groups: self.holder.snapshot(),
            };
            let _ = tokio::time::timeout(TICK, self.client.request(&request)).await;
        }
    }

    fn flush(&mut self) {
        self.pool.flush();
        if !self.out.is_empty() {
            let _ = self.reports.send(std::mem::take(&mut self.out));
        }
    }
}
