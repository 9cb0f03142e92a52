//! Mail domain resolution: a domain's MX hosts and their addresses (RFC 5321 section 5.1).
//!
//! A domain with MX records is served by those hosts; a domain without MX records is its own
//! mail host (the implicit MX); a null MX (`0 .`, RFC 7505) means the domain receives no mail.
//! CNAMEs are followed at every step. The resolver keeps no answer from one call to the next:
//! the daemon decides when to resolve again ([`next_refresh`]).

use std::collections::BTreeSet;
use std::error::Error;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::future::try_join_all;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{self, NetError};
use hickory_resolver::proto::ProtoError;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};

use crate::config::DnsConfig;

/// Responses kept while one domain is being resolved; emptied before the next one.
const CACHE_ENTRIES: u64 = 256;
/// The TTL given to an address literal, which never changes.
const LITERAL_TTL: Duration = Duration::from_secs(7 * 86_400);

/// What a mail domain resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailHosts {
    /// The mail hosts, most preferred first, lowercase, without the trailing dot. For a domain
    /// without MX records this is the domain itself; for a null MX or a domain that does not
    /// exist it is empty.
    pub mx_hosts: Vec<String>,
    /// The IPv4 and IPv6 addresses of all mail hosts.
    pub addresses: BTreeSet<IpAddr>,
    /// The domain publishes a null MX: it receives no mail.
    pub null_mx: bool,
    /// The domain does not exist (NXDOMAIN).
    pub nxdomain: bool,
    /// The smallest TTL of the answers used, negative answers included; zero when no answer
    /// carried one.
    pub ttl: Duration,
}

