//! The PDP server and the sync task together, in process, on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::files::tests::TestDir;
use super::files::{read_bundle_files, validate};
use super::serve::{Pdp, ServeOptions};
use super::sync::{self, SyncHandle, SyncOptions};
use super::*;

const TOKEN: &str = "test-token-0123456789";

fn demo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies/demo")
}

/// A copy of the demo bundle in `dir/policies`, and a token file.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    for (name, text) in read_bundle_files(&demo_dir()).unwrap() {
        std::fs::write(policies.join(name), text).unwrap();
    }
    let token = dir.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    (policies, token)
}

/// Edits a policy file in a way that keeps the bundle valid but changes its revision.
fn touch_policy(policies: &Path, tag: &str) {
    let file = policies.join("baseline.cedar");
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str(&format!("\n// edit {tag}\n"));
    std::fs::write(&file, text).unwrap();
}

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn start(options: ServeOptions) -> Self {
        let pdp = Pdp::bind(options).await.unwrap();
        let addr = pdp.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(pdp.run(async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        drop(self.stop.take());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn options(policies: &Path, token: &Path) -> ServeOptions {
    ServeOptions {
        policies: policies.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        token_file: Some(token.to_path_buf()),
        tls_cert: None,
        tls_key: None,
        ready_file: None,
    }
}

/// A raw HTTP/1.1 exchange: the whole response as text.
async fn raw(addr: SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("response in time")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: pdp\r\nConnection: close\r\n{extra}\r\n")
}

async fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

fn unused_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn refuses_plain_http_off_loopback_and_half_a_tls_pair() {
    let dir = TestDir::new("refuse");
    let (policies, token) = setup(&dir.0);
    for listen in ["0.0.0.0:0", "[::]:0", "192.0.2.1:0"] {
        let error = Pdp::bind(ServeOptions {
            listen: listen.parse().unwrap(),
            ..options(&policies, &token)
        })
        .await
        .err()
        .expect("refused");
        assert!(
            format!("{error:#}").contains("plain HTTP"),
            "{listen}: {error:#}"
        );
    }
    let error = Pdp::bind(ServeOptions {
        tls_cert: Some(dir.0.join("cert.pem")),
        ..options(&policies, &token)
    })
    .await
    .err()
    .expect("refused");
    assert!(format!("{error:#}").contains("go together"), "{error:#}");
    let error = Pdp::bind(ServeOptions {
        token_file: Some(dir.0.join("missing")),
        ..options(&policies, &token)
    })
    .await
    .err()
    .expect("refused");
    assert!(format!("{error:#}").contains("token file"), "{error:#}");
}

#[tokio::test]
async fn refuses_to_start_with_an_invalid_bundle() {
    let dir = TestDir::new("invalid-start");
    let (policies, token) = setup(&dir.0);
    std::fs::write(policies.join("broken.cedar"), "permit (").unwrap();
    let error = Pdp::bind(options(&policies, &token))
        .await
        .err()
        .expect("refused");
    assert!(format!("{error:#}").contains("invalid"), "{error:#}");
}

#[tokio::test]
async fn token_etag_and_long_poll() {
    let dir = TestDir::new("serve");
    let (policies, token) = setup(&dir.0);
    let revision = validate(&policies).unwrap();
    let server = Running::start(options(&policies, &token)).await;

    // No token, a wrong one, another scheme: 401 and nothing else, on any path.
    for extra in [
        String::new(),
        "Authorization: Bearer wrong\r\n".to_string(),
        format!("Authorization: Basic {TOKEN}\r\n"),
        format!("Authorization: Bearer {TOKEN}x\r\n"),
    ] {
        for path in ["/v1/bundle", "/other"] {
            let response = raw(server.addr, &get(path, &extra)).await;
            assert!(
                response.starts_with("HTTP/1.1 401"),
                "{extra:?} {path}: {response}"
            );
            assert!(!response.contains("sha256"), "{response}");
            assert!(!response.contains("tenants"), "{response}");
            assert!(!response.to_lowercase().contains("etag"), "{response}");
        }
    }

    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let response = raw(server.addr, &get("/v1/bundle", &auth)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response
            .to_lowercase()
            .contains(&format!("etag: \"{revision}\"")),
        "{response}"
    );
    let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
    let wire: WireBundle = serde_json::from_str(body).unwrap();
    assert_eq!(wire.revision, revision);
    assert_eq!(wire.files, read_bundle_files(&policies).unwrap());

    assert!(raw(server.addr, &get("/nope", &auth))
        .await
        .starts_with("HTTP/1.1 404"));
    assert!(raw(server.addr, &get("/v1/bundle?wait=x", &auth))
        .await
        .starts_with("HTTP/1.1 400"));

    // The current revision, no wait: 304 at once. An old one: 200.
    let current = format!("{auth}If-None-Match: \"{revision}\"\r\n");
    let response = raw(server.addr, &get("/v1/bundle", &current)).await;
    assert!(response.starts_with("HTTP/1.1 304"), "{response}");
    let old = format!("{auth}If-None-Match: \"sha256:0000000000000000\"\r\n");
    assert!(raw(server.addr, &get("/v1/bundle?wait=30", &old))
        .await
        .starts_with("HTTP/1.1 200"));

    // Long poll: nothing changes within the wait -> 304 after it.
    let started = Instant::now();
    let response = raw(server.addr, &get("/v1/bundle?wait=1", &current)).await;
    assert!(response.starts_with("HTTP/1.1 304"), "{response}");
    assert!(started.elapsed() >= Duration::from_millis(900));

    // An invalid edit is not published...
    std::fs::write(policies.join("broken.cedar"), "permit (").unwrap();
    let response = raw(server.addr, &get("/v1/bundle?wait=2", &current)).await;
    assert!(
        response.starts_with("HTTP/1.1 304"),
        "an invalid bundle was published: {response}"
    );
    std::fs::remove_file(policies.join("broken.cedar")).unwrap();

    // ...a valid one ends a held long poll with the new bundle.
    let addr = server.addr;
    let request = get("/v1/bundle?wait=30", &current);
    let poll = tokio::spawn(async move { raw(addr, &request).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    touch_policy(&policies, "1");
    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("the long poll ends when the bundle changes")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
    let wire: WireBundle = serde_json::from_str(body).unwrap();
    assert_eq!(wire.revision, validate(&policies).unwrap());
    assert_ne!(wire.revision, revision);

    server.stop().await;
}

fn sync_options(url: String, token: &str, ca: Option<PathBuf>, target: PathBuf) -> SyncOptions {
    SyncOptions {
        url,
        token: token.to_string(),
        ca_cert: ca,
        target_dir: target,
    }
}

#[tokio::test]
async fn sync_follows_the_pdp_and_keeps_the_last_good_bundle() {
    let dir = TestDir::new("sync");
    let (policies, token) = setup(&dir.0);
    let server = Running::start(options(&policies, &token)).await;
    let url = format!("http://{}", server.addr);
    let state = dir.0.join("state");
    let target = state.join("pdp-bundle");

    let handle = sync::try_spawn(sync_options(url.clone(), TOKEN, None, target.clone())).unwrap();
    assert!(handle.first_sync(Duration::from_secs(10)).await);
    assert_eq!(
        read_bundle_files(&target).unwrap(),
        read_bundle_files(&policies).unwrap()
    );
    let first = validate(&target).unwrap();
    let status = handle.status();
    assert_eq!(status.revision.as_deref(), Some(first.as_str()));
    assert_eq!(status.last_error, None);
    assert!(status.last_success.is_some());
    assert!(status.stale_seconds.unwrap() <= 1);
    let on_disk = read_status(&status_file(&target))
        .unwrap()
        .expect("status file");
    assert_eq!(on_disk.url, url);
    assert_eq!(on_disk.revision.as_deref(), Some(first.as_str()));

    // An edit on the PDP reaches the node through the held long poll.
    touch_policy(&policies, "2");
    let second = validate(&policies).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || validate(&target)
            .ok()
            .as_deref()
            == Some(&second))
        .await,
        "the node did not catch up"
    );
    assert_eq!(handle.status().revision.as_deref(), Some(second.as_str()));

    // The PDP goes away: the bundle stays, the error is reported.
    server.stop().await;
    assert!(
        wait_for(Duration::from_secs(10), || handle
            .status()
            .last_error
            .is_some())
        .await,
        "no error reported: {:?}",
        handle.status()
    );
    assert_eq!(validate(&target).unwrap(), second);
    let on_disk = read_status(&status_file(&target)).unwrap().unwrap();
    assert!(on_disk.last_error.is_some());
    assert!(on_disk.consecutive_failures >= 1);
    drop(handle);

    // A restart with the PDP unreachable: the persisted bundle is good at once.
    let dead = format!("http://127.0.0.1:{}", unused_port());
    let restarted = sync::try_spawn(sync_options(dead, TOKEN, None, target.clone())).unwrap();
    assert!(restarted.first_sync(Duration::from_secs(5)).await);
    assert_eq!(
        restarted.status().revision.as_deref(),
        Some(second.as_str())
    );
    assert!(
        wait_for(Duration::from_secs(10), || restarted
            .status()
            .last_error
            .is_some())
        .await
    );
    assert_eq!(validate(&target).unwrap(), second);
    drop(restarted);

    // The PDP comes back with a wrong token on the node: 401, reported, bundle kept.
    touch_policy(&policies, "3");
    let server = Running::start(options(&policies, &token)).await;
    let wrong = sync::try_spawn(sync_options(
        format!("http://{}", server.addr),
        "not-the-token",
        None,
        target.clone(),
    ))
    .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || wrong
            .status()
            .last_error
            .is_some_and(|e| e.contains("401")))
        .await,
        "{:?}",
        wrong.status()
    );
    assert_eq!(validate(&target).unwrap(), second);
    drop(wrong);

    // With the right token it catches up.
    let right = sync::try_spawn(sync_options(
        format!("http://{}", server.addr),
        TOKEN,
        None,
        target.clone(),
    ))
    .unwrap();
    let third = validate(&policies).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || validate(&target)
            .ok()
            .as_deref()
            == Some(&third))
        .await
    );
    drop(right);
    server.stop().await;

    // Nothing left beside the bundle but the status file.
    let mut left: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["pdp-bundle", "pdp-status.json"]);
}

