//! qthrottle: per-destination limits on outbound SMTP connections, enforced
//! in the kernel, and a qmail spawner that holds deliveries per destination.

pub mod cgroup;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dns;
pub mod kernel;
pub mod mounts;
pub mod plan;
pub mod rspawn;
pub mod slots;
pub mod status;