/// Why a domain could not be resolved. An answer that says "no such domain" or "no such
/// record" is not an error.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The text is not a valid domain name.
    #[error("invalid domain name {domain:?}")]
    InvalidName {
        domain: String,
        #[source]
        source: ProtoError,
    },
    /// The system resolver configuration (/etc/resolv.conf) could not be read.
    #[error("failed to read the system resolver configuration")]
    SystemConfig(#[source] NetError),
    /// The resolver could not be built from its configuration.
    #[error("failed to set up the resolver")]
    Setup(#[source] NetError),
    /// A query failed: timeout, SERVFAIL, REFUSED, network error.
    #[error("failed to look up {record_type} records of {name}")]
    Lookup {
        name: String,
        record_type: RecordType,
        #[source]
        source: Box<dyn Error + Send + Sync>,
    },
}

/// Resolves mail domains through the configured name servers (UDP, TCP when truncated).
#[derive(Clone)]
pub struct MailResolver {
    resolver: TokioResolver,
}

impl MailResolver {
    /// A resolver set up from the configuration's `[dns]` section.
    pub fn from_config(config: &DnsConfig) -> Result<Self, DnsError> {
        Self::new(&config.nameservers, config.timeout)
    }

    /// A resolver asking `nameservers` (any port; empty: those of /etc/resolv.conf), giving
    /// each query `timeout` in all before it fails.
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<Self, DnsError> {
        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(DnsError::SystemConfig)?
        } else {
            let servers = nameservers.iter().map(name_server).collect();
            let config = ResolverConfig::from_parts(None, Vec::new(), servers);
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        };
        tune(builder.options_mut(), timeout);
        let resolver = builder.build().map_err(DnsError::Setup)?;
        Ok(Self { resolver })
    }

    /// Resolves `domain` to its mail hosts and their addresses. An address literal
    /// (`[192.0.2.1]`, `[IPv6:2001:db8::1]`) stands for itself.
    pub async fn resolve(&self, domain: &str) -> Result<MailHosts, DnsError> {
        if let Some(address) = address_literal(domain) {
            return Ok(MailHosts::literal(address));
        }
        let name = domain_name(domain)?;
        // Every call sees the name servers' current data, never an earlier call's answers.
        self.resolver.clear_cache();
        let mut ttl = MinTtl::default();
        let mx = self.query(&name, RecordType::MX).await?;
        ttl.add(mx.ttl());
        let hosts = match mx {
            Answer::Empty { nxdomain: true, .. } => return Ok(ttl.finish(MailHosts::nxdomain())),
            Answer::Empty { .. } => vec![name],
            Answer::Records(lookup) => match mail_exchangers(&lookup) {
                Exchangers::Implicit => vec![name],
                Exchangers::Null => return Ok(ttl.finish(MailHosts::null_mx())),
                Exchangers::Hosts(hosts) => hosts,
            },
        };
        let addresses = self.addresses_of(&hosts, &mut ttl).await?;
        let mx_hosts = hosts.iter().map(host_text).collect();
        Ok(ttl.finish(MailHosts::served(mx_hosts, addresses)))
    }

    /// Resolves `host` straight to its A and AAAA addresses, without looking for MX records:
    /// a relay named in smtproutes. An IP address, bracketed or not, stands for itself.
    pub async fn resolve_host(&self, host: &str) -> Result<MailHosts, DnsError> {
        if let Some(address) = address_literal(host) {
            return Ok(MailHosts::literal(address));
        }
        let name = domain_name(host)?;
        self.resolver.clear_cache();
        let found = self.host_addresses(&name).await?;
        let mut ttl = MinTtl::default();
        ttl.add(found.ttl);
        if found.nxdomain {
            return Ok(ttl.finish(MailHosts::nxdomain()));
        }
        let addresses = found.addresses.into_iter().collect();
        Ok(ttl.finish(MailHosts::served(vec![host_text(&name)], addresses)))
    }

    /// The A and AAAA addresses of all `hosts`, looked up concurrently.
    async fn addresses_of(
        &self,
        hosts: &[Name],
        ttl: &mut MinTtl,
    ) -> Result<BTreeSet<IpAddr>, DnsError> {
        let lookups = hosts.iter().map(|host| self.host_addresses(host));
        let mut addresses = BTreeSet::new();
        for found in try_join_all(lookups).await? {
            addresses.extend(found.addresses);
            ttl.add(found.ttl);
        }
        Ok(addresses)
    }

    /// One host's A and AAAA addresses.
    async fn host_addresses(&self, host: &Name) -> Result<HostAddresses, DnsError> {
        let (v4, v6) = tokio::try_join!(
            self.query(host, RecordType::A),
            self.query(host, RecordType::AAAA)
        )?;
        Ok(HostAddresses {
            addresses: v4.addresses().chain(v6.addresses()).collect(),
            ttl: [v4.ttl(), v6.ttl()].into_iter().flatten().min(),
            nxdomain: v4.is_nxdomain() && v6.is_nxdomain(),
        })
    }

    /// One query; "no such name" and "no such record" come back as [`Answer::Empty`].
    async fn query(&self, name: &Name, record_type: RecordType) -> Result<Answer, DnsError> {
        match self.resolver.lookup(name.clone(), record_type).await {
            Ok(lookup) => Ok(Answer::Records(lookup)),
            Err(NetError::Dns(net::DnsError::NoRecordsFound(none))) => Ok(Answer::Empty {
                nxdomain: none.response_code == ResponseCode::NXDomain,
                ttl: none.negative_ttl,
            }),
            Err(error) => Err(DnsError::Lookup {
                name: host_text(name),
                record_type,
                source: cause(error),
            }),
        }
    }
}

/// The cause of a failed query. A resolver error that only wraps another one also names it
/// in its own message; keeping the inner error keeps the message from saying it twice.
fn cause(error: NetError) -> Box<dyn Error + Send + Sync> {
    match error {
        NetError::Dns(inner) => Box::new(inner),
        NetError::Proto(inner) => Box::new(inner),
        other => Box::new(other),
    }
}

/// When to resolve again: the answer's TTL, kept within `[min, max]`.
pub fn next_refresh(ttl: Duration, min: Duration, max: Duration) -> Duration {
    ttl.min(max).max(min)
}

impl MailHosts {
    fn literal(address: IpAddr) -> Self {
        Self {
            ttl: LITERAL_TTL,
            ..Self::served(vec![address.to_string()], BTreeSet::from([address]))
        }
    }

    fn nxdomain() -> Self {
        Self {
            nxdomain: true,
            ..Self::served(Vec::new(), BTreeSet::new())
        }
    }

    fn null_mx() -> Self {
        Self {
            null_mx: true,
            ..Self::served(Vec::new(), BTreeSet::new())
        }
    }

    fn served(mx_hosts: Vec<String>, addresses: BTreeSet<IpAddr>) -> Self {
        Self {
            mx_hosts,
            addresses,
            null_mx: false,
            nxdomain: false,
            ttl: Duration::ZERO,
        }
    }
}

