//! One PDP for many nodes (issue 3, point 4), against the real binary on loopback:
//!
//! - `enforcer pdp serve` answers only with the right bearer token, versions the bundle by
//!   revision (ETag / If-None-Match) and refuses plain HTTP off loopback before it binds;
//! - an agent run with `--pdp URL --pdp-token-file F` syncs and enforces; keeps enforcing
//!   when the PDP stops; restarts from its persisted bundle while the PDP is down; catches up
//!   when the PDP comes back with an edited policy; and with a wrong token reports the 401
//!   and keeps its last good bundle;
//! - the same over HTTPS with a self-signed certificate (`--pdp-ca`).
//!
//! Agents use `--policies DIR` as the directory the synced bundle is kept in (the PDP's
//! status file lands beside it, `DIR/../pdp-status.json`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use enforcer_tests::agent::enforcer_bin;
use enforcer_tests::fixtures::{World, STANDARD_POLICIES};
use enforcer_tests::probe::attempt;
use enforcer_tests::util::{output_bounded, tail_of, wait_until, ChildGuard};
use enforcer_tests::{require_kernel, Agent, AgentConfig, Outcome, Probe, TempDir};
use serde_json::Value;

const TOKEN: &str = "pdp-test-token-6f1d2c";

/// `enforcer pdp serve` as a child process; killed on drop.
struct PdpServer {
    child: ChildGuard,
    addr: SocketAddr,
    log: PathBuf,
}

impl PdpServer {
    fn start(
        workdir: &Path,
        policies: &Path,
        listen: &str,
        tls: Option<(&Path, &Path)>,
    ) -> Result<Self> {
        let ready = workdir.join(enforcer_tests::unique_name("pdp-ready"));
        let log = workdir.join(enforcer_tests::unique_name("pdp-stderr"));
        let token = token_file(workdir, TOKEN)?;
        let mut cmd = Command::new(enforcer_bin());
        cmd.args(["pdp", "serve", "--policies"])
            .arg(policies)
            .args(["--listen", listen, "--token-file"])
            .arg(&token)
            .arg("--ready-file")
            .arg(&ready);
        if let Some((cert, key)) = tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let mut child = ChildGuard::new(cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                if let Ok(addr) = text.trim().parse() {
                    return Ok(Self { child, addr, log });
                }
            }
            if let Some(status) = child.child().try_wait()? {
                bail!("pdp serve exited ({status}):\n{}", tail_of(&log, 4096));
            }
            if Instant::now() >= deadline {
                bail!("pdp serve not ready after 20 s:\n{}", tail_of(&log, 4096));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    /// SIGTERM, then wait (10 s at most).
    fn stop(mut self) -> Result<()> {
        // SAFETY: kill has no memory preconditions; the pid is our unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        self.child.wait_timeout(Duration::from_secs(10))?;
        Ok(())
    }
}

impl Drop for PdpServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("pdp serve stderr:\n{}", tail_of(&self.log, 4096));
        }
    }
}

fn token_file(dir: &Path, token: &str) -> Result<PathBuf> {
    let path = dir.join(enforcer_tests::unique_name("token"));
    enforcer_tests::util::write_secret(&path, format!("{token}\n"))?;
    Ok(path)
}

/// One plain HTTP/1.1 exchange on loopback: (status code, headers+body text).
fn http_get(addr: SocketAddr, target: &str, headers: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\r\n"
    )?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {text:?}"))?;
    Ok((code, text))
}

