//! The three programs and their maps. Connect programs decide with two
//! verdicts: [`ALLOW`] lets the connect go on, [`REFUSE`] makes it fail with
//! EPERM.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xsub},
    ptr,
};

use aya_ebpf::{
    bindings::{BPF_RB_NO_WAKEUP, bpf_sock_addr},
    btf_maps::{Array, LpmTrie, RingBuf},
    helpers::generated::{bpf_get_current_pid_tgid, bpf_get_socket_cookie},
    macros::{btf_map, cgroup_sock, cgroup_sock_addr},
    maps::lpm_trie::Key,
    programs::{SockAddrContext, SockContext},
};
use qthrottle_common::{
    Address, COUNTED_ADDRESS, COUNTED_GROUP, COUNTED_NONE, Counters, DEFAULT_SLOT, Destination,
    FLAG_FAIL_CLOSED, GroupSlot, RefusalEvent, SOCKET_PROBES, STAT_COUNT, STAT_DISPLACED,
    STAT_EVENTS_LOST, STAT_MAP_FULL, STAT_RETARGETED, Settings, SocketSlot, address_bucket,
    ipv4_mapped,
};

/// Let the connect proceed.
const ALLOW: i32 = 1;
/// Refuse the connect: the caller gets EPERM.
const REFUSE: i32 = 0;

const SOCK_STREAM: u32 = 1;

// Sizes here are defaults; the daemon sets the real ones from its
// configuration when it loads the object. Every map is pinned by name so a
// restarted daemon, and programs that replace these, keep the same state.
#[btf_map(pin_by_name)]
static QT_DESTINATIONS: LpmTrie<Address, Destination, 65536> = LpmTrie::new();
#[btf_map(pin_by_name)]
static QT_GROUPS: Array<GroupSlot, 4096> = Array::new();
#[btf_map(pin_by_name)]
static QT_GROUP_COUNTERS: Array<Counters, 4096> = Array::new();
#[btf_map(pin_by_name)]
static QT_ADDRESS_COUNTERS: Array<u64, 65536> = Array::new();
#[btf_map(pin_by_name)]
static QT_SETTINGS: Array<Settings, 1> = Array::new();
#[btf_map(pin_by_name)]
static QT_PORTS: Array<u64, 1024> = Array::new();
#[btf_map(pin_by_name)]
static QT_STATS: Array<u64, { STAT_COUNT as usize }> = Array::new();
#[btf_map(pin_by_name)]
static QT_SOCKETS: Array<SocketSlot, 65536> = Array::new();
#[btf_map(pin_by_name)]
static QT_EVENTS: RingBuf<RefusalEvent, 65536> = RingBuf::new();

#[cgroup_sock_addr(connect4)]
pub fn qthrottle_connect4(ctx: SockAddrContext) -> i32 {
    // user_ip4 holds the address in network order: its bytes in memory are the octets.
    connect(&ctx, |sa| ipv4_mapped(sa.user_ip4.to_ne_bytes()))
}

#[cgroup_sock_addr(connect6)]
pub fn qthrottle_connect6(ctx: SockAddrContext) -> i32 {
    // The verifier only allows 4-byte reads of user_ip6. An IPv4-mapped
    // address needs no special case: IPv4 is keyed in its mapped form.
    connect(&ctx, |sa| {
        let mut addr = [0u8; 16];
        for (chunk, word) in addr.chunks_exact_mut(4).zip(sa.user_ip6) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        addr
    })
}

/// The one connect path of both families: TCP to a limited port is
/// accounted, anything else passes untouched.
#[inline(always)]
fn connect(ctx: &SockAddrContext, destination: impl Fn(&bpf_sock_addr) -> Address) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let port = u16::from_be(sa.user_port as u16);
    if !port_limited(port) {
        return ALLOW;
    }
    account(ctx, &destination(sa), port)
}

#[cgroup_sock(sock_release)]
pub fn qthrottle_release(ctx: SockContext) -> i32 {
    // SAFETY: for cgroup_sock programs the helper takes the context itself.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    let (entry, displaced) = find_socket(cookie, socket_mask());
    if !entry.is_null() {
        // SAFETY: this socket's entry, which only its own release touches now.
        let counted = unsafe { &mut *entry };
        give_back(counted);
        // Free the entry last, once nothing reads it any more.
        counted.cookie = 0;
        if displaced {
            unstat(STAT_DISPLACED);
        }
    }
    ALLOW
}