/// What one host name resolved to.
struct HostAddresses {
    addresses: Vec<IpAddr>,
    /// The smallest TTL of the A and AAAA answers.
    ttl: Option<u32>,
    /// The name does not exist.
    nxdomain: bool,
}

/// The outcome of one query.
enum Answer {
    /// Records of the type asked for, with the CNAMEs that led to them.
    Records(Lookup),
    /// No record: the name does not exist (`nxdomain`) or has no record of that type.
    Empty { nxdomain: bool, ttl: Option<u32> },
}

impl Answer {
    /// How long the answer may be kept: its smallest record TTL, or the negative TTL.
    fn ttl(&self) -> Option<u32> {
        match self {
            Self::Records(lookup) => lookup.answers().iter().map(|record| record.ttl).min(),
            Self::Empty { ttl, .. } => *ttl,
        }
    }

    fn is_nxdomain(&self) -> bool {
        matches!(self, Self::Empty { nxdomain: true, .. })
    }

    fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let records = match self {
            Self::Records(lookup) => lookup.answers(),
            Self::Empty { .. } => &[],
        };
        records.iter().filter_map(|record| match &record.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
            _ => None,
        })
    }
}

/// What a domain's MX records say about where its mail goes.
#[derive(Debug, PartialEq, Eq)]
enum Exchangers {
    /// No MX record: the domain is its own mail host.
    Implicit,
    /// Only null MX records: no mail host at all.
    Null,
    /// These hosts, most preferred first.
    Hosts(Vec<Name>),
}

/// Reads the MX records of an answer. A null MX next to real ones is ignored.
fn mail_exchangers(lookup: &Lookup) -> Exchangers {
    let mut records: Vec<(u16, Name)> = lookup
        .answers()
        .iter()
        .filter_map(|record| match &record.data {
            RData::MX(mx) => Some((mx.preference, mx.exchange.to_lowercase())),
            _ => None,
        })
        .collect();
    if records.is_empty() {
        return Exchangers::Implicit;
    }
    records.retain(|(_, exchange)| !exchange.is_root());
    if records.is_empty() {
        return Exchangers::Null;
    }
    records.sort();
    let mut hosts: Vec<Name> = Vec::with_capacity(records.len());
    for (_, host) in records {
        if !hosts.contains(&host) {
            hosts.push(host);
        }
    }
    Exchangers::Hosts(hosts)
}

/// The smallest TTL seen so far.
#[derive(Default)]
struct MinTtl(Option<u32>);

impl MinTtl {
    fn add(&mut self, ttl: Option<u32>) {
        self.0 = match (self.0, ttl) {
            (Some(seen), Some(new)) => Some(seen.min(new)),
            (seen, new) => seen.or(new),
        };
    }

    fn finish(self, mut hosts: MailHosts) -> MailHosts {
        hosts.ttl = Duration::from_secs(self.0.unwrap_or(0).into());
        hosts
    }
}

/// The address in an address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`) or a bare address.
fn address_literal(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    let inner = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    let inner = inner
        .strip_prefix("IPv6:")
        .or_else(|| inner.strip_prefix("ipv6:"))
        .unwrap_or(inner);
    inner.parse().ok()
}

/// The absolute, lowercase name of a mail domain given as text.
fn domain_name(domain: &str) -> Result<Name, DnsError> {
    let invalid = |source| DnsError::InvalidName {
        domain: domain.to_owned(),
        source,
    };
    let trimmed = domain.trim().trim_end_matches('.');
    if trimmed.is_empty() {
        return Err(invalid(ProtoError::from("empty domain name")));
    }
    let mut name = Name::from_utf8(trimmed).map_err(invalid)?.to_lowercase();
    name.set_fqdn(true);
    Ok(name)
}

/// A host name as text: lowercase ASCII, no trailing dot.
fn host_text(name: &Name) -> String {
    let text = name.to_lowercase().to_ascii();
    text.trim_end_matches('.').to_owned()
}

/// A name server on any port, over UDP, and TCP for truncated answers.
fn name_server(addr: &SocketAddr) -> NameServerConfig {
    let mut udp = ConnectionConfig::udp();
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = addr.port();
    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
}

