//! The container image of `deploy/` enforces (issue 9, point 6), run the way the DaemonSet
//! runs it: `cargo xtask image` builds it (a static agent `FROM scratch`; podman installed
//! when missing), and podman runs it with exactly the capabilities, host namespaces, security
//! options, mounts and arguments of `deploy/daemonset.yaml`, read from the file, so that the
//! two cannot drift apart. Where the DaemonSet names the cluster, the test substitutes its
//! own, and says so:
//!
//! - the host paths that are the node's own (bpffs, the cgroup hierarchy) are mounted as
//!   they are; the state directory is a temp dir; Secrets are temp dirs holding the test's
//!   token and CA under the keys the DaemonSet reads;
//! - `--pdp` names a PDP this test runs on 127.84.20.1 (HTTPS, its own CA), serving a small
//!   bundle: a client cgroup under a test root and two servers on 127.84.20.x, one of each
//!   tenant; `--cgroup-root` and `--pin-path` are the test's; `--kubernetes`, `--node-name`
//!   and `--system-namespace` are dropped (no API server here: the Kubernetes source has its
//!   own tests).
//!
//! A process in the client cgroup connects to its own tenant's server (allowed) and to the
//! other tenant's (refused with EPERM, and a deny event on the container's stdout). Then the
//! container and the image are removed.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use enforcer_tests::agent::enforcer_bin;
use enforcer_tests::deploy::{agent_daemonset, load_all};
use enforcer_tests::probe::attempt;
use enforcer_tests::util::{output_bounded, tail_of, wait_until, ChildGuard};
use enforcer_tests::{
    require_kernel, unique_name, Outcome, PinDir, Probe, Server, TempDir, TestCgroup,
};
use k8s_openapi::api::core::v1::{Container, PodSpec, Volume};

/// This test's addresses: 127.84.20.0/24.
const NET: [u8; 3] = [127, 84, 20];
const PDP_TOKEN: &str = "adm9-container-token-5b0e";

fn ip(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(NET[0], NET[1], NET[2], host)
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The target directory `cargo xtask` uses (it writes podman's containers.conf there).
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => repo().join(dir),
        None => repo().join("target"),
    }
}

/// `podman` as `cargo xtask image` configures it for this machine.
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.env(
        "CONTAINERS_CONF",
        target_dir().join("image/containers.conf"),
    )
    .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    cmd
}

fn podman_ok(args: &[&str], timeout: Duration) -> Result<String> {
    let out = output_bounded(podman().args(args), timeout)?;
    ensure!(
        out.status.success(),
        "podman {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An image tag of this test; `podman rmi` on drop.
struct Image(String);

impl Image {
    /// `cargo xtask image --tag TAG`: builds the static agent (cached after the first time)
    /// and the image, installing podman when it is missing.
    fn build() -> Result<Self> {
        let tag = format!("localhost/{}:test", unique_name("adm9-enforcer"));
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo())
            .args(["xtask", "image", "--tag", &tag])
            .stdin(Stdio::null());
        // Building a release agent from scratch takes long on a small machine.
        let out = output_bounded(&mut cmd, Duration::from_secs(3 * 3600))?;
        // Without cargo's progress lines, and only the end: CI shows a failure's last
        // lines, and the cause (a compiler error, a full disk) is there.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let kept: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.trim_start().starts_with("Compiling "))
            .collect();
        ensure!(
            out.status.success(),
            "cargo xtask image failed ({}); the end of its output, without `Compiling` lines:\n{}",
            out.status,
            kept[kept.len().saturating_sub(60)..].join("\n")
        );
        Ok(Self(tag))
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = output_bounded(podman().args(["rmi", &self.0]), Duration::from_secs(60));
    }
}

/// A container of this test; `podman rm --force` on drop.
struct Running {
    name: String,
}

impl Running {
    fn logs(&self) -> String {
        output_bounded(podman().args(["logs", &self.name]), Duration::from_secs(30))
            .map(|o| {
                let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&o.stderr));
                text
            })
            .unwrap_or_else(|e| format!("<podman logs: {e:#}>"))
    }

    fn remove(&self) -> Result<()> {
        podman_ok(
            &["rm", "--force", "--time", "10", &self.name],
            Duration::from_secs(60),
        )?;
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("container {} log:\n{}", self.name, self.logs());
        }
        let _ = self.remove();
    }
}

