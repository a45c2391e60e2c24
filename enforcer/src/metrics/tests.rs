use std::time::{Duration, SystemTime};

use enforcer_common::{hook, reason, verdict};

use super::*;
use crate::datapath::{ConfigView, KernelStats, MapFill};

/// Metrics whose pins do not exist: the kernel families are replaced by
/// `enforcer_datapath_readable 0`.
fn without_kernel() -> Metrics {
    Metrics::new(PathBuf::from("/nonexistent/mt-metrics-unit/v6"))
}

/// The sample lines of `text` (no comments), for exact matching.
fn samples(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.starts_with('#')).collect()
}

fn has(text: &str, line: &str) -> bool {
    samples(text).contains(&line)
}

#[test]
fn events_are_counted_by_type_in_both_formats() {
    let metrics = without_kernel();
    for _ in 0..3 {
        metrics.events_emitted("connection.denied", 1);
    }
    metrics.events_emitted("policy.applied", 1);
    metrics.events_write_failed(1);
    let om = metrics.encode(true);
    assert!(om.contains("# TYPE enforcer_events counter\n"), "{om}");
    assert!(
        has(&om, "enforcer_events_total{type=\"connection.denied\"} 3"),
        "{om}"
    );
    assert!(
        has(&om, "enforcer_events_total{type=\"policy.applied\"} 1"),
        "{om}"
    );
    assert!(has(&om, "enforcer_events_write_errors_total 1"), "{om}");
    assert!(om.ends_with("# EOF\n"), "OpenMetrics ends with # EOF: {om}");
    let text = metrics.encode(false);
    assert!(
        text.contains("# TYPE enforcer_events_total counter\n"),
        "{text}"
    );
    assert!(
        has(&text, "enforcer_events_total{type=\"connection.denied\"} 3"),
        "{text}"
    );
    assert!(!text.contains("# EOF"), "{text}");
}

#[test]
fn consumer_drops_have_a_family_but_no_series_until_a_consumer_reports() {
    let metrics = without_kernel();
    let before = metrics.encode(true);
    assert!(
        !before.contains("enforcer_events_consumer_dropped"),
        "no consumer exists, so no number: {before}"
    );
    metrics.consumer_dropped("follower-1", 7);
    let after = metrics.encode(true);
    assert!(
        has(
            &after,
            "enforcer_events_consumer_dropped_total{consumer=\"follower-1\"} 7"
        ),
        "{after}"
    );
}

#[test]
fn durations_are_histograms_in_seconds() {
    let metrics = without_kernel();
    metrics.compiled(Duration::from_millis(3));
    metrics.compiled(Duration::from_millis(40));
    metrics.applied(Duration::from_micros(700), "sha256:abc");
    let om = metrics.encode(true);
    assert!(
        om.contains("# TYPE enforcer_policy_compile_duration_seconds histogram\n"),
        "{om}"
    );
    assert!(
        om.contains("# UNIT enforcer_policy_compile_duration_seconds seconds\n"),
        "{om}"
    );
    assert!(
        has(&om, "enforcer_policy_compile_duration_seconds_count 2"),
        "{om}"
    );
    let sum: f64 = samples(&om)
        .iter()
        .find_map(|l| l.strip_prefix("enforcer_policy_compile_duration_seconds_sum "))
        .unwrap_or_else(|| panic!("no sum: {om}"))
        .parse()
        .unwrap();
    assert!((sum - 0.043).abs() < 1e-9, "{sum}");
    // 3 ms falls in the 4 ms bucket (0.5 ms doubling), 40 ms only from 64 ms on.
    assert!(
        has(
            &om,
            "enforcer_policy_compile_duration_seconds_bucket{le=\"0.004\"} 1"
        ),
        "{om}"
    );
    assert!(
        has(
            &om,
            "enforcer_policy_compile_duration_seconds_bucket{le=\"0.064\"} 2"
        ),
        "{om}"
    );
    assert!(
        has(
            &om,
            "enforcer_policy_compile_duration_seconds_bucket{le=\"+Inf\"} 2"
        ),
        "{om}"
    );
    assert!(
        has(&om, "enforcer_policy_apply_duration_seconds_count 1"),
        "{om}"
    );
    assert!(
        has(
            &om,
            "enforcer_policy_apply_duration_seconds_bucket{le=\"0.001\"} 1"
        ),
        "{om}"
    );
}