/// `<dir>/pdp-status.json`, written by the agent's sync task beside its bundle directory.
fn pdp_status(bundle_dir: &Path) -> Value {
    let file = bundle_dir.parent().unwrap().join("pdp-status.json");
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

fn pdp_agent(
    world: &World,
    bundle_dir: &Path,
    url: &str,
    token: &Path,
    ca: Option<&Path>,
) -> AgentConfig {
    let mut config = world.agent_config();
    config.policies = bundle_dir.to_path_buf();
    config.extra_args = vec![
        "--pdp".into(),
        url.into(),
        "--pdp-token-file".into(),
        token.display().to_string(),
    ];
    if let Some(ca) = ca {
        config.extra_args.push("--pdp-ca".into());
        config.extra_args.push(ca.display().to_string());
    }
    config.ready_timeout = Duration::from_secs(30);
    config
}

/// The revision `enforcer policy check` reports for a bundle directory.
fn revision_of(dir: &Path) -> Result<String> {
    let out = output_bounded(
        Command::new(enforcer_bin())
            .arg("policy")
            .arg("check")
            .arg(dir),
        Duration::from_secs(60),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "policy check failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.split_whitespace()
        .skip_while(|w| *w != "revision")
        .nth(1)
        .map(str::to_string)
        .with_context(|| format!("no revision in {text:?}"))
}

/// The standard policies with one more exception: acme-gateway may query globex-vectors.
fn policies_with_exception() -> String {
    let unless = r#"unless { principal == Workload::"globex-agent" && resource == Endpoint::"acme-vectors" };"#;
    assert!(
        STANDARD_POLICIES.contains(unless),
        "the standard policies changed"
    );
    let widened = r#"unless { (principal == Workload::"globex-agent" && resource == Endpoint::"acme-vectors") || (principal == Workload::"acme-gateway" && resource == Endpoint::"globex-vectors") };"#;
    format!(
        "{}\n@id(\"acme-gateway-globex-vectors\")\npermit (principal == Workload::\"acme-gateway\", action == Action::\"query\", resource == Endpoint::\"globex-vectors\");\n",
        STANDARD_POLICIES.replace(unless, widened)
    )
}

#[test]
fn pdp_serve_refuses_plain_http_off_loopback() -> Result<()> {
    let dir = TempDir::new("pdp-refuse")?;
    let token = token_file(dir.path(), TOKEN)?;
    let demo = enforcer_tests::fixtures::demo_policies_dir();
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let ready = dir.path().join("ready");
        let out = output_bounded(
            Command::new(enforcer_bin())
                .args(["pdp", "serve", "--policies"])
                .arg(&demo)
                .args(["--listen", listen, "--token-file"])
                .arg(&token)
                .arg("--ready-file")
                .arg(&ready),
            Duration::from_secs(20),
        )?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success(),
            "{listen}: pdp serve started over plain HTTP"
        );
        ensure!(
            stderr.contains("plain HTTP") && stderr.contains("loopback"),
            "{listen}: unclear error: {stderr}"
        );
        ensure!(
            !ready.exists(),
            "{listen}: the server got as far as serving"
        );
    }
    Ok(())
}

#[test]
fn pdp_serve_token_etag_and_long_poll() -> Result<()> {
    let dir = TempDir::new("pdp-serve")?;
    let demo = enforcer_tests::fixtures::demo_policies_dir();
    let server = PdpServer::start(dir.path(), &demo, "127.0.0.1:0", None)?;
    let revision = revision_of(&demo)?;

    for headers in [
        String::new(),
        "Authorization: Bearer wrong\r\n".to_string(),
        format!("Authorization: Bearer {TOKEN}0\r\n"),
    ] {
        let (code, text) = http_get(server.addr, "/v1/bundle", &headers)?;
        ensure!(code == 401, "{headers:?}: {code}: {text}");
        ensure!(
            !text.contains("sha256:") && !text.contains("tenants"),
            "401 leaked: {text}"
        );
    }
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let (code, text) = http_get(server.addr, "/v1/bundle", &auth)?;
    ensure!(code == 200, "{code}: {text}");
    ensure!(
        text.to_lowercase()
            .contains(&format!("etag: \"{revision}\"")),
        "{text}"
    );
    let body: Value = serde_json::from_str(&text[text.find("\r\n\r\n").context("no body")? + 4..])?;
    ensure!(body["revision"] == revision.as_str(), "{body}");
    ensure!(body["files"]["inventory.yaml"].is_string(), "{body}");

    let current = format!("{auth}If-None-Match: \"{revision}\"\r\n");
    let (code, _) = http_get(server.addr, "/v1/bundle", &current)?;
    ensure!(
        code == 304,
        "If-None-Match with the current revision: {code}"
    );
    let started = Instant::now();
    let (code, _) = http_get(server.addr, "/v1/bundle?wait=1", &current)?;
    ensure!(
        code == 304 && started.elapsed() >= Duration::from_millis(900),
        "long poll: {code} after {:?}",
        started.elapsed()
    );
    server.stop()
}

