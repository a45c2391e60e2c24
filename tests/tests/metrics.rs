//! `enforcer run --metrics ADDR` against the real kernel and a real Prometheus server:
//!
//! - Prometheus (the distribution's package) scrapes the agent every second; the test makes
//!   N calls from a managed cgroup that policy denies, and PromQL over Prometheus's HTTP API
//!   returns exactly N denies (from the kernel's per-CPU counters) and N `connection.denied`
//!   events (from the agent), with no loss;
//! - `promtool check metrics` passes on what the agent serves, and every family the README
//!   lists is there; quarantine, release, a rejected bundle and its fix move their metrics;
//! - with `--pdp`, the sync's errors and staleness follow a PDP that goes away;
//! - a bad `--metrics` address is refused before anything is loaded.
//!
//! Addresses 127.85.0.0/16 only; cgroups and pins are named `mt-...`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use enforcer_tests::agent::enforcer_bin;
use enforcer_tests::cli::StateDir;
use enforcer_tests::fixtures::{standard_entities, write_bundle, World, STANDARD_POLICIES};
use enforcer_tests::probe::attempt;
use enforcer_tests::prometheus::{self, check_metrics, free_port, http_get, Prometheus};
use enforcer_tests::util::{output_bounded, unique_name, wait_until, ChildGuard, TempDir};
use enforcer_tests::{require, require_kernel, Agent, AgentConfig, PinDir, Probe, TestCgroup};

/// The standard world on 127.85.<t>.<i>, with cgroups and pins named `mt-...`.
fn world() -> Result<World> {
    let entities = standard_entities(85);
    for e in &entities {
        assert_eq!(e.v4.octets()[..2], [127, 85], "{}", e.name);
    }
    let root = TestCgroup::create(unique_name("mt-metrics"))?;
    let mut cgroups = BTreeMap::new();
    for e in entities.iter().filter(|e| e.local) {
        cgroups.insert(e.name.clone(), root.child(&e.name)?);
    }
    let bundle = write_bundle(&entities, &root.relative_str(), STANDARD_POLICIES)?;
    Ok(World {
        net: 85,
        entities,
        cgroups,
        root,
        bundle,
        pins: PinDir::new("mt-metrics")?,
    })
}

/// The agent's exposition in the Prometheus text format (what curl and promtool read).
fn scrape(addr: SocketAddr) -> Result<String> {
    let (status, body) = http_get(addr, "/metrics", None, Duration::from_secs(10))?;
    ensure!(status == 200, "GET /metrics: HTTP {status}: {body}");
    Ok(body)
}

