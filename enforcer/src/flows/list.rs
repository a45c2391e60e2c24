//! `enforcer flows [--to NAME] [--from W] [--json]`: the live tracked flows, read from the
//! pinned maps (so it works while no agent runs), named from the agent's state file.
//!
//! Two kinds of rows, by `side`:
//! - `client`: this node's connecting sockets (`FLOWS`); the subject is the socket's cgroup.
//! - `server`: this node's accepted sockets of a destination with ingress checking
//!   (`WIRE_PEERS` entries whose socket is established); the subject is the identity the
//!   SYN's option claimed and its tag proved, `source` / `destination` are the 4-tuple as the
//!   server's own socket (and so the DB's logs, `ss`) shows it. A row goes when that socket
//!   reaches TCP CLOSE.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use enforcer_common::{flow_state, FlowRecord};
use serde::Serialize;

use crate::agent::{read_state, FlowName};
use crate::datapath;

/// One live flow, as listed.
#[derive(Debug, Serialize)]
pub struct FlowView {
    /// `client` (this node connected) or `server` (this node accepted; identity verified).
    pub side: &'static str,
    /// The socket cookie of this node's socket.
    pub cookie: u64,
    pub protocol: &'static str,
    /// `established`, `connecting` (TCP handshake in progress) or `connected` (UDP).
    pub state: &'static str,
    pub source: Option<String>,
    pub destination: String,
    /// Client rows: where the socket is connected when that is not `destination` (a socket
    /// load balancer sent the connect to a Service's backend).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    pub subject: End,
    pub to: End,
    pub dataset_scope: Vec<String>,
    /// The connecting process (client rows; the kernel does not know the server's at accept).
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Seconds since `connect()` (client rows) or since the handshake completed (server).
    pub age_seconds: f64,
    /// Client rows: the low 32 bits of the policy generation that allowed it. Server rows: 0
    /// (since option version 2 the client's node sends its clock there, not its generation).
    pub policy_generation: u32,
}

/// One end's identity, by number and (from the agent's state) name and tenant.
#[derive(Debug, Serialize)]
pub struct End {
    pub identity: u32,
    pub name: Option<String>,
    pub tenant: Option<String>,
}

