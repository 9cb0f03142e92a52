//! Tests of reading, validating and editing the configuration file.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proptest::prelude::*;

use super::*;

const EXAMPLE: &str = r#"ports = [25]                         # limited TCP destination ports
default_limit = 10
cgroup = "qthrottle"
pin_path = "/sys/fs/bpf/qthrottle"
socket = "/run/qthrottle/control.sock"
socket_group = "qmail"
state_dir = "/run/qthrottle"
map_full = "open"
max_groups = 4096
max_destinations = 65536
max_addresses = 65536

[dns]
nameservers = ["127.0.0.1:5353"]
min_ttl = 60
max_ttl = 86400
timeout = 5

[rspawn]
qmail_dir = "/var/qmail"
wire = "one-byte"
concurrency = 120
hold_timeout = 600
hold_queue = 10000

[[group]]
name = "google"                      # unique
limit = 5
domains = ["gmail.com", "googlemail.com"]
mx_suffixes = [".google.com"]
addresses = ["192.0.2.1", "198.51.100.0/24", "2001:db8::/32"]
"#;

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn net(s: &str) -> IpNet {
    s.parse().expect("test network parses")
}

fn temp_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("create temporary directory");
    let path = dir.path().join("qthrottle.toml");
    fs::write(&path, text).expect("write test configuration");
    (dir, path)
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).expect("read test configuration")
}

/// The error text for `text`, which must be rejected.
fn error_of(text: &str) -> String {
    match parse(Path::new("/etc/q.toml"), text) {
        Ok(config) => panic!("accepted {text:?} as {config:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn example_file_reads_into_typed_config() {
    let config = parse(Path::new("/etc/q.toml"), EXAMPLE).expect("example is valid");
    let expected = Config {
        socket_group: Some("qmail".to_owned()),
        dns: DnsConfig {
            nameservers: vec!["127.0.0.1:5353".parse::<SocketAddr>().expect("address")],
            ..DnsConfig::default()
        },
        groups: vec![GroupConfig {
            name: "google".to_owned(),
            limit: 5,
            domains: strings(&["gmail.com", "googlemail.com"]),
            mx_suffixes: strings(&[".google.com"]),
            addresses: vec![
                net("192.0.2.1/32"),
                net("198.51.100.0/24"),
                net("2001:db8::/32"),
            ],
            line: 26,
        }],
        ..Config::default()
    };
    assert_eq!(config, expected);
}

#[test]
fn every_other_value_reads() {
    let text = "ports = [25, 587]\ndefault_limit = 0\ncgroup = \"/system.slice/q\"\n\
                map_full = \"closed\"\nmax_groups = 2\n\
                [dns]\nnameservers = [\"::1\", \"[::1]:5300\", \"192.0.2.53\"]\n\
                min_ttl = 1\nmax_ttl = 1\ntimeout = 300\n\
                [rspawn]\nwire = \"two-byte\"\nconcurrency = 65535\nhold_timeout = 0\n\
                hold_queue = 0\n";
    let config = parse(Path::new("/q.toml"), text).expect("valid");
    assert_eq!(config.ports, [25, 587]);
    assert_eq!((config.default_limit, config.max_groups), (0, 2));
    assert_eq!(config.cgroup, "/system.slice/q");
    assert_eq!(config.map_full, MapFull::Closed);
    let servers: Vec<String> = config
        .dns
        .nameservers
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(servers, ["[::1]:53", "[::1]:5300", "192.0.2.53:53"]);
    assert_eq!(config.dns.min_ttl, Duration::from_secs(1));
    assert_eq!(config.rspawn.wire, Wire::TwoByte);
    assert_eq!(config.rspawn.concurrency, 65535);
    assert_eq!(
        (config.rspawn.hold_timeout, config.rspawn.hold_queue),
        (Duration::ZERO, 0)
    );
}

#[test]
fn good_file_round_trips_through_an_edit() {
    let (_dir, path) = temp_file(EXAMPLE);
    let before = load(&path, true).expect("example is valid");
    let g = &before.groups[0];
    let addresses = strings(&["192.0.2.1", "198.51.100.0/24", "2001:db8::/32"]);
    let after = set_group(
        &path,
        &g.name,
        g.limit,
        &g.domains,
        &addresses,
        &g.mx_suffixes,
    )
    .expect("same group again");
    assert_eq!(after, before);
    assert_eq!(
        read(&path),
        EXAMPLE,
        "setting a group to what it is changes nothing"
    );
}

#[test]
fn empty_file_and_missing_default_file_give_the_built_in_default() {
    let config = parse(Path::new("/q.toml"), "# nothing\n").expect("empty is valid");
    assert_eq!(config, Config::default());
    assert_eq!(config.ports, [25]);
    assert_eq!(config.default_limit, 10);
    assert!(config.groups.is_empty());
    let dir = tempfile::tempdir().expect("temporary directory");
    let missing = dir.path().join("absent.toml");
    assert_eq!(load(&missing, false).expect("default"), Config::default());
}

#[test]
fn missing_explicit_file_is_an_error() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let missing = dir.path().join("absent.toml");
    let err = load(&missing, true).expect_err("explicit file must exist");
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("absent.toml"), "{err}");
}

