//! Mail domain resolution against a real DNS server on loopback.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use qthrottle::dns::{DnsError, MailHosts, MailResolver};
use qthrottle_tests::dns::DnsServer;

/// Per-query timeout given to the resolver.
const TIMEOUT: Duration = Duration::from_secs(2);

const ZONE: &str = "
shared-a.test.        MX    10 mx.provider.test.
shared-b.test.        MX    20 MX.Provider.TEST.
mx.provider.test.     A     127.0.10.1
mx.provider.test.     AAAA  fd00::10:1
two.test.             MX    10 mx1.two.test.
two.test.             MX    20 mx2.two.test.
mx1.two.test.         A     127.0.20.1
mx2.two.test.         AAAA  fd00::20:2
nullmx.test.          MX    0 .
nullmx.test.          A     127.0.30.1
alias.test.           MX    10 mail.alias.test.
mail.alias.test.      CNAME real.hosting.test.
real.hosting.test.    A     127.0.40.1
plain.test.           A     127.0.50.1
plain.test.           AAAA  fd00::50:1
cname-domain.test.    CNAME shared-a.test.
ttl.test.         300 MX    10 mx.ttl.test.
mx.ttl.test.       45 A     127.0.60.1
mx.ttl.test.      600 AAAA  fd00::60:1
moving.test.          MX    10 mx.moving.test.
mx.moving.test.       A     127.0.70.1
broken.test.          MX    10 mx.broken.test.
mx.broken.test.       A     127.0.80.1
half-broken.test.     MX    10 mx1.half-broken.test.
half-broken.test.     MX    20 mx2.half-broken.test.
mx1.half-broken.test. A     127.0.81.1
mx2.half-broken.test. A     127.0.81.2
";

fn start() -> (DnsServer, MailResolver) {
    start_with(ZONE)
}

fn start_with(zone: &str) -> (DnsServer, MailResolver) {
    let server = DnsServer::start(zone).expect("DNS server starts");
    let resolver = MailResolver::new(&[server.addr()], TIMEOUT).expect("resolver is built");
    (server, resolver)
}

async fn resolve(resolver: &MailResolver, domain: &str) -> MailHosts {
    match resolver.resolve(domain).await {
        Ok(hosts) => hosts,
        Err(error) => panic!("{domain}: {}", chain(&error)),
    }
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter()
        .map(|ip| ip.parse().expect("test address"))
        .collect()
}

#[tokio::test]
async fn domains_sharing_an_mx_host_get_the_same_addresses() {
    let (_server, resolver) = start();
    let a = resolve(&resolver, "shared-a.test").await;
    let b = resolve(&resolver, "SHARED-B.test.").await;
    assert_eq!(a.addresses, ips(&["127.0.10.1", "fd00::10:1"]));
    assert_eq!(a.addresses, b.addresses);
    assert_eq!(a.mx_hosts, ["mx.provider.test"]);
    assert_eq!(b.mx_hosts, ["mx.provider.test"]);
}

#[tokio::test]
async fn every_mx_host_contributes_its_addresses() {
    let (_server, resolver) = start();
    let hosts = resolve(&resolver, "two.test").await;
    assert_eq!(hosts.mx_hosts, ["mx1.two.test", "mx2.two.test"]);
    assert_eq!(hosts.addresses, ips(&["127.0.20.1", "fd00::20:2"]));
    assert!(!hosts.null_mx && !hosts.nxdomain);
}

#[tokio::test]
async fn null_mx_gives_no_address() {
    let (_server, resolver) = start();
    let hosts = resolve(&resolver, "nullmx.test").await;
    assert!(hosts.null_mx);
    assert!(
        hosts.addresses.is_empty(),
        "the domain's own A must not be used"
    );
    assert!(hosts.mx_hosts.is_empty());
}

#[tokio::test]
async fn mx_host_behind_a_cname_is_followed() {
    let (_server, resolver) = start();
    let hosts = resolve(&resolver, "alias.test").await;
    assert_eq!(hosts.mx_hosts, ["mail.alias.test"]);
    assert_eq!(hosts.addresses, ips(&["127.0.40.1"]));
}

#[tokio::test]
async fn domain_that_is_a_cname_uses_the_target_mx() {
    let (_server, resolver) = start();
    let hosts = resolve(&resolver, "cname-domain.test").await;
    assert_eq!(hosts.mx_hosts, ["mx.provider.test"]);
    assert_eq!(hosts.addresses, ips(&["127.0.10.1", "fd00::10:1"]));
}

#[tokio::test]
async fn domain_without_mx_is_its_own_mail_host() {
    let (_server, resolver) = start();
    let hosts = resolve(&resolver, "plain.test").await;
    assert_eq!(hosts.mx_hosts, ["plain.test"]);
    assert_eq!(hosts.addresses, ips(&["127.0.50.1", "fd00::50:1"]));
    assert!(!hosts.null_mx && !hosts.nxdomain);
}

#[tokio::test]
async fn nonexistent_domain_is_an_answer_without_address() {
    let (_server, resolver) = start();
    let hosts = resolve(&resolver, "nowhere.test").await;
    assert!(hosts.nxdomain);
    assert!(!hosts.null_mx);
    assert!(hosts.addresses.is_empty() && hosts.mx_hosts.is_empty());
    assert_eq!(
        hosts.ttl,
        Duration::from_secs(3600),
        "the SOA's negative TTL"
    );
}

