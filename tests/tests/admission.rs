//! The admission webhook end to end (issue 9, point 5): the **real kube-apiserver** (1.20,
//! `enforcer_tests::kube::ApiServer`) calls `enforcer admission serve` over HTTPS.
//!
//! The webhook configurations are the ones of `deploy/admission.yaml`, created through the
//! API with two changes only: `clientConfig.url` (the webhook on 127.84.x.y instead of the
//! in-cluster Service) and `caBundle` (the test's CA, which signed the webhook's certificate
//! for `IP:127.84.x.y`). So `failurePolicy`, rules, timeouts and the namespace selector are
//! exactly what a user applies.
//!
//! - a pod created in a tenant namespace comes back with the namespace's tenant metadata as
//!   labels (from labels and annotations);
//! - a pod claiming another tenant, a pod in an enforced namespace without a tenant, and a
//!   relabel to another tenant are refused, the API error naming the pod, label and values;
//! - a tenant's pod comes back with `NET_RAW` dropped from its containers; one that adds
//!   `NET_ADMIN`, is privileged or mounts a `hostPath` is refused, every reason named; so
//!   is the same pod in a namespace without a tenant, while kube-system (spared by the
//!   selector) admits it as is;
//! - with the webhook stopped, pod creation fails in judged namespaces (failurePolicy Fail),
//!   while kube-system and the enforcer's namespace (spared by the selector) still work.
//!
//! The webhook runs with `--client-ca`, as a hardened cluster runs it: the API server
//! presents its webhook client certificate (its `--admission-control-config-file` names a
//! kubeconfig with it), so every review above was made for a client the webhook verified;
//! `admission::tests` shows what a client without one gets (403, its body unread).
//!
//! API server 1.20 does not label namespaces with `kubernetes.io/metadata.name` (1.21 and
//! later do, on every namespace): the test sets that label on the namespaces the selector
//! must see, as a newer server would.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use enforcer_policy::cluster::labels;
use enforcer_tests::agent::enforcer_bin;
use enforcer_tests::deploy::{load_all, Object};
use enforcer_tests::kube::{require_apiserver, ApiServer, ApiServerOptions};
use enforcer_tests::util::{tail_of, ChildGuard};
use enforcer_tests::TempDir;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, HostPathVolumeSource, Namespace, Pod,
    PodSecurityContext, PodSpec, SecurityContext, Sysctl, Volume, VolumeMount,
};
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::Api;

/// The webhook's address (this test's range is 127.84.0.0/16).
const WEBHOOK_IP: &str = "127.84.9.1";
/// The namespace label the selector of deploy/admission.yaml reads.
const NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// How long the API server may take to start calling a newly created webhook configuration.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// `enforcer admission serve` as a child process; killed on drop.
struct Webhook {
    child: ChildGuard,
    addr: SocketAddr,
    log: PathBuf,
}

impl Webhook {
    fn start(
        dir: &Path,
        cert: &Path,
        key: &Path,
        client_ca: &Path,
        kubeconfig: &Path,
    ) -> Result<Self> {
        let ready = dir.join("webhook-ready");
        let log = dir.join("webhook.log");
        let mut cmd = Command::new(enforcer_bin());
        cmd.args(["admission", "serve", "--listen", &format!("{WEBHOOK_IP}:0")])
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .arg("--client-ca")
            .arg(client_ca)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let mut child = ChildGuard::new(cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(addr) = std::fs::read_to_string(&ready)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                return Ok(Self { child, addr, log });
            }
            if let Some(status) = child.child().try_wait()? {
                bail!(
                    "admission serve exited ({status}):\n{}",
                    tail_of(&log, 4096)
                );
            }
            ensure!(
                Instant::now() < deadline,
                "admission serve not ready after 20 s:\n{}",
                tail_of(&log, 4096)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait (10 s at most).
    fn stop(&mut self) -> Result<()> {
        // SAFETY: kill has no memory preconditions; the pid is our unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let status = self.child.wait_timeout(Duration::from_secs(10))?;
        ensure!(status.success(), "admission serve exited with {status}");
        Ok(())
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("admission serve log:\n{}", tail_of(&self.log, 8192));
        }
    }
}

/// A self-signed CA named `name`.
fn certificate_authority(name: &str) -> Result<rcgen::CertifiedIssuer<'static, rcgen::KeyPair>> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(rcgen::CertifiedIssuer::self_signed(
        ca,
        KeyPair::generate()?,
    )?)
}