#[test]
fn path_comes_from_flag_then_environment_then_default() {
    let flag = Path::new("/a.toml");
    let env = Some(OsString::from("/b.toml"));
    assert_eq!(
        resolve_path_from(Some(flag), env.clone()),
        (flag.to_path_buf(), true)
    );
    assert_eq!(
        resolve_path_from(None, env),
        (PathBuf::from("/b.toml"), true)
    );
    let default = (PathBuf::from(DEFAULT_PATH), false);
    assert_eq!(resolve_path_from(None, Some(OsString::new())), default);
    assert_eq!(resolve_path_from(None, None), default);
}

#[test]
fn values_are_normalized() {
    let text = "[[group]]\nname = \"g\"\nlimit = 1\n\
                domains = [\"GMail.COM.\", \"xn--bcher-kva.example\"]\n\
                mx_suffixes = [\"Google.com\", \".yahoodns.net.\"]\n\
                addresses = [\"2001:db8::1\", \"::ffff:192.0.2.0/120\", \"::ffff:192.0.2.9\"]\n";
    let config = parse(Path::new("/q.toml"), text).expect("valid");
    let g = &config.groups[0];
    assert_eq!(g.domains, ["gmail.com", "xn--bcher-kva.example"]);
    assert_eq!(g.mx_suffixes, [".google.com", ".yahoodns.net"]);
    let expected = [
        net("2001:db8::1/128"),
        net("192.0.2.0/24"),
        net("192.0.2.9/32"),
    ];
    assert_eq!(g.addresses, expected);
}