#[test]
fn prometheus_scrapes_the_deny_count_the_test_caused() -> Result<()> {
    if !require_kernel() || !require("prometheus", prometheus::unavailable_reason()) {
        return Ok(());
    }
    const DENIES: u64 = 25;
    let world = world()?;
    let ip = "127.85.200.1";
    let metrics: SocketAddr = format!("{ip}:{}", free_port(ip)?).parse()?;
    let state = StateDir::new()?;
    let mut cfg = state.configure(world.agent_config());
    cfg.extra_args
        .extend(["--metrics".to_string(), metrics.to_string()]);
    let dirs = state.dirs(&cfg);
    let agent = Agent::start(cfg)?;
    let prometheus = Prometheus::scrape("127.85.200.2", metrics)?;

    // The target is up: Prometheus scraped the agent (OpenMetrics, as it asks) at least once.
    let mut up = None;
    let scraped = wait_until(Duration::from_secs(30), Duration::from_millis(250), || {
        up = prometheus.value("up{job=\"enforcer\"}").ok().flatten();
        up == Some(1.0)
    });
    ensure!(
        scraped,
        "Prometheus never scraped the agent (up = {up:?}); its log:\n{}\nagent:\n{}",
        prometheus.log_tail(),
        agent.stderr_tail()
    );
    let denies = "sum(enforcer_verdicts_total{job=\"enforcer\",verdict=\"deny\"})";
    let before = prometheus.value(denies)?;
    ensure!(
        before == Some(0.0),
        "no deny yet, so the count must be 0: {before:?}"
    );

    // N calls across tenants from acme-gateway's cgroup: each one refused by the kernel.
    let cross = attempt("tcp", world.entity("globex-vectors").ip(false), 6333);
    let summary = Probe::new()
        .in_cgroup(world.cgroup("acme-gateway"))
        .timeout(Duration::from_secs(60))
        .repeat(DENIES, &cross)?;
    ensure!(
        summary.eperm == DENIES,
        "every call must be refused: {summary:?}"
    );

    // Prometheus scrapes every second: poll its API until the count arrives, then require
    // that it is exactly N (not more: a deny is counted once).
    let mut got = None;
    let arrived = wait_until(Duration::from_secs(30), Duration::from_millis(250), || {
        got = prometheus.value(denies).ok().flatten();
        got.is_some_and(|v| v >= DENIES as f64)
    });
    ensure!(
        arrived,
        "PromQL {denies} never reached {DENIES}: last {got:?}\n{}",
        prometheus.log_tail()
    );
    ensure!(
        got == Some(DENIES as f64),
        "{denies} = {got:?}, not {DENIES}"
    );
    // Every one at connect4 (TCP over IPv4), for a tenant mismatch; no other hook denied.
    let by_hook = prometheus.value(
        "enforcer_verdicts_total{hook=\"connect4\",verdict=\"deny\",reason=\"tenant_mismatch\"}",
    )?;
    ensure!(
        by_hook == Some(DENIES as f64),
        "all {DENIES} are tenant mismatches at connect4: {by_hook:?}"
    );
    let elsewhere =
        prometheus.value("sum(enforcer_verdicts_total{hook!=\"connect4\",verdict=\"deny\"})")?;
    ensure!(
        elsewhere == Some(0.0),
        "denies at other hooks: {elsewhere:?}"
    );

    // The agent emitted one connection.denied event per deny (its own counter), and the
    // kernel lost none.
    let events = "enforcer_events_total{type=\"connection.denied\"}";
    let mut emitted = None;
    let ok = wait_until(Duration::from_secs(30), Duration::from_millis(250), || {
        emitted = prometheus.value(events).ok().flatten();
        emitted.is_some_and(|v| v >= DENIES as f64)
    });
    ensure!(
        ok && emitted == Some(DENIES as f64),
        "{events} = {emitted:?}, not {DENIES}"
    );
    ensure!(
        prometheus.value("enforcer_kernel_events_lost_total")? == Some(0.0),
        "no event was lost"
    );
    let denied_lines = agent.denies()?.len() as u64;
    ensure!(
        denied_lines == DENIES,
        "{denied_lines} deny lines in the events file"
    );

    // The policy in force: its revision, as `enforcer status` reports it.
    let status = dirs.status()?;
    let revision = status
        .pointer("/agent/revision")
        .and_then(|v| v.as_str())
        .context("status has no revision")?
        .to_string();
    let info = prometheus.query("enforcer_policy_info")?;
    ensure!(
        info.len() == 1 && info[0]["metric"]["revision"] == revision.as_str(),
        "enforcer_policy_info must name {revision}: {info:?}"
    );
    ensure!(
        prometheus
            .value("enforcer_policy_compile_duration_seconds_count")?
            .is_some_and(|n| n >= 1.0)
            && prometheus
                .value("enforcer_policy_apply_duration_seconds_count")?
                .is_some_and(|n| n >= 1.0),
        "the first compile and apply are timed"
    );
    // Map fill as `enforcer status` computes it.
    let maps = status["maps"].as_array().context("status maps")?;
    for map in maps {
        let name = map["name"].as_str().context("map name")?;
        let capacity = prometheus.value(&format!("enforcer_map_capacity{{map=\"{name}\"}}"))?;
        ensure!(
            capacity == map["capacity"].as_f64(),
            "{name}: capacity {capacity:?} vs status {map}"
        );
    }

    // What the agent serves passes promtool, in the Prometheus text format, and holds every
    // family the README lists (those of a remote PDP only with --pdp).
    let text = scrape(metrics)?;
    check_metrics(&text)?;
    for family in [
        "enforcer_verdicts_total",
        "enforcer_kernel_events_lost_total",
        "enforcer_events_total",
        "enforcer_events_write_errors_total",
        "enforcer_map_entries",
        "enforcer_map_capacity",
        "enforcer_policy_info",
        "enforcer_policy_age_seconds",
        "enforcer_policy_generation",
        "enforcer_policy_compile_duration_seconds",
        "enforcer_policy_apply_duration_seconds",
        "enforcer_policy_rejections_total",
        "enforcer_quarantined_subjects",
        "enforcer_audit_mode",
        "enforcer_datapath_readable",
    ] {
        ensure!(
            text.contains(&format!("# TYPE {family} ")),
            "no {family} in:\n{text}"
        );
    }
    ensure!(
        text.contains("enforcer_datapath_readable 1"),
        "the pins were read: {text}"
    );
    // Prometheus asks for OpenMetrics; that form is served too.
    let (status, om) = http_get(
        metrics,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
        Duration::from_secs(10),
    )?;
    ensure!(
        status == 200 && om.ends_with("# EOF\n"),
        "OpenMetrics: {om}"
    );

    // The agent's own gauges and counters follow what it does: a quarantine, a rejected
    // bundle, and the reload that fixes it (read straight from the agent: no need to wait for
    // a scrape).
    let wait_for = |line: &str| -> Result<()> {
        let mut text = String::new();
        let ok = wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
            text = scrape(metrics).unwrap_or_default();
            text.lines().any(|l| l == line)
        });
        ensure!(
            ok,
            "no {line:?} in:\n{text}\nagent:\n{}",
            agent.stderr_tail()
        );
        Ok(())
    };
    wait_for("enforcer_quarantined_subjects 0")?;
    let out = dirs.run(&["quarantine", "add", "acme-gateway"])?;
    ensure!(out.success(), "quarantine add: {out}");
    wait_for("enforcer_quarantined_subjects 1")?;
    let out = dirs.quarantine_release("acme-gateway")?;
    ensure!(out.success(), "quarantine release: {out}");
    wait_for("enforcer_quarantined_subjects 0")?;
    world
        .bundle
        .write_file("broken.cedar", "permit (principal,")?;
    wait_for("enforcer_policy_rejections_total 1")?;
    wait_for(&format!(
        "enforcer_policy_info{{revision=\"{revision}\"}} 1"
    ))?;
    std::fs::remove_file(world.bundle.path().join("broken.cedar"))?;
    wait_for("enforcer_events_total{type=\"policy.applied\"} 2")?;
    wait_for("enforcer_policy_apply_duration_seconds_count 2")?;
    wait_for("enforcer_policy_rejections_total 1")?;
    Ok(())
}

