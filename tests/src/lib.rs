//! Kernel-test harness of the enforcer.
//!
//! Everything here runs as root against the real kernel and cleans up after itself on
//! `Drop`, also when a test panics: cgroups ([`cgroup`]), network namespaces and veth pairs
//! ([`netns`]), bpffs pin directories ([`bpf`]), loopback servers ([`servers`]), policy
//! bundles ([`bundle`]), the agent ([`agent`]) and the `probe` client ([`probe`]).
//!
//! Tests may run in parallel threads, so every resource gets a unique name
//! ([`unique_name`]) and every test uses its own address range (`127.<net>.x.y`,
//! `fd7e:<net>::/64`); [`fixtures`] builds such a world from one `net` number.

pub mod agent;
pub mod bpf;
pub mod bundle;
pub mod cgroup;
pub mod chroma;
pub mod cli;
pub mod deploy;
pub mod fixtures;
pub mod flows;
pub mod generated;
pub mod kube;
pub mod kubelet;
pub mod netns;
pub mod probe;
pub mod prometheus;
pub mod raw_tcp;
pub mod rsyslog;
pub mod servers;
pub mod sockaddr;
pub mod util;

pub use agent::{Agent, AgentConfig};
pub use bpf::PinDir;
pub use bundle::PolicyBundle;
pub use cgroup::TestCgroup;
pub use netns::{NetNs, Veth};
pub use probe::{Outcome, Probe};
pub use servers::Server;
pub use util::{unique_name, TempDir};

/// Why this machine cannot run kernel tests, or `None` when it can.
pub fn kernel_unavailable_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (kernel tests load BPF and create cgroups)".into());
    }
    if let Err(e) = cgroup::cgroup2_mount() {
        return Some(format!("no cgroup v2 hierarchy: {e:#}"));
    }
    if let Err(e) = bpf::bpf_available() {
        return Some(format!("BPF is not usable: {e:#}"));
    }
    None
}

/// Whether a kernel test can run here. When it cannot, says why loudly on stderr and returns
/// `false` (the test then returns early); under `CI=true` it panics instead, because a CI
/// run that silently skips every kernel test proves nothing.
pub fn require_kernel() -> bool {
    require("kernel", kernel_unavailable_reason())
}

/// What `require_kernel` and `kube::require_apiserver` share: `true` when `unavailable` is
/// `None`; otherwise a loud skip, or a panic under `CI=true`.
pub fn require(what: &str, unavailable: Option<String>) -> bool {
    let Some(reason) = unavailable else {
        return true;
    };
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed>")
        .to_string();
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what} test {test} cannot run under CI=true: {reason}");
    }
    eprintln!();
    eprintln!("************************************************************");
    eprintln!("SKIP {test}: {reason}");
    eprintln!("************************************************************");
    false
}