/// Each case: a file, the `PATH:LINE: FIELD:` its first problem must start
/// with, and words of the message.
const ERROR_CASES: &[(&str, &str, &str)] = &[
    ("portz = [25]\n", "/etc/q.toml:1: portz: ", "unknown field"),
    (
        "ports = [25, 0]\n",
        "/etc/q.toml:1: ports: ",
        "between 1 and 65535",
    ),
    (
        "ports = [\n  25,\n  25,\n]\n",
        "/etc/q.toml:3: ports: ",
        "listed twice",
    ),
    ("ports = []\n", "/etc/q.toml:1: ports: ", "at least one"),
    (
        "default_limit = -1\n",
        "/etc/q.toml:1: default_limit: ",
        "between 0 and 1000000",
    ),
    (
        "map_full = \"maybe\"\n",
        "/etc/q.toml:1: map_full: ",
        "open",
    ),
    (
        "pin_path = \"bpf\"\n",
        "/etc/q.toml:1: pin_path: ",
        "absolute",
    ),
    ("cgroup = \"../x\"\n", "/etc/q.toml:1: cgroup: ", ".."),
    (
        "\n[dns]\nmin_ttl = 600\nmax_ttl = 60\n",
        "/etc/q.toml:3: dns.min_ttl: ",
        "max_ttl",
    ),
    (
        "[dns]\ntimeout = \"5\"\n",
        "/etc/q.toml:2: dns.timeout: ",
        "integer, found string",
    ),
    (
        "[dns]\ntiemout = 5\n",
        "/etc/q.toml:2: dns.tiemout: ",
        "unknown field",
    ),
    (
        "[dns]\nnameservers = [\"localhost\"]\n",
        "/etc/q.toml:2: dns.nameservers: ",
        "IP:PORT",
    ),
    ("dns = 5\n", "/etc/q.toml:1: dns: ", "expected a table"),
    (
        "[rspawn]\nconcurrency = 256\n",
        "/etc/q.toml:2: rspawn.concurrency: ",
        "255",
    ),
    (
        "[rspawn]\nwire = \"3\"\n",
        "/etc/q.toml:2: rspawn.wire: ",
        "two-byte",
    ),
    (
        "[group]\nname = \"a\"\n",
        "/etc/q.toml:1: group: ",
        "[[group]]",
    ),
    (
        "\n[[group]]\nname = \"a\"\n",
        "/etc/q.toml:2: group[0].limit: ",
        "missing",
    ),
    (
        "[[group]]\nname = \"a\"\nlimit = 1000001\n",
        "/etc/q.toml:3: group[0].limit: ",
        "",
    ),
    (
        "[[group]]\nname = \"a b\"\nlimit = 1\n",
        "/etc/q.toml:2: group[0].name: ",
        "' '",
    ),
    (
        "[[group]]\nname = \"a\"\nlimit = 1\ncolour = 1\n",
        "/etc/q.toml:4: group[0].colour: ",
        "",
    ),
    (
        "[[group]]\nname = \"a\"\nlimit = 1\n[[group]]\nname = \"a\"\nlimit = 2\n",
        "/etc/q.toml:5: group[1].name: ",
        "already the name of group[0] (line 2)",
    ),
    (
        "[[group]]\nname = \"a\"\nlimit = 1\n\
         domains = [\n  \"ok.example\",\n  \"bad..example\",\n]\n",
        "/etc/q.toml:6: group[0].domains: ",
        "bad..example",
    ),
    (
        "[[group]]\nname = \"a\"\nlimit = 1\ndomains = [\"x.example\"]\n\
         [[group]]\nname = \"b\"\nlimit = 1\ndomains = [\"X.example.\"]\n",
        "/etc/q.toml:8: group[1].domains: ",
        "x.example is already in group[0]",
    ),
    (
        "[[group]]\nname = \"a\"\nlimit = 1\naddresses = [\"198.51.100.1/24\"]\n",
        "/etc/q.toml:4: group[0].addresses: ",
        "host bits set; the range is 198.51.100.0/24",
    ),
    (
        "[[group]]\nname = \"a\"\nlimit = 1\naddresses = [\"192.0.2.1\", \"192.0.2.1/32\"]\n",
        "/etc/q.toml:4: group[0].addresses: ",
        "listed twice",
    ),
    (
        "[[group]]\nname = \"a\"\nlimit = 1\naddresses = [\"mx.example\"]\n",
        "/etc/q.toml:4: group[0].addresses: ",
        "not an IP address",
    ),
    (
        "[[group]]\nname = \"a\"\nlimit = 1\ndomains = [\"192.0.2.1\"]\n",
        "/etc/q.toml:4: group[0].domains: ",
        "under addresses",
    ),
    (
        "max_groups = 1\n[[group]]\nname = \"a\"\nlimit = 1\n",
        "/etc/q.toml:1: max_groups: ",
        "too small",
    ),
    (
        "max_destinations = 1\n[[group]]\nname = \"a\"\nlimit = 1\n\
         addresses = [\"192.0.2.1\", \"192.0.2.2\"]\n",
        "/etc/q.toml:1: max_destinations: ",
        "too small",
    ),
    ("ports = [25\nx = 1\n", "/etc/q.toml:2: x: ", "invalid TOML"),
    (
        "[[group]]\nname = \"a\"\nlimit = \"5\n",
        "/etc/q.toml:3: group[0].limit: ",
        "invalid TOML",
    ),
    (
        "[dns]\ntimeout = 1\ntimeout = 2\n",
        "/etc/q.toml:3: dns.timeout: ",
        "duplicate key",
    ),
];

#[test]
fn each_problem_names_file_line_and_field() {
    for (text, prefix, words) in ERROR_CASES {
        let error = error_of(text);
        let first = error.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(prefix),
            "{text:?}: {first:?} should start with {prefix:?}"
        );
        assert!(
            first.contains(words),
            "{text:?}: {first:?} should contain {words:?}"
        );
    }
}

#[test]
fn all_problems_are_reported_in_line_order() {
    let text = "[[group]]\nname = \"a\"\nlimit = 1\naddresses = [\"nope\"]\n\
                [dns]\nmin_ttl = 0\n";
    let lines: Vec<String> = error_of(&format!("ports = [0]\n{text}"))
        .lines()
        .map(|l| l.split(": ").take(2).collect::<Vec<_>>().join(": "))
        .collect();
    let expected = [
        "/etc/q.toml:1: ports",
        "/etc/q.toml:5: group[0].addresses",
        "/etc/q.toml:7: dns.min_ttl",
    ];
    assert_eq!(lines, expected);
}

