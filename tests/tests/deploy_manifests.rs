//! Every manifest of `deploy/` parses into its k8s-openapi type (a field the type does not
//! have is an error), and the manifests agree with each other and with the binary: service
//! accounts, Service selectors and ports, webhook services, paths and selectors, RBAC verbs,
//! volumes, the command lines, and the policy ConfigMap, which `enforcer policy check`
//! accepts as the kubelet mounts it.
//!
//! `ENFORCER_BLESS=1` rewrites `deploy/policies.yaml` from `policies/demo` (then checks it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use enforcer_tests::agent::enforcer_bin;
use enforcer_tests::deploy::{deploy_dir, load_all, selects, Manifest, Object};
use enforcer_tests::util::output_bounded;
use enforcer_tests::TempDir;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The enforcer's own namespace, which everything namespaced lives in.
const NAMESPACE: &str = "ai-enforcer";
/// The bundle the policy ConfigMap holds.
const BUNDLE: &str = "policies/demo";
/// The ConfigMap's name.
const POLICY_CONFIGMAP: &str = "enforcer-policies";

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn manifests() -> Vec<Manifest> {
    static BLESS: std::sync::Once = std::sync::Once::new();
    BLESS.call_once(|| {
        if std::env::var("ENFORCER_BLESS").is_ok_and(|v| v == "1") {
            bless_policies().expect("rewriting deploy/policies.yaml");
        }
    });
    load_all().unwrap_or_else(|e| panic!("{e:#}"))
}

fn name(m: &Manifest) -> &str {
    m.object.metadata().name.as_deref().unwrap_or_default()
}

fn workloads(all: &[Manifest]) -> Vec<(&Manifest, &PodSpec, BTreeMap<String, String>)> {
    all.iter()
        .filter_map(|m| {
            let (template, _) = m.object.pod_template()?;
            let spec = template.spec.as_ref()?;
            let labels = template
                .metadata
                .as_ref()
                .and_then(|meta| meta.labels.clone())
                .unwrap_or_default();
            Some((m, spec, labels))
        })
        .collect()
}

fn containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
}

#[test]
fn every_manifest_parses_into_its_type() {
    let all = manifests();
    let kinds: BTreeSet<String> = all
        .iter()
        .map(|m| m.object.describe().split('/').next().unwrap().to_string())
        .collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Deployment",
        "Service",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        assert!(kinds.contains(kind), "deploy/ has no {kind}: {kinds:?}");
    }
    // Each object once.
    let mut seen = BTreeSet::new();
    for m in &all {
        assert!(
            seen.insert((m.object.describe(), m.object.metadata().namespace.clone())),
            "{} is defined twice",
            m.location()
        );
    }
}

#[test]
fn a_misspelt_field_is_refused() {
    let doc: serde_yaml::Value = serde_yaml::from_str(
        r#"
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: x}
spec:
  selector: {}
  template:
    spec:
      containers:
        - name: c
          volumeMounts:
            - {name: v, mountPath: /x, mountPropagaton: Bidirectional}
"#,
    )
    .unwrap();
    let err = format!("{:#}", enforcer_tests::deploy::parse(&doc).unwrap_err());
    assert!(
        err.contains(".spec.template.spec.containers[0].volumeMounts[0].mountPropagaton"),
        "{err}"
    );
    let doc: serde_yaml::Value =
        serde_yaml::from_str("apiVersion: v1\nkind: Secret\nmetadata: {name: x}\n").unwrap();
    let err = format!("{:#}", enforcer_tests::deploy::parse(&doc).unwrap_err());
    assert!(err.contains("\"Secret\" is not a kind"), "{err}");
}

