//! Network namespaces and veth pairs that a test creates itself (`ip netns`, iproute2).
//!
//! Inside a namespace only ULA IPv6 (`fd00::/8`) addresses on the test's own veth are used (and
//! link-local ones, which never leave that link), added with `nodad` so they are usable at
//! once (no duplicate-address-detection delay).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::util::{output_bounded, run};

/// A named network namespace (`/run/netns/NAME`) with `lo` up; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn create(name: &str) -> Result<Self> {
        run("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, usable with `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS...`, must succeed; returns stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `args[0] args[1..]` inside the namespace (bounded to 30 s); must succeed.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let Some((program, rest)) = args.split_first() else {
            bail!("exec needs a program");
        };
        let out = output_bounded(self.command(program).args(rest), Duration::from_secs(30))?;
        if !out.status.success() {
            bail!(
                "`{}` in netns {} failed ({}): {}",
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Opens the namespace file (for `setns`).
    pub fn open(&self) -> Result<File> {
        File::open(self.path()).with_context(|| format!("open {}", self.path().display()))
    }

    /// Runs `f` on a fresh thread that has entered this namespace. Network namespaces are per
    /// thread, and a socket stays in the namespace it was created in, so sockets made by `f`
    /// can be used from any thread afterwards.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let ns = self.open()?;
        std::thread::scope(|s| {
            s.spawn(|| -> Result<T> {
                enter_netns(&ns)?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns {} panicked", self.name))?
        })
    }
}

/// Moves the calling thread into the network namespace of `ns`.
pub fn enter_netns(ns: &File) -> Result<()> {
    // SAFETY: setns on a valid fd; only affects the calling thread for CLONE_NEWNET.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
    }
    Ok(())
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace also destroys the veth ends inside it.
        if let Err(e) = run("ip", &["netns", "delete", &self.name]) {
            eprintln!("warning: netns cleanup: {e:#}");
        }
    }
}

/// A veth pair with one end in each of two namespaces; deleted on drop (deleting one end
/// deletes both).
#[derive(Debug)]
pub struct Veth {
    ns_a: String,
    dev_a: String,
    dev_b: String,
}

/// An interface name unique to this process and call: at most 15 bytes (IFNAMSIZ - 1).
pub fn unique_ifname(suffix: char) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    // "vt" + pid (<= 6 hex digits, pid_max <= 4194304) + counter + suffix.
    let mut name = format!("vt{:x}x{:x}{suffix}", std::process::id(), n);
    name.truncate(15);
    name
}

impl Veth {
    /// Creates the pair directly inside the namespaces (never in the host namespace), adds
    /// `addrs_a` / `addrs_b` (CIDR, e.g. `fd7e:12::1/64`) with `nodad`, and sets both ends up.
    pub fn create(a: &NetNs, addrs_a: &[&str], b: &NetNs, addrs_b: &[&str]) -> Result<Self> {
        let dev_a = unique_ifname('a');
        let dev_b = unique_ifname('b');
        a.ip(&[
            "link",
            "add",
            &dev_a,
            "type",
            "veth",
            "peer",
            "name",
            &dev_b,
            "netns",
            b.name(),
        ])?;
        let veth = Self {
            ns_a: a.name().to_string(),
            dev_a: dev_a.clone(),
            dev_b: dev_b.clone(),
        };
        for (ns, dev, addrs) in [(a, &dev_a, addrs_a), (b, &dev_b, addrs_b)] {
            for addr in addrs {
                check_test_address(addr)?;
                ns.ip(&["addr", "add", addr, "dev", dev, "nodad"])?;
            }
            ns.ip(&["link", "set", dev, "up"])?;
        }
        Ok(veth)
    }

    pub fn dev_a(&self) -> &str {
        &self.dev_a
    }

    pub fn dev_b(&self) -> &str {
        &self.dev_b
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // The namespace may already be gone (and the pair with it): ignore errors.
        let _ = run("ip", &["-n", &self.ns_a, "link", "del", &self.dev_a]);
    }
}

/// Tests use only ULA IPv6 and loopback IPv4 addresses: refuse anything else.
fn check_test_address(cidr: &str) -> Result<()> {
    let ip = cidr.split('/').next().unwrap_or(cidr);
    let ok = match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => v6.segments()[0] & 0xff00 == 0xfd00,
        Ok(std::net::IpAddr::V4(v4)) => v4.is_loopback(),
        Err(_) => false,
    };
    if !ok {
        bail!("test address {cidr} is neither fd00::/8 nor 127.0.0.0/8");
    }
    Ok(())
}