#[tokio::test]
async fn ttl_is_the_smallest_of_the_records_used() {
    let (_server, resolver) = start();
    let hosts = resolve(&resolver, "ttl.test").await;
    assert_eq!(hosts.addresses, ips(&["127.0.60.1", "fd00::60:1"]));
    assert_eq!(hosts.ttl, Duration::from_secs(45));
}

#[tokio::test]
async fn silent_server_is_an_error_after_the_timeout() {
    // Bound but never read: queries get no answer and no ICMP error.
    let silent = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind silent socket");
    let addr = silent.local_addr().expect("silent socket address");
    let resolver = MailResolver::new(&[addr], TIMEOUT).expect("resolver is built");
    let started = Instant::now();
    let outcome = tokio::time::timeout(TIMEOUT * 10, resolver.resolve("shared-a.test")).await;
    println!(
        "silent server: failed after {:?} (per-query timeout {TIMEOUT:?})",
        started.elapsed()
    );
    match outcome.expect("the resolver gives up by itself") {
        Err(error @ DnsError::Lookup { .. }) => println!("error: {}", chain(&error)),
        other => panic!("expected a lookup error, got {other:?}"),
    }
}

#[tokio::test]
async fn server_failure_is_an_error() {
    let (server, resolver) = start();
    server.fail("broken.test.").expect("mark name as failing");
    match resolver.resolve("broken.test").await {
        Err(error @ DnsError::Lookup { .. }) => println!("error: {}", chain(&error)),
        other => panic!("expected a lookup error, got {other:?}"),
    }
}

#[tokio::test]
async fn failure_on_one_mx_host_fails_the_whole_domain() {
    let (server, resolver) = start();
    server
        .fail("mx2.half-broken.test.")
        .expect("mark name as failing");
    match resolver.resolve("half-broken.test").await {
        Err(error @ DnsError::Lookup { .. }) => println!("error: {}", chain(&error)),
        other => panic!("a partial address set must not be returned, got {other:?}"),
    }
}

#[tokio::test]
async fn changed_zone_is_seen_by_the_next_resolution() {
    let (server, resolver) = start();
    let before = resolve(&resolver, "moving.test").await;
    assert_eq!(before.addresses, ips(&["127.0.70.1"]));

    let moved_address = ZONE.replace("127.0.70.1", "127.0.70.2");
    server.set_zone(&moved_address).expect("zone replaced");
    let after = resolve(&resolver, "moving.test").await;
    assert_eq!(after.addresses, ips(&["127.0.70.2"]));

    let moved_mx = format!(
        "{}\nnew-mx.moving.test. A 127.0.70.3\n",
        ZONE.replace("10 mx.moving.test.", "10 new-mx.moving.test.")
    );
    server.set_zone(&moved_mx).expect("zone replaced");
    let after = resolve(&resolver, "moving.test").await;
    assert_eq!(after.mx_hosts, ["new-mx.moving.test"]);
    assert_eq!(after.addresses, ips(&["127.0.70.3"]));
}

#[tokio::test]
async fn answer_too_large_for_udp_comes_over_tcp() {
    let mut zone = String::from("big.test. MX 10 mx.big.test.\n");
    let mut expected = BTreeSet::new();
    for i in 1..=200u8 {
        let _ = writeln!(zone, "mx.big.test. A 127.0.90.{i}");
        expected.insert(IpAddr::from([127, 0, 90, i]));
    }
    let (_server, resolver) = start_with(&zone);
    let hosts = resolve(&resolver, "big.test").await;
    assert_eq!(hosts.addresses, expected);
}

#[tokio::test]
async fn relay_host_resolves_to_its_own_addresses_without_mx() {
    let (_server, resolver) = start();
    // shared-a.test has MX records but no address of its own: a relay name is not a domain.
    let relay = resolver
        .resolve_host("Mail.Alias.test")
        .await
        .expect("relay resolves");
    assert_eq!(relay.mx_hosts, ["mail.alias.test"]);
    assert_eq!(relay.addresses, ips(&["127.0.40.1"]));
    let no_address = resolver
        .resolve_host("shared-a.test")
        .await
        .expect("relay resolves");
    assert!(no_address.addresses.is_empty() && !no_address.nxdomain);
    let missing = resolver
        .resolve_host("nowhere.test")
        .await
        .expect("relay resolves");
    assert!(missing.nxdomain && missing.addresses.is_empty());
}

#[tokio::test]
async fn address_literal_needs_no_query() {
    let silent = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind silent socket");
    let addr = silent.local_addr().expect("silent socket address");
    let resolver = MailResolver::new(&[addr], TIMEOUT).expect("resolver is built");
    let hosts = resolver.resolve("[127.0.0.9]").await.expect("literal");
    assert_eq!(hosts.addresses, ips(&["127.0.0.9"]));
    let relay = resolver.resolve_host("::1").await.expect("literal");
    assert_eq!(relay.addresses, ips(&["::1"]));
}

#[test]
fn default_configuration_reads_the_system_resolver_settings() {
    // No query is sent: the machine may have no reachable name server.
    let config = qthrottle::config::DnsConfig::default();
    assert!(config.nameservers.is_empty());
    if let Err(error) = MailResolver::from_config(&config) {
        panic!("/etc/resolv.conf: {}", chain(&error));
    }
}
