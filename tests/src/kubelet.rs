//! What the kubelet and the container runtime do to the cgroup tree, for the tests that run
//! no kubelet: the pod and container cgroups of both cgroup drivers and all three QoS
//! classes, under a test root that stands for the node's cgroup root.
//!
//! The names are written out here literally (DESIGN.md, "Verified toolchain facts"), not
//! taken from the agent's parser (`enforcer::sources::cgroups`), so that a test checks the
//! parser against the kubelet's layout rather than against itself:
//!
//! ```text
//! systemd:  kubepods.slice/kubepods-pod<uid_>.slice/cri-containerd-<id>.scope            Guaranteed
//!           kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/...  Burstable
//!           kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/...
//! cgroupfs: kubepods/pod<uid>/<id>, kubepods/burstable/pod<uid>/<id>, kubepods/besteffort/pod<uid>/<id>
//! ```
//!
//! (`<uid_>` is the pod UID with `_` for `-`.) The pause sandbox is a container leaf beside
//! the others.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;

pub use enforcer::sources::cgroups::{Driver, Qos};

use crate::cgroup::TestCgroup;
use crate::util::unique_name;

/// The QoS cgroups the kubelet creates at start, per driver.
const QOS_DIRS: [&str; 6] = [
    "kubepods.slice",
    "kubepods.slice/kubepods-burstable.slice",
    "kubepods.slice/kubepods-besteffort.slice",
    "kubepods",
    "kubepods/burstable",
    "kubepods/besteffort",
];

/// A node's cgroup root with the kubelet's QoS cgroups of both drivers below it (a real
/// node uses one driver; one agent here sees both). Dropping it removes everything below.
#[derive(Debug)]
pub struct Node {
    // Held for their Drop, which runs before the root's (leaf-first).
    _qos: Vec<TestCgroup>,
    root: TestCgroup,
}

impl Node {
    /// A fresh root `<prefix>-<pid>-<n>` under the cgroup v2 mount (`prefix` is the test's
    /// own name prefix).
    pub fn create(prefix: &str) -> Result<Node> {
        let root = TestCgroup::create(unique_name(prefix))?;
        let mut qos = Vec::new();
        for dir in QOS_DIRS {
            qos.push(root.child(dir)?);
        }
        qos.reverse();
        Ok(Node { _qos: qos, root })
    }

    /// The root: what the agent's `--cgroup-root` is.
    pub fn root(&self) -> &TestCgroup {
        &self.root
    }

    /// Starts a pod as the kubelet does: its pod cgroup and the sandbox (pause) container.
    pub fn start_pod(&self, uid: &str, driver: Driver, qos: Qos) -> Result<PodCgroups> {
        let relative = pod_cgroup(driver, qos, uid);
        let pod = self.root.child(&relative)?;
        let sandbox = pod.child(&container_cgroup(driver, &container_id()))?;
        Ok(PodCgroups {
            containers: Vec::new(),
            sandbox,
            pod,
            driver,
        })
    }
}

/// A pod's cgroups. Dropping it removes them (containers, sandbox, then the pod cgroup), as
/// the kubelet does when a pod is gone.
#[derive(Debug)]
pub struct PodCgroups {
    // Drop order: containers, sandbox, pod.
    containers: Vec<TestCgroup>,
    sandbox: TestCgroup,
    pod: TestCgroup,
    driver: Driver,
}

impl PodCgroups {
    /// Starts a container in the pod (an app container, a sidecar, a restart, an ephemeral
    /// debug container: a new cgroup beside the others) and returns its cgroup.
    pub fn add_container(&mut self) -> Result<&TestCgroup> {
        let cg = self
            .pod
            .child(&container_cgroup(self.driver, &container_id()))?;
        self.containers.push(cg);
        Ok(self.containers.last().expect("just pushed"))
    }

    /// The pod cgroup.
    pub fn pod(&self) -> &TestCgroup {
        &self.pod
    }

    /// The sandbox (pause) container's cgroup.
    pub fn sandbox(&self) -> &TestCgroup {
        &self.sandbox
    }

    /// The containers started with [`PodCgroups::add_container`], in order.
    pub fn containers(&self) -> &[TestCgroup] {
        &self.containers
    }
}

/// The pod cgroup of `uid`, relative to the node's cgroup root.
pub fn pod_cgroup(driver: Driver, qos: Qos, uid: &str) -> String {
    let systemd_uid = uid.replace('-', "_");
    match (driver, qos) {
        (Driver::Systemd, Qos::Guaranteed) => {
            format!("kubepods.slice/kubepods-pod{systemd_uid}.slice")
        }
        (Driver::Systemd, Qos::Burstable) => format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice"
        ),
        (Driver::Systemd, Qos::BestEffort) => format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{systemd_uid}.slice"
        ),
        (Driver::Cgroupfs, Qos::Guaranteed) => format!("kubepods/pod{uid}"),
        (Driver::Cgroupfs, Qos::Burstable) => format!("kubepods/burstable/pod{uid}"),
        (Driver::Cgroupfs, Qos::BestEffort) => format!("kubepods/besteffort/pod{uid}"),
    }
}

/// A container cgroup's name as containerd names it under each driver.
pub fn container_cgroup(driver: Driver, id: &str) -> String {
    match driver {
        Driver::Systemd => format!("cri-containerd-{id}.scope"),
        Driver::Cgroupfs => id.to_string(),
    }
}

/// A fresh container ID: 64 hex digits, unique in this process.
pub fn container_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{:032x}{:016x}{n:016x}", 0xc9u128, std::process::id())
}
