//! The enforcer's node agent: compiles policy from the PDP (`enforcer-policy`) into the
//! kernel maps, keeps them in step, and streams every denied call to the SOC.
//!
//! Data flows one way: inventory + policy -> decisions (`enforcer_policy`) -> desired kernel
//! state ([`desired`]) -> maps ([`datapath`]); kernel -> ring buffer -> [`events`] -> sink.

pub mod admission;
pub mod agent;
pub mod control;
pub mod datapath;
pub mod desired;
pub mod events;
pub mod explain;
pub mod flows;
pub mod fs;
pub mod last_good;
pub mod learn;
pub mod metrics;
mod mmap;
pub mod page;
pub mod pdp;
pub mod sources;
pub mod status;
pub mod stdio;
pub mod wire;
