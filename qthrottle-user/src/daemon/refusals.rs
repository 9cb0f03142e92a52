//! Reads refusal events from the kernel's ring buffer and logs them, at most
//! one line per group per second; the lines left out are counted in the next.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use qthrottle_common::RefusalEvent;

/// Per-group log throttle.
#[derive(Default)]
pub struct RefusalLog {
    /// Per group name: when its last line was written, and lines left out since.
    last: BTreeMap<String, (Instant, u64)>,
}

const INTERVAL: Duration = Duration::from_secs(1);

impl RefusalLog {
    /// Drains the ring buffer; `name` gives a slot's group name.
    pub fn drain(&mut self, events: &mut RingBuf<MapData>, name: impl Fn(u32) -> String) {
        while let Some(item) = events.next() {
            if item.len() < std::mem::size_of::<RefusalEvent>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole RefusalEvent (length checked);
            // read_unaligned copes with the ring buffer's 8-byte alignment.
            let event: RefusalEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            self.note(&event, &name);
        }
        self.flush();
    }

    /// Reports refusals left out of the log once their group has been quiet
    /// for a second, so a burst's tail is not held back until the next one.
    fn flush(&mut self) {
        let now = Instant::now();
        for (group, (last, suppressed)) in &mut self.last {
            if *suppressed > 0 && now.duration_since(*last) >= INTERVAL {
                tracing::warn!(
                    "refused group={group}: {suppressed} more refusals since the last line"
                );
                *last = now;
                *suppressed = 0;
            }
        }
        self.last
            .retain(|_, (last, _)| now.duration_since(*last) < Duration::from_secs(60));
    }

    fn note(&mut self, event: &RefusalEvent, name: &impl Fn(u32) -> String) {
        let now = Instant::now();
        let group = name(event.slot);
        let (last, suppressed) = self
            .last
            .entry(group.clone())
            .or_insert((now - INTERVAL, 0));
        if now.duration_since(*last) < INTERVAL {
            *suppressed += 1;
            return;
        }
        let more = if *suppressed > 0 {
            format!(" (+{suppressed} more since last line)")
        } else {
            String::new()
        };
        tracing::warn!(
            "refused group={} destination={} open={}/{} pid={}{more}",
            group,
            destination(event),
            event.open,
            event.limit,
            event.pid,
        );
        *last = now;
        *suppressed = 0;
    }
}

fn destination(event: &RefusalEvent) -> SocketAddr {
    let v6 = Ipv6Addr::from(event.addr);
    let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
    SocketAddr::new(ip, event.port)
}
