//! Which destination group a recipient domain belongs to: asked of the daemon
//! over its control socket and cached for as long as the answer says.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

use super::hold::GroupName;
use crate::control::{Request, Response};

/// How long the daemon may take to answer one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait before asking an unreachable daemon again.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long a domain the daemon could not place stays without a group.
const NO_GROUP_TTL: Duration = Duration::from_secs(60);
/// Most requests outstanding at once.
const MAX_REQUESTS: usize = 16;

/// A domain's group and that group's limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub group: GroupName,
    pub limit: u32,
}

#[derive(Debug)]
struct Cached {
    placement: Option<Placement>,
    expires: Instant,
}

/// What is known about a domain right now.
#[derive(Debug, PartialEq, Eq)]
pub enum Known {
    /// Hold its deliveries in this group.
    Placed(Placement),
    /// Run its deliveries without holding.
    Unplaced,
    /// The daemon is down and has never placed it: run without holding.
    DaemonDown,
    /// Ask the daemon.
    Ask,
}

/// The cache of answers and the daemon's reachability.
#[derive(Debug, Default)]
pub struct Directory {
    cache: HashMap<String, Cached>,
    down_until: Option<Instant>,
    down_noted: bool,
}

impl Directory {
    /// What to do with a delivery to `domain` (lowercase).
    pub fn known(&self, domain: &str, now: Instant) -> Known {
        let cached = self.cache.get(domain);
        if let Some(c) = cached.filter(|c| c.expires > now) {
            return c.placement.clone().map_or(Known::Unplaced, Known::Placed);
        }
        if !self.down_until.is_some_and(|until| until > now) {
            return Known::Ask;
        }
        match cached.and_then(|c| c.placement.clone()) {
            Some(stale) => Known::Placed(stale),
            None => Known::DaemonDown,
        }
    }

    /// Record the daemon's answer (or failure) about `domain`; returns what
    /// the deliveries that waited for it should do.
    pub fn answered(&mut self, domain: &str, answer: io::Result<Response>, now: Instant) -> Known {
        let (placement, ttl) = match answer {
            Ok(Response::Group { group, limit, ttl }) => (
                Some(Placement {
                    group: group.into(),
                    limit,
                }),
                Duration::from_secs(ttl),
            ),
            Ok(_) => (None, NO_GROUP_TTL),
            Err(_) => {
                self.down_until = Some(now + RETRY_AFTER);
                let stale = self.cache.get(domain).and_then(|c| c.placement.clone());
                return stale.map_or(Known::DaemonDown, Known::Placed);
            }
        };
        self.reachable();
        let known = placement.clone().map_or(Known::Unplaced, Known::Placed);
        self.cache.insert(
            domain.to_string(),
            Cached {
                placement,
                expires: now + ttl,
            },
        );
        known
    }

    fn reachable(&mut self) {
        self.down_until = None;
        self.down_noted = false;
    }

    /// True once per outage: the caller tells qmail-send about it then.
    pub fn note_down(&mut self) -> bool {
        !std::mem::replace(&mut self.down_noted, true)
    }

    /// Forget every answer (the routes changed).
    pub fn clear(&mut self) {
        self.cache.clear();
    }

    /// Drop answers that expired long ago, to bound the cache.
    pub fn prune(&mut self, now: Instant) {
        let keep = |c: &Cached| c.expires + Duration::from_secs(3600) > now;
        if self.cache.len() > 1024 {
            self.cache.retain(|_, c| keep(c));
        }
    }
}

/// Connections to the daemon, reused between requests.
#[derive(Debug)]
pub struct Client {
    socket: PathBuf,
    idle: RefCell<Vec<BufReader<UnixStream>>>,
    slots: Semaphore,
}

impl Client {
    pub fn new(socket: &Path) -> Rc<Self> {
        Rc::new(Client {
            socket: socket.to_path_buf(),
            idle: RefCell::new(Vec::new()),
            slots: Semaphore::new(MAX_REQUESTS),
        })
    }

    /// Send one request and read its answer.
    pub async fn request(&self, request: &Request) -> io::Result<Response> {
        let _slot = self.slots.acquire().await.map_err(io::Error::other)?;
        let exchange = self.exchange(request);
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
    }

    async fn exchange(&self, request: &Request) -> io::Result<Response> {
        let idle = self.idle.borrow_mut().pop();
        let mut conn = match idle {
            Some(conn) => conn,
            None => BufReader::new(UnixStream::connect(&self.socket).await?),
        };
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        conn.get_mut().write_all(&line).await?;
        let mut answer = String::new();
        if conn.read_line(&mut answer).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let response = serde_json::from_str(&answer)?;
        self.idle.borrow_mut().push(conn);
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, limit: u32, ttl: u64) -> io::Result<Response> {
        Ok(Response::Group {
            group: name.into(),
            limit,
            ttl,
        })
    }

    #[test]
    fn answers_are_cached_for_their_ttl() {
        let mut d = Directory::default();
        let now = Instant::now();
        assert_eq!(d.known("a.org", now), Known::Ask);
        d.answered("a.org", group("g", 3, 10), now);
        let placed = Known::Placed(Placement {
            group: "g".into(),
            limit: 3,
        });
        assert_eq!(d.known("a.org", now + Duration::from_secs(9)), placed);
        assert_eq!(d.known("a.org", now + Duration::from_secs(10)), Known::Ask);
    }

    #[test]
    fn unreachable_daemon_means_stale_answer_or_none_until_retry() {
        let mut d = Directory::default();
        let now = Instant::now();
        d.answered("a.org", group("g", 3, 0), now);
        d.answered("b.org", Err(io::ErrorKind::ConnectionRefused.into()), now);
        assert_eq!(d.known("b.org", now), Known::DaemonDown);
        assert!(matches!(d.known("a.org", now), Known::Placed(_)));
        assert!(d.note_down());
        assert!(!d.note_down());
        assert_eq!(d.known("b.org", now + RETRY_AFTER), Known::Ask);
        d.answered(
            "b.org",
            Ok(Response::Error {
                message: "x".into(),
            }),
            now,
        );
        assert_eq!(d.known("b.org", now), Known::Unplaced);
        assert!(d.note_down());
    }
}