fn tune(options: &mut ResolverOpts, timeout: Duration) {
    options.timeout = timeout;
    // The pool already resends over UDP within the timeout; a retry on top of it would
    // multiply the time a dead server costs.
    options.attempts = 0;
    options.cache_size = CACHE_ENTRIES;
    options.use_hosts_file = ResolveHosts::Never;
    options.preserve_intermediates = true;
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::op::Query;
    use hickory_resolver::proto::rr::Record;
    use hickory_resolver::proto::rr::rdata::{CNAME, MX};

    fn name(text: &str) -> Name {
        Name::from_ascii(text).expect("valid test name")
    }

    fn mx_answer(records: &[(u16, &str)]) -> Lookup {
        let owner = name("example.test.");
        let answers = records.iter().map(|(preference, exchange)| {
            let mx = MX::new(*preference, name(exchange));
            Record::from_rdata(owner.clone(), 300, RData::MX(mx))
        });
        Lookup::new_with_max_ttl(Query::query(owner.clone(), RecordType::MX), answers)
    }

    #[test]
    fn next_refresh_stays_within_floor_and_ceiling() {
        let (min, max) = (Duration::from_secs(60), Duration::from_secs(86_400));
        assert_eq!(next_refresh(Duration::from_secs(5), min, max), min);
        assert_eq!(
            next_refresh(Duration::from_secs(300), min, max).as_secs(),
            300
        );
        assert_eq!(next_refresh(Duration::from_secs(604_800), min, max), max);
        assert_eq!(next_refresh(Duration::ZERO, min, max), min);
    }

    #[test]
    fn exchangers_are_ordered_by_preference_and_deduplicated() {
        let lookup = mx_answer(&[
            (20, "B.example.test."),
            (10, "a.example.test."),
            (30, "b.example.test."),
        ]);
        let expected = vec![name("a.example.test."), name("b.example.test.")];
        assert_eq!(mail_exchangers(&lookup), Exchangers::Hosts(expected));
    }

    #[test]
    fn null_mx_alone_means_no_mail_host() {
        assert_eq!(mail_exchangers(&mx_answer(&[(0, ".")])), Exchangers::Null);
    }

    #[test]
    fn null_mx_next_to_real_hosts_is_ignored() {
        let lookup = mx_answer(&[(0, "."), (10, "mx.example.test.")]);
        let expected = vec![name("mx.example.test.")];
        assert_eq!(mail_exchangers(&lookup), Exchangers::Hosts(expected));
    }

    #[test]
    fn answer_without_mx_records_is_an_implicit_mx() {
        let owner = name("example.test.");
        let cname = RData::CNAME(CNAME(name("other.test.")));
        let record = Record::from_rdata(owner.clone(), 300, cname);
        let lookup = Lookup::new_with_max_ttl(Query::query(owner, RecordType::MX), [record]);
        assert_eq!(mail_exchangers(&lookup), Exchangers::Implicit);
    }

    #[test]
    fn domain_names_are_absolute_and_lowercase() {
        let parsed = domain_name("Example.TEST").expect("valid name");
        assert!(parsed.is_fqdn());
        assert_eq!(host_text(&parsed), "example.test");
        assert_eq!(
            host_text(&domain_name("example.test.").expect("valid name")),
            "example.test"
        );
        assert!(domain_name("").is_err());
        assert!(domain_name(" . ").is_err());
    }

    #[test]
    fn address_literals_stand_for_themselves() {
        let v4: IpAddr = "192.0.2.1".parse().expect("address");
        let v6: IpAddr = "2001:db8::1".parse().expect("address");
        assert_eq!(address_literal("[192.0.2.1]"), Some(v4));
        assert_eq!(address_literal("192.0.2.1"), Some(v4));
        assert_eq!(address_literal("[IPv6:2001:db8::1]"), Some(v6));
        assert_eq!(address_literal("2001:db8::1"), Some(v6));
        assert_eq!(address_literal("mx.example.test"), None);
        assert_eq!(address_literal("[mx.example.test]"), None);
        let hosts = MailHosts::literal(v4);
        assert_eq!(hosts.addresses, BTreeSet::from([v4]));
        assert_eq!(hosts.mx_hosts, ["192.0.2.1"]);
    }

    #[test]
    fn smallest_ttl_wins_and_none_means_zero() {
        let mut ttl = MinTtl::default();
        ttl.add(None);
        ttl.add(Some(300));
        ttl.add(Some(60));
        ttl.add(Some(120));
        assert_eq!(ttl.finish(MailHosts::nxdomain()).ttl.as_secs(), 60);
        assert_eq!(
            MinTtl::default().finish(MailHosts::nxdomain()).ttl,
            Duration::ZERO
        );
    }
}
