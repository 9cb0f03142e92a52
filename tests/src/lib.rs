//! Tests of qthrottle against the real kernel.

pub mod daemon;
pub mod dns;
pub mod env;
pub mod listener;
pub mod probe;
pub mod rspawn;
pub mod smtp;