/// Issue 6, fault 8: a reader that saw a bundle on disk and then read the status (in memory
/// or its file) saw the previous revision. An observer thread reads disk, then status, as
/// fast as it can while the PDP publishes edits; the status may be newer than what it read
/// from disk a moment before (an edit can land in between), never older. (Before the fix,
/// the status changed after the swap; the original test hit that window once in two runs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_never_behind_the_bundle_on_disk() {
    const EDITS: usize = 8;
    let dir = TestDir::new("order");
    let (policies, token) = setup(&dir.0);
    let server = Running::start(options(&policies, &token)).await;
    let target = dir.0.join("state").join("pdp-bundle");
    let handle = sync::try_spawn(sync_options(
        format!("http://{}", server.addr),
        TOKEN,
        None,
        target.clone(),
    ))
    .unwrap();
    assert!(handle.first_sync(Duration::from_secs(10)).await);
    let status_path = super::status_file(&target);
    // Every revision the node will go through, in order: the same edits on a scratch copy.
    let scratch = dir.0.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    for (name, text) in read_bundle_files(&policies).unwrap() {
        std::fs::write(scratch.join(name), text).unwrap();
    }
    let mut order = vec![validate(&scratch).unwrap()];
    for k in 0..EDITS {
        touch_policy(&scratch, &format!("order {k}"));
        order.push(validate(&scratch).unwrap());
    }
    let order = std::sync::Arc::new(order);
    let rank_in = |order: &[String], revision: &str| order.iter().position(|r| r == revision);

    let handle = std::sync::Arc::new(handle);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let observer = {
        let (handle, done, target) = (handle.clone(), done.clone(), target.clone());
        let order = order.clone();
        std::thread::spawn(move || {
            let rank = |revision: &str| rank_in(&order, revision);
            let mut checks = 0u64;
            let mut problems = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) && problems.len() < 5 {
                // Disk first, then the status. The disk is read the cheap way (which edits
                // the policy file holds) so that the observer looks often.
                let Ok(text) = std::fs::read_to_string(target.join("baseline.cedar")) else {
                    continue;
                };
                let on_disk = order[text.matches("// edit order ").count()].clone();
                let in_memory = handle.status().revision;
                let in_file = super::read_status(&status_path)
                    .ok()
                    .flatten()
                    .and_then(|s| s.revision);
                checks += 1;
                for (what, seen) in [("in memory", in_memory), ("in its file", in_file)] {
                    let behind = match seen.as_deref() {
                        Some(seen) => rank(seen) < rank(&on_disk),
                        None => true,
                    };
                    if behind {
                        problems.push(format!(
                            "disk holds {on_disk} but the status {what} still says {seen:?}"
                        ));
                    }
                }
            }
            (checks, problems)
        })
    };
    for k in 0..EDITS {
        touch_policy(&policies, &format!("order {k}"));
        let want = validate(&policies).unwrap();
        assert_eq!(
            Some(k + 1),
            rank_in(&order, &want),
            "the scratch copy predicts the revisions"
        );
        assert!(
            wait_for(Duration::from_secs(20), || handle
                .status()
                .revision
                .as_deref()
                == Some(want.as_str()))
            .await,
            "edit {k} did not reach the node"
        );
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let observed = tokio::task::spawn_blocking(move || observer.join().unwrap())
        .await
        .unwrap();
    let (checks, problems) = observed;
    assert!(checks > 0, "the observer never read a valid bundle");
    assert!(problems.is_empty(), "after {checks} checks: {problems:#?}");
    drop(handle);
    server.stop().await;
}