#[test]
fn inline_group_tables_read_like_array_tables() {
    let text = "group = [\n  { name = \"a\", limit = 1 },\n  { name = \"b\", limit = 2 },\n]\n";
    let config = parse(Path::new("/q.toml"), text).expect("valid");
    let seen: Vec<_> = config
        .groups
        .iter()
        .map(|g| (g.name.as_str(), g.limit, g.line))
        .collect();
    assert_eq!(seen, [("a", 1, 2), ("b", 2, 3)]);
    let error = error_of("group = [\n  { name = \"a\" },\n]\n");
    assert!(
        error.starts_with("/etc/q.toml:2: group[0].limit: missing"),
        "{error}"
    );
}

const COMMENTED: &str = "# qthrottle on mx1\nports = [25]  # smtp only\n\n\
                         [dns]\ntimeout = 3\n\n\
                         # Google, hosted domains included\n[[group]]\nname = \"google\"\n\
                         limit = 5   # published limit\ndomains = [\"gmail.com\"]\n\n\
                         # Yahoo\n[[group]]\nname = \"yahoo\"\nlimit = 2\n\n\
                         [rspawn]\nwire = \"two-byte\"\n";

#[test]
fn new_group_goes_after_the_last_group_and_nothing_else_moves() {
    let (_dir, path) = temp_file(COMMENTED);
    let domains = strings(&["a.example", "b.example"]);
    let config = set_group(&path, "new", 3, &domains, &strings(&["192.0.2.0/24"]), &[])
        .expect("valid group");
    assert_eq!(config.group("new").map(|g| g.limit), Some(3));
    let added = "\n[[group]]\nname = \"new\"\nlimit = 3\n\
                 domains = [\"a.example\", \"b.example\"]\naddresses = [\"192.0.2.0/24\"]\n";
    let expected = COMMENTED.replacen("\n[rspawn]", &format!("{added}\n[rspawn]"), 1);
    assert_eq!(read(&path), expected);
}

#[test]
fn replaced_group_keeps_its_place_and_comments() {
    let (_dir, path) = temp_file(COMMENTED);
    set_group(
        &path,
        "google",
        7,
        &[],
        &strings(&["192.0.2.1"]),
        &strings(&[".google.com"]),
    )
    .expect("valid group");
    let expected = COMMENTED.replace(
        "limit = 5   # published limit\ndomains = [\"gmail.com\"]\n",
        "limit = 7   # published limit\nmx_suffixes = [\".google.com\"]\n\
         addresses = [\"192.0.2.1\"]\n",
    );
    assert_eq!(read(&path), expected);
}

#[test]
fn removed_group_takes_only_its_own_lines() {
    let (_dir, path) = temp_file(COMMENTED);
    let config = remove_group(&path, "yahoo").expect("yahoo exists");
    assert_eq!(config.groups.len(), 1);
    let expected = COMMENTED.replace("# Yahoo\n[[group]]\nname = \"yahoo\"\nlimit = 2\n\n", "");
    assert_eq!(read(&path), expected);
    remove_group(&path, "google").expect("google exists");
    assert!(list_groups(&path, true).expect("valid").is_empty());
    assert!(!read(&path).contains("[[group]]"));
}

/// Comment blocks: one above each header, one directly below each group.
const BLOCKS: &str = "ports = [25]\n\n# Google\n[[group]]\nname = \"google\"\nlimit = 5\n\
                      # google note\n\n# Yahoo\n[[group]]\nname = \"yahoo\"\nlimit = 2\n\
                      # yahoo note\n\n# Spawner settings\n[rspawn]\nwire = \"two-byte\"\n";

#[test]
fn comments_below_the_last_group_stay_with_it_when_one_is_added() {
    let (_dir, path) = temp_file(BLOCKS);
    set_group(&path, "new", 1, &[], &[], &[]).expect("valid group");
    let added = "# yahoo note\n\n[[group]]\nname = \"new\"\nlimit = 1\n\n";
    assert_eq!(read(&path), BLOCKS.replace("# yahoo note\n\n", added));
}