/// A CA, and a webhook certificate for `IP:WEBHOOK_IP` signed by it: (CA PEM, cert, key).
fn certificates(dir: &Path) -> Result<(String, PathBuf, PathBuf)> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    let ca = certificate_authority("adm9 webhook CA")?;
    // Rustls (and the API server's Go TLS) want a leaf distinct from its CA.
    let mut leaf = CertificateParams::new(vec![WEBHOOK_IP.to_string()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "enforcer-admission");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &ca)?;
    let cert_path = dir.join("webhook.crt");
    let key_path = dir.join("webhook.key");
    std::fs::write(&cert_path, cert.pem())?;
    enforcer_tests::util::write_secret(&key_path, key.serialize_pem())?;
    Ok((ca.pem(), cert_path, key_path))
}

/// The API server's side of webhook client authentication: a CA (its PEM written to
/// `webhook-client-ca.crt`, for the webhook's `--client-ca`), a client certificate it signed,
/// and the `--admission-control-config-file` that makes the API server present it to every
/// webhook (the kubeconfig user `*`, the default match). Returns the two files' paths:
/// (client CA, admission configuration).
fn client_authentication(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    let ca = certificate_authority("adm9 webhook client CA")?;
    let mut leaf = CertificateParams::new(Vec::<String>::new())?;
    leaf.distinguished_name
        .push(DnType::CommonName, "kube-apiserver-webhook-client");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &ca)?;
    let ca_path = dir.join("webhook-client-ca.crt");
    std::fs::write(&ca_path, ca.pem())?;
    let (cert_path, key_path) = (
        dir.join("webhook-client.crt"),
        dir.join("webhook-client.key"),
    );
    std::fs::write(&cert_path, cert.pem())?;
    enforcer_tests::util::write_secret(&key_path, key.serialize_pem())?;
    let kubeconfig = dir.join("webhook-client.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nusers:\n- name: '*'\n  user:\n    \
             client-certificate: {}\n    client-key: {}\n",
            cert_path.display(),
            key_path.display()
        ),
    )?;
    let admission = dir.join("admission-configuration.yaml");
    let plugin = |name: &str| {
        format!(
            "- name: {name}\n  configuration:\n    apiVersion: apiserver.config.k8s.io/v1\n    \
             kind: WebhookAdmissionConfiguration\n    kubeConfigFile: {}\n",
            kubeconfig.display()
        )
    };
    std::fs::write(
        &admission,
        format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: AdmissionConfiguration\nplugins:\n{}{}",
            plugin("ValidatingAdmissionWebhook"),
            plugin("MutatingAdmissionWebhook")
        ),
    )?;
    Ok((ca_path, admission))
}

/// deploy/admission.yaml's two webhook configurations, pointed at `base` with `ca`.
fn configurations(
    base: &str,
    ca: &str,
) -> Result<(MutatingWebhookConfiguration, ValidatingWebhookConfiguration)> {
    let client = |path: Option<String>| -> Result<WebhookClientConfig> {
        let path = path.context("a webhook without a service path")?;
        Ok(WebhookClientConfig {
            url: Some(format!("{base}{path}")),
            ca_bundle: Some(ByteString(ca.as_bytes().to_vec())),
            service: None,
        })
    };
    let (mut mutating, mut validating) = (None, None);
    for manifest in load_all()? {
        match manifest.object {
            Object::MutatingWebhookConfiguration(mut c) => {
                for hook in c.webhooks.iter_mut().flatten() {
                    let path = hook
                        .client_config
                        .service
                        .as_ref()
                        .and_then(|s| s.path.clone());
                    hook.client_config = client(path)?;
                }
                c.metadata.annotations = None; // cert-manager's, meaningless here
                mutating = Some(c);
            }
            Object::ValidatingWebhookConfiguration(mut c) => {
                for hook in c.webhooks.iter_mut().flatten() {
                    let path = hook
                        .client_config
                        .service
                        .as_ref()
                        .and_then(|s| s.path.clone());
                    hook.client_config = client(path)?;
                }
                c.metadata.annotations = None;
                validating = Some(c);
            }
            _ => {}
        }
    }
    Ok((
        mutating.context("deploy/ has no MutatingWebhookConfiguration")?,
        validating.context("deploy/ has no ValidatingWebhookConfiguration")?,
    ))
}

