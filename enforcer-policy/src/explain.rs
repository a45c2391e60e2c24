//! `policy explain`: one cell's decision, the policies that determined it with their source
//! locations and ATLAS techniques, and the kernel table key the agent compares it with. For a
//! Service destination: every ready backend with its own decision, and which one decided.

use std::fmt;

use crate::{Bundle, Decision, PolicyError, Protocol};

/// One side of the cell, as an operator knows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Party {
    pub name: String,
    pub identity: u32,
    pub kind: crate::IdentityKind,
    pub tenant: Option<String>,
    pub purpose: Option<String>,
    pub endpoint_kind: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Explanation {
    /// The policy snapshot ([`Bundle::snapshot`]): the revision, plus risk overrides.
    pub revision: String,
    pub from: Party,
    pub to: Party,
    pub port: u16,
    pub protocol: Protocol,
    pub decision: Decision,
    /// The subject is in audit mode (its own or its tenant's `audit: true`): a call the
    /// decision denies passes, reported as `connection.audited` (the agent's global
    /// `--audit` is the running agent's, which the live comparison reads).
    pub audit: bool,
    /// The key the kernel looks up first for this cell. For a declared port it is present in
    /// the table exactly when `decision.allowed`. For a destination without declared ports
    /// (`decision.any_port`) the kernel then looks up the same key with port 0: an exact
    /// entry exists only for a port decided otherwise than most ports (a deny exception
    /// under an any-port allow, or an allow under a default deny).
    #[serde(serialize_with = "serialize_key")]
    pub kernel_key: crate::PolicyKey,
    /// Set when the destination is a Kubernetes Service: `decision` is that of all its ready
    /// backends (allowed only if every one allows), here listed one by one.
    pub service: Option<ServiceExplanation>,
}

/// How a Service's port was judged: as every one of its ready backends.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServiceExplanation {
    pub namespace: String,
    pub name: String,
    /// The port is declared by the Service (else denied, `backends` empty).
    pub declared: bool,
    /// Every ready backend of the port, by address and port.
    pub backends: Vec<BackendExplanation>,
    /// The index in `backends` of the one whose decision is the Service's: the first that
    /// denies, or the first when all allow. `None` when there are no ready backends, or when
    /// `fronts_foreign_step_up` (denied).
    pub deciding: Option<usize>,
    /// Another tenant's endpoint with a step-up among the Service's backends (its name):
    /// every call through the Service is denied (`foreign-step-up-backend`).
    pub fronts_foreign_step_up: Option<String>,
}

/// One ready backend and the decision of a direct call to it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BackendExplanation {
    pub ip: std::net::IpAddr,
    /// The target port: the backend is asked at it.
    pub port: u16,
    /// The identity the address leads to (WORLD when none has it).
    pub identity: Party,
    pub decision: Decision,
}

fn serialize_key<S: serde::Serializer>(k: &crate::PolicyKey, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut st = s.serialize_struct("PolicyKey", 4)?;
    st.serialize_field("subject", &k.subject)?;
    st.serialize_field("destination", &k.destination)?;
    st.serialize_field("dport", &k.dport)?;
    st.serialize_field("protocol", &k.protocol)?;
    st.end()
}

fn party_of(i: &crate::Identity) -> Party {
    Party {
        name: i.name.clone(),
        identity: i.id,
        kind: i.kind,
        tenant: i.tenant.clone(),
        purpose: i.purpose.clone(),
        endpoint_kind: i.endpoint_kind.clone(),
    }
}

pub(crate) fn explain(
    bundle: &Bundle,
    from: &str,
    to: &str,
    port: u16,
    protocol: Protocol,
) -> Result<Explanation, PolicyError> {
    let decision = bundle.decide(from, to, port, protocol)?;
    let ids = bundle.identities();
    let party = |name: &str| {
        ids.by_name(name)
            .map(party_of)
            .ok_or_else(|| PolicyError::UnknownName(name.into()))
    };
    let (from_party, to_party) = (party(from)?, party(to)?);
    let audit = ids
        .by_name(from)
        .is_some_and(|i| i.flags & enforcer_common::flags::AUDIT != 0);
    let service = match (ids.index_of(from), ids.index_of(to)) {
        (Some(s), Some(d)) if ids.at(d).kind == crate::IdentityKind::Service => {
            let judged = bundle.decide_service(s, d, port, protocol)?;
            let target = ids.at(d);
            let (namespace, name) = target
                .name
                .strip_prefix("service/")
                .and_then(|n| n.split('#').next())
                .and_then(|n| n.split_once('/'))
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .unwrap_or_default();
            Some(ServiceExplanation {
                namespace,
                name,
                declared: target.service_port(port, protocol).is_some(),
                backends: judged
                    .backends
                    .into_iter()
                    .map(|(b, bi, decision)| BackendExplanation {
                        ip: b.ip,
                        port: b.port,
                        identity: party_of(ids.at(bi)),
                        decision,
                    })
                    .collect(),
                deciding: judged.deciding,
                fronts_foreign_step_up: target.fronts_foreign_step_up.clone(),
            })
        }
        _ => None,
    };
    let kernel_key = crate::PolicyKey {
        subject: from_party.identity,
        destination: to_party.identity,
        dport: port,
        protocol: protocol.number(),
        _pad: 0,
    };
    Ok(Explanation {
        revision: bundle.snapshot(),
        from: from_party,
        to: to_party,
        port,
        protocol,
        decision,
        audit,
        kernel_key,
        service,
    })
}