#[test]
fn comments_at_the_end_of_the_file_stay_above_an_added_group() {
    let text = "# qthrottle\n[[group]]\nname = \"a\"\nlimit = 1\n# domains = [\"a.example\"]\n";
    let (_dir, path) = temp_file(text);
    set_group(&path, "b", 2, &[], &[], &[]).expect("valid group");
    let expected = format!("{text}\n[[group]]\nname = \"b\"\nlimit = 2\n");
    assert_eq!(read(&path), expected);
}

#[test]
fn removing_a_group_keeps_the_comments_of_its_neighbours() {
    let (_dir, path) = temp_file(BLOCKS);
    remove_group(&path, "yahoo").expect("yahoo exists");
    let yahoo = "\n# Yahoo\n[[group]]\nname = \"yahoo\"\nlimit = 2\n# yahoo note\n";
    assert_eq!(read(&path), BLOCKS.replace(yahoo, ""));
    let (_dir, path) = temp_file(BLOCKS);
    remove_group(&path, "google").expect("google exists");
    let google = "\n# Google\n[[group]]\nname = \"google\"\nlimit = 5\n# google note\n";
    assert_eq!(read(&path), BLOCKS.replace(google, ""));
}

#[test]
fn set_group_creates_the_file_and_its_directory() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("etc/qthrottle/qthrottle.toml");
    set_group(&path, "orange", 2, &strings(&["orange.fr"]), &[], &[]).expect("valid group");
    let mode = fs::metadata(&path).expect("created").permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    let groups = list_groups(&path, true).expect("valid");
    assert_eq!(groups.len(), 1);
    assert_eq!((groups[0].name.as_str(), groups[0].limit), ("orange", 2));
    assert_eq!(groups[0].domains, ["orange.fr"]);
}

#[test]
fn edits_keep_the_file_mode_and_leave_no_temporary_file() {
    let (dir, path) = temp_file(COMMENTED);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
    set_group(&path, "google", 4, &[], &[], &[]).expect("valid group");
    let mode = fs::metadata(&path)
        .expect("still there")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o640);
    let names: Vec<_> = fs::read_dir(dir.path()).expect("list").flatten().collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

fn is_link(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

#[test]
fn edit_through_a_symbolic_link_replaces_the_target() {
    let (dir, path) = temp_file(COMMENTED);
    let link = dir.path().join("link.toml");
    std::os::unix::fs::symlink("qthrottle.toml", &link).expect("symlink");
    set_group(&link, "yahoo", 1, &[], &[], &[]).expect("valid group");
    assert!(is_link(&link));
    assert_eq!(list_groups(&path, true).expect("valid")[1].limit, 1);
    let dangling = dir.path().join("dangling.toml");
    std::os::unix::fs::symlink("etc/created.toml", &dangling).expect("symlink");
    set_group(&dangling, "a", 1, &[], &[], &[]).expect("valid group");
    assert!(is_link(&dangling));
    let created = dir.path().join("etc/created.toml");
    assert_eq!(list_groups(&created, true).expect("valid")[0].name, "a");
}

#[test]
fn inline_group_array_is_edited_as_tables() {
    let (_dir, path) = temp_file("ports = [25]\ngroup = [{ name = \"a\", limit = 1 }]\n");
    set_group(&path, "b", 2, &[], &[], &[]).expect("valid group");
    let names: Vec<_> = list_groups(&path, true)
        .expect("valid")
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn rejected_edits_leave_the_file_byte_identical() {
    let (dir, path) = temp_file(COMMENTED);
    let bad: Vec<(&str, Result<Config, ConfigError>)> = vec![
        (
            "bad address",
            set_group(&path, "x", 1, &[], &strings(&["10.0.0.1/8"]), &[]),
        ),
        ("bad name", set_group(&path, "no spaces", 1, &[], &[], &[])),
        (
            "limit",
            set_group(&path, "google", 2_000_000, &[], &[], &[]),
        ),
        (
            "taken domain",
            set_group(&path, "x", 1, &strings(&["gmail.com"]), &[], &[]),
        ),
        (
            "bad suffix",
            set_group(&path, "x", 1, &[], &[], &strings(&["*.example"])),
        ),
        ("absent", remove_group(&path, "hotmail")),
    ];
    for (what, result) in bad {
        assert!(result.is_err(), "{what} was accepted");
        assert_eq!(read(&path), COMMENTED, "{what} changed the file");
    }
    let names: Vec<_> = fs::read_dir(dir.path()).expect("list").flatten().collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn rejected_edit_names_the_line_of_the_new_group() {
    let (_dir, path) = temp_file(COMMENTED);
    let err = set_group(&path, "x", 1, &[], &strings(&["10.0.0.1/8"]), &[]).expect_err("bad");
    let text = err.to_string();
    assert!(
        text.contains(": group[2].addresses: 10.0.0.1/8 has host bits set"),
        "{text}"
    );
    assert!(matches!(err, ConfigError::Invalid { .. }));
}

#[test]
fn a_broken_file_is_not_edited() {
    for broken in ["ports = [0]\n", "ports = [25\n", "group = 5\n"] {
        let (_dir, path) = temp_file(broken);
        let err = set_group(&path, "a", 1, &[], &[], &[]).expect_err("file is invalid");
        assert!(err.to_string().contains(":1: "), "{err}");
        assert_eq!(read(&path), broken);
    }
}

#[test]
fn removing_from_a_missing_file_creates_nothing() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("sub/absent.toml");
    let err = remove_group(&path, "a").expect_err("no such group");
    assert!(matches!(err, ConfigError::NoSuchGroup { .. }), "{err:?}");
    assert!(!dir.path().join("sub").exists());
}

/// One step of an edit sequence over a small set of group names.
#[derive(Debug, Clone)]
enum Op {
    Set {
        name: usize,
        limit: u32,
        domains: usize,
        addresses: usize,
    },
    Remove {
        name: usize,
    },
}

const NAMES: [&str; 4] = ["google", "yahoo", "ms.outlook", "orange_fr"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..NAMES.len(), 0..=MAX_LIMIT, 0..3usize, 0..3usize).prop_map(
            |(name, limit, domains, addresses)| Op::Set {
                name,
                limit,
                domains,
                addresses
            }
        ),
        (0..NAMES.len()).prop_map(|name| Op::Remove { name }),
    ]
}