#[test]
fn agent_follows_a_loopback_pdp_through_outages_restarts_and_a_wrong_token() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::standard(61)?;
    let _servers = world.servers_v4()?;
    let work = TempDir::new("pdp-node")?;
    let bundle_dir = work.path().join("node/pdp-bundle");
    let token = token_file(work.path(), TOKEN)?;
    let probe = Probe::new().in_cgroup(world.cgroup("acme-gateway"));
    let (cross, same) = world.gateway_calls();
    let expect = |what: &str, want, when: &str| probe.expect_outcome(what, want, when);
    let eventually = |what: &str, want: Outcome, within: Duration, when: &str| -> Result<()> {
        let mut last = None;
        let ok = wait_until(within, Duration::from_millis(200), || {
            let r = probe.run_one(what).ok();
            let hit = r.as_ref().is_some_and(|r| r.outcome == want);
            last = r;
            hit
        });
        ensure!(
            ok,
            "{when}: {what} still {last:?} after {within:?}, want {want:?}; PDP status {}",
            pdp_status(&bundle_dir)
        );
        Ok(())
    };

    // 1. The agent syncs from the PDP and enforces.
    let pdp = PdpServer::start(work.path(), world.bundle.path(), "127.0.0.1:0", None)?;
    let url = pdp.url("http");
    let listen = pdp.addr.to_string();
    let config = pdp_agent(&world, &bundle_dir, &url, &token, None);
    let mut agent = Agent::start(config.clone())?;
    expect(&cross, Outcome::Eperm, "synced from the PDP")?;
    expect(&same, Outcome::Ok, "synced from the PDP")?;
    let first = revision_of(world.bundle.path())?;
    let status = pdp_status(&bundle_dir);
    ensure!(
        status["revision"] == first.as_str(),
        "status after the first sync: {status}"
    );
    ensure!(
        status["url"] == url.as_str() && status["last_error"].is_null(),
        "{status}"
    );
    let shown = agent.status()?;
    ensure!(
        shown["pdp"]["url"] == url.as_str(),
        "enforcer status does not show the PDP: {shown}"
    );

    // 2. The PDP stops: the agent reports it and keeps enforcing.
    pdp.stop()?;
    ensure!(
        wait_until(Duration::from_secs(40), Duration::from_millis(100), || {
            !pdp_status(&bundle_dir)["last_error"].is_null()
        }),
        "the agent did not report the PDP outage: {}",
        pdp_status(&bundle_dir)
    );
    expect(&cross, Outcome::Eperm, "PDP down")?;
    expect(&same, Outcome::Ok, "PDP down")?;

    // 3. The agent restarts while the PDP is down: it enforces the persisted bundle.
    agent.stop()?;
    let mut agent = Agent::start(config.clone())?;
    expect(&cross, Outcome::Eperm, "restarted, PDP down")?;
    expect(&same, Outcome::Ok, "restarted, PDP down")?;
    ensure!(
        pdp_status(&bundle_dir)["revision"] == first.as_str(),
        "{}",
        pdp_status(&bundle_dir)
    );

    // 4. The PDP's policy is edited and it comes back on the same address: the agent catches
    //    up (its backoff is at most 30 s), the once-denied cell now connects.
    world
        .bundle
        .write_file("policies.cedar", &policies_with_exception())?;
    let second = revision_of(world.bundle.path())?;
    let pdp = PdpServer::start(work.path(), world.bundle.path(), &listen, None)?;
    eventually(
        &cross,
        Outcome::Ok,
        Duration::from_secs(60),
        "PDP back with an exception",
    )?;
    expect(&same, Outcome::Ok, "PDP back with an exception")?;
    ensure!(
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(100),
            || pdp_status(&bundle_dir)["revision"] == second.as_str()
        ),
        "{}",
        pdp_status(&bundle_dir)
    );

    // 5. A wrong token is refused: 401 on the wire; an agent holding it reports the error and
    //    keeps its last good bundle, even when the PDP's policy changes.
    let (code, text) = http_get(
        pdp.addr,
        "/v1/bundle",
        "Authorization: Bearer not-the-token\r\n",
    )?;
    ensure!(
        code == 401 && !text.contains("sha256:"),
        "wrong token: {code}: {text}"
    );
    agent.stop()?;
    let wrong = token_file(work.path(), "not-the-token")?;
    let mut wrong_config = pdp_agent(&world, &bundle_dir, &url, &wrong, None);
    wrong_config.ready_timeout = Duration::from_secs(30);
    let agent = Agent::start(wrong_config)?;
    ensure!(
        wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
            pdp_status(&bundle_dir)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("401"))
        }),
        "the agent did not report the refused token: {}",
        pdp_status(&bundle_dir)
    );
    world
        .bundle
        .write_file("policies.cedar", STANDARD_POLICIES)?;
    std::thread::sleep(Duration::from_secs(3));
    expect(
        &cross,
        Outcome::Ok,
        "wrong token: the last good bundle stays",
    )?;
    ensure!(
        pdp_status(&bundle_dir)["revision"] == second.as_str(),
        "{}",
        pdp_status(&bundle_dir)
    );
    drop(agent);
    pdp.stop()
}

