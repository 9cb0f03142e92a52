//! Marker library: lets the userspace crate depend on this crate at build time
//! so that cargo rebuilds the eBPF object when its sources change.
#![no_std]