/// What a group should hold: limit, domains, addresses.
type Expected = (u32, Vec<String>, Vec<IpNet>);

/// The groups expected in the file, in file order.
type Model = Vec<(String, Expected)>;

/// Applies one step to the file and to the model.
fn apply(path: &Path, model: &mut Model, op: &Op) {
    match *op {
        Op::Set {
            name,
            limit,
            domains,
            addresses,
        } => {
            apply_set(path, model, name, limit, (domains, addresses));
        }
        Op::Remove { name } => apply_remove(path, model, NAMES[name]),
    }
}

fn apply_set(path: &Path, model: &mut Model, index: usize, limit: u32, sizes: (usize, usize)) {
    let name = NAMES[index];
    let domains: Vec<String> = (0..sizes.0)
        .map(|i| format!("d{i}.{name}.example"))
        .collect();
    let nets: Vec<String> = (0..sizes.1)
        .map(|i| format!("2001:db8:{index}::{i}"))
        .collect();
    set_group(path, name, limit, &domains, &nets, &[]).expect("valid group");
    let nets = nets.iter().map(|n| net(&format!("{n}/128"))).collect();
    let expected = (limit, domains, nets);
    match model.iter_mut().find(|(n, _)| n == name) {
        Some(entry) => entry.1 = expected,
        None => model.push((name.to_owned(), expected)),
    }
}

fn apply_remove(path: &Path, model: &mut Model, name: &str) {
    let present = model.iter().position(|(n, _)| n == name);
    let before = read(path);
    match (remove_group(path, name), present) {
        (Ok(_), Some(i)) => drop(model.remove(i)),
        (Err(ConfigError::NoSuchGroup { .. }), None) => assert_eq!(read(path), before),
        (other, _) => panic!("remove {name}: {other:?} with model {model:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn edit_sequences_leave_exactly_the_expected_groups(ops in prop::collection::vec(op(), 1..12)) {
        let (_dir, path) = temp_file(BLOCKS);
        let mut model: Model = vec![
            ("google".into(), (5, Vec::new(), Vec::new())),
            ("yahoo".into(), (2, Vec::new(), Vec::new())),
        ];
        for op in &ops {
            apply(&path, &mut model, op);
            let groups = list_groups(&path, true).expect("every edit leaves a valid file");
            let seen: Model = groups
                .into_iter()
                .map(|g| (g.name, (g.limit, g.domains, g.addresses)))
                .collect();
            prop_assert_eq!(&seen, &model);
        }
        let text = read(&path);
        prop_assert!(text.starts_with("ports = [25]\n"));
        prop_assert!(text.contains("\n# Spawner settings\n[rspawn]\nwire = \"two-byte\"\n"));
    }
}
