//! The webhook's HTTP layer, in process over real TLS on loopback: routes, methods, the body
//! bound (declared and streamed), bad bodies, and an API server that does not answer. The
//! decisions themselves are tested in `decide`, `review` and, against the real API server,
//! `tests/tests/admission.rs`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;

use super::*;
use crate::pdp::files::tests::TestDir;

/// Nothing listens here (127.84.0.0/16 is this helper's range): every namespace lookup fails.
const NOWHERE: &str = "https://127.84.0.9:1";

struct Running {
    addr: SocketAddr,
    /// The CA of the webhook's serving certificate.
    ca: PathBuf,
    connector: TlsConnector,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

/// A CA and a server certificate for `IP:127.84.0.1`, as PEM files in `dir`: (ca, cert, key).
fn pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.84.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    std::fs::set_permissions(
        &paths.2,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    paths
}

/// A CA of its own in `dir` (`{name}-ca.pem`) and a client certificate it signed
/// (`{name}.pem`, `{name}-key.pem`): (ca, cert, key).
fn client_pki(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = leaf.signed_by(&key, &ca).unwrap();
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

impl Running {
    async fn start(dir: &Path) -> Self {
        Self::start_with(dir, NOWHERE, None).await
    }

    /// A webhook whose namespace lookups go to `api_server`, requiring a client certificate
    /// signed by `client_ca` when given.
    async fn start_with(dir: &Path, api_server: &str, client_ca: Option<PathBuf>) -> Self {
        let (ca, cert, key) = pki(dir);
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
                 clusters: [{{name: c, cluster: {{server: \"{api_server}\", certificate-authority: {}}}}}]\n\
                 users: [{{name: u, user: {{token: t}}}}]\n\
                 contexts: [{{name: c, context: {{cluster: c, user: u}}}}]\n",
                ca.display()
            ),
        )
        .unwrap();
        let ready = dir.join("ready");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_until(
            ServeOptions {
                listen: "127.84.0.1:0".parse().unwrap(),
                tls_cert: cert,
                tls_key: key,
                client_ca,
                kubeconfig: Some(kubeconfig),
                ready_file: Some(ready.clone()),
                confinement: Default::default(),
            },
            async move {
                let _ = stopped.await;
            },
        ));
        let addr = loop {
            if let Some(addr) = std::fs::read_to_string(&ready)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                break addr;
            }
            assert!(!task.is_finished(), "the webhook stopped before serving");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let connector = TlsConnector::from(crate::pdp::tls::client_config(Some(&ca)).unwrap());
        Self {
            addr,
            ca,
            connector,
            stop: Some(stop),
            task,
        }
    }

    /// A fresh connection on which `head` has been sent, held open.
    async fn open(&self, head: &str) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        self.open_with(&self.connector, head).await.unwrap()
    }

    /// A connector that trusts the webhook and presents `cert` (PEM, with its key `key`).
    fn connector_presenting(&self, cert: &Path, key: &Path) -> TlsConnector {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for ca in rustls::pki_types::CertificateDer::pem_file_iter(&self.ca).unwrap() {
            roots.add(ca.unwrap()).unwrap();
        }
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
        TlsConnector::from(std::sync::Arc::new(config))
    }

    /// [`Self::open`] through `connector`; the handshake's or the write's error.
    async fn open_with(
        &self,
        connector: &TlsConnector,
        head: &str,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        let name = rustls::pki_types::ServerName::try_from("127.84.0.1").unwrap();
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(head.as_bytes()).await?;
        tls.flush().await?;
        // TLS 1.3: the server judges the client's certificate after the client's side of the
        // handshake is done; its refusal is the first thing read.
        Ok(tls)
    }

    /// Sends `head` then `body` on a fresh connection; the status code and the whole answer.
    async fn exchange(&self, head: &str, body: &[u8]) -> (u16, String) {
        let tls = self.open(head).await;
        Self::answer(tls, body).await
    }

    /// Sends `body` on `tls`, then reads the answer to its end: the status code and the text.
    async fn answer(
        mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        body: &[u8],
    ) -> (u16, String) {
        // The server may answer (413) and close before the body is through.
        let _ = tls.write_all(body).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut answer)).await;
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
        (status, text)
    }

    /// `GET /healthz` on a fresh connection.
    async fn health(&self) -> (u16, String) {
        self.exchange(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"",
        )
        .await
    }

    async fn post(&self, path: &str, body: &[u8]) -> (u16, String) {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        self.exchange(&head, body).await
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

fn review_json(namespace: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {},
            "object": {"metadata": {"name": "p"}},
        }
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_methods_bounds_and_an_unreachable_api_server() {
    let dir = TestDir::new("admission-http");
    let server = Running::start(&dir.0).await;

    let (status, text) = server.health().await;
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("\r\n\r\nok\n"), "{text}");

    let (status, text) = server
        .exchange(
            "GET /validate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"",
        )
        .await;
    assert_eq!(status, 405, "{text}");
    assert!(text.contains("allow: POST"), "{text}");

    // A head larger than a connection's buffer (hyper's default, ~408 KiB, let 256 of them
    // hold 100 MB before any budget): refused.
    let long_head = format!(
        "POST /validate HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(crate::pdp::listen::CONNECTION_BUFFER_BYTES)
    );
    let (status, text) = server.exchange(&long_head, b"").await;
    assert_eq!(status, 431, "{text}");

    let (status, text) = server.post("/admit", b"{}").await;
    assert_eq!(status, 404, "{text}");
    assert!(
        text.contains(
            "no such path \"/admit\": the webhook serves POST /mutate and POST /validate"
        ),
        "{text}"
    );

    let (status, text) = server.post("/validate", b"not json").await;
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains(
            "the request body is not an AdmissionReview: expected ident at line 1 column 2"
        ),
        "{text}"
    );

    // Declared too large: refused before reading a byte of it.
    let head = format!(
        "POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        MAX_BODY_BYTES + 1
    );
    let (status, text) = server.exchange(&head, b"").await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("larger than 4 MiB"), "{text}");

