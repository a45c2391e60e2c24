//! `policy explain`: one cell's decision, the policies that determined it with their source
//! locations and ATLAS techniques, and the kernel table key the agent compares it with.

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
    /// The key the kernel looks up first for this cell. For a declared port it is present in
    /// the table exactly when `decision.allowed`. For a destination without declared ports
    /// (`decision.any_port`) the kernel then looks up the same key with port 0: an exact
    /// entry exists only for a port decided otherwise than most ports (a deny exception
    /// under an any-port allow, or an allow under a default deny).
    #[serde(serialize_with = "serialize_key")]
    pub kernel_key: crate::PolicyKey,
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

pub(crate) fn explain(
    bundle: &Bundle,
    from: &str,
    to: &str,
    port: u16,
    protocol: Protocol,
) -> Result<Explanation, PolicyError> {
    let decision = bundle.decide(from, to, port, protocol)?;
    let party = |name: &str| {
        let i = bundle.identities().by_name(name);
        let i = i.ok_or_else(|| PolicyError::UnknownName(name.into()))?;
        Ok::<_, PolicyError>(Party {
            name: i.name.clone(),
            identity: i.id,
            kind: i.kind,
            tenant: i.tenant.clone(),
            purpose: i.purpose.clone(),
            endpoint_kind: i.endpoint_kind.clone(),
        })
    };
    let (from, to) = (party(from)?, party(to)?);
    let kernel_key = crate::PolicyKey {
        subject: from.identity,
        destination: to.identity,
        dport: port,
        protocol: protocol.number(),
        _pad: 0,
    };
    Ok(Explanation {
        revision: bundle.snapshot(),
        from,
        to,
        port,
        protocol,
        decision,
        kernel_key,
    })
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.decision;
        let verdict = if d.allowed { "ALLOW" } else { "DENY" };
        let party = |p: &Party| {
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
        };
        writeln!(
            f,
            "{verdict}: {} -> {} port {}/{}",
            self.from.name, self.to.name, self.port, self.protocol
        )?;
        writeln!(f, "  from:     {}", party(&self.from))?;
        writeln!(f, "  to:       {}", party(&self.to))?;
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
        if d.policies.is_empty() {
            if !d.undeclared_port && !d.allowed {
                writeln!(f, "  policies: none matched (implicit deny)")?;
            }
        } else {
            writeln!(f, "  policies:")?;
            for p in &d.policies {
                writeln!(
                    f,
                    "    {} {} at {}:{}{}",
                    p.effect,
                    p.id,
                    p.file.display(),
                    p.line,
                    if p.quarantine { " [quarantine]" } else { "" }
                )?;
                for t in &p.atlas {
                    writeln!(
                        f,
                        "      ATLAS {} {} ({})",
                        t.id,
                        t.name,
                        t.tactics.join(", ")
                    )?;
                }
            }
        }
        Ok(())
    }
}