#[test]
fn no_ambiguous_octal_numbers() {
    // `defaultMode: 0400` is 256 to kubectl (YAML 1.1) and 400 to YAML 1.2 parsers: write
    // modes in decimal.
    for entry in std::fs::read_dir(deploy_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        for (i, line) in std::fs::read_to_string(&path).unwrap().lines().enumerate() {
            let value = line.split_once(": ").map(|(_, v)| v.trim()).unwrap_or("");
            let value = value.split(" #").next().unwrap().trim();
            assert!(
                !(value.len() > 1
                    && value.starts_with('0')
                    && value.bytes().all(|b| b.is_ascii_digit())),
                "{}:{}: {value} reads as octal to kubectl and decimal to others",
                path.display(),
                i + 1
            );
        }
    }
}

#[test]
fn namespaced_objects_live_in_the_enforcer_namespace() {
    let all = manifests();
    assert!(all
        .iter()
        .any(|m| matches!(m.object, Object::Namespace(_)) && name(m) == NAMESPACE));
    for m in &all {
        let cluster_scoped = matches!(
            m.object,
            Object::Namespace(_)
                | Object::ClusterRole(_)
                | Object::ClusterRoleBinding(_)
                | Object::MutatingWebhookConfiguration(_)
                | Object::ValidatingWebhookConfiguration(_)
        );
        let ns = m.object.metadata().namespace.as_deref();
        if cluster_scoped {
            assert_eq!(ns, None, "{} is cluster-scoped", m.location());
        } else {
            assert_eq!(ns, Some(NAMESPACE), "{}", m.location());
        }
    }
}

#[test]
fn workloads_use_defined_service_accounts_volumes_and_one_image() {
    let all = manifests();
    let accounts: BTreeSet<&str> = all
        .iter()
        .filter(|m| matches!(m.object, Object::ServiceAccount(_)))
        .map(name)
        .collect();
    let configmaps: BTreeSet<&str> = all
        .iter()
        .filter(|m| matches!(m.object, Object::ConfigMap(_)))
        .map(name)
        .collect();
    let readme = std::fs::read_to_string(deploy_dir().join("README.md")).unwrap();
    let mut images = BTreeSet::new();
    for (m, spec, labels) in workloads(&all) {
        let (_, selector) = m.object.pod_template().unwrap();
        assert!(
            selects(selector, &labels).unwrap(),
            "{}: the selector does not select the pod template's labels",
            m.location()
        );
        let account = spec.service_account_name.as_deref().unwrap_or("default");
        assert!(
            accounts.contains(account),
            "{}: serviceAccountName {account} is not defined in deploy/",
            m.location()
        );
        let volumes: BTreeMap<&str, _> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| (v.name.as_str(), v))
            .collect();
        for volume in volumes.values() {
            if let Some(cm) = &volume.config_map {
                assert!(
                    configmaps.contains(cm.name.as_str()),
                    "{}: volume {} mounts ConfigMap {} that deploy/ does not define",
                    m.location(),
                    volume.name,
                    cm.name
                );
            }
            if let Some(secret) = volume
                .secret
                .as_ref()
                .and_then(|s| s.secret_name.as_deref())
            {
                assert!(
                    readme.contains(&format!("`{secret}`")),
                    "{}: Secret {secret} is not described in deploy/README.md",
                    m.location()
                );
            }
        }
        for container in containers(spec) {
            images.insert(container.image.clone().unwrap_or_default());
            for mount in container.volume_mounts.iter().flatten() {
                assert!(
                    volumes.contains_key(mount.name.as_str()),
                    "{}: container {} mounts undefined volume {}",
                    m.location(),
                    container.name,
                    mount.name
                );
                if mount.mount_propagation.as_deref() == Some("Bidirectional") {
                    // The API server refuses it otherwise.
                    assert_eq!(
                        container
                            .security_context
                            .as_ref()
                            .and_then(|s| s.privileged),
                        Some(true),
                        "{}: Bidirectional propagation needs a privileged container",
                        m.location()
                    );
                }
            }
        }
    }
    assert_eq!(images.len(), 1, "one image for every component: {images:?}");
}