    // Streamed without a length: cut off at the bound.
    let chunk = vec![b' '; 1 << 20];
    let mut body = Vec::new();
    for _ in 0..5 {
        body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        body.extend_from_slice(&chunk);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let (status, text) = server
        .exchange(
            "POST /mutate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            &body,
        )
        .await;
    assert_eq!(status, 413, "{text}");

    // A well-formed review, and an API server that cannot be reached: a 500 naming the
    // namespace and the cause, so that the configuration's failurePolicy decides.
    let (status, text) = server.post("/validate", &review_json("acme")).await;
    assert_eq!(status, 500, "{text}");
    assert!(
        text.contains("pod acme/p: cannot read namespace acme from the API server:"),
        "{text}"
    );

    server.stop().await;
}

/// With `--client-ca`, a review is answered only on a connection whose client presented a
/// certificate that CA signed (the API server's): without one it is refused (403) before its
/// body is read, and the connection closed; a certificate another CA signed fails the
/// handshake; the health check needs none (kubelet probes present none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reviews_need_the_api_servers_client_certificate_when_one_is_required() {
    let dir = TestDir::new("admission-client-ca");
    let (client_ca, cert, key) = client_pki(&dir.0, "apiserver");
    let (_, other_cert, other_key) = client_pki(&dir.0, "other");
    let server = Running::start_with(&dir.0, NOWHERE, Some(client_ca)).await;
    let review = review_json("acme");
    let head = |len: usize| {
        format!(
            "POST /validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {len}\r\nConnection: close\r\n\r\n"
        )
    };