#[test]
fn agent_syncs_over_https_with_a_pinned_ca() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = World::standard(62)?;
    let _servers = world.servers_v4()?;
    let work = TempDir::new("pdp-tls")?;
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])?;
    let cert_pem = work.path().join("cert.pem");
    let key_pem = work.path().join("key.pem");
    std::fs::write(&cert_pem, cert.cert.pem())?;
    enforcer_tests::util::write_secret(&key_pem, cert.signing_key.serialize_pem())?;
    let pdp = PdpServer::start(
        work.path(),
        world.bundle.path(),
        "127.0.0.1:0",
        Some((&cert_pem, &key_pem)),
    )?;

    // Plain HTTP to the TLS port gets no bundle.
    let plain = http_get(
        pdp.addr,
        "/v1/bundle",
        &format!("Authorization: Bearer {TOKEN}\r\n"),
    );
    ensure!(
        !plain.as_ref().is_ok_and(|(_, t)| t.contains("sha256:")),
        "{plain:?}"
    );

    let bundle_dir = work.path().join("node/pdp-bundle");
    let token = token_file(work.path(), TOKEN)?;
    let url = pdp.url("https");
    let agent = Agent::start(pdp_agent(
        &world,
        &bundle_dir,
        &url,
        &token,
        Some(&cert_pem),
    ))?;
    let probe = Probe::new().in_cgroup(world.cgroup("acme-gateway"));
    let r = probe.run_one(&attempt(
        "tcp",
        world.entity("globex-vectors").ip(false),
        6333,
    ))?;
    ensure!(
        r.outcome == Outcome::Eperm,
        "cross-tenant over an HTTPS-synced bundle: {r:?}"
    );
    let r = probe.run_one(&attempt(
        "tcp",
        world.entity("acme-vectors").ip(false),
        6333,
    ))?;
    ensure!(r.outcome == Outcome::Ok, "same tenant: {r:?}");
    let status = pdp_status(&bundle_dir);
    ensure!(
        status["url"] == url.as_str() && status["last_error"].is_null(),
        "{status}"
    );
    ensure!(
        status["revision"] == revision_of(world.bundle.path())?.as_str(),
        "{status}"
    );
    drop(agent);
    pdp.stop()
}