#[test]
fn services_select_their_pods_and_name_their_ports() {
    let all = manifests();
    let pods = workloads(&all);
    for m in &all {
        let Object::Service(service) = &m.object else {
            continue;
        };
        let spec = service.spec.as_ref().expect("a Service has a spec");
        let selector = spec.selector.clone().unwrap_or_default();
        assert!(!selector.is_empty(), "{}: no selector", m.location());
        let backends: Vec<_> = pods
            .iter()
            .filter(|(_, _, labels)| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .collect();
        assert_eq!(
            backends.len(),
            1,
            "{}: the selector {selector:?} must select exactly one workload's pods",
            m.location()
        );
        let (workload, pod, _) = backends[0];
        let container_ports: BTreeMap<String, i32> = containers(pod)
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| Some((p.name.clone()?, p.container_port)))
            .collect();
        for port in spec.ports.iter().flatten() {
            let target = port
                .target_port
                .clone()
                .unwrap_or(IntOrString::Int(port.port));
            let number = match &target {
                IntOrString::String(named) => *container_ports.get(named).unwrap_or_else(|| {
                    panic!(
                        "{}: targetPort {named} is not a port of {}",
                        m.location(),
                        workload.location()
                    )
                }),
                IntOrString::Int(n) => *n,
            };
            // The program listens where the Service sends.
            let listens = containers(pod)
                .flat_map(|c| c.args.iter().flatten())
                .any(|a| a.starts_with("--listen=") && a.ends_with(&format!(":{number}")));
            assert!(
                listens,
                "{}: port {} goes to {number}, where no container of {} listens (--listen)",
                m.location(),
                port.port,
                workload.location()
            );
        }
    }
}

/// The two webhook configurations' hooks, as (configuration, name, path expected, hook).
struct Hook {
    location: String,
    path: Option<String>,
    expected_path: &'static str,
    service: Option<k8s_openapi::api::admissionregistration::v1::ServiceReference>,
    failure_policy: Option<String>,
    side_effects: String,
    versions: Vec<String>,
    selector: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    rules: Vec<k8s_openapi::api::admissionregistration::v1::RuleWithOperations>,
    timeout: Option<i32>,
}

fn hooks(all: &[Manifest]) -> Vec<Hook> {
    let mut out = Vec::new();
    for m in all {
        match &m.object {
            Object::MutatingWebhookConfiguration(c) => {
                for h in c.webhooks.iter().flatten() {
                    out.push(Hook {
                        location: format!("{} webhook {}", m.location(), h.name),
                        path: h
                            .client_config
                            .service
                            .as_ref()
                            .and_then(|s| s.path.clone()),
                        expected_path: enforcer::admission::MUTATE_PATH,
                        service: h.client_config.service.clone(),
                        failure_policy: h.failure_policy.clone(),
                        side_effects: h.side_effects.clone(),
                        versions: h.admission_review_versions.clone(),
                        selector: h.namespace_selector.clone(),
                        rules: h.rules.clone().unwrap_or_default(),
                        timeout: h.timeout_seconds,
                    })
                }
            }
            Object::ValidatingWebhookConfiguration(c) => {
                for h in c.webhooks.iter().flatten() {
                    out.push(Hook {
                        location: format!("{} webhook {}", m.location(), h.name),
                        path: h
                            .client_config
                            .service
                            .as_ref()
                            .and_then(|s| s.path.clone()),
                        expected_path: enforcer::admission::VALIDATE_PATH,
                        service: h.client_config.service.clone(),
                        failure_policy: h.failure_policy.clone(),
                        side_effects: h.side_effects.clone(),
                        versions: h.admission_review_versions.clone(),
                        selector: h.namespace_selector.clone(),
                        rules: h.rules.clone().unwrap_or_default(),
                        timeout: h.timeout_seconds,
                    })
                }
            }
            _ => {}
        }
    }
    out
}