    // No certificate: a head that declares the largest body and sends none is answered at
    // once (reading the body would wait 10 s for it, then answer 408).
    let started = std::time::Instant::now();
    let (status, text) = server.exchange(&head(MAX_BODY_BYTES), b"").await;
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains("present a client certificate signed by a CA of its --client-ca"),
        "{text}"
    );
    assert!(started.elapsed() < BODY_TIMEOUT, "{:?}", started.elapsed());
    let (status, text) = server.post("/mutate", &review).await;
    assert_eq!(status, 403, "{text}");
    let (status, text) = server.health().await;
    assert_eq!(status, 200, "{text}");
    // One request per connection without a certificate: a keep-alive health check with a
    // review pipelined behind it gets its answer, then the connection ends (the review is
    // never read).
    for first in ["GET /healthz", "POST /validate"] {
        let tls = server
            .open(&format!(
                "{first} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n{}",
                head(review.len())
            ))
            .await;
        let (_, text) = Running::answer(tls, &review).await;
        assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{first}: {text}");
    }

    // Another CA's certificate: no handshake (in TLS 1.3 the server's refusal is what the
    // client reads first).
    let other = server.connector_presenting(&other_cert, &other_key);
    if let Ok(mut tls) = server.open_with(&other, &head(review.len())).await {
        let _ = tls.write_all(&review).await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut answer))
            .await
            .expect("the refused client's read ends");
        assert!(
            read.is_err(),
            "answered: {}",
            String::from_utf8_lossy(&answer)
        );
    }

    // The API server's certificate: the review is made (500: no API server to read the
    // namespace from here).
    let apiserver = server.connector_presenting(&cert, &key);
    let tls = server
        .open_with(&apiserver, &head(review.len()))
        .await
        .unwrap();
    let (status, text) = Running::answer(tls, &review).await;
    assert_eq!(status, 500, "{text}");
    assert!(
        text.contains("pod acme/p: cannot read namespace acme from the API server:"),
        "{text}"
    );

    server.stop().await;
}

#[tokio::test]
async fn refuses_to_start_without_a_usable_certificate_or_kubeconfig() {
    let dir = TestDir::new("admission-start");
    let (_, cert, key) = pki(&dir.0);
    let options = |cert: &Path, key: &Path, kubeconfig: &Path| ServeOptions {
        listen: "127.84.0.1:0".parse().unwrap(),
        tls_cert: cert.to_path_buf(),
        tls_key: key.to_path_buf(),
        client_ca: None,
        kubeconfig: Some(kubeconfig.to_path_buf()),
        ready_file: None,
        confinement: Default::default(),
    };
    let missing = dir.0.join("missing");
    let error = serve_until(options(&cert, &missing, &missing), async {})
        .await
        .unwrap_err();
    assert!(format!("{error:#}").contains("missing"), "{error:#}");
    let error = serve_until(options(&cert, &key, &missing), async {})
        .await
        .unwrap_err();
    assert!(
        format!("{error:#}").contains(&format!("reading the kubeconfig {}", missing.display())),
        "{error:#}"
    );
}

/// Bodies over `SMALL_BODY_BYTES` share `LARGE_BODIES_BYTES` while they are read and reviewed:
/// four clients that declare 4 MiB and send nothing hold all of it, so a fifth large body is
/// answered 503 (before, each of the 256 connections a client may hold made the webhook
/// buffer up to 4 MiB), while a small review is served as ever; once the four hang up, a large
/// body is read again. The probes are just over the small bound (257 KiB): one that reaches
/// the server before a holder's head takes its share for the few milliseconds its body takes
/// to read, far below the 2 s a holder waits, so the holders end up holding it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_share_a_bounded_budget() {
    let dir = TestDir::new("admission-budget");
    let server = Running::start(&dir.0).await;
    let head = |len: usize| {
        format!(
            "POST /validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {len}\r\nConnection: close\r\n\r\n"
        )
    };
    let probe_len = SMALL_BODY_BYTES as usize + (1 << 10);
    let (probe, filler) = (head(probe_len), vec![b' '; probe_len]);
    let holders = (LARGE_BODIES_BYTES / MAX_BODY_BYTES as u64) as usize;
    let mut held = Vec::new();
    for _ in 0..holders {
        held.push(server.open(&head(MAX_BODY_BYTES)).await);
    }
    // Until the server has taken the holders' shares a probe is read (400: spaces are no
    // review). Bounded in time and tries.
    let until = |want: u16| {
        let (server, probe, filler) = (&server, &probe, &filler);
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            for _ in 0..60 {
                let (status, text) = server.exchange(probe, filler).await;
                if status == want || tokio::time::Instant::now() > deadline {
                    return (status, text);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("no {want} in 60 tries");
        }
    };
    let (status, text) = until(503).await;
    assert_eq!(status, 503, "{text}");
    assert!(
        text.contains(&format!(
            "16 MiB of other requests over {} KiB",
            SMALL_BODY_BYTES >> 10
        )),
        "{text}"
    );
    // A pod's review is small: served while the large ones wait (500: no API server here).
    let (status, text) = server.post("/validate", &review_json("acme")).await;
    assert_eq!(status, 500, "{text}");
    drop(held);
    let (status, text) = until(400).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("not an AdmissionReview"), "{text}");
    server.stop().await;
}

