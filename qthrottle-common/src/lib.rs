//! The kernel/user ABI of qthrottle: map names and the `#[repr(C)]` values they
//! hold, shared by the eBPF programs and the daemon so no layout is written twice.
#![no_std]

/// Longest-prefix-match map from destination address to its group.
pub const MAP_DESTINATIONS: &str = "QT_DESTINATIONS";
/// Array of [`GroupSlot`], written by userspace, indexed by group slot.
pub const MAP_GROUPS: &str = "QT_GROUPS";
/// Array of [`Counters`], written by the kernel, indexed by group slot.
pub const MAP_GROUP_COUNTERS: &str = "QT_GROUP_COUNTERS";
/// Array of `u64` open counts for destinations in no group, indexed by a hash
/// of the address (see [`address_bucket`]). Its size is a power of two.
pub const MAP_ADDRESS_COUNTERS: &str = "QT_ADDRESS_COUNTERS";
/// One-entry array of [`Settings`].
pub const MAP_SETTINGS: &str = "QT_SETTINGS";
/// Bitmap of limited TCP ports: entry `port / 64`, bit `port % 64`.
pub const MAP_PORTS: &str = "QT_PORTS";
/// Array of `u64` event counters, indexed by the `STAT_*` constants.
pub const MAP_STATS: &str = "QT_STATS";
/// Array of [`SocketSlot`], an open-addressing table keyed by socket cookie,
/// holding the counter of every counted socket. Its size is a power of two.
pub const MAP_SOCKETS: &str = "QT_SOCKETS";
/// Ring buffer of [`RefusalEvent`].
pub const MAP_EVENTS: &str = "QT_EVENTS";

/// Program names, as the eBPF object exports them.
pub const PROG_CONNECT4: &str = "qthrottle_connect4";
pub const PROG_CONNECT6: &str = "qthrottle_connect6";
pub const PROG_RELEASE: &str = "qthrottle_release";

/// Group slot 0 is the default: the limit that applies to each destination
/// address that is in no group, with the aggregate counters of those addresses.
pub const DEFAULT_SLOT: u32 = 0;
/// Number of entries of [`MAP_PORTS`] (65536 ports / 64 bits).
pub const PORT_WORDS: u32 = 1024;

/// [`Settings::flags`]: refuse a connect that cannot be counted because a map
/// is full (the default is to let it through uncounted).
pub const FLAG_FAIL_CLOSED: u32 = 1;

/// [`GroupSlot::state`] values.
pub const SLOT_FREE: u32 = 0;
pub const SLOT_ACTIVE: u32 = 1;
/// Removed from the configuration; kept until its open count drains to zero.
pub const SLOT_DRAINING: u32 = 2;

/// How many consecutive entries of [`MAP_SOCKETS`] a socket may probe.
pub const SOCKET_PROBES: u32 = 8;

/// Indices into [`MAP_STATS`].
pub const STAT_MAP_FULL: u32 = 0;
pub const STAT_EVENTS_LOST: u32 = 1;
pub const STAT_RETARGETED: u32 = 2;
/// A gauge, not an event count: counted sockets whose entry lies in the
/// second run of [`MAP_SOCKETS`] (its first run was full).
pub const STAT_DISPLACED: u32 = 3;
pub const STAT_COUNT: u32 = 4;

/// [`SocketSlot::kind`] values.
pub const COUNTED_NONE: u32 = 0;
pub const COUNTED_GROUP: u32 = 1;
pub const COUNTED_ADDRESS: u32 = 2;

/// Length of a group name stored in [`GroupSlot::name`].
pub const NAME_LEN: usize = 56;

/// Value of [`MAP_DESTINATIONS`]: the group slot an address belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Destination {
    pub slot: u32,
}

/// Value of [`MAP_GROUPS`]. Only `limit` is read by the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupSlot {
    pub limit: u32,
    pub state: u32,
    /// NUL-padded UTF-8 group name, so `status` can name a slot without the daemon.
    pub name: [u8; NAME_LEN],
}