#[test]
fn a_bad_metrics_address_is_refused_before_anything_is_loaded() -> Result<()> {
    let pins = std::env::temp_dir().join(unique_name("mt-no-pins"));
    for bad in ["9464", "localhost:9464", "127.85.0.1:99999"] {
        let out = output_bounded(
            std::process::Command::new(enforcer_bin())
                .args(["run", "--policies", "/nonexistent", "--pin-path"])
                .arg(&pins)
                .args(["--metrics", bad]),
            Duration::from_secs(30),
        )?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{bad}: accepted");
        ensure!(
            stderr.contains("--metrics") && stderr.contains(bad) && stderr.contains("IP:PORT"),
            "{bad}: {stderr}"
        );
    }
    ensure!(!pins.exists(), "nothing was created at {}", pins.display());
    Ok(())
}

#[test]
fn an_address_in_use_is_an_error_naming_it() -> Result<()> {
    if !require_kernel() {
        return Ok(());
    }
    let world = world()?;
    let taken = std::net::TcpListener::bind("127.85.201.1:0")?;
    let addr = taken.local_addr()?;
    let mut cfg = world.agent_config();
    cfg.extra_args
        .extend(["--metrics".to_string(), addr.to_string()]);
    let error = format!("{:#}", Agent::start(cfg).unwrap_err());
    ensure!(
        error.contains(&format!("listening on {addr} for --metrics")),
        "{error}"
    );
    ensure!(
        !world.pins.path().exists(),
        "refused before anything was pinned"
    );
    Ok(())
}