/// The flows under `pin_root`, those from `from` (a subject's name) to `to` (a destination's
/// name) when given. A name the agent's state does not know is an error, not an empty list.
pub fn collect(
    pin_root: &Path,
    state_dir: &Path,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<Vec<FlowView>> {
    let dir = datapath::pin_dir(pin_root);
    let records = super::read(&dir).with_context(|| {
        format!(
            "reading the tracked flows under {} (is an enforcer agent of this version using --pin-path {}?)",
            dir.display(),
            pin_root.display()
        )
    })?;
    let names: BTreeMap<u32, FlowName> = read_state(state_dir)
        .map(|s| s.flow_names)
        .unwrap_or_default();
    let id_of = |name: &str, flag: &str| -> Result<u32> {
        names
            .iter()
            .find(|(_, n)| n.name == name)
            .map(|(id, _)| *id)
            .with_context(|| {
                format!(
                    "{flag} {name}: no such subject or tracked destination in the agent's state ({})",
                    state_dir.join("state.json").display()
                )
            })
    };
    let peers = crate::wire::verified_peers(&dir)?;
    let from = from.map(|n| id_of(n, "--from")).transpose()?;
    let to = to.map(|n| id_of(n, "--to")).transpose()?;
    let now = crate::events::aggregate::monotonic_ns();
    let wanted = |subject: u32, destination: u32| {
        from.is_none_or(|id| subject == id) && to.is_none_or(|id| destination == id)
    };
    let mut views: Vec<FlowView> = records
        .into_iter()
        // An `ENDED` record's socket connected elsewhere (reported closed); it is kept only
        // for the agent to look whether the kernel refused that connect.
        .filter(|(_, r)| r.flags & enforcer_common::flow_flags::ENDED == 0)
        .filter(|(_, r)| wanted(r.subject, r.destination))
        .map(|(cookie, r)| view(cookie, &r, &names, now))
        .collect();
    views.extend(
        peers
            .iter()
            .filter(|p| p.accepted && wanted(p.identity, p.destination))
            .map(|p| server_view(p, &names, now)),
    );
    Ok(views)
}

/// A server-side row: the accepted socket's 4-tuple and the verified claim.
fn server_view(
    p: &crate::wire::VerifiedPeer,
    names: &BTreeMap<u32, FlowName>,
    now: u64,
) -> FlowView {
    FlowView {
        side: "server",
        cookie: p.cookie,
        protocol: "tcp",
        state: "established",
        source: Some(p.client.to_string()),
        destination: p.server.to_string(),
        peer: None,
        subject: end(p.identity, names),
        to: end(p.destination, names),
        dataset_scope: names
            .get(&p.destination)
            .map(|n| n.datasets.clone())
            .unwrap_or_default(),
        pid: None,
        comm: None,
        age_seconds: now.saturating_sub(p.accepted_ns) as f64 / 1e9,
        policy_generation: 0,
    }
}

fn end(identity: u32, names: &BTreeMap<u32, FlowName>) -> End {
    let name = names.get(&identity);
    End {
        identity,
        name: name.map(|n| n.name.clone()),
        tenant: name.and_then(|n| n.tenant.clone()),
    }
}

fn socket(ip: std::net::IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

fn view(cookie: u64, r: &FlowRecord, names: &BTreeMap<u32, FlowName>, now: u64) -> FlowView {
    let end_of = |id| end(id, names);
    let comm_end = r.comm.iter().position(|&b| b == 0).unwrap_or(r.comm.len());
    FlowView {
        side: "client",
        cookie,
        protocol: super::protocol_name(r.protocol),
        state: match (r.protocol, r.state) {
            (enforcer_common::proto::UDP, _) => "connected",
            (_, flow_state::ESTABLISHED) => "established",
            _ => "connecting",
        },
        source: super::source_ip(r).map(|ip| socket(ip, r.sport)),
        destination: socket(super::destination_ip(r), r.dport),
        peer: super::peer_elsewhere(r).map(|(ip, port)| socket(ip, port)),
        subject: end_of(r.subject),
        to: end_of(r.destination),
        dataset_scope: names
            .get(&r.destination)
            .map(|n| n.datasets.clone())
            .unwrap_or_default(),
        pid: Some((r.pid_tgid >> 32) as u32),
        comm: Some(String::from_utf8_lossy(&r.comm[..comm_end]).into_owned()),
        age_seconds: now.saturating_sub(r.start_ns) as f64 / 1e9,
        policy_generation: r.policy_generation,
    }
}

/// The table `enforcer flows` prints.
pub fn render(flows: &[FlowView]) -> String {
    use std::fmt::Write as _;
    let name = |e: &End| match (&e.name, &e.tenant) {
        (Some(n), Some(t)) => format!("{n} ({t})"),
        (Some(n), None) => n.clone(),
        _ => format!("identity {}", e.identity),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6} {:<5} {:<12} {:<28} {:<28} {:<28} {:<28} {:>8}",
        "SIDE", "PROTO", "STATE", "SOURCE", "DESTINATION", "SUBJECT", "TO", "AGE(s)"
    );
    for f in flows {
        let _ = writeln!(
            out,
            "{:<6} {:<5} {:<12} {:<28} {:<28} {:<28} {:<28} {:>8.1}",
            f.side,
            f.protocol,
            f.state,
            f.source.as_deref().unwrap_or("-"),
            f.destination,
            name(&f.subject),
            name(&f.to),
            f.age_seconds
        );
    }
    let _ = writeln!(out, "{} tracked flow(s)", flows.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::VerifiedPeer;

    fn name(name: &str, datasets: &[&str]) -> FlowName {
        FlowName {
            name: name.into(),
            tenant: Some("acme".into()),
            datasets: datasets.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn a_server_row_shows_the_servers_own_4_tuple_and_the_verified_claim() {
        let names = BTreeMap::from([
            (300, name("acme-retriever", &[])),
            (301, name("acme-vectors", &["acme-kb"])),
        ]);
        let peer = VerifiedPeer {
            client: "[fd95::1]:40000".parse().unwrap(),
            server: "[fd95::2]:8000".parse().unwrap(),
            identity: 300,
            destination: 301,
            stamp: 7,
            key_id: 1,
            accepted: true,
            cookie: 42,
            accepted_ns: 1_000_000_000,
        };
        let v = server_view(&peer, &names, 3_500_000_000);
        assert_eq!(v.side, "server");
        assert_eq!(v.cookie, 42);
        assert_eq!(v.source.as_deref(), Some("[fd95::1]:40000"));
        assert_eq!(v.destination, "[fd95::2]:8000");
        assert_eq!(v.subject.name.as_deref(), Some("acme-retriever"));
        assert_eq!(v.subject.tenant.as_deref(), Some("acme"));
        assert_eq!(v.to.name.as_deref(), Some("acme-vectors"));
        assert_eq!(v.dataset_scope, ["acme-kb"]);
        assert_eq!((v.pid, v.comm.as_deref()), (None, None));
        assert_eq!(v.age_seconds, 2.5);
        assert_eq!(v.policy_generation, 0);
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["pid"], serde_json::Value::Null);
        let table = render(&[v]);
        assert!(table.contains("server") && table.contains("acme-retriever (acme)"));
        assert!(table.contains("1 tracked flow(s)"), "{table}");
    }

    #[test]
    fn an_unknown_claimed_identity_is_shown_by_number() {
        let peer = VerifiedPeer {
            client: "127.0.0.1:40000".parse().unwrap(),
            server: "127.95.0.2:8000".parse().unwrap(),
            identity: 999,
            destination: 301,
            stamp: 0,
            key_id: 1,
            accepted: true,
            cookie: 1,
            accepted_ns: 0,
        };
        let v = server_view(&peer, &BTreeMap::new(), 0);
        assert_eq!(v.subject.name, None);
        assert!(render(&[v]).contains("identity 999"));
    }
}