#[test]
fn webhooks_call_the_webhook_service_fail_closed_and_spare_the_system() {
    let all = manifests();
    let hooks = hooks(&all);
    assert_eq!(hooks.len(), 2, "one mutating and one validating webhook");
    // A namespace spared by one only would have its pods refused for the `NET_RAW` the
    // mutating webhook did not drop, or stamped but never checked.
    assert_eq!(
        hooks[0].selector, hooks[1].selector,
        "the two webhooks spare the same namespaces"
    );
    for hook in &hooks {
        let at = &hook.location;
        assert_eq!(hook.failure_policy.as_deref(), Some("Fail"), "{at}");
        assert_eq!(hook.side_effects, "None", "{at}");
        assert_eq!(
            hook.versions,
            ["v1"],
            "{at}: the webhook speaks AdmissionReview v1 only"
        );
        assert_eq!(hook.path.as_deref(), Some(hook.expected_path), "{at}");
        // Within the API server's limit, and above the namespace lookup's bound.
        let timeout = hook.timeout.unwrap_or(10);
        assert!(
            (1..=30).contains(&timeout)
                && Duration::from_secs(timeout as u64) > enforcer::admission::NAMESPACE_TIMEOUT,
            "{at}: timeoutSeconds {timeout}"
        );
        // Exactly pods and the subresource that adds ephemeral containers, on create and
        // update.
        assert_eq!(hook.rules.len(), 1, "{at}");
        let rule = &hook.rules[0];
        assert_eq!(
            rule.api_groups.as_deref(),
            Some(&["".to_string()][..]),
            "{at}"
        );
        assert_eq!(
            rule.api_versions.as_deref(),
            Some(&["v1".to_string()][..]),
            "{at}"
        );
        assert_eq!(
            rule.resources.as_deref(),
            Some(&["pods".to_string(), "pods/ephemeralcontainers".to_string()][..]),
            "{at}"
        );
        assert_eq!(
            rule.operations.clone().unwrap_or_default(),
            ["CREATE", "UPDATE"],
            "{at}"
        );
        // The service exists and sends to the webhook's container.
        let service = hook
            .service
            .as_ref()
            .unwrap_or_else(|| panic!("{at}: no service"));
        let target = all
            .iter()
            .find_map(|m| match &m.object {
                Object::Service(s)
                    if name(m) == service.name
                        && m.object.metadata().namespace.as_deref()
                            == Some(service.namespace.as_str()) =>
                {
                    Some(s)
                }
                _ => None,
            })
            .unwrap_or_else(|| {
                panic!(
                    "{at}: Service {}/{} is not defined",
                    service.namespace, service.name
                )
            });
        let port = service.port.unwrap_or(443);
        assert!(
            target
                .spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .is_some_and(|ports| ports.iter().any(|p| p.port == port)),
            "{at}: Service {} has no port {port}",
            service.name
        );
        let selector = target.spec.as_ref().unwrap().selector.clone().unwrap();
        let (_, pod, _) = workloads(&all)
            .into_iter()
            .find(|(_, _, labels)| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .unwrap();
        assert!(
            containers(pod)
                .any(|c| c.args.as_deref().unwrap_or_default()[..2] == ["admission", "serve"]),
            "{at}: Service {} does not lead to `enforcer admission serve`",
            service.name
        );
        // The selector, evaluated as the API server does on the label every namespace has.
        let selector = hook
            .selector
            .as_ref()
            .unwrap_or_else(|| panic!("{at}: no namespaceSelector"));
        let ns = |name: &str| {
            BTreeMap::from([("kubernetes.io/metadata.name".to_string(), name.to_string())])
        };
        for spared in ["kube-system", NAMESPACE] {
            assert!(
                !selects(selector, &ns(spared)).unwrap(),
                "{at}: selects {spared}"
            );
        }
        for judged in ["default", "acme-prod", "kube-public"] {
            assert!(
                selects(selector, &ns(judged)).unwrap(),
                "{at}: spares {judged}"
            );
        }
    }
}

#[test]
fn rbac_reads_only_and_exactly_what_each_component_uses() {
    let all = manifests();
    let roles: BTreeMap<&str, _> = all
        .iter()
        .filter_map(|m| match &m.object {
            Object::ClusterRole(r) => Some((name(m), r)),
            _ => None,
        })
        .collect();
    let accounts: BTreeSet<&str> = all
        .iter()
        .filter(|m| matches!(m.object, Object::ServiceAccount(_)))
        .map(name)
        .collect();
    // Which account has which (apiGroup, resource) -> verbs.
    let mut grants: BTreeMap<String, BTreeMap<(String, String), BTreeSet<String>>> =
        BTreeMap::new();
    for m in &all {
        let Object::ClusterRoleBinding(binding) = &m.object else {
            continue;
        };
        assert_eq!(binding.role_ref.kind, "ClusterRole", "{}", m.location());
        let role = roles
            .get(binding.role_ref.name.as_str())
            .unwrap_or_else(|| {
                panic!("{}: no ClusterRole {}", m.location(), binding.role_ref.name)
            });
        for subject in binding.subjects.iter().flatten() {
            assert_eq!(subject.kind, "ServiceAccount", "{}", m.location());
            assert_eq!(
                subject.namespace.as_deref(),
                Some(NAMESPACE),
                "{}",
                m.location()
            );
            assert!(
                accounts.contains(subject.name.as_str()),
                "{}: no ServiceAccount {}",
                m.location(),
                subject.name
            );
            for rule in role.rules.iter().flatten() {
                assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
                for group in rule.api_groups.iter().flatten() {
                    for resource in rule.resources.iter().flatten() {
                        grants
                            .entry(subject.name.clone())
                            .or_default()
                            .entry((group.clone(), resource.clone()))
                            .or_default()
                            .extend(rule.verbs.iter().cloned());
                    }
                }
            }
        }
    }
    let read = |verbs: &[&str]| verbs.iter().map(|v| v.to_string()).collect::<BTreeSet<_>>();
    let watch = read(&["get", "list", "watch"]);
    let expected_agent: BTreeMap<(String, String), BTreeSet<String>> = [
        ("", "pods"),
        ("", "nodes"),
        ("", "namespaces"),
        ("", "services"),
        ("", "endpoints"),
        ("discovery.k8s.io", "endpointslices"),
    ]
    .into_iter()
    .map(|(g, r)| ((g.to_string(), r.to_string()), watch.clone()))
    .collect();
    assert_eq!(grants.get("enforcer-agent"), Some(&expected_agent));
    assert_eq!(
        grants.get("enforcer-admission"),
        Some(&BTreeMap::from([(
            ("".to_string(), "namespaces".to_string()),
            read(&["get"])
        )]))
    );
    assert_eq!(grants.get("enforcer-pdp"), None, "the PDP calls no API");
    // Whatever the binding: nobody writes.
    for role in roles.values() {
        for rule in role.rules.iter().flatten() {
            for verb in &rule.verbs {
                assert!(
                    watch.contains(verb),
                    "verb {verb} in {:?}",
                    role.metadata.name
                );
            }
        }
    }
    // Components without API access carry no token.
    for (m, spec, _) in workloads(&all) {
        let account = spec.service_account_name.as_deref().unwrap_or("default");
        if !grants.contains_key(account) {
            let sa_token = all.iter().find_map(|a| match &a.object {
                Object::ServiceAccount(sa) if name(a) == account => {
                    sa.automount_service_account_token
                }
                _ => None,
            });
            assert!(
                spec.automount_service_account_token == Some(false) || sa_token == Some(false),
                "{}: {account} has no role, so it needs no token",
                m.location()
            );
        }
    }
}

#[test]
fn the_agent_daemonset_grants_what_its_comment_explains() {
    let all = manifests();
    let ds = enforcer_tests::deploy::agent_daemonset(&all).unwrap();
    let spec = ds.spec.clone().unwrap().template.spec.unwrap();
    let agent = &spec.containers[0];
    let security = agent.security_context.clone().unwrap();
    assert_eq!(security.privileged, Some(false));
    let caps = security.capabilities.unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<String> = caps.add.unwrap_or_default().into_iter().collect();
    // Each capability is explained in the DaemonSet's header comment.
    let text = std::fs::read_to_string(deploy_dir().join("daemonset.yaml")).unwrap();
    for cap in &added {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("#     {cap} "))),
            "capability {cap} is granted without its explanation in daemonset.yaml"
        );
    }
    assert_eq!(spec.host_network, Some(true));
    assert_ne!(spec.host_pid, Some(true));
    assert_ne!(spec.host_ipc, Some(true));
    // The node name by the downward API, passed as --node-name.
    let args = agent.args.clone().unwrap();
    assert!(
        args.contains(&"--node-name=$(NODE_NAME)".to_string()),
        "{args:?}"
    );
    assert!(args.contains(&"--kubernetes".to_string()), "{args:?}");
    let env = agent.env.clone().unwrap();
    let node = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node.value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );
    // The metrics port: the one `--metrics` listens on, on the node's address, and the one
    // the scrape annotations name.
    let ports = agent.ports.clone().unwrap();
    let metrics = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("a port named metrics");
    assert!(
        args.contains(&format!("--metrics=$(HOST_IP):{}", metrics.container_port)),
        "{args:?}"
    );
    let host_ip = env.iter().find(|e| e.name == "HOST_IP").expect("HOST_IP");
    assert_eq!(
        host_ip
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("status.hostIP")
    );
    let annotations = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    assert_eq!(
        annotations.get("prometheus.io/port"),
        Some(&metrics.container_port.to_string())
    );
    assert_eq!(
        annotations.get("prometheus.io/path").map(String::as_str),
        Some("/metrics")
    );
    // The state directory and the pins are host paths, so a restarted agent finds them.
    let volumes = spec.volumes.unwrap();
    let host_path = |mount_path: &str| {
        let mount = agent
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == mount_path)?;
        volumes
            .iter()
            .find(|v| v.name == mount.name)?
            .host_path
            .as_ref()
            .map(|h| h.path.clone())
    };
    assert_eq!(host_path("/sys/fs/bpf").as_deref(), Some("/sys/fs/bpf"));
    assert_eq!(
        host_path("/sys/fs/cgroup").as_deref(),
        Some("/sys/fs/cgroup")
    );
    assert!(
        args.contains(&"--state-dir=/run/enforcer".to_string()),
        "{args:?}"
    );
    assert!(host_path("/run/enforcer").is_some());
    assert!(
        args.iter()
            .any(|a| a.starts_with("--pin-path=/sys/fs/bpf/")),
        "{args:?}"
    );
    // Revocation in a pod's network namespace: SYS_ADMIN (setns) and the runtimes'
    // namespace files (never the host's PID namespace), read-only, with the namespaces of
    // pods started later propagated into the container. One is useless without the other.
    let netns = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == enforcer::flows::destroy::NETNS_DIRS[0]);
    assert_eq!(
        added.contains("SYS_ADMIN"),
        netns.is_some(),
        "SYS_ADMIN is granted for the /run/netns mount only, and that mount needs it"
    );
    if let Some(netns) = netns {
        assert_eq!(netns.read_only, Some(true), "{netns:?}");
        assert_eq!(
            netns.mount_propagation.as_deref(),
            Some("HostToContainer"),
            "{netns:?}"
        );
        assert_eq!(host_path("/run/netns").as_deref(), Some("/run/netns"));
    }
}