/// The value of the sample `name` (no labels) in a Prometheus text exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn pdp_sync_errors_and_staleness_follow_the_pdp() -> Result<()> {
    if !require_kernel() || !require("prometheus", prometheus::unavailable_reason()) {
        return Ok(());
    }
    let world = world()?;
    let work = TempDir::new("mt-pdp")?;
    let token = work.path().join("token");
    enforcer_tests::util::write_secret(&token, "mt-metrics-token-4c2a\n")?;
    let ready = work.path().join("pdp-ready");
    let pdp_log = work.path().join("pdp.log");
    let mut pdp = ChildGuard::new(
        std::process::Command::new(enforcer_bin())
            .args(["pdp", "serve", "--policies"])
            .arg(world.bundle.path())
            .args(["--listen", "127.85.202.1:0", "--token-file"])
            .arg(&token)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&pdp_log)?)
            .spawn()
            .context("starting enforcer pdp serve")?,
    );
    let mut pdp_addr = None;
    let up = wait_until(Duration::from_secs(20), Duration::from_millis(20), || {
        pdp_addr = std::fs::read_to_string(&ready)
            .ok()
            .and_then(|t| t.trim().parse::<SocketAddr>().ok());
        pdp_addr.is_some()
    });
    ensure!(
        up,
        "pdp serve not ready:\n{}",
        enforcer_tests::util::tail_of(&pdp_log, 4096)
    );
    let pdp_addr = pdp_addr.context("PDP address")?;

    let ip = "127.85.202.2";
    let metrics: SocketAddr = format!("{ip}:{}", free_port(ip)?).parse()?;
    let synced = work.path().join("bundle");
    let mut cfg = AgentConfig::new(&synced, &world.root.relative_str(), world.pins.path());
    cfg.extra_args.extend([
        "--pdp".to_string(),
        format!("http://{pdp_addr}"),
        "--pdp-token-file".to_string(),
        token.display().to_string(),
        "--metrics".to_string(),
        metrics.to_string(),
    ]);
    let state = StateDir::new()?;
    let agent = Agent::start(state.configure(cfg))?;
    let wait_for = |what: &str, done: &dyn Fn(&str) -> bool| -> Result<String> {
        let mut text = String::new();
        let ok = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
            text = scrape(metrics).unwrap_or_default();
            done(&text)
        });
        ensure!(
            ok,
            "{what}: not in\n{text}\nagent:\n{}",
            agent.stderr_tail()
        );
        Ok(text)
    };
    let text = wait_for("synced, no error", &|t| {
        sample(t, "enforcer_pdp_synced") == Some(1.0)
    })?;
    ensure!(
        sample(&text, "enforcer_pdp_sync_errors_total") == Some(0.0)
            && sample(&text, "enforcer_pdp_sync_consecutive_failures") == Some(0.0)
            && sample(&text, "enforcer_pdp_staleness_seconds").is_some(),
        "{text}"
    );
    check_metrics(&text)?;

    // The PDP goes away: the agent's next attempt fails, and the policy grows stale.
    drop(pdp.0.take().map(|mut child| {
        let _ = child.kill();
        child.wait()
    }));
    let text = wait_for("sync errors", &|t| {
        sample(t, "enforcer_pdp_sync_errors_total").is_some_and(|n| n >= 1.0)
            && sample(t, "enforcer_pdp_sync_consecutive_failures").is_some_and(|n| n >= 1.0)
    })?;
    ensure!(
        sample(&text, "enforcer_pdp_synced") == Some(1.0),
        "a PDP reached once stays synced-once: {text}"
    );
    wait_for("staleness grows", &|t| {
        sample(t, "enforcer_pdp_staleness_seconds").is_some_and(|s| s >= 2.0)
    })?;
    Ok(())
}
