//! Pods on a node, judged as pods: the kubelet's exact cgroup layouts (both drivers, all three
//! QoS classes) created under a test root on the real cgroup v2 hierarchy.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use enforcer::sources::cgroups::{scan, Driver, Limits, Qos, Watcher};
use enforcer_tests::{require_kernel, unique_name, TestCgroup};

const CID: &str = "4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Waits for the watcher's signal, bounded (5 s: a signal is due in milliseconds).
async fn signalled(watcher: &Watcher) -> bool {
    tokio::time::timeout(Duration::from_secs(5), watcher.changed())
        .await
        .is_ok()
}

async fn watches_become(watcher: &Watcher, n: usize) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = watcher.status();
        if status.watches == n {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "watches: {} (want {n}): {status:?}",
            status.watches
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// inotify on cgroup v2: a pod cgroup and its containers created by mkdir are signalled and
/// watched, removed ones are signalled and their watches released (kernfs does not always
/// send IN_IGNORED), and the scan finds the pod with the kernel's cgroup IDs.
#[test]
fn inotify_follows_kubelet_cgroups_on_cgroup_v2() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let root = TestCgroup::create(unique_name("cg9-watch"))?;
    // Plain mkdir/rmdir below the test root, as the kubelet and the runtime do; the root's
    // guard removes whatever is left.
    let mkdir = |relative: &str| -> Result<u64> {
        let path = root.path().join(relative);
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(enforcer::fs::cgroup_id(&path)?)
    };
    let rmdir = |relative: &str| -> Result<()> {
        let path = root.path().join(relative);
        std::fs::remove_dir(&path).with_context(|| format!("rmdir {}", path.display()))
    };
    mkdir("kubepods.slice")?;
    mkdir("kubepods.slice/kubepods-burstable.slice")?;
    runtime().block_on(async {
        let watcher = Watcher::spawn(&root.path(), 64)?;
        ensure!(watcher.status().watches == 3, "{:?}", watcher.status());
        let uid = "0a8b3c4d-0000-4000-8000-000000000083";
        let pod = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            uid.replace('-', "_")
        );
        let sandbox = format!("{pod}/{CID}");
        let container = format!("{pod}/cri-containerd-{CID}.scope");
        let mut want = vec![mkdir(&pod)?];
        ensure!(signalled(&watcher).await, "no signal for the pod cgroup");
        want.push(mkdir(&sandbox)?);
        want.push(mkdir(&container)?);
        ensure!(signalled(&watcher).await, "no signal for the containers");
        watches_become(&watcher, 6).await?;

        let found = scan(&root.path(), Limits::default())?;
        let got = found.pods.get(uid).context("the scan misses the pod")?;
        ensure!(got.driver == Driver::Systemd && got.qos == Qos::Burstable);
        let mut ids: Vec<u64> = got.cgroups.values().copied().collect();
        ids.sort();
        want.sort();
        ensure!(ids == want, "{ids:?} != {want:?}");

        rmdir(&container)?;
        ensure!(
            signalled(&watcher).await,
            "no signal for a removed container"
        );
        watches_become(&watcher, 5).await?;
        rmdir(&sandbox)?;
        rmdir(&pod)?;
        watches_become(&watcher, 3).await?;
        ensure!(
            watcher.status().degraded.is_none(),
            "{:?}",
            watcher.status()
        );
        ensure!(scan(&root.path(), Limits::default())?.pods.is_empty());
        Ok(())
    })
}
