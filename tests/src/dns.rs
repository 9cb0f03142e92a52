//! A real DNS server on loopback, authoritative for the zone data a test gives it.
//!
//! The server runs in-process on its own thread and answers over UDP and TCP on the same
//! OS-assigned port of 127.0.0.1. The zone is master-file text whose origin is the root, so a
//! test may use any names; the zone can be replaced while the server runs, and chosen names
//! can be made to fail with SERVFAIL. The server stops when the [`DnsServer`] is dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, ResponseCode};
use hickory_server::proto::rr::{LowerName, Name, RecordSet, RecordType, RrKey};
use hickory_server::proto::serialize::txt::Parser;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, MessageResponseBuilder, ZoneType};
use tokio::sync::oneshot;

/// TTL of records written without one.
const DEFAULT_TTL: u32 = 3600;
/// SOA added when the zone text has none; its minimum (3600 s) is the negative TTL.
const DEFAULT_SOA: &str = ". 3600 IN SOA ns.test. hostmaster.test. 1 3600 600 86400 3600";
/// How long an idle TCP client may keep its connection.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 16;
/// Tries at finding a port free for both UDP and TCP.
const BIND_TRIES: usize = 50;

/// A running DNS server; stops on drop.
pub struct DnsServer {
    addr: SocketAddr,
    zones: Arc<Zones>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    /// Starts a server for `zone`: master-file text relative to the root, e.g.
    /// `"example.test. 300 IN MX 10 mx.example.test.\nmx.example.test. 300 IN A 127.0.0.2"`.
    /// Records without a TTL get 3600 s; an SOA is added when the text has none.
    pub fn start(zone: &str) -> Result<Self> {
        let zones = Arc::new(Zones::new(catalog(zone)?));
        let (udp, tcp) = bind_same_port().context("failed to bind the DNS server sockets")?;
        let addr = udp
            .local_addr()
            .context("failed to read the DNS server address")?;
        let (stop, stopped) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handler = SwitchHandler(Arc::clone(&zones));
        let thread = std::thread::Builder::new()
            .name("dns-server".into())
            .spawn(move || serve(handler, udp, tcp, stopped, ready_tx))
            .context("failed to start the DNS server thread")?;
        let started = ready_rx
            .recv()
            .map_err(|_| anyhow!("DNS server thread ended early"));
        let server = Self {
            addr,
            zones,
            stop: Some(stop),
            thread: Some(thread),
        };
        started?.context("failed to start the DNS server")?;
        Ok(server)
    }

    /// The address the server answers on, UDP and TCP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the whole zone; queries after this call see the new data.
    pub fn set_zone(&self, zone: &str) -> Result<()> {
        let catalog = catalog(zone)?;
        *self
            .zones
            .catalog
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(catalog);
        Ok(())
    }

    /// Answers every query for `name` (any type) with SERVFAIL from now on.
    pub fn fail(&self, name: &str) -> Result<()> {
        let name = Name::from_ascii(name).with_context(|| format!("invalid name {name:?}"))?;
        let mut failing = self
            .zones
            .failing
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        failing.insert(LowerName::new(&name));
        Ok(())
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // An error means the thread has already ended; joining is all that is left.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The zone data a running server answers from.
struct Zones {
    catalog: RwLock<Arc<Catalog>>,
    failing: RwLock<BTreeSet<LowerName>>,
}

impl Zones {
    fn new(catalog: Catalog) -> Self {
        Self {
            catalog: RwLock::new(Arc::new(catalog)),
            failing: RwLock::new(BTreeSet::new()),
        }
    }

    fn current(&self) -> Arc<Catalog> {
        Arc::clone(&self.catalog.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn fails(&self, request: &Request) -> bool {
        let Ok(info) = request.request_info() else {
            return false;
        };
        let failing = self.failing.read().unwrap_or_else(PoisonError::into_inner);
        failing.contains(info.query.name())
    }
}

/// Hands each request to the current zone, or answers SERVFAIL for a failing name.
struct SwitchHandler(Arc<Zones>);

#[async_trait::async_trait]
impl RequestHandler for SwitchHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        if self.0.fails(request) {
            return server_failure(request, response_handle).await;
        }
        let catalog = self.0.current();
        catalog
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

async fn server_failure<R: ResponseHandler>(request: &Request, mut handle: R) -> ResponseInfo {
    let response = MessageResponseBuilder::new(&request.queries, None)
        .error_msg(&request.metadata, ResponseCode::ServFail);
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(_) => {
            let mut metadata = request.metadata;
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        }
    }
}

/// A catalog holding one zone at the root, parsed from `zone`.
fn catalog(zone: &str) -> Result<Catalog> {
    let mut records = parse(&format!("$TTL {DEFAULT_TTL}\n{zone}"))?;
    let soa_key = RrKey::new(LowerName::new(&Name::root()), RecordType::SOA);
    if !records.contains_key(&soa_key) {
        records.extend(parse(DEFAULT_SOA)?);
    }
    let handler = InMemoryZoneHandler::<hickory_server::net::runtime::TokioRuntimeProvider>::new(
        Name::root(),
        records,
        ZoneType::Primary,
        AxfrPolicy::Deny,
    )
    .map_err(|message| anyhow!("failed to load the test zone: {message}"))?;
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::new(&Name::root()), vec![Arc::new(handler)]);
    Ok(catalog)
}

fn parse(text: &str) -> Result<BTreeMap<RrKey, RecordSet>> {
    let (_, records) = Parser::new(text, None, Some(Name::root()))
        .parse()
        .context("failed to parse the test zone")?;
    Ok(records)
}

/// A UDP socket and a TCP listener on the same free port of 127.0.0.1.
fn bind_same_port() -> Result<(UdpSocket, TcpListener)> {
    let mut last_error = None;
    for _ in 0..BIND_TRIES {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        match TcpListener::bind(udp.local_addr()?) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.map_or_else(|| anyhow!("no free port"), anyhow::Error::from))
}

/// The server thread: runs until `stopped` fires or its sender is dropped.
fn serve(
    handler: SwitchHandler,
    udp: UdpSocket,
    tcp: TcpListener,
    stopped: oneshot::Receiver<()>,
    ready: std::sync::mpsc::Sender<Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = ready.send(Err(error.into()));
            return;
        }
    };
    runtime.block_on(async move {
        let mut server = Server::new(handler);
        match register(&mut server, udp, tcp) {
            Ok(()) => {
                let _ = ready.send(Ok(()));
                let _ = stopped.await;
            }
            Err(error) => {
                let _ = ready.send(Err(error));
            }
        }
        // Dropping the server ends its tasks and closes the sockets.
    });
}

fn register(server: &mut Server<SwitchHandler>, udp: UdpSocket, tcp: TcpListener) -> Result<()> {
    udp.set_nonblocking(true)?;
    tcp.set_nonblocking(true)?;
    server.register_socket(tokio::net::UdpSocket::from_std(udp)?);
    let listener = tokio::net::TcpListener::from_std(tcp)?;
    server.register_listener(listener, TCP_IDLE, TCP_RESPONSE_BUFFER);
    Ok(())
}