/// What a destination is counted in: a group slot, or its own per-address counter.
#[derive(Clone, Copy)]
struct Target {
    kind: u32,
    slot: u32,
}

/// The outcome of trying to take a slot.
enum Take {
    Taken,
    Refused {
        slot: u32,
        open: u64,
        limit: u32,
    },
    /// A map was full or contended: the configured failure mode decides.
    Uncountable,
}

#[inline(always)]
fn account(ctx: &SockAddrContext, addr: &Address, port: u16) -> i32 {
    let Some(settings) = QT_SETTINGS.get(0) else {
        return ALLOW;
    };
    let target = match QT_DESTINATIONS.get(&Key::new(128, *addr)) {
        Some(dest) => Target {
            kind: COUNTED_GROUP,
            slot: dest.slot,
        },
        None => Target {
            kind: COUNTED_ADDRESS,
            slot: address_bucket(addr, settings.address_mask),
        },
    };
    // SAFETY: the helper takes the sock_addr context as it is.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let (existing, _) = find_socket(cookie, settings.socket_mask);
    if !existing.is_null() {
        // SAFETY: non-null storage of the socket being connected; the socket
        // lock is held during connect.
        let counted = unsafe { &mut *existing };
        if counted.kind != COUNTED_NONE {
            if counted.kind == target.kind && counted.slot == target.slot && counted.addr == *addr {
                // connect() retried on a socket that already holds its slot.
                return ALLOW;
            }
            // Retried toward another destination: the old slot goes back first.
            give_back(counted);
            stat(STAT_RETARGETED);
        }
    }
    let take = if target.kind == COUNTED_GROUP {
        take_group_slot(target.slot)
    } else {
        take_address_slot(target.slot, settings.default_limit)
    };
    match take {
        Take::Taken => record(cookie, existing, settings.socket_mask, target, addr),
        Take::Refused { slot, open, limit } => {
            report_refusal(addr, port, slot, open, limit);
            REFUSE
        }
        Take::Uncountable => uncountable(),
    }
}

/// Notes which counter the socket holds a slot in.
#[inline(always)]
fn record(
    cookie: u64,
    existing: *mut SocketSlot,
    mask: u32,
    target: Target,
    addr: &Address,
) -> i32 {
    let mut value = SocketSlot {
        cookie,
        kind: target.kind,
        slot: target.slot,
        addr: *addr,
    };
    let entry = if existing.is_null() {
        claim_socket(cookie, mask)
    } else {
        existing
    };
    if entry.is_null() {
        give_back(&mut value);
        stat(STAT_MAP_FULL);
        return uncountable();
    }
    // SAFETY: an entry this socket owns (its cookie is in it).
    unsafe { *entry = value };
    ALLOW
}

/// Counted sockets live in an array used as an open-addressing table keyed
/// by socket cookie. Array lookups are inlined by the verifier and need no
/// lock or allocation; socket-local storage or a hash map cost three to four
/// times as much per counted connect. The connect path has the settings at
/// hand; the release reads the table size here.
#[inline(always)]
fn socket_mask() -> u32 {
    QT_SETTINGS.get(0).map_or(0, |s| s.socket_mask)
}

/// A socket's entry is first looked for in the run starting at its cookie
/// (cookies come from a counter, so neighbouring sockets share cache lines:
/// the common case touches memory that is already hot), then, if that run is
/// full, in a run starting at a hash of its cookie. Without the second run, a
/// block of long-lived sockets would stop every later cookie that wraps onto
/// it. A gauge counts entries in second runs, so that while there are none,
/// the release of a socket that was never counted skips that search.
#[inline(always)]
fn first_run(cookie: u64) -> u32 {
    cookie as u32
}

