//! The eBPF side as userspace sees it: loading the programs or adopting the
//! pinned ones, attaching them to the cgroup with pinned links, and typed
//! access to the pinned maps.

use std::{
    ffi::CString,
    fs::File,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, LpmTrie, Map, MapData, MapInfo, RingBuf},
    programs::{
        CgroupAttachMode, Program,
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
};
use qthrottle_common::{
    Address, Counters, Destination, GroupSlot, MAP_ADDRESS_COUNTERS, MAP_DESTINATIONS, MAP_EVENTS,
    MAP_GROUP_COUNTERS, MAP_GROUPS, MAP_PORTS, MAP_SETTINGS, MAP_SOCKETS, MAP_STATS, PROG_CONNECT4,
    PROG_CONNECT6, PROG_RELEASE, Settings, SocketSlot,
};

/// The compiled eBPF object, embedded at build time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/qthrottle-ebpf"));

/// Each program with the file its link is pinned under.
const PROGRAMS: [(&str, &str); 3] = [
    (PROG_CONNECT4, "link_connect4"),
    (PROG_CONNECT6, "link_connect6"),
    (PROG_RELEASE, "link_release"),
];

/// Sizes of the maps whose size comes from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    pub groups: u32,
    pub destinations: u32,
    pub addresses: u32,
    pub connections: u32,
}

/// Typed handles on the maps the daemon and the CLI read and write.
pub struct Maps {
    pub destinations: LpmTrie<MapData, Address, Destination>,
    pub groups: Array<MapData, GroupSlot>,
    pub counters: Array<MapData, Counters>,
    pub addresses: Array<MapData, u64>,
    pub sockets: Array<MapData, SocketSlot>,
    pub settings: Array<MapData, Settings>,
    pub ports: Array<MapData, u64>,
    pub stats: Array<MapData, u64>,
}

impl Sizes {
    /// The sizes as created: tables indexed with a mask are powers of two.
    pub fn rounded(self) -> Self {
        Sizes {
            connections: self.connections.next_power_of_two(),
            addresses: self.addresses.next_power_of_two(),
            ..self
        }
    }
}

/// The loaded programs; dropping them leaves the pinned links attached.
pub struct Programs(Ebpf);

impl Programs {
    /// Attaches the programs to a cgroup made anew, replacing the pinned
    /// links of the cgroup that was removed.
    pub fn reattach(&mut self, cgroup_dir: &Path, pin_dir: &Path) -> anyhow::Result<()> {
        let cgroup = File::open(cgroup_dir)
            .with_context(|| format!("failed to open cgroup {}", cgroup_dir.display()))?;
        for (name, link_file) in PROGRAMS {
            let pin = pin_dir.join(link_file);
            match std::fs::remove_file(&pin) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("failed to remove {}", pin.display()));
                }
                _ => {}
            }
            let program = self
                .0
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?;
            attach_new(program, &cgroup, &pin)
                .with_context(|| format!("failed to attach {name}"))?;
        }
        Ok(())
    }
}

/// Programs attached and maps ready, as the daemon holds them.
pub struct Loaded {
    pub maps: Maps,
    pub events: RingBuf<MapData>,
    /// True when the programs were already attached (pinned links found).
    pub adopted: bool,
    /// Sizes in force: those of the pinned maps when they already existed.
    pub sizes: Sizes,
    pub programs: Programs,
}

impl Maps {
    /// Opens the pinned maps without loading any program (status, CLI).
    pub fn open_pinned(pin_dir: &Path) -> anyhow::Result<Self> {
        if !pin_dir.join(MAP_GROUPS).exists() {
            bail!(
                "no pinned state in {}: the daemon has never run with this configuration",
                pin_dir.display()
            );
        }
        let open = |name: &str| -> anyhow::Result<MapData> {
            let path = pin_dir.join(name);
            MapData::from_pin(&path)
                .with_context(|| format!("failed to open pinned map {}", path.display()))
        };
        Ok(Self {
            destinations: LpmTrie::try_from(Map::LpmTrie(open(MAP_DESTINATIONS)?))?,
            groups: Array::try_from(Map::Array(open(MAP_GROUPS)?))?,
            counters: Array::try_from(Map::Array(open(MAP_GROUP_COUNTERS)?))?,
            addresses: Array::try_from(Map::Array(open(MAP_ADDRESS_COUNTERS)?))?,
            sockets: Array::try_from(Map::Array(open(MAP_SOCKETS)?))?,
            settings: Array::try_from(Map::Array(open(MAP_SETTINGS)?))?,
            ports: Array::try_from(Map::Array(open(MAP_PORTS)?))?,
            stats: Array::try_from(Map::Array(open(MAP_STATS)?))?,
        })
    }

    fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        };
        Ok(Self {
            destinations: LpmTrie::try_from(take(MAP_DESTINATIONS)?)?,
            groups: Array::try_from(take(MAP_GROUPS)?)?,
            counters: Array::try_from(take(MAP_GROUP_COUNTERS)?)?,
            addresses: Array::try_from(take(MAP_ADDRESS_COUNTERS)?)?,
            sockets: Array::try_from(take(MAP_SOCKETS)?)?,
            settings: Array::try_from(take(MAP_SETTINGS)?)?,
            ports: Array::try_from(take(MAP_PORTS)?)?,
            stats: Array::try_from(take(MAP_STATS)?)?,
        })
    }
}

/// Sizes of maps already pinned in `pin_dir`, which a new load must reuse.
fn pinned_sizes(pin_dir: &Path) -> Option<Sizes> {
    let size = |name: &str| {
        MapInfo::from_pin(pin_dir.join(name))
            .ok()
            .map(|i| i.max_entries())
    };
    Some(Sizes {
        groups: size(MAP_GROUPS)?,
        destinations: size(MAP_DESTINATIONS)?,
        addresses: size(MAP_ADDRESS_COUNTERS)?,
        connections: size(MAP_SOCKETS)?,
    })
}

/// Loads the programs with their maps pinned in `pin_dir` (reusing maps that
/// are already pinned, so open counts survive), and attaches them to the
/// cgroup: a pinned link is switched to the new program atomically, so there
/// is never a moment with two counting programs or none.
pub fn load(pin_dir: &Path, cgroup_dir: &Path, wanted: Sizes) -> anyhow::Result<Loaded> {
    if OBJECT.is_empty() {
        bail!("this qthrottle was built without its eBPF programs (AYA_BUILD_SKIP)");
    }
    std::fs::create_dir_all(pin_dir)
        .with_context(|| format!("failed to create pin directory {}", pin_dir.display()))?;
    let sizes = pinned_sizes(pin_dir).unwrap_or(wanted.rounded());
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .map_max_entries(MAP_GROUPS, sizes.groups)
        .map_max_entries(MAP_GROUP_COUNTERS, sizes.groups)
        .map_max_entries(MAP_DESTINATIONS, sizes.destinations)
        .map_max_entries(MAP_ADDRESS_COUNTERS, sizes.addresses)
        .map_max_entries(MAP_SOCKETS, sizes.connections)
        .load(OBJECT)
        .context("failed to load the eBPF programs")?;
    let cgroup = File::open(cgroup_dir)
        .with_context(|| format!("failed to open cgroup {}", cgroup_dir.display()))?;
    let mut adopted = false;
    for (name, link_file) in PROGRAMS {
        adopted |= attach(&mut ebpf, name, &cgroup, &pin_dir.join(link_file))
            .with_context(|| format!("failed to attach {name}"))?;
    }
    let maps = Maps::take(&mut ebpf)?;
    let events = ebpf.take_map(MAP_EVENTS).context("map QT_EVENTS missing")?;
    let events = RingBuf::try_from(events)?;
    Ok(Loaded {
        maps,
        events,
        adopted,
        sizes,
        programs: Programs(ebpf),
    })
}

/// Loads one program and attaches it: onto its pinned link when there is one
/// (true), or with a new link that is then pinned (false).
fn attach(ebpf: &mut Ebpf, name: &str, cgroup: &File, link_pin: &Path) -> anyhow::Result<bool> {
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing"))?;
    match program {
        Program::CgroupSockAddr(prog) => prog.load()?,
        Program::CgroupSock(prog) => prog.load()?,
        _ => bail!("program {name} is of an unexpected type"),
    }
    if link_pin.exists() {
        let prog_fd = program.fd()?.as_fd();
        match replace_program(link_pin, prog_fd) {
            Ok(()) => return Ok(true),
            // A link whose cgroup is gone cannot be updated: start afresh.
            Err(_) => std::fs::remove_file(link_pin)
                .with_context(|| format!("failed to remove stale link {}", link_pin.display()))?,
        }
    }
    attach_new(program, cgroup, link_pin)?;
    Ok(false)
}