/// A review of a pod in `namespace` that also holds `values` JSON values beyond it, in a
/// field the webhook does not read (a list of `[]`s: serde buffers it as a tree, 72 bytes
/// a value).
fn review_holding(namespace: &str, values: u64) -> Vec<u8> {
    let mut review: serde_json::Value = serde_json::from_slice(&review_json(namespace)).unwrap();
    let base = cost::json_values(&review_json(namespace)).unwrap();
    // The key and the list are two values.
    let extra = vec![serde_json::json!([]); (values - base - 2) as usize];
    review["padding"] = serde_json::Value::Array(extra);
    let body = serde_json::to_vec(&review).unwrap();
    assert_eq!(cost::json_values(&body).unwrap(), values);
    body
}

/// Every review holds its share of `cost::PARSE_BUDGET_BYTES` while it is parsed and decided
/// (before, a 4 MiB body could make the webhook allocate gigabytes): a body that would take
/// more than the whole budget is refused with 413 unparsed; of two reviews that each need
/// 60 % of it, one is answered 503 while the other waits for its namespace (an API server
/// that accepts and never answers: 4 s), and a pod's small review is served meanwhile (not
/// queued behind the waiting one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reviews_share_a_bounded_parse_budget() {
    let dir = TestDir::new("admission-parse-budget");
    let silent = tokio::net::TcpListener::bind("127.84.0.10:0")
        .await
        .unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let holding = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let server = std::sync::Arc::new(
        Running::start_with(&dir.0, &format!("https://{silent_addr}"), None).await,
    );

    // A `[]` of the padding is a value of 3 bytes.
    let charge = |body: &[u8]| cost::charge(cost::census(body).unwrap(), body.len() as u64);
    let per_value = cost::PARSE_BYTES_PER_VALUE + 3 * cost::PARSE_BYTES_PER_BYTE;
    let over = cost::PARSE_BUDGET_BYTES / per_value + 1;
    let body = review_holding("acme", over);
    let (status, text) = server.post("/validate", &body).await;
    assert_eq!(status, 413, "{text}");
    assert!(
        text.contains(&format!(
            "holds {over} JSON values (counting object keys) in {} bytes: reviewing it may \
             take {} MiB, more than the 40 MiB this webhook's reviews may take at once",
            body.len(),
            charge(&body).div_ceil(1 << 20)
        )),
        "{text}"
    );

    let large = review_holding("acme", cost::PARSE_BUDGET_BYTES * 6 / 10 / per_value);
    let share = charge(&large);
    assert!(
        share > cost::PARSE_BUDGET_BYTES / 2 && share < cost::PARSE_BUDGET_BYTES,
        "{share}"
    );
    let large = std::sync::Arc::new(large);
    let both: Vec<_> = (0..2)
        .map(|_| {
            let (server, large) = (server.clone(), large.clone());
            tokio::spawn(async move { server.post("/validate", &large).await })
        })
        .collect();
    let small = server.post("/validate", &review_json("acme")).await;
    let mut statuses = Vec::new();
    for answer in both {
        let (status, text) = answer.await.unwrap();
        match status {
            503 => assert!(
                text.contains("other requests that hold the 40 MiB its reviews may take at once"),
                "{text}"
            ),
            500 => assert!(text.contains("cannot read namespace acme"), "{text}"),
            _ => panic!("{text}"),
        }
        statuses.push(status);
    }
    statuses.sort();
    assert_eq!(statuses, [500, 503]);
    // Served, not refused: its namespace lookup timed out like the holder's.
    assert_eq!(small.0, 500, "{}", small.1);
    assert!(
        small.1.contains("cannot read namespace acme"),
        "{}",
        small.1
    );

    holding.abort();
    std::sync::Arc::into_inner(server).unwrap().stop().await;
}