#[tokio::test]
async fn sync_refuses_a_bundle_that_does_not_validate() {
    // A hand-made "PDP" that serves an invalid bundle: the node must not install it.
    let dir = TestDir::new("bad-bundle");
    let target = dir.0.join("state/pdp-bundle");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = serde_json::to_string(&WireBundle {
        revision: "sha256:0000000000000000".into(),
        files: [("policies.cedar".to_string(), "permit (".to_string())].into(),
    })
    .unwrap();
    let server = tokio::spawn(async move {
        for _ in 0..20 {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        }
    });
    let handle: SyncHandle = sync::try_spawn(sync_options(
        format!("http://{addr}"),
        TOKEN,
        None,
        target.clone(),
    ))
    .unwrap();
    assert!(!handle.first_sync(Duration::from_secs(2)).await);
    let status = handle.status();
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("invalid bundle")),
        "{status:?}"
    );
    assert!(!target.exists());
    drop(handle);
    server.abort();
}

#[tokio::test]
async fn https_with_a_pinned_ca() {
    let dir = TestDir::new("tls");
    let (policies, token) = setup(&dir.0);
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert_pem = dir.0.join("cert.pem");
    let key_pem = dir.0.join("key.pem");
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(
        &key_pem,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let other_pem = dir.0.join("other.pem");
    std::fs::write(&other_pem, other.cert.pem()).unwrap();

    let server = Running::start(ServeOptions {
        tls_cert: Some(cert_pem.clone()),
        tls_key: Some(key_pem),
        ..options(&policies, &token)
    })
    .await;

    // Plain HTTP to the TLS port gets no bundle.
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let response = raw(server.addr, &get("/v1/bundle", &auth)).await;
    assert!(!response.contains("sha256"), "{response}");

    // A node that trusts another certificate refuses the connection.
    let target = dir.0.join("state/pdp-bundle");
    let untrusting = sync::try_spawn(sync_options(
        format!("https://{}", server.addr),
        TOKEN,
        Some(other_pem),
        target.clone(),
    ))
    .unwrap();
    assert!(!untrusting.first_sync(Duration::from_secs(2)).await);
    assert!(untrusting
        .status()
        .last_error
        .is_some_and(|e| e.contains("TLS")));
    drop(untrusting);

    for host in ["127.0.0.1".to_string(), "localhost".to_string()] {
        let target = dir.0.join(format!("state-{host}/pdp-bundle"));
        let handle = sync::try_spawn(sync_options(
            format!("https://{host}:{}", server.addr.port()),
            TOKEN,
            Some(cert_pem.clone()),
            target.clone(),
        ))
        .unwrap();
        assert!(
            handle.first_sync(Duration::from_secs(10)).await,
            "{host}: {:?}",
            handle.status()
        );
        assert_eq!(validate(&target).unwrap(), validate(&policies).unwrap());
    }
    server.stop().await;
}

#[test]
fn plain_http_urls_only_to_loopback() {
    let error = sync::try_spawn(sync_options(
        "http://192.0.2.1:80".into(),
        TOKEN,
        None,
        PathBuf::from("/nonexistent/x"),
    ))
    .err()
    .expect("refused");
    assert!(format!("{error:#}").contains("loopback"));
}

/// Counts what is created directly in a directory, with inotify: a spy on `stage`.
struct Creations {
    fd: std::os::fd::OwnedFd,
}

impl Creations {
    fn watch(dir: &Path) -> Self {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: inotify_init1 returns a new descriptor (checked), which we then own.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(
            raw >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid inotify descriptor and a NUL-terminated path.
        let wd = unsafe {
            libc::inotify_add_watch(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                path.as_ptr(),
                libc::IN_CREATE,
            )
        };
        assert!(
            wd >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
        Self { fd }
    }

    /// Whether anything was created since [`Creations::watch`].
    fn any(&self) -> bool {
        let mut buf = [0u8; 4096];
        // SAFETY: reads at most `buf.len()` bytes into `buf`.
        let n = unsafe {
            libc::read(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        n > 0
    }
}

fn empty_status() -> std::sync::Mutex<PdpStatus> {
    std::sync::Mutex::new(PdpStatus::new("http://127.0.0.1:1"))
}

/// Review 70 M3: an answer naming more files than a bundle holds is refused before anything
/// is written (it used to write them all, then let the load refuse them: millions of inodes
/// from one 64 MiB answer).
#[test]
fn install_refuses_more_files_than_a_bundle_holds_before_writing_any() {
    let dir = TestDir::new("many-files");
    let target = dir.0.join("pdp-bundle");
    let files = (0..5000)
        .map(|i| (format!("a{i:07}.cedar"), String::new()))
        .collect();
    let wire = WireBundle {
        revision: "sha256:0011223344556677".into(),
        files,
    };
    let created = Creations::watch(&dir.0);
    let error = sync::install(wire, &target, &empty_status()).unwrap_err();
    let error = format!("{error:#}");
    assert!(!created.any(), "something was created before the refusal");
    let limit = enforcer_policy::limits::POLICY_FILES;
    assert!(
        error.contains("has 5000 files") && error.contains(&format!("{limit} policy files")),
        "{error}"
    );
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0);
}

/// The bounds are the load's own: a bundle at every limit is staged, one over any is not.
#[test]
fn stage_bounds_are_the_bundle_limits() {
    use enforcer_policy::limits::{POLICY_FILES, POLICY_FILE_BYTES, POLICY_TOTAL_BYTES};
    let dir = TestDir::new("bounds");
    let mut files: std::collections::BTreeMap<String, String> = (0..POLICY_FILES)
        .map(|i| (format!("p{i}.cedar"), String::new()))
        .collect();
    files.insert("inventory.yaml".into(), String::new());
    files.insert("schema.cedarschema".into(), String::new());
    let staged = super::files::stage(dir.0.join("full"), &files).unwrap();
    assert_eq!(
        std::fs::read_dir(staged.path()).unwrap().count(),
        POLICY_FILES + 2
    );
    drop(staged);
    // One policy file more (without a schema, so that the count of entries is within).
    files.remove("schema.cedarschema");
    files.insert("one-more.cedar".into(), String::new());
    let error = super::files::stage(dir.0.join("s"), &files).unwrap_err();
    assert!(
        error.to_string().contains(&format!(
            "{} policy files (*.cedar); the limit is {POLICY_FILES}",
            POLICY_FILES + 1
        )),
        "{error}"
    );
    // One file over its own limit, and files over the total.
    let big = "x".repeat(POLICY_FILE_BYTES as usize);
    let over = [("a.cedar".to_string(), format!("{big}x"))].into();
    let error = super::files::stage(dir.0.join("s"), &over).unwrap_err();
    assert!(
        error
            .to_string()
            .contains(&format!("the limit is {POLICY_FILE_BYTES} bytes")),
        "{error}"
    );
    let total = (0..=POLICY_TOTAL_BYTES / POLICY_FILE_BYTES)
        .map(|i| (format!("p{i}.cedar"), big.clone()))
        .collect();
    let error = super::files::stage(dir.0.join("s"), &total).unwrap_err();
    assert!(
        error
            .to_string()
            .contains(&format!("the limit is {POLICY_TOTAL_BYTES} bytes")),
        "{error}"
    );
    assert!(!dir.0.join("s").exists());
}

/// Review 70 L1: the answer's strings reach the error (so the log, `pdp-status.json` and
/// `enforcer status`) only as a short prefix.
#[test]
fn install_errors_show_only_a_prefix_of_the_answer() {
    let dir = TestDir::new("long-strings");
    let target = dir.0.join("pdp-bundle");
    let good = read_bundle_files(&demo_dir()).unwrap();
    let long = "a".repeat(1 << 20);
    // A 1 MiB revision with the good files.
    let error = sync::install(
        WireBundle {
            revision: long.clone(),
            files: good.clone(),
        },
        &target,
        &empty_status(),
    )
    .unwrap_err();
    let error = format!("{error:#}");
    assert!(
        error.len() < 1024,
        "{} bytes: {}",
        error.len(),
        &error[..200]
    );
    assert!(error.contains("not a bundle revision"), "{error}");
    // A 1 MiB file name, of a policy file or not.
    for name in [format!("{long}.cedar"), long.clone()] {
        let mut files = good.clone();
        files.insert(name, String::new());
        let error = sync::install(
            WireBundle {
                revision: validate(&demo_dir()).unwrap(),
                files,
            },
            &target,
            &empty_status(),
        )
        .unwrap_err();
        let error = format!("{error:#}");
        assert!(
            error.len() < 1024,
            "{} bytes: {}",
            error.len(),
            &error[..200]
        );
    }
    assert!(!target.exists());
}

/// An answer of `n` empty policy files, in name order (as the server writes it).
fn answer_of(n: usize) -> String {
    let files: Vec<String> = (0..n).map(|i| format!("\"a{i:07}.cedar\":\"\"")).collect();
    format!(
        "{{\"revision\":\"sha256:0011223344556677\",\"files\":{{{}}}}}",
        files.join(",")
    )
}

/// Review 71 N3: an answer's files are counted while it is decoded. Decoded whole first, a
/// 64 MiB answer of millions of empty files was a map of several hundred MB before
/// `check_bounds` could refuse it; now decoding stops at the first file past the limit.
#[test]
fn an_answer_s_files_are_bounded_while_it_is_decoded() {
    use enforcer_policy::limits::POLICY_FILES;
    let most = POLICY_FILES + 2;
    // At the limit: decoded, and written as before (the server's side is unchanged).
    let json = answer_of(most);
    let wire: WireBundle = serde_json::from_str(&json).unwrap();
    assert_eq!(wire.files.len(), most);
    assert_eq!(serde_json::to_string(&wire).unwrap(), json);
    // One past it, or 100,000: refused, naming the limit, where the file past it ends (so the
    // map never held more than that).
    let stop = answer_of(most + 1).len();
    for n in [most + 1, 100_000] {
        let json = answer_of(n);
        let error = serde_json::from_str::<WireBundle>(&json).unwrap_err();
        assert!(
            error
                .to_string()
                .contains(&format!("more than {most} files; the limit is {most}")),
            "{error}"
        );
        assert_eq!(error.line(), 1);
        assert!(
            error.column() <= stop,
            "decoding stopped at column {} of {}, past the file over the limit (column {stop})",
            error.column(),
            json.len()
        );
    }
    // A name is at most `MAX_NAME_BYTES`; a longer one is refused, and shown only in part.
    let max = super::files::MAX_NAME_BYTES;
    for (name, ok) in [
        (format!("{}.cedar", "n".repeat(max - 6)), true),
        (format!("{}.cedar", "n".repeat(max - 5)), false),
        ("n".repeat(1 << 20), false),
    ] {
        let json = format!("{{\"revision\":\"sha256:00\",\"files\":{{\"{name}\":\"\"}}}}");
        match serde_json::from_str::<WireBundle>(&json) {
            Ok(wire) => assert!(ok && wire.files.contains_key(&name)),
            Err(error) => {
                let error = error.to_string();
                assert!(!ok, "{error}");
                assert!(
                    error.contains(&format!("the limit is {max} bytes")) && error.len() < 1024,
                    "{} bytes: {}",
                    error.len(),
                    &error[..200.min(error.len())]
                );
            }
        }
    }
}

/// Review 71 N3, through the agent's request: the error of an answer of 100,000 files names
/// the limit.
#[tokio::test]
async fn the_agent_refuses_an_answer_of_too_many_files_naming_the_limit() {
    let most = enforcer_policy::limits::POLICY_FILES + 2;
    let json = answer_of(100_000);
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
        json.len()
    );
    let error = super::fuzzing::fetch_bytes(response.as_bytes(), None)
        .await
        .unwrap_err();
    let error = format!("{error:#}");
    assert!(
        error.contains("not a bundle") && error.contains(&format!("the limit is {most}")),
        "{error}"
    );
}

/// Review 71 N4: the bundle's own diagnostics quote what they refuse (here a 1 MiB step-up
/// ttl, whole); the error the status stores (and the log repeats) is bounded, and says how
/// much was cut.
#[test]
fn a_refused_bundle_s_diagnostics_are_stored_bounded() {
    let dir = TestDir::new("huge-diagnostic");
    let target = dir.0.join("pdp-bundle");
    let mut files = read_bundle_files(&demo_dir()).unwrap();
    let inventory = files.get_mut(enforcer_policy::INVENTORY_FILE).unwrap();
    let at = "    datasets: [acme-kb]\n";
    assert!(inventory.contains(at));
    let huge = "1".repeat(1 << 20);
    *inventory = inventory.replacen(
        at,
        &format!("{at}    step_up: {{action: quarantine, ttl: \"{huge}\"}}\n"),
        1,
    );
    let error = sync::install(
        WireBundle {
            revision: "sha256:0011223344556677".into(),
            files,
        },
        &target,
        &empty_status(),
    )
    .unwrap_err();
    let whole = format!("{error:#}");
    assert!(
        whole.len() > 1 << 20 && whole.contains("step_up ttl"),
        "the diagnostics quote the value: {}",
        &whole[..200.min(whole.len())]
    );

    let mut status = PdpStatus::new("http://127.0.0.1:1");
    let logged = sync::record(
        &mut status,
        &Err(error),
        &None,
        std::time::SystemTime::now(),
    );
    let stored = status.last_error.clone().unwrap();
    assert_eq!(logged.as_ref(), Some(&stored));
    assert_eq!(status.consecutive_failures, 1);
    assert!(
        stored.len() <= sync::STATUS_ERROR_BYTES,
        "{} bytes stored: {}...",
        stored.len(),
        &stored[..200]
    );
    assert!(
        stored.starts_with("the PDP served an invalid bundle"),
        "{stored}"
    );
    let kept = stored.rfind("... (").expect("a note of the cut");
    assert!(whole.starts_with(&stored[..kept]));
    assert!(
        stored.ends_with(&format!(" ({} more bytes not shown)", whole.len() - kept)),
        "{}",
        &stored[kept..]
    );
    assert!(!target.exists());
}