#[inline(always)]
fn second_run(cookie: u64) -> u32 {
    (cookie.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32
}

/// The entry of a socket that holds a slot (null if none), and whether it
/// lies in its second run.
#[inline(always)]
fn find_socket(cookie: u64, mask: u32) -> (*mut SocketSlot, bool) {
    let found = probe_for(first_run(cookie), 1, mask, cookie, cookie);
    if !found.is_null() || stat_value(STAT_DISPLACED) == 0 {
        return (found, false);
    }
    let found = probe_for(second_run(cookie), SPREAD, mask, cookie, cookie);
    (found, !found.is_null())
}

/// Takes a free entry for `cookie` with a compare-and-swap, or null when
/// both runs are full.
#[inline(always)]
fn claim_socket(cookie: u64, mask: u32) -> *mut SocketSlot {
    let entry = probe_for(first_run(cookie), 1, mask, 0, cookie);
    if !entry.is_null() {
        return entry;
    }
    let entry = probe_for(second_run(cookie), SPREAD, mask, 0, cookie);
    if !entry.is_null() {
        stat(STAT_DISPLACED);
    }
    entry
}

/// Step between the probes of a second run: odd, so with a power-of-two table
/// the probes land far apart; a second run never meets the block of
/// long-lived sockets that filled the first.
const SPREAD: u32 = 0x9e37_79b1;

/// Walks [`SOCKET_PROBES`] entries from `start`, `step` apart, for one whose
/// cookie is `want`; with `want` 0 it claims the first free one for `cookie`.
#[inline(always)]
fn probe_for(start: u32, step: u32, mask: u32, want: u64, cookie: u64) -> *mut SocketSlot {
    for probe in 0..SOCKET_PROBES {
        let index = start.wrapping_add(probe.wrapping_mul(step)) & mask;
        let Some(e) = QT_SOCKETS.get_ptr_mut(index) else {
            break;
        };
        // SAFETY: array values are stable; cookies are written atomically,
        // and entries are claimed only by compare-and-swap.
        let hit = unsafe {
            if want == 0 {
                cas(&raw mut (*e).cookie, 0, cookie)
            } else {
                (*e).cookie == want
            }
        };
        if hit {
            return e;
        }
    }
    ptr::null_mut()
}

/// Gives a socket's slot back to the counter it was counted in, once.
#[inline(always)]
fn give_back(counted: &mut SocketSlot) {
    if counted.kind == COUNTED_GROUP {
        if let Some(c) = QT_GROUP_COUNTERS.get_ptr_mut(counted.slot) {
            // SAFETY: array values are stable; the field is only changed atomically.
            unsafe { sub(&raw mut (*c).open, 1) };
        }
    } else if counted.kind == COUNTED_ADDRESS {
        release_address(counted.slot);
    }
    counted.kind = COUNTED_NONE;
}

#[inline(always)]
fn take_group_slot(slot: u32) -> Take {
    let (Some(group), Some(c)) = (QT_GROUPS.get(slot), QT_GROUP_COUNTERS.get_ptr_mut(slot)) else {
        return Take::Uncountable;
    };
    // SAFETY: array values are stable; every field is changed atomically.
    unsafe { take(c, group.limit, slot) }
}

/// Increments `open`, then rolls back when that went over the limit, so the
/// number of counted sockets never exceeds the limit however many CPUs race.
///
/// # Safety
/// `c` must point at a live map value.
#[inline(always)]
unsafe fn take(c: *mut Counters, limit: u32, slot: u32) -> Take {
    // SAFETY: the caller guarantees `c` is live.
    unsafe {
        let open = add(&raw mut (*c).open, 1);
        if open >= u64::from(limit) {
            sub(&raw mut (*c).open, 1);
            add(&raw mut (*c).refused, 1);
            return Take::Refused { slot, open, limit };
        }
        add(&raw mut (*c).allowed, 1);
    }
    Take::Taken
}

/// Destinations in no group are counted per address, in a bucket chosen by
/// hashing the address. Buckets live in an array, so there is nothing to
/// create or delete and no reclaim that could race a connect: an idle bucket
/// is simply zero.
#[inline(always)]
fn take_address_slot(bucket: u32, limit: u32) -> Take {
    let Some(open) = QT_ADDRESS_COUNTERS.get_ptr_mut(bucket) else {
        return Take::Uncountable;
    };
    // SAFETY: array values are stable; the count is only changed atomically.
    let before = unsafe { add(open, 1) };
    let take = if before >= u64::from(limit) {
        // SAFETY: as above.
        unsafe { sub(open, 1) };
        Take::Refused {
            slot: DEFAULT_SLOT,
            open: before,
            limit,
        }
    } else {
        Take::Taken
    };
    count_default(&take);
    take
}

/// Keeps the default slot's counters as the sum over per-address counters.
#[inline(always)]
fn count_default(take: &Take) {
    let Some(c) = QT_GROUP_COUNTERS.get_ptr_mut(DEFAULT_SLOT) else {
        return;
    };
    // SAFETY: array values are stable; fields are only changed atomically.
    unsafe {
        match take {
            Take::Taken => {
                add(&raw mut (*c).open, 1);
                add(&raw mut (*c).allowed, 1);
            }
            Take::Refused { .. } => {
                add(&raw mut (*c).refused, 1);
            }
            Take::Uncountable => {}
        }
    }
}

/// Gives back a slot of a destination in no group.
#[inline(always)]
fn release_address(bucket: u32) {
    if let Some(c) = QT_GROUP_COUNTERS.get_ptr_mut(DEFAULT_SLOT) {
        // SAFETY: array values are stable; fields are only changed atomically.
        unsafe { sub(&raw mut (*c).open, 1) };
    }
    if let Some(open) = QT_ADDRESS_COUNTERS.get_ptr_mut(bucket) {
        // SAFETY: as above.
        unsafe { sub(open, 1) };
    }
}

#[inline(always)]
fn report_refusal(addr: &Address, port: u16, slot: u32, open: u64, limit: u32) {
    let event = RefusalEvent {
        addr: *addr,
        port,
        slot,
        open: open as u32,
        limit,
        // SAFETY: helper without arguments, allowed in cgroup programs.
        pid: (unsafe { bpf_get_current_pid_tgid() } >> 32) as u32,
        ..RefusalEvent::default()
    };
    // No wakeup: the daemon drains the buffer on a timer. Waking it for each
    // refusal made a refused connect cost microseconds.
    if QT_EVENTS.output(&event, BPF_RB_NO_WAKEUP.into()).is_err() {
        stat(STAT_EVENTS_LOST);
    }
}

#[inline(always)]
fn uncountable() -> i32 {
    match QT_SETTINGS.get(0) {
        Some(s) if s.flags & FLAG_FAIL_CLOSED != 0 => REFUSE,
        _ => ALLOW,
    }
}

#[inline(always)]
fn port_limited(port: u16) -> bool {
    QT_PORTS
        .get(u32::from(port >> 6))
        .is_some_and(|word| (*word >> (port & 63)) & 1 == 1)
}

/// Current value of a [`QT_STATS`] entry.
#[inline(always)]
fn stat_value(index: u32) -> u64 {
    // SAFETY: array values are stable; a plain read of a counter.
    QT_STATS.get_ptr(index).map_or(0, |c| unsafe { *c })
}

/// Takes one back from a gauge in [`QT_STATS`].
#[inline(always)]
fn unstat(index: u32) {
    if let Some(c) = QT_STATS.get_ptr_mut(index) {
        // SAFETY: array values are stable; atomics only.
        unsafe { sub(c, 1) };
    }
}

#[inline(always)]
fn stat(index: u32) {
    if let Some(c) = QT_STATS.get_ptr_mut(index) {
        // SAFETY: array values are stable; atomics only.
        unsafe { add(c, 1) };
    }
}

// SeqCst on purpose: with Relaxed, LLVM emits a BPF add that does not fetch
// the old value even when it is used, and the limit silently stops holding.
// The kernel test `limit_holds_under_contention` catches that miscompile.

/// Atomic add returning the previous value.
///
/// # Safety
/// `p` must point at a live, aligned u64 in a map value.
#[inline(always)]
unsafe fn add(p: *mut u64, v: u64) -> u64 {
    // SAFETY: forwarded to the caller.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, v) }
}

/// Atomic subtract returning the previous value. Same safety as [`add`].
#[inline(always)]
unsafe fn sub(p: *mut u64, v: u64) -> u64 {
    // SAFETY: forwarded to the caller.
    unsafe { atomic_xsub::<u64, u64, { AtomicOrdering::SeqCst }>(p, v) }
}

/// Atomic compare-and-swap; true when `p` held `old` and now holds `new`.
/// Same safety as [`add`].
#[inline(always)]
unsafe fn cas(p: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: forwarded to the caller.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new).1
    }
}