fn namespace(name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Namespace {
    let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let mut labels = map(labels);
    labels.insert(NAME_LABEL.into(), name.into());
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels),
            annotations: Some(map(annotations)),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn pod(name: &str, labels: &[(&str, &str)]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "main".into(),
                image: Some("scratch".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Each container's dropped capabilities.
fn dropped(pod: &Pod) -> Vec<Vec<String>> {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| {
            c.security_context
                .as_ref()
                .and_then(|s| s.capabilities.as_ref())
                .and_then(|c| c.drop.clone())
                .unwrap_or_default()
        })
        .collect()
}

fn pod_labels(pod: &Pod) -> BTreeMap<String, String> {
    pod.metadata.labels.clone().unwrap_or_default()
}

/// The API server's refusal of a request, as its message; an error when it was accepted.
fn refusal<T: std::fmt::Debug>(result: kube::Result<T>) -> Result<String> {
    match result {
        Ok(created) => bail!("the API server accepted it: {created:?}"),
        Err(kube::Error::Api(status)) => Ok(status.message.clone()),
        Err(other) => bail!("not a refusal by the API server: {other:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_calls_the_webhook_and_fails_closed_without_it() -> Result<()> {
    if !require_apiserver() {
        return Ok(());
    }
    let dir = TempDir::new("adm9-admission")?;
    let (client_ca, admission_configuration) = client_authentication(dir.path())?;
    let server = ApiServer::start_with(ApiServerOptions {
        extra_args: vec![format!(
            "--admission-control-config-file={}",
            admission_configuration.display()
        )],
        ..Default::default()
    })?;
    let client = server.client();
    let (ca, cert, key) = certificates(dir.path())?;
    let mut webhook = Webhook::start(dir.path(), &cert, &key, &client_ca, server.kubeconfig())?;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let create_ns = |ns: Namespace| {
        let namespaces = namespaces.clone();
        async move { namespaces.create(&PostParams::default(), &ns).await }
    };
    create_ns(namespace(
        "adm9-acme",
        &[
            (labels::TENANT, "acme"),
            (labels::ENFORCED, "true"),
            (labels::REGION, "eu-west-1"),
        ],
        &[(labels::DATA_RESIDENCY, "eu")],
    ))
    .await?;
    create_ns(namespace("adm9-locked", &[(labels::ENFORCED, "true")], &[])).await?;
    create_ns(namespace("adm9-plain", &[], &[])).await?;
    create_ns(namespace("ai-enforcer", &[], &[])).await?;
    // kube-system exists from the start; give it the label a 1.21+ server sets.
    namespaces
        .patch(
            "kube-system",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {NAME_LABEL: "kube-system"}}})),
        )
        .await?;

    let (mutating, validating) = configurations(&format!("https://{}", webhook.addr), &ca)?;
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &mutating)
        .await
        .context("creating the MutatingWebhookConfiguration")?;
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &validating)
        .await
        .context("creating the ValidatingWebhookConfiguration")?;

    // The API server picks configurations up from an informer: dry-run creates (webhooks
    // with sideEffects None are called for them, nothing is stored) until both answer.
    let acme: Api<Pod> = Api::namespaced(client.clone(), "adm9-acme");
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let deadline = Instant::now() + ACTIVE_TIMEOUT;
    loop {
        let stamped = acme
            .create(&dry, &pod("probe", &[]))
            .await
            .is_ok_and(|p| pod_labels(&p).get(labels::TENANT).map(String::as_str) == Some("acme"));
        let checked = acme
            .create(&dry, &pod("probe", &[(labels::TENANT, "globex")]))
            .await
            .is_err();
        if stamped && checked {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the API server did not call the webhooks within {ACTIVE_TIMEOUT:?}\nAPI server log:\n{}",
            server.apiserver_log_tail(4096)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Stamped: the namespace's labels and annotations become the pod's labels.
    let created = acme
        .create(&PostParams::default(), &pod("web", &[("app", "web")]))
        .await
        .context("creating a pod in a tenant namespace")?;
    let expected = BTreeMap::from([
        ("app".to_string(), "web".to_string()),
        (labels::TENANT.to_string(), "acme".to_string()),
        (labels::REGION.to_string(), "eu-west-1".to_string()),
        (labels::DATA_RESIDENCY.to_string(), "eu".to_string()),
    ]);
    assert_eq!(pod_labels(&created), expected);
    assert_eq!(pod_labels(&acme.get("web").await?), expected, "as stored");
    assert_eq!(
        dropped(&acme.get("web").await?),
        [vec!["NET_RAW".to_string()]],
        "NET_RAW dropped, as stored"
    );

    // `CAP_NET_RAW` is not NET_RAW to containerd (it reads `CAP_CAP_NET_RAW`): dropped anew.
    let mut prefixed = pod("prefixed", &[]);
    prefixed.spec.as_mut().unwrap().containers[0].security_context = Some(SecurityContext {
        capabilities: Some(Capabilities {
            add: None,
            drop: Some(vec!["CAP_NET_RAW".into()]),
        }),
        ..Default::default()
    });
    let created = acme.create(&PostParams::default(), &prefixed).await?;
    assert_eq!(
        dropped(&created),
        [vec!["CAP_NET_RAW".to_string(), "NET_RAW".to_string()]]
    );

    // A pod whose ingress is checked answers no SYN with a cookie (whose ACK would open a
    // connection the check never saw): the sysctl is set where the pod leaves it unset...
    let mut db = pod("db", &[]);
    db.metadata.annotations = Some(BTreeMap::from([(
        labels::INGRESS.to_string(),
        "enforce".to_string(),
    )]));
    let created = acme.create(&PostParams::default(), &db).await?;
    let sysctls = |pod: &Pod| -> Vec<(String, String)> {
        let context = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
        let sysctls = context.and_then(|c| c.sysctls.clone()).unwrap_or_default();
        sysctls.into_iter().map(|s| (s.name, s.value)).collect()
    };
    let off = vec![("net.ipv4.tcp_syncookies".to_string(), "0".to_string())];
    assert_eq!(sysctls(&created), off);
    assert_eq!(sysctls(&acme.get("db").await?), off, "as stored");
    // ... and a pod that keeps cookies on is refused, saying why.
    db.metadata.name = Some("db-cookies".into());
    db.spec.as_mut().unwrap().security_context = Some(PodSecurityContext {
        sysctls: Some(vec![Sysctl {
            name: "net.ipv4.tcp_syncookies".into(),
            value: "1".into(),
        }]),
        ..Default::default()
    });
    let message = refusal(acme.create(&PostParams::default(), &db).await)?;
    assert!(
        message.contains(r#"pod adm9-acme/db-cookies: its ingress is checked (ai-enforcer.io/ingress enforce) but it sets sysctl net.ipv4.tcp_syncookies="1""#),
        "{message}"
    );
    // A pod with no check keeps the kernel's default.
    assert_eq!(sysctls(&acme.get("web").await?), []);

    // What the enforcer cannot contain: refused, every reason at once.
    let mut uncontained = pod("rewriter", &[]);
    let spec = uncontained.spec.as_mut().unwrap();
    spec.containers[0].security_context = Some(SecurityContext {
        privileged: Some(true),
        capabilities: Some(Capabilities {
            add: Some(vec!["NET_ADMIN".into()]),
            drop: None,
        }),
        ..Default::default()
    });
    spec.volumes = Some(vec![Volume {
        name: "node".into(),
        host_path: Some(HostPathVolumeSource {
            path: "/sys/fs/cgroup".into(),
            type_: None,
        }),
        ..Default::default()
    }]);
    spec.containers[0].volume_mounts = Some(vec![VolumeMount {
        name: "node".into(),
        mount_path: "/host".into(),
        ..Default::default()
    }]);
    let message = refusal(acme.create(&PostParams::default(), &uncontained).await)?;
    for reason in [
        r#"pod adm9-acme/rewriter: volume "node" mounts the node's path "/sys/fs/cgroup" (hostPath)"#,
        r#"pod adm9-acme/rewriter: container "main" is privileged"#,
        r#"pod adm9-acme/rewriter: container "main" adds capability NET_ADMIN"#,
    ] {
        assert!(message.contains(reason), "{reason} not in {message}");
    }
    // The mutating webhook dropped NET_RAW before the validating one judged.
    assert!(!message.contains("keeps NET_RAW"), "{message}");
    assert!(acme.get_opt("rewriter").await?.is_none());

    // What the node would do for the pod: a probe sent where the pod says, the node's port,
    // the node's network namespace (whose ports the API server makes host ports: said once).
    let mut lent = pod("lent", &[]);
    lent.spec.as_mut().unwrap().containers[0] = serde_json::from_value(serde_json::json!({
        "name": "main", "image": "scratch",
        "readinessProbe": {"httpGet": {"host": "127.0.0.1", "port": 10248}},
        "ports": [{"containerPort": 8080, "hostPort": 9100}]
    }))?;
    let message = refusal(acme.create(&PostParams::default(), &lent).await)?;
    for reason in [
        r#"pod adm9-acme/lent: container "main"'s readinessProbe names host "127.0.0.1""#,
        r#"pod adm9-acme/lent: container "main" asks for hostPort 9100"#,
    ] {
        assert!(message.contains(reason), "{reason} not in {message}");
    }
    let mut host = pod("host", &[]);
    let spec = host.spec.as_mut().unwrap();
    spec.host_network = Some(true);
    spec.containers[0].ports = Some(vec![ContainerPort {
        container_port: 8080,
        ..Default::default()
    }]);
    let message = refusal(acme.create(&PostParams::default(), &host).await)?;
    assert!(
        message.contains("pod adm9-acme/host: hostNetwork: true puts the pod in the node's"),
        "{message}"
    );
    assert!(!message.contains("hostPort"), "{message}");

    // Another tenant claimed: refused with the reason.
    let message = refusal(
        acme.create(
            &PostParams::default(),
            &pod("claimer", &[(labels::TENANT, "globex")]),
        )
        .await,
    )?;
    assert!(
        message.contains(r#"admission webhook "check.tenant.ai-enforcer.io" denied the request: pod adm9-acme/claimer: label ai-enforcer.io/tenant="globex" differs from namespace adm9-acme's ai-enforcer.io/tenant="acme""#),
        "{message}"
    );
    assert!(
        acme.get_opt("claimer").await?.is_none(),
        "a refused pod is not stored"
    );

    // Relabelling a running pod into another tenant: refused too.
    let message = refusal(
        acme.patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {labels::TENANT: "globex"}}})),
        )
        .await,
    )?;
    assert!(
        message.contains(r#"pod adm9-acme/web: label ai-enforcer.io/tenant="globex" differs"#),
        "{message}"
    );
    assert_eq!(
        acme.get("web").await?.metadata.labels.unwrap()[labels::TENANT],
        "acme"
    );

    // An enforced namespace without a tenant admits nothing.
    let locked: Api<Pod> = Api::namespaced(client.clone(), "adm9-locked");
    let message = refusal(
        locked
            .create(&PostParams::default(), &pod("any", &[]))
            .await,
    )?;
    assert!(
        message.contains("pod adm9-locked/any: namespace adm9-locked is enforced (label ai-enforcer.io/enforced=true) but has no tenant"),
        "{message}"
    );

    // A namespace without tenant metadata, not enforced: no labels stamped...
    let plain: Api<Pod> = Api::namespaced(client.clone(), "adm9-plain");
    let created = plain
        .create(&PostParams::default(), &pod("loose", &[]))
        .await?;
    assert_eq!(pod_labels(&created), BTreeMap::new());
    // ... but confined all the same: its raw frames would reach a tenant's pods, its
    // hostPath their cgroups.
    assert_eq!(dropped(&created), [vec!["NET_RAW".to_string()]]);
    uncontained.metadata.name = Some("unjudged".into());
    let message = refusal(plain.create(&PostParams::default(), &uncontained).await)?;
    for reason in [
        r#"pod adm9-plain/unjudged: container "main" is privileged"#,
        "adds capability NET_ADMIN",
        r#"volume "node" mounts the node's path "/sys/fs/cgroup""#,
    ] {
        assert!(message.contains(reason), "{reason:?} in {message}");
    }
    assert!(plain.get_opt("unjudged").await?.is_none());
    // What must hold such things lives in a namespace the selector spares.
    let system: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    uncontained.metadata.name = Some("node-agent".into());
    let created = system
        .create(&PostParams::default(), &uncontained)
        .await
        .context("a privileged pod in kube-system")?;
    assert_eq!(dropped(&created), [Vec::<String>::new()], "untouched");

    // The webhook stops: failurePolicy Fail refuses pods wherever the selector reaches...
    webhook.stop()?;
    for api in [&acme, &plain] {
        let message = refusal(
            api.create(&PostParams::default(), &pod("while-down", &[]))
                .await,
        )?;
        assert!(
            message.contains("failed calling webhook")
                && message.contains("stamp.tenant.ai-enforcer.io"),
            "{message}"
        );
    }
    assert!(acme.get_opt("while-down").await?.is_none());
    // ... and the spared namespaces still work (even a pod claiming a tenant: not judged).
    for ns in ["kube-system", "ai-enforcer"] {
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        let created = api
            .create(
                &PostParams::default(),
                &pod("spared", &[(labels::TENANT, "globex")]),
            )
            .await
            .with_context(|| format!("creating a pod in {ns} with the webhook down"))?;
        assert_eq!(
            pod_labels(&created)[labels::TENANT],
            "globex",
            "untouched in {ns}"
        );
    }
    Ok(())
}