/// What the test puts where the DaemonSet names the node or the cluster.
struct Site {
    /// hostPath -> the test's directory, for host paths the test must not share.
    host_paths: BTreeMap<String, PathBuf>,
    /// Secret name -> key -> content.
    secrets: BTreeMap<String, BTreeMap<String, String>>,
    /// Where secret volumes are materialised.
    scratch: PathBuf,
    /// `--flag` -> the test's value; `None` drops the flag.
    args: BTreeMap<&'static str, Option<String>>,
    /// Extra arguments after the DaemonSet's.
    extra_args: Vec<String>,
    /// The downward API's `spec.nodeName`.
    node_name: String,
}

/// The podman arguments (before the image) and the container arguments (after it) that
/// reproduce the DaemonSet's pod for its first container. Anything of the pod spec this
/// function does not know how to reproduce is an error, so that a grant added to the
/// DaemonSet cannot go untested.
fn podman_run_args(spec: &PodSpec, site: &Site) -> Result<(Vec<String>, Vec<String>)> {
    ensure!(
        spec.containers.len() == 1,
        "the agent pod has one container"
    );
    ensure!(
        spec.init_containers.is_none(),
        "init containers are not reproduced here"
    );
    let container: &Container = &spec.containers[0];
    let mut run = Vec::new();
    // Host namespaces.
    match spec.host_network {
        Some(true) => run.push("--network=host".to_string()),
        _ => bail!("the DaemonSet no longer uses the host network: podman here has no CNI"),
    }
    if spec.host_pid == Some(true) {
        run.push("--pid=host".into());
    }
    if spec.host_ipc == Some(true) {
        run.push("--ipc=host".into());
    }
    ensure!(
        spec.security_context.is_none(),
        "pod-level securityContext is not reproduced here"
    );
    // The container's security context.
    let security = container
        .security_context
        .as_ref()
        .context("the agent container has no securityContext")?;
    if security.privileged == Some(true) {
        run.push("--privileged".into());
    }
    if let Some(caps) = &security.capabilities {
        for cap in caps.drop.iter().flatten() {
            run.push(format!("--cap-drop={}", cap.to_lowercase()));
        }
        for cap in caps.add.iter().flatten() {
            run.push(format!("--cap-add={cap}"));
        }
    }
    if security.read_only_root_filesystem == Some(true) {
        run.push("--read-only".into());
    }
    if security.allow_privilege_escalation == Some(false) {
        run.push("--security-opt=no-new-privileges".into());
    }
    match (security.run_as_user, security.run_as_group) {
        (Some(u), Some(g)) => run.push(format!("--user={u}:{g}")),
        (Some(u), None) => run.push(format!("--user={u}")),
        (None, _) => {}
    }
    match security.seccomp_profile.as_ref().map(|p| p.type_.as_str()) {
        None | Some("RuntimeDefault") => {} // podman's default profile
        Some("Unconfined") => run.push("--security-opt=seccomp=unconfined".into()),
        Some(other) => bail!("seccomp profile type {other} is not reproduced here"),
    }
    ensure!(
        security.se_linux_options.is_none() && security.app_armor_profile.is_none(),
        "SELinux / AppArmor options are not reproduced here"
    );
    // Environment: values and the downward API's node name.
    let mut env = BTreeMap::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("spec.nodeName") => site.node_name.clone(),
                // The node's address (the agent serves metrics there): this test's own.
                Some("status.hostIP") => ip(1).to_string(),
                other => bail!("env {} from {other:?} is not reproduced here", var.name),
            },
            _ => bail!("env {} is neither a value nor a field", var.name),
        };
        run.push(format!("--env={}={value}", var.name));
        env.insert(var.name.clone(), value);
    }
    // Volumes, as mounted.
    let volumes: BTreeMap<&str, &Volume> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    for mount in container.volume_mounts.iter().flatten() {
        ensure!(
            mount.sub_path.is_none(),
            "subPath mounts are not reproduced here"
        );
        let volume = volumes
            .get(mount.name.as_str())
            .with_context(|| format!("volume {} is not defined", mount.name))?;
        let mut options = Vec::new();
        if mount.read_only == Some(true) {
            options.push("ro");
        }
        options.push(match mount.mount_propagation.as_deref() {
            None | Some("None") => "rprivate",
            Some("HostToContainer") => "rslave",
            Some("Bidirectional") => "rshared",
            Some(other) => bail!("mountPropagation {other}"),
        });
        let source = if let Some(host) = &volume.host_path {
            match site.host_paths.get(&host.path) {
                Some(local) => local.clone(),
                None => {
                    let path = PathBuf::from(&host.path);
                    // As the kubelet does for this type (the host's /run/netns is missing
                    // until a first network namespace is named).
                    if host.type_.as_deref() == Some("DirectoryOrCreate") && !path.exists() {
                        std::fs::create_dir_all(&path)
                            .with_context(|| format!("create {}", path.display()))?;
                    }
                    path
                }
            }
        } else if let Some(secret) = &volume.secret {
            let name = secret
                .secret_name
                .clone()
                .context("a secret volume without a name")?;
            let data = site
                .secrets
                .get(&name)
                .with_context(|| format!("the test has no Secret {name}"))?;
            let dir = site.scratch.join(format!("secret-{}", mount.name));
            std::fs::create_dir_all(&dir)?;
            let mode = secret.default_mode.unwrap_or(0o644) as u32;
            let files: Vec<(String, String)> = match &secret.items {
                Some(items) => items
                    .iter()
                    .map(|i| (i.key.clone(), i.path.clone()))
                    .collect(),
                None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
            };
            for (key, path) in files {
                let content = data
                    .get(&key)
                    .with_context(|| format!("Secret {name} has no key {key}"))?;
                let file = dir.join(&path);
                std::fs::write(&file, content)?;
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))?;
            }
            dir
        } else {
            bail!(
                "volume {} is neither a hostPath nor a Secret: not reproduced here",
                mount.name
            );
        };
        ensure!(
            source.exists(),
            "{} (for {}) does not exist on this machine",
            source.display(),
            mount.mount_path
        );
        run.push(format!(
            "--volume={}:{}:{}",
            source.display(),
            mount.mount_path,
            options.join(",")
        ));
    }
    ensure!(
        container.command.is_none(),
        "the DaemonSet overrides the entrypoint"
    );
    // Arguments: $(VAR) expanded as the kubelet does, then the test's substitutions.
    let mut args = Vec::new();
    for arg in container.args.iter().flatten() {
        let mut arg = arg.clone();
        for (name, value) in &env {
            arg = arg.replace(&format!("$({name})"), value);
        }
        let flag = arg.split('=').next().unwrap_or_default();
        match site.args.get(flag) {
            Some(Some(value)) => args.push(format!("{flag}={value}")),
            Some(None) => {}
            None => args.push(arg),
        }
    }
    args.extend(site.extra_args.iter().cloned());
    Ok((run, args))
}