/// A party on one line: `name (identity N, kind, tenant t, purpose p, kind k)`.
fn party_text(p: &Party) -> String {
    let mut s = format!("{} (identity {}, {}", p.name, p.identity, p.kind);
    if let Some(t) = &p.tenant {
        s += &format!(", tenant {t}");
    }
    if let Some(x) = &p.purpose {
        s += &format!(", purpose {x}");
    }
    if let Some(k) = &p.endpoint_kind {
        s += &format!(", kind {k}");
    }
    s + ")"
}

/// The policies of a decision, one per line, with their ATLAS techniques.
fn write_policies(f: &mut fmt::Formatter<'_>, d: &Decision, indent: &str) -> fmt::Result {
    for p in &d.policies {
        writeln!(
            f,
            "{indent}{} {} at {}:{}{}",
            p.effect,
            p.id,
            p.file.display(),
            p.line,
            if p.quarantine { " [quarantine]" } else { "" }
        )?;
        for t in &p.atlas {
            writeln!(
                f,
                "{indent}  ATLAS {} {} ({})",
                t.id,
                t.name,
                t.tactics.join(", ")
            )?;
        }
    }
    Ok(())
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.decision;
        let verdict = match (d.allowed, self.audit) {
            (true, _) => "ALLOW",
            (false, false) => "DENY",
            (false, true) => {
                "AUDIT (a deny that audit mode lets through, reported as connection.audited)"
            }
        };
        writeln!(
            f,
            "{verdict}: {} -> {} port {}/{}",
            self.from.name, self.to.name, self.port, self.protocol
        )?;
        writeln!(f, "  from:     {}", party_text(&self.from))?;
        writeln!(f, "  to:       {}", party_text(&self.to))?;
        let port_note = if d.undeclared_port {
            " (port not declared by the destination: no table entry, denied)"
        } else if d.any_port {
            " (destination declares no ports: Cedar asked at this port)"
        } else {
            ""
        };
        writeln!(f, "  action:   {}{port_note}", d.action)?;
        writeln!(f, "  revision: {}", self.revision)?;
        let k = &self.kernel_key;
        if d.any_port {
            writeln!(
                f,
                "  kernel:   key {{subject {}, destination {}, dport {}, protocol {}}} ({} exception if most ports are {}), else dport 0 (any port)",
                k.subject,
                k.destination,
                k.dport,
                k.protocol,
                if d.allowed { "an allow" } else { "a deny" },
                if d.allowed { "denied" } else { "allowed" },
            )?;
        } else {
            writeln!(
                f,
                "  kernel:   key {{subject {}, destination {}, dport {}, protocol {}}} {}",
                k.subject,
                k.destination,
                k.dport,
                k.protocol,
                if d.allowed {
                    "present (allow)"
                } else {
                    "absent (deny)"
                }
            )?;
        }
        if let Some(svc) = &self.service {
            let (ns, name, port, protocol) = (&svc.namespace, &svc.name, self.port, self.protocol);
            if !svc.declared {
                writeln!(
                    f,
                    "  service:  {ns}/{name} does not declare port {port}/{protocol}"
                )?;
            } else if let Some(backend) = &svc.fronts_foreign_step_up {
                writeln!(
                    f,
                    "  service:  {ns}/{name} port {port}/{protocol}: denied, it fronts {backend}, another tenant's endpoint with a step-up (call it directly); its backends:"
                )?;
            } else if svc.backends.is_empty() {
                writeln!(
                    f,
                    "  service:  {ns}/{name} port {port}/{protocol}: no ready backends (denied)"
                )?;
            } else {
                writeln!(
                    f,
                    "  service:  {ns}/{name} port {port}/{protocol}: judged as all {} ready backends (allowed only if every backend allows)",
                    svc.backends.len()
                )?;
                writeln!(f, "  backends:")?;
            }
            for (i, b) in svc.backends.iter().enumerate() {
                let bd = &b.decision;
                let why = if bd.undeclared_port {
                    " (target port not declared by the backend)"
                } else if !bd.allowed && bd.policies.is_empty() {
                    " (no permit: implicit deny)"
                } else {
                    ""
                };
                let address = match b.ip {
                    std::net::IpAddr::V6(a) => format!("[{a}]:{}", b.port),
                    std::net::IpAddr::V4(a) => format!("{a}:{}", b.port),
                };
                writeln!(
                    f,
                    "    {} {address} -> {}, action {}{why}{}",
                    if bd.allowed { "ALLOW" } else { "DENY " },
                    party_text(&b.identity),
                    bd.action,
                    if svc.deciding == Some(i) {
                        "  <- decided"
                    } else {
                        ""
                    }
                )?;
                write_policies(f, bd, "        ")?;
            }
        }
        if d.policies.is_empty() {
            if !d.undeclared_port && !d.allowed && self.service.is_none() {
                writeln!(f, "  policies: none matched (implicit deny)")?;
            }
        } else {
            writeln!(f, "  policies:")?;
            write_policies(f, d, "    ")?;
        }
        Ok(())
    }
}