#[test]
fn the_policy_in_force_is_an_info_metric_with_its_age() {
    let metrics = without_kernel();
    let om = metrics.encode(true);
    assert!(
        !om.contains("enforcer_policy_info"),
        "no policy applied yet: {om}"
    );
    metrics.applied(Duration::from_millis(1), "sha256:0123");
    // Backdate the snapshot: the age is computed at scrape time.
    metrics.policy.lock().unwrap().as_mut().unwrap().applied_at =
        SystemTime::now() - Duration::from_secs(120);
    let om = metrics.encode(true);
    assert!(om.contains("# TYPE enforcer_policy info\n"), "{om}");
    assert!(
        has(&om, "enforcer_policy_info{revision=\"sha256:0123\"} 1"),
        "{om}"
    );
    let age: f64 = samples(&om)
        .iter()
        .find_map(|l| l.strip_prefix("enforcer_policy_age_seconds "))
        .unwrap_or_else(|| panic!("no age: {om}"))
        .parse()
        .unwrap();
    assert!((120.0..3600.0).contains(&age), "{age}");
    let text = metrics.encode(false);
    assert!(
        has(&text, "enforcer_policy_info{revision=\"sha256:0123\"} 1"),
        "{text}"
    );
    metrics.rejected();
    metrics.rejected();
    assert!(has(
        &metrics.encode(true),
        "enforcer_policy_rejections_total 2"
    ));
}

#[test]
fn quarantined_subjects_are_a_gauge() {
    let metrics = without_kernel();
    metrics.set_quarantined(2);
    assert!(has(
        &metrics.encode(true),
        "enforcer_quarantined_subjects 2"
    ));
    metrics.set_quarantined(0);
    assert!(has(
        &metrics.encode(true),
        "enforcer_quarantined_subjects 0"
    ));
}

#[test]
fn pdp_sync_errors_and_staleness() {
    let metrics = without_kernel();
    assert!(
        !metrics.encode(true).contains("enforcer_pdp"),
        "no --pdp, no PDP families"
    );
    let never = PdpStatus {
        errors_total: 4,
        consecutive_failures: 4,
        ..PdpStatus::new("https://pdp:8443")
    };
    metrics.set_pdp(move || never.clone());
    let om = metrics.encode(true);
    assert!(has(&om, "enforcer_pdp_sync_errors_total 4"), "{om}");
    assert!(
        has(&om, "enforcer_pdp_sync_consecutive_failures 4.0"),
        "{om}"
    );
    assert!(has(&om, "enforcer_pdp_synced 0.0"), "{om}");
    assert!(
        !om.contains("enforcer_pdp_staleness"),
        "never reached: no staleness number: {om}"
    );
    let reached = PdpStatus {
        last_success: Some(SystemTime::now() - Duration::from_secs(90)),
        errors_total: 5,
        ..PdpStatus::new("https://pdp:8443")
    };
    metrics.set_pdp(move || reached.clone().at(SystemTime::now()));
    let om = metrics.encode(true);
    assert!(has(&om, "enforcer_pdp_synced 1.0"), "{om}");
    assert!(om.contains("# UNIT enforcer_pdp_staleness_seconds seconds\n"));
    let stale: f64 = samples(&om)
        .iter()
        .find_map(|l| l.strip_prefix("enforcer_pdp_staleness_seconds "))
        .unwrap_or_else(|| panic!("no staleness: {om}"))
        .parse()
        .unwrap();
    assert!((90.0..3600.0).contains(&stale), "{stale}");
}

#[test]
fn unreadable_pins_are_said_not_hidden() {
    let om = without_kernel().encode(true);
    assert!(has(&om, "enforcer_datapath_readable 0.0"), "{om}");
    assert!(!om.contains("enforcer_verdicts"), "{om}");
}

fn stats() -> KernelStats {
    let mut by_hook = vec![vec![vec![0u64; reason::COUNT]; verdict::COUNT]; hook::COUNT];
    by_hook[hook::CONNECT4 as usize][verdict::ALLOW as usize][reason::ALLOWED as usize] = 11;
    by_hook[hook::CONNECT4 as usize][verdict::DENY as usize][reason::TENANT_MISMATCH as usize] = 3;
    by_hook[hook::SENDMSG6 as usize][verdict::DENY as usize][reason::TENANT_MISMATCH as usize] = 2;
    by_hook[hook::SOCK_CREATE as usize][verdict::AUDIT as usize][reason::NO_PERMIT as usize] = 2;
    KernelStats {
        verdicts: Vec::new(),
        verdicts_by_hook: by_hook,
        lost_events: 9,
        maps: vec![
            MapFill {
                name: "POLICY_A",
                entries: Some(12),
                capacity: Some(262_144),
            },
            MapFill {
                name: "EVENTS",
                entries: None,
                capacity: Some(1 << 20),
            },
        ],
        config: ConfigView {
            active_policy: 1,
            audit: true,
            generation: 42,
            node_netns_cookie: 1,
        },
    }
}