#[test]
fn every_command_line_is_one_the_binary_accepts() {
    // `enforcer ARGS... --help` exits 0 only when every flag exists and every value parses
    // (clap reads the arguments in order and stops at --help, before checking required ones).
    let all = manifests();
    for (m, spec, _) in workloads(&all) {
        for container in containers(spec) {
            let args = container.args.clone().unwrap_or_default();
            assert!(
                container.command.is_none(),
                "{}: the image's entrypoint runs",
                m.location()
            );
            let out = output_bounded(
                Command::new(enforcer_bin()).args(&args).arg("--help"),
                Duration::from_secs(20),
            )
            .unwrap();
            assert!(
                out.status.success(),
                "{} container {}: `enforcer {}` is refused by the binary:\n{}",
                m.location(),
                container.name,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn the_policy_configmap_is_the_demo_bundle_and_passes_policy_check() {
    let all = manifests();
    let cm = all
        .iter()
        .find_map(|m| match &m.object {
            Object::ConfigMap(cm) if name(m) == POLICY_CONFIGMAP => Some(cm.clone()),
            _ => None,
        })
        .expect("the policy ConfigMap");
    let data = cm.data.unwrap_or_default();
    let expected = bundle_files().unwrap();
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "deploy/policies.yaml and {BUNDLE} hold different files (ENFORCER_BLESS=1 regenerates it)"
    );
    for (file, text) in &expected {
        assert!(
            data[file] == *text,
            "deploy/policies.yaml: {file} differs from {BUNDLE}/{file} (ENFORCER_BLESS=1 \
             regenerates it)"
        );
    }
    // Laid out as the kubelet mounts a ConfigMap: a `..data` symlink to a timestamped
    // directory, and each key a symlink through it.
    let dir = TempDir::new("adm9-configmap").unwrap();
    let stamp = dir.path().join("..2026_12_01_00_00_00.000000001");
    std::fs::create_dir(&stamp).unwrap();
    for (file, text) in &data {
        std::fs::write(stamp.join(file), text).unwrap();
    }
    std::os::unix::fs::symlink(stamp.file_name().unwrap(), dir.path().join("..data")).unwrap();
    for file in data.keys() {
        std::os::unix::fs::symlink(format!("..data/{file}"), dir.path().join(file)).unwrap();
    }
    let out = output_bounded(
        Command::new(enforcer_bin())
            .args(["policy", "check"])
            .arg(dir.path()),
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(
        out.status.success(),
        "enforcer policy check refuses the mounted ConfigMap:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The bundle's files by name (the files a bundle directory may hold).
fn bundle_files() -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(repo().join(BUNDLE))? {
        let path = entry?.path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        if file.starts_with('.') {
            continue;
        }
        ensure!(path.is_file(), "{} is not a file", path.display());
        out.insert(file, std::fs::read_to_string(&path)?);
    }
    Ok(out)
}

/// Writes `deploy/policies.yaml` from the bundle: one block scalar per file.
fn bless_policies() -> Result<()> {
    let mut yaml = String::from(
        "# The policy bundle, mounted by the PDP (pdp.yaml). Generated from policies/demo:\n\
         #   ENFORCER_BLESS=1 cargo test -p enforcer-tests --test deploy_manifests\n\
         # (the test checks that the two are the same). In a cluster, edit this ConfigMap.\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: enforcer-policies\n  \
         namespace: ai-enforcer\n  labels:\n    app.kubernetes.io/part-of: ai-enforcer\ndata:\n",
    );
    for (file, text) in bundle_files()? {
        if text.contains('\t')
            || text.contains('\r')
            || text
                .lines()
                .any(|l| l.starts_with(' ') && l.trim().is_empty())
        {
            bail!("{BUNDLE}/{file}: tabs, carriage returns or blank lines of spaces do not survive a block scalar as written here");
        }
        // `|` keeps one final newline, `|+` all of them, `|-` none.
        let chomp = if !text.ends_with('\n') {
            "-"
        } else if text.ends_with("\n\n") {
            "+"
        } else {
            ""
        };
        // An indentation indicator (content 2 deeper than the key), in case the first line
        // starts with spaces.
        yaml.push_str(&format!("  {file}: |2{chomp}\n"));
        for line in text.lines() {
            if line.is_empty() {
                yaml.push('\n');
            } else {
                yaml.push_str(&format!("    {line}\n"));
            }
        }
    }
    let path = deploy_dir().join("policies.yaml");
    std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))
}
