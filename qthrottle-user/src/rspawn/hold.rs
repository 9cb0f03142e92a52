//! Holding deliveries per destination group: each group runs at most its
//! limit of deliveries at once, and the rest wait in the group's FIFO.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::control::GroupDeliveries;

/// A destination group's name, shared by everything that refers to it.
pub type GroupName = Rc<str>;

#[derive(Debug)]
struct Group<T> {
    limit: u32,
    in_flight: u32,
    queue: VecDeque<(Instant, T)>,
}

/// What became of a delivery offered to its group.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<T> {
    /// Below the limit: run it now (it counts as in flight).
    Start(T),
    /// At the limit: it waits in the group's FIFO.
    Held,
    /// At the limit with the FIFO full: give it back to qmail-send.
    QueueFull(T),
}

/// A delivery that waited too long, with its group and that group's limit.
#[derive(Debug, PartialEq, Eq)]
pub struct Expired<T> {
    pub group: GroupName,
    pub limit: u32,
    pub delivery: T,
}

/// All groups with deliveries in flight or held.
#[derive(Debug)]
pub struct Holder<T> {
    groups: HashMap<GroupName, Group<T>>,
    timeout: Duration,
    max_queue: usize,
    changed: bool,
}

impl<T> Holder<T> {
    pub fn new(timeout: Duration, max_queue: usize) -> Self {
        Holder {
            groups: HashMap::new(),
            timeout,
            max_queue,
            changed: false,
        }
    }

    /// Offer a delivery to `group`, whose limit is `limit`. Deliveries that
    /// a raised limit lets start are appended to `started`.
    pub fn admit(
        &mut self,
        group: &GroupName,
        limit: u32,
        delivery: T,
        now: Instant,
        started: &mut Vec<T>,
    ) -> Admission<T> {
        self.changed = true;
        let entry = self.groups.entry(group.clone()).or_insert_with(|| Group {
            limit,
            in_flight: 0,
            queue: VecDeque::new(),
        });
        entry.limit = limit;
        start_waiting(entry, started);
        if entry.in_flight < entry.limit && entry.queue.is_empty() {
            entry.in_flight += 1;
            return Admission::Start(delivery);
        }
        if entry.queue.len() >= self.max_queue {
            return Admission::QueueFull(delivery);
        }
        entry.queue.push_back((now, delivery));
        Admission::Held
    }

    /// A delivery of `group` ended; the deliveries that may start now are
    /// appended to `started`.
    pub fn finish(&mut self, group: &GroupName, started: &mut Vec<T>) {
        self.changed = true;
        let Some(entry) = self.groups.get_mut(group) else {
            return;
        };
        entry.in_flight = entry.in_flight.saturating_sub(1);
        start_waiting(entry, started);
        if entry.in_flight == 0 && entry.queue.is_empty() {
            self.groups.remove(group);
        }
    }

    /// Take out every delivery that has waited longer than the hold timeout.
    pub fn expire(&mut self, now: Instant) -> Vec<Expired<T>> {
        let mut expired = Vec::new();
        for (name, group) in &mut self.groups {
            while let Some((since, _)) = group.queue.front() {
                if now.duration_since(*since) < self.timeout {
                    break;
                }
                let Some((_, delivery)) = group.queue.pop_front() else {
                    break;
                };
                expired.push(Expired {
                    group: name.clone(),
                    limit: group.limit,
                    delivery,
                });
            }
        }
        if !expired.is_empty() {
            self.changed = true;
            self.groups
                .retain(|_, g| g.in_flight > 0 || !g.queue.is_empty());
        }
        expired
    }

    /// How long a delivery may wait.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How many deliveries wait in `group`.
    pub fn held_in(&self, group: &GroupName) -> usize {
        self.groups.get(group).map_or(0, |g| g.queue.len())
    }

    /// How many deliveries wait, in all groups.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.groups.values().map(|g| g.queue.len()).sum()
    }

    /// Deliveries in flight and held per group, if anything changed since the
    /// last call.
    pub fn take_changes(&mut self) -> Option<BTreeMap<String, GroupDeliveries>> {
        if !std::mem::take(&mut self.changed) {
            return None;
        }
        Some(self.snapshot())
    }

    /// Deliveries in flight and held per group.
    pub fn snapshot(&self) -> BTreeMap<String, GroupDeliveries> {
        let count = |g: &Group<T>| GroupDeliveries {
            in_flight: u64::from(g.in_flight),
            held: g.queue.len() as u64,
        };
        self.groups
            .iter()
            .map(|(name, g)| (name.to_string(), count(g)))
            .collect()
    }
}

fn start_waiting<T>(group: &mut Group<T>, started: &mut Vec<T>) {
    while group.in_flight < group.limit {
        let Some((_, delivery)) = group.queue.pop_front() else {
            return;
        };
        group.in_flight += 1;
        started.push(delivery);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder() -> Holder<u32> {
        Holder::new(Duration::from_secs(10), 2)
    }

    #[test]
    fn holds_past_the_limit_and_starts_in_order() {
        let mut h = holder();
        let g: GroupName = "google".into();
        let now = Instant::now();
        let mut started = Vec::new();
        assert_eq!(h.admit(&g, 1, 1, now, &mut started), Admission::Start(1));
        assert_eq!(h.admit(&g, 1, 2, now, &mut started), Admission::Held);
        assert_eq!(h.admit(&g, 1, 3, now, &mut started), Admission::Held);
        assert_eq!(
            h.admit(&g, 1, 4, now, &mut started),
            Admission::QueueFull(4)
        );
        h.finish(&g, &mut started);
        assert_eq!(started, [2]);
        h.finish(&g, &mut started);
        assert_eq!(started, [2, 3]);
        h.finish(&g, &mut started);
        assert!(h.snapshot().is_empty());
    }

    #[test]
    fn raised_limit_starts_waiting_deliveries() {
        let mut h = holder();
        let g: GroupName = "orange".into();
        let now = Instant::now();
        let mut started = Vec::new();
        h.admit(&g, 1, 1, now, &mut started);
        h.admit(&g, 1, 2, now, &mut started);
        assert_eq!(h.admit(&g, 3, 3, now, &mut started), Admission::Start(3));
        assert_eq!(started, [2]);
        assert_eq!(
            h.snapshot()["orange"],
            GroupDeliveries {
                in_flight: 3,
                held: 0
            }
        );
    }

    #[test]
    fn waiting_too_long_expires_with_the_group_named() {
        let mut h = holder();
        let g: GroupName = "yahoo".into();
        let now = Instant::now();
        let mut started = Vec::new();
        h.admit(&g, 1, 1, now, &mut started);
        h.admit(&g, 1, 2, now, &mut started);
        assert!(h.expire(now + Duration::from_secs(9)).is_empty());
        let expired = h.expire(now + Duration::from_secs(10));
        assert_eq!(
            expired,
            [Expired {
                group: g.clone(),
                limit: 1,
                delivery: 2
            }]
        );
        assert_eq!(h.held(), 0);
    }
}