/// CA and a leaf for `IP:addr`: (CA PEM, cert PEM, key PEM).
fn pki(addr: IpAddr) -> Result<(String, String, String)> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec![addr.to_string()])?.signed_by(&key, &ca)?;
    Ok((ca.pem(), leaf.pem(), key.serialize_pem()))
}

/// `enforcer pdp serve` on the host, over HTTPS; killed on drop.
struct Pdp {
    _child: ChildGuard,
    url: String,
}

impl Pdp {
    fn start(dir: &Path, policies: &Path, cert: &str, key: &str) -> Result<Self> {
        let (cert_path, key_path) = (dir.join("pdp.crt"), dir.join("pdp.key"));
        std::fs::write(&cert_path, cert)?;
        enforcer_tests::util::write_secret(&key_path, key)?;
        let token = dir.join("pdp-token");
        enforcer_tests::util::write_secret(&token, PDP_TOKEN)?;
        let ready = dir.join("pdp-ready");
        let log = dir.join("pdp.log");
        let mut cmd = Command::new(enforcer_bin());
        cmd.args(["pdp", "serve", "--policies"])
            .arg(policies)
            .arg(format!("--listen={}:0", ip(1)))
            .arg("--token-file")
            .arg(&token)
            .arg("--tls-cert")
            .arg(&cert_path)
            .arg("--tls-key")
            .arg(&key_path)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let mut child = ChildGuard::new(cmd.spawn()?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(addr) = std::fs::read_to_string(&ready)
                .ok()
                .and_then(|t| t.trim().parse::<SocketAddr>().ok())
            {
                return Ok(Self {
                    _child: child,
                    url: format!("https://{addr}"),
                });
            }
            if let Some(status) = child.child().try_wait()? {
                bail!("pdp serve exited ({status}):\n{}", tail_of(&log, 4096));
            }
            ensure!(
                Instant::now() < deadline,
                "pdp serve not ready:\n{}",
                tail_of(&log, 4096)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn bundle(dir: &Path, root: &str, acme: SocketAddr, globex: SocketAddr) -> Result<PathBuf> {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    let demo = repo().join("policies/demo");
    for file in ["schema.cedarschema", "baseline.cedar"] {
        std::fs::copy(demo.join(file), policies.join(file))?;
    }
    std::fs::write(
        policies.join("inventory.yaml"),
        format!(
            "tenants: [acme, globex]\n\
             workloads:\n\
             \x20 - name: acme-client\n    tenant: acme\n    purpose: retrieval\n    ring: prod\n\
             \x20   cgroups: [{root}/client]\n    ips: [{client}/32]\n\
             endpoints:\n\
             \x20 - name: acme-db\n    tenant: acme\n    kind: vector_db\n    ips: [{a}/32]\n\
             \x20 - name: globex-db\n    tenant: globex\n    kind: vector_db\n    ips: [{g}/32]\n",
            client = ip(2),
            a = acme.ip(),
            g = globex.ip(),
        ),
    )?;
    Ok(policies)
}

#[test]
fn the_image_enforces_with_exactly_the_daemonset_grants() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let image = Image::build()?;
    let daemonset = agent_daemonset(&load_all()?)?;
    let spec = daemonset
        .spec
        .and_then(|s| s.template.spec)
        .context("the DaemonSet has no pod spec")?;

    let work = TempDir::new("adm9-container")?;
    let state = work.path().join("state");
    std::fs::create_dir_all(&state)?;
    let root = unique_name("adm9-root");
    let client = TestCgroup::create(format!("{root}/client"))?;
    let acme_db = Server::tcp(SocketAddr::new(ip(10).into(), 9000))?;
    let globex_db = Server::tcp(SocketAddr::new(ip(20).into(), 9000))?;
    let policies = bundle(work.path(), &root, acme_db.addr(), globex_db.addr())?;
    let (ca, cert, key) = pki(ip(1).into())?;
    let pdp = Pdp::start(work.path(), &policies, &cert, &key)?;
    let pins = PinDir::new("adm9-container")?;

    let site = Site {
        host_paths: BTreeMap::from([("/run/enforcer".to_string(), state.clone())]),
        secrets: BTreeMap::from([
            (
                "enforcer-pdp-token".to_string(),
                BTreeMap::from([("token".to_string(), PDP_TOKEN.to_string())]),
            ),
            (
                "enforcer-pdp-tls".to_string(),
                BTreeMap::from([("ca.crt".to_string(), ca)]),
            ),
        ]),
        scratch: work.path().to_path_buf(),
        args: BTreeMap::from([
            ("--kubernetes", None),
            ("--node-name", None),
            ("--system-namespace", None),
            ("--pdp", Some(pdp.url.clone())),
            ("--cgroup-root", Some(root.clone())),
            ("--pin-path", Some(pins.path().display().to_string())),
        ]),
        // In the state directory, which the DaemonSet mounts from the host.
        extra_args: vec!["--ready-file=/run/enforcer/ready".into()],
        node_name: "adm9-node".into(),
    };
    let (run_args, agent_args) = podman_run_args(&spec, &site)?;
    let mount_of_state = run_args
        .iter()
        .any(|a| a.starts_with(&format!("--volume={}:/run/enforcer:", state.display())));
    ensure!(
        mount_of_state,
        "the state directory is not /run/enforcer: {run_args:?}"
    );

    let running = Running {
        name: unique_name("adm9-agent"),
    };
    let mut cmd = podman();
    cmd.args(["run", "--detach", "--name", &running.name])
        .args(&run_args)
        .arg(&image.0)
        .args(&agent_args);
    let out = output_bounded(&mut cmd, Duration::from_secs(120))?;
    ensure!(
        out.status.success(),
        "podman run {run_args:?} {} {agent_args:?} failed: {}",
        image.0,
        String::from_utf8_lossy(&out.stderr)
    );
    // Ready once the policy from the PDP is in the kernel and the hooks are attached.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !state.join("ready").exists() {
        let status = podman_ok(
            &["inspect", "--format", "{{.State.Status}}", &running.name],
            Duration::from_secs(30),
        )?;
        ensure!(
            status.trim() == "running",
            "the agent container is {}:\n{}",
            status.trim(),
            running.logs()
        );
        ensure!(
            Instant::now() < deadline,
            "the agent in the container is not ready after 60 s:\n{}",
            running.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let checks = || -> Result<()> {
        let probe = Probe::new().in_cgroup(&client);
        probe.expect_outcome(
            &attempt("tcp", acme_db.addr().ip(), acme_db.addr().port()),
            Outcome::Ok,
            "same tenant, through the containerised agent",
        )?;
        probe.expect_outcome(
            &attempt("tcp", globex_db.addr().ip(), globex_db.addr().port()),
            Outcome::Eperm,
            "another tenant, through the containerised agent",
        )?;
        // The deny event, as the DaemonSet's `--events=-` writes it: on the container's stdout.
        let globex = globex_db.addr().ip().to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let logs = running.logs();
            let denied = logs.lines().filter(|l| l.starts_with('{')).any(|l| {
                serde_json::from_str::<serde_json::Value>(l).is_ok_and(|e| {
                    e["type"] == "connection.denied"
                        && e["reason"] == "tenant_mismatch"
                        && e["destination"]["ip"] == globex.as_str()
                        && e["subject"]["workload"] == "acme-client"
                })
            });
            if denied {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "no deny event on the container's stdout:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        ensure!(
            wait_until(
                Duration::from_secs(10),
                Duration::from_millis(20),
                || acme_db.hits() == 1
            ),
            "the allowed connect did not reach its server ({} accepts)",
            acme_db.hits()
        );
        assert_eq!(
            globex_db.hits(),
            0,
            "the refused connect reached its server"
        );

        Ok(())
    };
    if let Err(error) = checks() {
        return Err(error.context(format!("container log:\n{}", running.logs())));
    }

    // Remove the container, then the image; the pins go with `pins` (the links with them).
    running.remove()?;
    drop(running);
    let _ = output_bounded(
        Command::new(enforcer_bin())
            .args(["detach", "--pin-path"])
            .arg(pins.path()),
        Duration::from_secs(30),
    );
    let tag = image.0.clone();
    drop(image);
    let gone = output_bounded(
        podman().args(["image", "exists", &tag]),
        Duration::from_secs(30),
    )?;
    ensure!(
        !gone.status.success(),
        "image {tag} is still there after removal"
    );
    Ok(())
}