impl GroupSlot {
    pub const EMPTY: Self = Self {
        limit: 0,
        state: SLOT_FREE,
        name: [0; NAME_LEN],
    };
}

/// Value of [`MAP_GROUP_COUNTERS`] and [`MAP_ADDRESS_COUNTERS`]; changed only
/// by the kernel, with atomic operations.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub open: u64,
    pub allowed: u64,
    pub refused: u64,
}

/// Value of [`MAP_SETTINGS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Limit per destination address for addresses in no group.
    pub default_limit: u32,
    pub flags: u32,
    /// Entries of [`MAP_SOCKETS`] minus one.
    pub socket_mask: u32,
    /// Entries of [`MAP_ADDRESS_COUNTERS`] minus one.
    pub address_mask: u32,
}

/// Value of [`MAP_SOCKETS`]: the counter a socket was counted in, so that its
/// release gives the slot back to that counter and no other.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketSlot {
    /// Socket cookie of the owner; 0 when the entry is free.
    pub cookie: u64,
    pub kind: u32,
    pub slot: u32,
    pub addr: [u8; 16],
}

/// Sent through [`MAP_EVENTS`] for each refused connect.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefusalEvent {
    /// Destination, IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
    /// Group slot, [`DEFAULT_SLOT`] for an address in no group.
    pub slot: u32,
    pub open: u32,
    pub limit: u32,
    pub pid: u32,
    pub _pad2: u32,
}

/// The counter of an address in no group: a multiplicative hash of its four
/// words, masked to the table size. Two addresses that share a bucket share
/// its count, which can only refuse early, never let one more through.
#[inline(always)]
pub const fn address_bucket(addr: &Address, mask: u32) -> u32 {
    let mut h: u32 = 0;
    let mut i = 0;
    while i < 4 {
        let w = u32::from_ne_bytes([
            addr[i * 4],
            addr[i * 4 + 1],
            addr[i * 4 + 2],
            addr[i * 4 + 3],
        ]);
        h = (h ^ w).wrapping_mul(0x9e37_79b1);
        h ^= h >> 15;
        i += 1;
    }
    h & mask
}

/// Key data of [`MAP_DESTINATIONS`]: a 16-byte address, IPv4 stored IPv4-mapped.
pub type Address = [u8; 16];

/// Maps an IPv4 address (octets in network order) to its IPv6 form `::ffff:a.b.c.d`.
pub const fn ipv4_mapped(octets: [u8; 4]) -> Address {
    let [a, b, c, d] = octets;
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], made of integers and byte arrays only,
    // with explicit padding fields, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Destination {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GroupSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Settings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SocketSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RefusalEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_sizes_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<GroupSlot>(), 8 + NAME_LEN);
        assert_eq!(core::mem::size_of::<Counters>(), 24);
        assert_eq!(core::mem::size_of::<SocketSlot>(), 32);
        assert_eq!(core::mem::size_of::<Settings>(), 16);
        assert_eq!(core::mem::size_of::<RefusalEvent>(), 40);
    }

    #[test]
    fn address_buckets_spread_and_stay_in_range() {
        let mask = 65535;
        let mut seen = [false; 65536];
        let mut distinct = 0;
        for i in 0..1000u32 {
            let [a, b, c, d] = (0x0a00_0000 + i * 7).to_be_bytes();
            let bucket = address_bucket(&ipv4_mapped([a, b, c, d]), mask) as usize;
            if !seen[bucket] {
                seen[bucket] = true;
                distinct += 1;
            }
        }
        // A good spread leaves few of 1,000 addresses sharing a bucket.
        assert!(distinct > 980, "{distinct}");
    }

    #[test]
    fn ipv4_mapped_form() {
        let m = ipv4_mapped([127, 0, 0, 2]);
        assert_eq!(&m[10..], &[0xff, 0xff, 127, 0, 0, 2]);
        assert!(m[..10].iter().all(|b| *b == 0));
    }
}