/// Attaches a loaded program with a new link and pins the link.
fn attach_new(program: &mut Program, cgroup: &File, link_pin: &Path) -> anyhow::Result<()> {
    // Links on a cgroup always allow other programs beside them; the kernel
    // refuses attach flags on link creation, hence Single (no flags).
    let link = match program {
        Program::CgroupSockAddr(prog) => {
            let id = prog.attach(cgroup, CgroupAttachMode::Single)?;
            FdLink::try_from(prog.take_link(id)?)?
        }
        Program::CgroupSock(prog) => {
            let id = prog.attach(cgroup, CgroupAttachMode::Single)?;
            FdLink::try_from(prog.take_link(id)?)?
        }
        _ => bail!("unexpected program type"),
    };
    link.pin(link_pin)?;
    Ok(())
}

/// Switches the pinned link at `link_pin` to run `prog` (BPF_LINK_UPDATE):
/// atomic, so the cgroup never runs both programs or neither.
fn replace_program(link_pin: &Path, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    let path = CString::new(link_pin.as_os_str().as_bytes())?;
    // bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut get = [0u64; 2];
    get[0] = path.as_ptr() as u64;
    // SAFETY: `get` is a valid bpf_attr prefix for BPF_OBJ_GET and `path` outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, get.as_mut_ptr().cast(), 16) }?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    let link = unsafe { OwnedFd::from_raw_fd(fd) };
    // bpf_attr for BPF_LINK_UPDATE: link_fd, new_prog_fd, flags, old_prog_fd (u32 each).
    let mut update = [link.as_raw_fd() as u32, prog.as_raw_fd() as u32, 0, 0];
    // SAFETY: `update` is a valid bpf_attr prefix for BPF_LINK_UPDATE; both fds are open.
    unsafe { bpf(BPF_LINK_UPDATE, update.as_mut_ptr().cast(), 16) }.map(drop)
}

/// bpf(2) commands (include/uapi/linux/bpf.h), which libc does not export.
const BPF_OBJ_GET: libc::c_int = 7;
const BPF_LINK_UPDATE: libc::c_int = 29;

/// The bpf(2) system call.
///
/// # Safety
/// `attr` must point at `size` readable and writable bytes laid out as the
/// `bpf_attr` member that `cmd` expects.
unsafe fn bpf(cmd: libc::c_int, attr: *mut libc::c_void, size: u32) -> std::io::Result<i32> {
    // SAFETY: forwarded to the caller.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret as i32)
    }
}

/// Detaches the programs and removes every pinned object. Open connections are
/// left alone; nothing is counted any more.
pub fn unload(pin_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e).with_context(|| format!("failed to read {}", pin_dir.display())),
    };
    // Links first, so enforcement stops before the maps go.
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort_by_key(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
    });
    for path in paths {
        std::fs::remove_file(&path)
            .with_context(|| format!("failed to remove {}", path.display()))?;
        removed.push(path);
    }
    std::fs::remove_dir(pin_dir)
        .with_context(|| format!("failed to remove {}", pin_dir.display()))?;
    Ok(removed)
}

/// Run-time statistics of one attached program.
#[derive(Debug, Clone)]
pub struct ProgramStats {
    pub name: &'static str,
    pub run_time: Duration,
    pub run_count: u64,
}

/// Kernel run-time statistics of the attached programs (non-zero only while
/// `kernel.bpf_stats_enabled` is on or an enable_stats descriptor is held).
pub fn program_stats(pin_dir: &Path) -> anyhow::Result<Vec<ProgramStats>> {
    let mut out = Vec::new();
    for (name, link_file) in PROGRAMS {
        let link = FdLink::from(PinnedLink::from_pin(pin_dir.join(link_file))?);
        let id = link.info()?.program_id();
        let info = loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == id)
            .with_context(|| format!("program {id} of {name} not found"))?;
        out.push(ProgramStats {
            name,
            run_time: info.run_time(),
            run_count: info.run_count(),
        });
    }
    Ok(out)
}