fn kernel_text(openmetrics: bool) -> String {
    let mut registry = Registry::default();
    #[derive(Debug)]
    struct Fixed;
    impl Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
            encode_kernel(&mut encoder, &stats())
        }
    }
    registry.register_collector(Box::new(Fixed));
    let mut out = String::new();
    if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
    }
    out
}

#[test]
fn kernel_verdicts_lost_events_and_map_fill() {
    for openmetrics in [true, false] {
        let out = kernel_text(openmetrics);
        for line in [
            "enforcer_verdicts_total{hook=\"connect4\",verdict=\"allow\",reason=\"allowed\"} 11",
            "enforcer_verdicts_total{hook=\"connect6\",verdict=\"allow\",reason=\"allowed\"} 0",
            "enforcer_verdicts_total{hook=\"connect4\",verdict=\"deny\",reason=\"tenant_mismatch\"} 3",
            "enforcer_verdicts_total{hook=\"sendmsg6\",verdict=\"deny\",reason=\"tenant_mismatch\"} 2",
            "enforcer_verdicts_total{hook=\"connect4\",verdict=\"deny\",reason=\"no_permit\"} 0",
            "enforcer_verdicts_total{hook=\"sock_create\",verdict=\"audit\",reason=\"no_permit\"} 2",
            "enforcer_kernel_events_lost_total 9",
            "enforcer_map_entries{map=\"POLICY_A\"} 12",
            "enforcer_map_capacity{map=\"POLICY_A\"} 262144",
            "enforcer_map_capacity{map=\"EVENTS\"} 1048576",
            "enforcer_policy_generation 42.0",
            "enforcer_audit_mode 1.0",
        ] {
            assert!(has(&out, line), "openmetrics={openmetrics}: {line}\n{out}");
        }
        // Impossible pairs are left out, and a map without an entry count has no entries line.
        assert!(
            !out.contains("verdict=\"allow\",reason=\"no_permit\""),
            "{out}"
        );
        assert!(
            !out.contains("verdict=\"deny\",reason=\"allowed\""),
            "{out}"
        );
        assert!(
            !out.contains("enforcer_map_entries{map=\"EVENTS\"}"),
            "{out}"
        );
    }
    let per_reason = reason::COUNT - 1;
    let verdict_lines = samples(&kernel_text(true))
        .iter()
        .filter(|l| l.starts_with("enforcer_verdicts_total"))
        .count();
    assert_eq!(
        verdict_lines,
        hook::COUNT * (1 + 2 * per_reason),
        "hooks x (allow + deny/audit x reasons)"
    );
}

#[test]
fn accept_headers() {
    // What Prometheus 2.42 sends.
    assert!(wants_openmetrics(Some(
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    )));
    assert!(!wants_openmetrics(None));
    assert!(!wants_openmetrics(Some("*/*")));
    assert!(!wants_openmetrics(Some("text/plain")));
    assert!(!wants_openmetrics(Some(
        "application/openmetrics-text; q=0, text/plain"
    )));
}

#[test]
fn metrics_addresses() {
    assert_eq!(
        parse_addr("127.0.0.1:9464").unwrap(),
        "127.0.0.1:9464".parse().unwrap()
    );
    assert_eq!(
        parse_addr("[::1]:9464").unwrap(),
        "[::1]:9464".parse().unwrap()
    );
    for bad in ["", "9464", "localhost:9464", "127.0.0.1", "127.0.0.1:99999"] {
        let error = format!("{:#}", parse_addr(bad).unwrap_err());
        assert!(
            error.contains("--metrics") && error.contains("IP:PORT"),
            "{bad:?}: {error}"
        );
    }
}

#[tokio::test]
async fn serves_metrics_over_http_and_404_elsewhere() {
    let metrics = Arc::new(without_kernel());
    metrics.events_emitted("connection.denied", 1);
    let server = serve("127.85.0.1:0".parse().unwrap(), metrics.clone())
        .await
        .unwrap();
    let addr = server.local_addr();
    let get = |path: &'static str, accept: Option<&'static str>| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accept = accept
            .map(|a| format!("Accept: {a}\r\n"))
            .unwrap_or_default();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    };
    let text = get("/metrics", None).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains(PROMETHEUS_TEXT), "{text}");
    assert!(
        text.contains("enforcer_events_total{type=\"connection.denied\"} 1"),
        "{text}"
    );
    let om = get(
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0"),
    )
    .await;
    assert!(om.contains(OPENMETRICS), "{om}");
    assert!(om.ends_with("# EOF\n"), "{om}");
    let missing = get("/", None).await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    drop(server);
}
