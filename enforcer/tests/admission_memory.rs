//! What reviewing a body takes is at most what the webhook charges for it
//! (`admission::cost::charge`: per JSON value, per byte, per byte of the longest string), on
//! the dearest shapes a body
//! can take: long lists of the smallest containers, volumes, ports, added capabilities,
//! labels, annotations, managed fields, trees in fields the webhook does not read (the
//! envelope's, the pod's, `request.options`), long strings where they are kept, and long
//! names repeated in every reason of a denial, for both webhooks, a creation and an update.
//!
//! Measured with a counting allocator (this test binary's own), as the most bytes held at
//! once while one review is answered, plus the body. Before the bound, a 4 MiB body of
//! `{"name":""}` volumes took 3 GiB (813 bytes per byte), and a 1 MB body of host ports in a
//! pod with a long name 6 GB (a sentence per port, each naming the pod), so this test would
//! fail by far.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use enforcer::admission::cost::{census, charge, PARSE_BUDGET_BYTES};
use enforcer::admission::{review, Confinement, Namespaces, Route};
use k8s_openapi::api::core::v1::Namespace;

/// The system allocator, counting the bytes held and the most held since [`Counting::reset`].
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let held = HELD.fetch_add(layout.size(), Relaxed) + layout.size();
        PEAK.fetch_max(held, Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size(), Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

impl Counting {
    /// Starts a measure; its result is [`Counting::grown`].
    fn reset() -> usize {
        let held = HELD.load(Relaxed);
        PEAK.store(held, Relaxed);
        held
    }

    fn grown(from: usize) -> usize {
        PEAK.load(Relaxed).saturating_sub(from)
    }
}

/// Every namespace exists and names tenant `acme`.
struct Acme;

impl Namespaces for Acme {
    async fn get(&self, name: &str) -> Result<Option<Namespace>, String> {
        let mut namespace = Namespace::default();
        namespace.metadata.name = Some(name.into());
        namespace.metadata.labels = Some(
            [(
                enforcer_policy::cluster::labels::TENANT.to_string(),
                "acme".to_string(),
            )]
            .into(),
        );
        Ok(Some(namespace))
    }
}

/// About `bytes` of `unit`s, comma-separated.
fn repeated(unit: &str, bytes: usize) -> String {
    vec![unit; bytes / (unit.len() + 1)].join(",")
}

/// An object of `n` distinct keys with empty values, about `bytes` long.
fn keys(bytes: usize) -> String {
    let mut text = String::new();
    for i in 0.. {
        if text.len() >= bytes {
            break;
        }
        if i > 0 {
            text.push(',');
        }
        text.push_str(&format!(r#""{i:x}":"""#));
    }
    format!("{{{text}}}")
}

/// A review of `object` (and `old` as its oldObject), with `extra` fields in the envelope
/// and in the request.
fn review_of(operation: &str, object: &str, old: &str, envelope: &str, request: &str) -> Vec<u8> {
    format!(
        r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview",{envelope}"request":{{"uid":"u","kind":{{"group":"","version":"v1","kind":"Pod"}},"resource":{{"group":"","version":"v1","resource":"pods"}},"namespace":"n","operation":"{operation}","userInfo":{{}},{request}"object":{object},"oldObject":{old}}}}}"#
    )
    .into_bytes()
}

#[test]
fn a_review_takes_at_most_what_it_is_charged() {
    // Each body holds close to the most values a review may (MAX_VALUES).
    let bytes = 320 << 10;
    let pod = |spec: &str, meta: &str| {
        format!(r#"{{"metadata":{{"name":"p"{meta}}},"spec":{{"containers":[]{spec}}}}}"#)
    };
    let shapes: Vec<(&str, String, &str, &str)> = vec![
        (
            "containers",
            format!(
                r#"{{"metadata":{{"name":"p"}},"spec":{{"containers":[{}]}}}}"#,
                repeated(r#"{"name":""}"#, bytes)
            ),
            "",
            "",
        ),
        (
            "ephemeral containers",
            pod(
                &format!(
                    r#","ephemeralContainers":[{}]"#,
                    repeated(r#"{"name":""}"#, bytes)
                ),
                "",
            ),
            "",
            "",
        ),
        (
            "security contexts",
            format!(
                r#"{{"metadata":{{"name":"p"}},"spec":{{"containers":[{}]}}}}"#,
                repeated(r#"{"name":"","securityContext":{}}"#, bytes)
            ),
            "",
            "",
        ),
        (
            "env",
            format!(
                r#"{{"metadata":{{"name":"p"}},"spec":{{"containers":[{{"name":"c","env":[{}]}}]}}}}"#,
                repeated(r#"{"name":""}"#, bytes)
            ),
            "",
            "",
        ),
        (
            "ports",
            format!(
                r#"{{"metadata":{{"name":"p"}},"spec":{{"containers":[{{"name":"c","ports":[{}]}}]}}}}"#,
                repeated(r#"{"hostPort":1}"#, bytes)
            ),
            "",
            "",
        ),
        (
            "volumes",
            pod(
                &format!(r#","volumes":[{}]"#, repeated(r#"{"name":""}"#, bytes)),
                "",
            ),
            "",
            "",
        ),
        (
            "hostPath volumes",
            pod(
                &format!(
                    r#","volumes":[{}]"#,
                    repeated(r#"{"name":"","hostPath":{"path":""}}"#, bytes)
                ),
                "",
            ),
            "",
            "",
        ),
        (
            "unknown spec field",
            pod(&format!(r#","x":[{}]"#, repeated("[]", bytes)), ""),
            "",
            "",
        ),
        (
            "labels",
            pod("", &format!(r#","labels":{}"#, keys(bytes))),
            "",
            "",
        ),
        (
            "annotations",
            pod("", &format!(r#","annotations":{}"#, keys(bytes))),
            "",
            "",
        ),
        (
            "managed fields",
            pod(
                "",
                &format!(r#","managedFields":[{}]"#, repeated("{}", bytes)),
            ),
            "",
            "",
        ),
        (
            "unknown pod field",
            format!(
                r#"{{"metadata":{{"name":"p"}},"x":[{}]}}"#,
                repeated("[]", bytes)
            ),
            "",
            "",
        ),
        ("envelope field", pod("", ""), "envelope", ""),
        ("request.options", pod("", ""), "", "options"),
        // serde's error quotes the string it could not read, escaped: 7 bytes for U+0301's
        // 2, 6 for DEL's 1.
        ("a string for a flag", pod("", ""), "", "dryRun"),
        ("DELs for a flag", pod("", ""), "", "dryRun DEL"),
        (
            "added capabilities",
            format!(
                r#"{{"metadata":{{"name":"p"}},"spec":{{"containers":[{{"name":"c","securityContext":{{"capabilities":{{"drop":["ALL"],"add":[{}]}}}}}}]}}}}"#,
                repeated(r#""X""#, bytes)
            ),
            "",
            "",
        ),
        (
            "long pod name, host ports",
            format!(
                r#"{{"metadata":{{"name":"{}"}},"spec":{{"containers":[{{"name":"c","ports":[{}]}}]}}}}"#,
                "a".repeat(bytes / 2),
                repeated(r#"{"hostPort":1}"#, bytes / 2)
            ),
            "",
            "",
        ),
        (
            "long container name, capabilities",
            format!(
                r#"{{"metadata":{{"name":"p"}},"spec":{{"containers":[{{"name":"{}","securityContext":{{"capabilities":{{"drop":["ALL"],"add":[{}]}}}}}}]}}}}"#,
                "c".repeat(bytes / 2),
                repeated(r#""X""#, bytes / 2)
            ),
            "",
            "",
        ),
        (
            "long label value",
            pod(
                "",
                &format!(
                    r#","labels":{{"ai-enforcer.io/tenant":"{}"}}"#,
                    "v".repeat(bytes)
                ),
            ),
            "",
            "",
        ),
        (
            "long container name",
            format!(
                r#"{{"metadata":{{"name":"p"}},"spec":{{"containers":[{{"name":"{}"}}]}}}}"#,
                "c".repeat(bytes)
            ),
            "",
            "",
        ),
        (
            "long hostPath",
            pod(
                &format!(
                    r#","volumes":[{{"name":"h","hostPath":{{"path":"{}"}}}}]"#,
                    "/".repeat(bytes)
                ),
                "",
            ),
            "",
            "",
        ),
    ];
    let filler = format!("[{}]", repeated("[]", bytes));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let confinement = Confinement::default();
    let mut report = Vec::new();
    for (shape, object, envelope, request) in &shapes {
        let envelope = match *envelope {
            "" => String::new(),
            _ => format!(r#""x":{filler},"#),
        };
        let request = match *request {
            "" => String::new(),
            "dryRun" => format!(r#""dryRun":"{}","#, "\u{301}".repeat(bytes / 2)),
            "dryRun DEL" => format!(r#""dryRun":"{}","#, "\u{7f}".repeat(bytes)),
            _ => format!(r#""options":{{"x":{filler}}},"#),
        };
        let half = object.len() / 2;
        for (operation, route) in [
            ("CREATE", Route::Validate),
            ("CREATE", Route::Mutate),
            ("UPDATE", Route::Mutate),
        ] {
            let body = match operation {
                // An update carries the pod twice: half as many of each.
                "UPDATE" => {
                    let object = object_of_about(object, half);
                    review_of(operation, &object, &object, &envelope, &request)
                }
                _ => review_of(operation, object, "null", &envelope, &request),
            };
            let census = census(&body).unwrap();
            let (values, charged) = (census.values, charge(census, body.len() as u64));
            assert!(
                charged <= PARSE_BUDGET_BYTES,
                "{shape} ({operation}): {values} values, {} bytes: more than a review may take",
                body.len()
            );
            let from = Counting::reset();
            let answer = runtime.block_on(review(route, &body, &Acme, &confinement));
            let took = Counting::grown(from) as u64;
            drop(answer);
            report.push(format!(
                "{shape} ({operation} {route:?}): {values} values in {} bytes, took {took} \
                 bytes, {}% of the {charged} charged",
                body.len(),
                took * 100 / charged
            ));
            // The body itself is held too (charged, not counted here).
            assert!(
                took + body.len() as u64 <= charged,
                "{shape} ({operation} {route:?}) took {took} bytes for {values} values in {} \
                 bytes: more than the {charged} charged\n{}",
                body.len(),
                report.join("\n")
            );
        }
    }
    println!("{}", report.join("\n"));
}

/// `object` with its repeated part cut to about `bytes` (at a unit's end), for an update's
/// two copies.
fn object_of_about(object: &str, bytes: usize) -> String {
    let value: serde_json::Value = serde_json::from_str(object).unwrap();
    let mut text = serde_json::to_string(&value).unwrap();
    // Halve its long lists and maps until it fits (a pod without any is kept whole).
    while text.len() > bytes {
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        halve(&mut value);
        let halved = serde_json::to_string(&value).unwrap();
        if halved.len() == text.len() {
            break;
        }
        text = halved;
    }
    text
}

/// Halves the lists and maps of more than 16 entries in `value` (the outermost ones).
fn halve(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Array(items) if items.len() > 16 => items.truncate(items.len() / 2),
        Value::Object(map) if map.len() > 16 => {
            let keep: Vec<String> = map.keys().take(map.len() / 2).cloned().collect();
            map.retain(|k, _| keep.contains(k));
        }
        Value::Array(items) => items.iter_mut().for_each(halve),
        Value::Object(map) => map.values_mut().for_each(halve),
        _ => {}
    }
}
