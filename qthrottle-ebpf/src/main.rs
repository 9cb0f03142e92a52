//! qthrottle's kernel side: cgroup connect4/connect6 programs that count
//! outbound TCP connections per destination group and refuse the one over the
//! limit, and a sock_release program that gives the slot back.
//!
//! Every counted socket carries a [`SocketSlot`] in socket storage naming the
//! counter it was counted in, so its release goes to that counter and no other,
//! once.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", expect(internal_features))]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod program;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
