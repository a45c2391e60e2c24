//! The inventory (`inventory.yaml`): tenants, workloads (subjects and destinations) and
//! endpoints (destinations only), parsed with exact source locations.
//!
//! The file is read as marked YAML events into a small located tree, then walked by hand, so
//! that every error (syntax, type, or semantic such as an unknown tenant or an overlapping
//! CIDR) names the line and column of the offending node, and every problem is reported, not
//! just the first.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::diagnostics::{Diagnostic, Diagnostics};
use crate::identity::{validate_spiffe_id, IpNet};
use crate::Protocol;

/// A 1-based source position in the inventory file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Loc {
    pub line: u32,
    pub column: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    /// Would-deny calls of this tenant's workloads pass and are reported as `audit`.
    pub audit: bool,
    pub loc: Loc,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Defaults {
    /// ATLAS IDs reported for a deny that no forbid policy decided.
    pub implicit_deny_atlas: Vec<String>,
    /// ATLAS IDs reported for a connection from a cgroup with no identity.
    pub unknown_subject_atlas: Vec<String>,
}

/// A declared port of a destination: connecting to it is the Cedar action `action`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub port: u16,
    pub protocol: Protocol,
    pub action: String,
    /// Location of the `action` (or of the port entry when the action is defaulted).
    pub loc: Loc,
}

/// A thing that runs. With `cgroups` it is a subject; with `ips` it is a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub tenant: Option<String>,
    pub purpose: Option<String>,
    pub ring: Option<String>,
    /// A Cedar decimal literal in canonical form (`risk::canonical_decimal`: `0.2`, `1.0`).
    pub risk: String,
    pub audit: bool,
    pub spiffe_id: Option<String>,
    pub cgroups: Vec<String>,
    pub ips: Vec<IpNet>,
    pub ports: Vec<Port>,
    /// Location of the name.
    pub loc: Loc,
}

/// A destination only: vector DBs, feature stores, model registries, APIs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    pub tenant: Option<String>,
    pub kind: String,
    pub ips: Vec<IpNet>,
    pub ports: Vec<Port>,
    pub datasets: Vec<String>,
    pub loc: Loc,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    pub file: PathBuf,
    pub tenants: Vec<Tenant>,
    pub defaults: Defaults,
    pub workloads: Vec<Workload>,
    pub endpoints: Vec<Endpoint>,
    /// Locations of the ATLAS IDs in `defaults`, for diagnostics.
    pub(crate) defaults_locs: HashMap<String, Loc>,
    /// Locations of fields of named items: (item name, field) -> location. Fields are
    /// `tenant` and `ip:<cidr>`.
    pub(crate) locs: HashMap<(String, String), Loc>,
}

impl Inventory {
    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| t.name == name)
    }

    /// Parse and validate `text` (the content of `file`). Every problem is reported.
    pub fn parse(file: &Path, text: &str) -> Result<Inventory, Diagnostics> {
        let root = match parse_marked(text) {
            Ok(Some(root)) => root,
            Ok(None) => {
                return Err(Diagnostic::new(file, 1, 1, "the inventory is empty")
                    .with_hint("expected a mapping with `tenants`, `workloads` and `endpoints`")
                    .into())
            }
            Err(e) => {
                let m = e.marker();
                return Err(Diagnostic::new(
                    file,
                    m.line() as u32,
                    m.col() as u32 + 1,
                    format!("YAML syntax error: {}", e.info()),
                )
                .into());
            }
        };
        let mut walker = Walker {
            file: file.to_path_buf(),
            diags: Diagnostics::default(),
            locs: HashMap::new(),
            accepted: HashMap::new(),
        };
        let mut inv = walker.inventory(&root);
        inv.locs = std::mem::take(&mut walker.locs);
        let mut diags = walker.diags;
        check_semantics(file, &inv, &mut diags);
        if diags.is_empty() {
            Ok(inv)
        } else {
            diags.sort();
            Err(diags)
        }
    }

    pub fn load(file: &Path) -> Result<Inventory, Diagnostics> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            Diagnostics::from(Diagnostic::new(file, 1, 1, format!("cannot read: {e}")))
        })?;
        Inventory::parse(file, &text)
    }
}

// ---------------------------------------------------------------------------------------------
// The located YAML tree.

#[derive(Clone, Debug)]
pub(crate) struct Node {
    value: Value,
    loc: Loc,
}

#[derive(Clone, Debug)]
enum Value {
    /// The text, and whether it was a plain (unquoted) scalar: only plain `~`/`null`/empty are null.
    Scalar(String, bool),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar(s, true) if s.is_empty() || s == "~" || s == "null")
    }
    fn kind(&self) -> &'static str {
        match &self.value {
            Value::Scalar(..) if self.is_null() => "null",
            Value::Scalar(..) => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// Builds the tree from marked events. Anchors are kept so that aliases resolve.
#[derive(Default)]
struct Builder {
    stack: Vec<(Node, Option<Node>, usize)>, // (container, pending map key, anchor)
    root: Option<Node>,
    anchors: HashMap<usize, Node>,
}

impl Builder {
    fn loc(m: &Marker) -> Loc {
        Loc {
            line: m.line() as u32,
            column: m.col() as u32 + 1,
        }
    }
    fn open(&mut self, value: Value, loc: Loc, anchor: usize) {
        self.stack.push((Node { value, loc }, None, anchor));
    }
    fn push_value(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some((parent, key, _)) => match &mut parent.value {
                Value::Seq(items) => items.push(node),
                Value::Map(entries) => match key.take() {
                    None => *key = Some(node),
                    Some(k) => entries.push((k, node)),
                },
                Value::Scalar(..) => unreachable!("scalars have no children"),
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let loc = Builder::loc(&mark);
        match ev {
            Event::Scalar(s, style, anchor, _) => {
                let plain = style == TScalarStyle::Plain;
                self.push_value(
                    Node {
                        value: Value::Scalar(s, plain),
                        loc,
                    },
                    anchor,
                );
            }
            Event::SequenceStart(anchor, _) => self.open(Value::Seq(vec![]), loc, anchor),
            Event::MappingStart(anchor, _) => self.open(Value::Map(vec![]), loc, anchor),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((mut node, _, anchor)) = self.stack.pop() {
                    // A block mapping's start mark is unreliable; its first key is exact.
                    if let Value::Map(entries) = &node.value {
                        if let Some((k, _)) = entries.first() {
                            node.loc = k.loc;
                        }
                    }
                    self.push_value(node, anchor);
                }
            }
            Event::Alias(id) => {
                let node = self.anchors.get(&id).cloned().unwrap_or(Node {
                    value: Value::Scalar(String::new(), true),
                    loc,
                });
                self.push_value(node, 0);
            }
            _ => {}
        }
    }
}

fn parse_marked(text: &str) -> Result<Option<Node>, yaml_rust2::ScanError> {
    let mut b = Builder::default();
    Parser::new_from_str(text).load(&mut b, false)?;
    Ok(b.root.filter(|r| !r.is_null()))
}

// ---------------------------------------------------------------------------------------------
// Walking the tree into the model, collecting every type error.

/// What workloads and endpoints share, as read so far.
#[derive(Default)]
struct ItemFields {
    /// The name and its location, once a valid `name` has been read.
    name: Option<(String, Loc)>,
    tenant: Option<String>,
    ips: Vec<IpNet>,
    ports: Vec<Port>,
    /// Where `tenant` and each address were written, for `Inventory::locs`.
    field_locs: Vec<(String, Loc)>,
}

struct Walker {
    file: PathBuf,
    diags: Diagnostics,
    locs: HashMap<(String, String), Loc>,
    /// Items accepted so far, per kind: the index of the next one.
    accepted: HashMap<&'static str, usize>,
}

impl Walker {
    fn item_key(&mut self, kind: &'static str) -> String {
        let n = self.accepted.entry(kind).or_insert(0);
        *n += 1;
        format!("{kind}#{}", *n - 1)
    }

    fn err(&mut self, loc: Loc, msg: impl Into<String>) {
        self.diags
            .push(Diagnostic::new(&self.file, loc.line, loc.column, msg));
    }
    fn err_hint(&mut self, loc: Loc, msg: impl Into<String>, hint: impl Into<String>) {
        self.diags
            .push(Diagnostic::new(&self.file, loc.line, loc.column, msg).with_hint(hint));
    }

    /// The entries of a mapping; unknown keys are errors (they are usually typos).
    fn map<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        known: &[&str],
    ) -> Option<Vec<(&'n str, &'n Node)>> {
        let Value::Map(entries) = &node.value else {
            self.err(
                node.loc,
                format!("{what} must be a mapping, found {}", node.kind()),
            );
            return None;
        };
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for (k, v) in entries {
            let Value::Scalar(key, _) = &k.value else {
                self.err(k.loc, format!("{what}: keys must be strings"));
                continue;
            };
            if !known.contains(&key.as_str()) {
                self.err_hint(
                    k.loc,
                    format!("{what}: unknown field `{key}`"),
                    format!("known fields: {}", known.join(", ")),
                );
                continue;
            }
            if !seen.insert(key.as_str()) {
                self.err(k.loc, format!("{what}: duplicate field `{key}`"));
                continue;
            }
            out.push((key.as_str(), v));
        }
        Some(out)
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.value {
            Value::Scalar(s, _) if !node.is_null() && !s.is_empty() => Some(s.clone()),
            _ => {
                self.err(
                    node.loc,
                    format!("{what} must be a non-empty string, found {}", node.kind()),
                );
                None
            }
        }
    }

    fn bool(&mut self, node: &Node, what: &str) -> bool {
        match &node.value {
            Value::Scalar(s, true) if s == "true" => true,
            Value::Scalar(s, true) if s == "false" => false,
            _ => {
                self.err(node.loc, format!("{what} must be true or false"));
                false
            }
        }
    }

    /// A list of items; null is an empty list.
    fn seq<'n>(&mut self, node: &'n Node, what: &str) -> &'n [Node] {
        match &node.value {
            Value::Seq(items) => items,
            _ if node.is_null() => &[],
            _ => {
                self.err(
                    node.loc,
                    format!("{what} must be a list, found {}", node.kind()),
                );
                &[]
            }
        }
    }

    fn strings(&mut self, node: &Node, what: &str) -> Vec<(String, Loc)> {
        let items = self.seq(node, what);
        items
            .iter()
            .filter_map(|n| self.string(n, what).map(|s| (s, n.loc)))
            .collect()
    }

    fn inventory(&mut self, root: &Node) -> Inventory {
        let mut inv = Inventory {
            file: self.file.clone(),
            ..Inventory::default()
        };
        let Some(fields) = self.map(
            root,
            "inventory",
            &["tenants", "defaults", "workloads", "endpoints"],
        ) else {
            return inv;
        };
        for (key, node) in fields {
            match key {
                "tenants" => {
                    let items = self.seq(node, "tenants");
                    inv.tenants = items.iter().filter_map(|t| self.tenant(t)).collect();
                }
                "defaults" => self.defaults(node, &mut inv),
                "workloads" => {
                    let items = self.seq(node, "workloads");
                    inv.workloads = items.iter().filter_map(|w| self.workload(w)).collect();
                }
                "endpoints" => {
                    let items = self.seq(node, "endpoints");
                    inv.endpoints = items.iter().filter_map(|e| self.endpoint(e)).collect();
                }
                _ => unreachable!(),
            }
        }
        inv
    }

    fn tenant(&mut self, node: &Node) -> Option<Tenant> {
        if let Value::Scalar(..) = node.value {
            let name = self.string(node, "a tenant")?;
            return Some(Tenant {
                name,
                audit: false,
                loc: node.loc,
            });
        }
        let fields = self.map(node, "tenant", &["name", "audit"])?;
        let mut name = None;
        let mut audit = false;
        for (k, v) in fields {
            match k {
                "name" => name = self.string(v, "tenant name").map(|n| (n, v.loc)),
                "audit" => audit = self.bool(v, "audit"),
                _ => unreachable!(),
            }
        }
        match name {
            Some((name, loc)) => Some(Tenant { name, audit, loc }),
            None => {
                self.err(node.loc, "tenant: missing field `name`");
                None
            }
        }
    }

    fn defaults(&mut self, node: &Node, inv: &mut Inventory) {
        let Some(fields) = self.map(
            node,
            "defaults",
            &["implicit_deny_atlas", "unknown_subject_atlas"],
        ) else {
            return;
        };
        for (k, v) in fields {
            let ids = self.strings(v, k);
            for (id, loc) in &ids {
                inv.defaults_locs.entry(id.clone()).or_insert(*loc);
            }
            let ids = ids.into_iter().map(|(s, _)| s).collect();
            match k {
                "implicit_deny_atlas" => inv.defaults.implicit_deny_atlas = ids,
                "unknown_subject_atlas" => inv.defaults.unknown_subject_atlas = ids,
                _ => unreachable!(),
            }
        }
    }

    fn ips(&mut self, node: &Node) -> Vec<(IpNet, Loc)> {
        let mut out = Vec::new();
        for item in self.seq(node, "ips") {
            let Some(s) = self.string(item, "an IP address or CIDR") else {
                continue;
            };
            match s.parse::<IpNet>() {
                Ok(net) => out.push((net, item.loc)),
                Err(e) => self.err_hint(
                    item.loc,
                    format!("invalid IP or CIDR `{s}`: {e}"),
                    "write an IPv4 or IPv6 address, optionally with a prefix: 127.10.1.2/32",
                ),
            }
        }
        out
    }

    fn ports(&mut self, node: &Node) -> Vec<Port> {
        let mut out: Vec<Port> = Vec::new();
        for item in self.seq(node, "ports") {
            let Some(fields) = self.map(item, "port", &["port", "protocol", "action"]) else {
                continue;
            };
            let mut port = None;
            let mut protocol = Protocol::Tcp;
            let mut action = (crate::DEFAULT_ACTION.to_string(), item.loc);
            let mut ok = true;
            for (k, v) in fields {
                match k {
                    "port" => {
                        let text = match &v.value {
                            Value::Scalar(s, _) => s.as_str(),
                            _ => "",
                        };
                        match text.parse::<u32>() {
                            Ok(n) if (1..=65535).contains(&n) => port = Some(n as u16),
                            _ => {
                                ok = false;
                                self.err_hint(
                                    v.loc,
                                    format!("invalid port `{text}`"),
                                    "a port is a number from 1 to 65535; omit `ports` to allow any port (action `connect`)",
                                );
                            }
                        }
                    }
                    "protocol" => match self.string(v, "protocol").map(|s| s.parse::<Protocol>()) {
                        Some(Ok(p)) => protocol = p,
                        Some(Err(_)) => {
                            ok = false;
                            self.err_hint(v.loc, "invalid protocol", "use `tcp` or `udp`");
                        }
                        None => ok = false,
                    },
                    "action" => match self.string(v, "action") {
                        Some(a) => action = (a, v.loc),
                        None => ok = false,
                    },
                    _ => unreachable!(),
                }
            }
            if port.is_none() && ok {
                self.err(item.loc, "port: missing field `port`");
            }
            let Some(port) = port else { continue };
            if !ok {
                continue;
            }
            if out.iter().any(|p| p.port == port && p.protocol == protocol) {
                self.err(
                    item.loc,
                    format!("port {port}/{protocol} is declared twice"),
                );
                continue;
            }
            out.push(Port {
                port,
                protocol,
                action: action.0,
                loc: action.1,
            });
        }
        out
    }

    /// `name`, `tenant`, `ips` or `ports`: the fields workloads and endpoints share.
    fn item_field(&mut self, item: &mut ItemFields, key: &str, v: &Node) {
        match key {
            "name" => {
                if let Some(n) = self.string(v, "name") {
                    item.name = Some((n, v.loc));
                }
            }
            "tenant" => {
                item.tenant = self.string(v, "tenant");
                item.field_locs.push(("tenant".to_string(), v.loc));
            }
            "ips" => {
                for (net, loc) in self.ips(v) {
                    item.field_locs.push((format!("ip:{net}"), loc));
                    item.ips.push(net);
                }
            }
            "ports" => item.ports = self.ports(v),
            _ => unreachable!("`map` lets through only the fields it was given"),
        }
    }

    /// A workload or endpoint without a name is dropped; a named one is accepted, and the
    /// locations of its fields are kept under its key (`workload#3`, see `items`).
    /// Returns the name and its location.
    fn accept_item(
        &mut self,
        kind: &'static str,
        node: &Node,
        item: &mut ItemFields,
    ) -> Option<(String, Loc)> {
        let Some(name) = item.name.take() else {
            self.err(node.loc, format!("{kind}: missing field `name`"));
            return None;
        };
        let key = self.item_key(kind);
        for (field, loc) in item.field_locs.drain(..) {
            self.locs.insert((key.clone(), field), loc);
        }
        Some(name)
    }

    fn risk(&mut self, node: &Node) -> Option<String> {
        let Value::Scalar(s, _) = &node.value else {
            self.err(node.loc, "risk must be a decimal number");
            return None;
        };
        match crate::risk::canonical_decimal(s) {
            Ok(d) => Some(d),
            Err(why) => {
                self.err_hint(
                    node.loc,
                    format!("invalid risk `{s}`: {why}"),
                    "a Cedar decimal: digits with at most 4 fractional digits, e.g. 0.25",
                );
                None
            }
        }
    }

    fn workload(&mut self, node: &Node) -> Option<Workload> {
        let fields = self.map(
            node,
            "workload",
            &[
                "name",
                "tenant",
                "purpose",
                "ring",
                "risk",
                "audit",
                "spiffe_id",
                "cgroups",
                "ips",
                "ports",
            ],
        )?;
        let mut item = ItemFields::default();
        let mut w = Workload {
            name: String::new(),
            tenant: None,
            purpose: None,
            ring: None,
            risk: "0.0".into(),
            audit: false,
            spiffe_id: None,
            cgroups: vec![],
            ips: vec![],
            ports: vec![],
            loc: node.loc,
        };
        for (k, v) in fields {
            match k {
                "purpose" => w.purpose = self.string(v, "purpose"),
                "ring" => w.ring = self.string(v, "ring"),
                "risk" => w.risk = self.risk(v).unwrap_or(w.risk),
                "audit" => w.audit = self.bool(v, "audit"),
                "spiffe_id" => {
                    if let Some(s) = self.string(v, "spiffe_id") {
                        if let Err(e) = validate_spiffe_id(&s) {
                            self.err_hint(
                                v.loc,
                                format!("invalid SPIFFE ID: {e}"),
                                "spiffe://<trust-domain>/<path>, lowercase trust domain, segments of [A-Za-z0-9._-], at most 2048 bytes",
                            );
                        }
                        w.spiffe_id = Some(s);
                    }
                }
                "cgroups" => {
                    for (c, loc) in self.strings(v, "cgroups") {
                        if c.starts_with('/') || c.split('/').any(|s| s == ".." || s.is_empty()) {
                            self.err_hint(
                                loc,
                                format!("invalid cgroup path `{c}`"),
                                "a path relative to the cgroup v2 mount, e.g. enforcer-demo/acme-retriever",
                            );
                        } else {
                            w.cgroups.push(c);
                        }
                    }
                }
                _ => self.item_field(&mut item, k, v),
            }
        }
        (w.name, w.loc) = self.accept_item("workload", node, &mut item)?;
        (w.tenant, w.ips, w.ports) = (item.tenant, item.ips, item.ports);
        Some(w)
    }

    fn endpoint(&mut self, node: &Node) -> Option<Endpoint> {
        let fields = self.map(
            node,
            "endpoint",
            &["name", "tenant", "kind", "ips", "ports", "datasets"],
        )?;
        let mut item = ItemFields::default();
        let mut e = Endpoint {
            name: String::new(),
            tenant: None,
            kind: String::new(),
            ips: vec![],
            ports: vec![],
            datasets: vec![],
            loc: node.loc,
        };
        for (k, v) in fields {
            match k {
                "kind" => e.kind = self.string(v, "kind").unwrap_or_default(),
                "datasets" => {
                    e.datasets = self
                        .strings(v, "datasets")
                        .into_iter()
                        .map(|(s, _)| s)
                        .collect()
                }
                _ => self.item_field(&mut item, k, v),
            }
        }
        (e.name, e.loc) = self.accept_item("endpoint", node, &mut item)?;
        (e.tenant, e.ips, e.ports) = (item.tenant, item.ips, item.ports);
        if e.kind.is_empty() {
            self.err_hint(
                e.loc,
                format!("endpoint `{}`: missing field `kind`", e.name),
                "vector_db | feature_store | model_registry | llm_api | ...",
            );
        }
        Some(e)
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entry checks: names, tenants, addresses, cgroups, ATLAS defaults.

/// Where a name or address was declared, to point at it again.
/// (key in `Inventory::locs`, name, tenant, location of the name, addresses) of every item.
type Item<'a> = (String, &'a str, Option<&'a str>, Loc, &'a [IpNet]);

fn items(inv: &Inventory) -> Vec<Item<'_>> {
    let workloads = inv.workloads.iter().enumerate().map(|(i, w)| {
        (
            format!("workload#{i}"),
            w.name.as_str(),
            w.tenant.as_deref(),
            w.loc,
            w.ips.as_slice(),
        )
    });
    let endpoints = inv.endpoints.iter().enumerate().map(|(i, e)| {
        (
            format!("endpoint#{i}"),
            e.name.as_str(),
            e.tenant.as_deref(),
            e.loc,
            e.ips.as_slice(),
        )
    });
    workloads.chain(endpoints).collect()
}

fn check_semantics(file: &Path, inv: &Inventory, diags: &mut Diagnostics) {
    let at = |loc: Loc, msg: String| Diagnostic::new(file, loc.line, loc.column, msg);

    // Tenants: unique.
    let mut tenants: HashMap<&str, Loc> = HashMap::new();
    for t in &inv.tenants {
        if let Some(first) = tenants.insert(&t.name, t.loc) {
            diags.push(at(
                t.loc,
                format!(
                    "duplicate tenant `{}` (first declared at line {})",
                    t.name, first.line
                ),
            ));
        }
    }
    let known_tenants = || {
        let names: BTreeSet<&str> = inv.tenants.iter().map(|t| t.name.as_str()).collect();
        names.into_iter().collect::<Vec<_>>().join(", ")
    };

    // Names: unique across workloads and endpoints; `world` is the reserved WORLD identity.
    let items = items(inv);
    let mut names: HashMap<&str, Loc> = HashMap::new();
    for (_, name, _, loc, _) in &items {
        if *name == crate::identity::WORLD_NAME {
            diags.push(
                at(*loc, format!("the name `{name}` is reserved"))
                    .with_hint("`world` is the identity of every address not in the inventory"),
            );
        }
        if let Some(first) = names.insert(name, *loc) {
            diags.push(at(
                *loc,
                format!(
                    "duplicate name `{name}` (first declared at line {})",
                    first.line
                ),
            ));
        }
    }

    // Tenants referenced must be declared.
    let field_loc = |key: &str, field: String, fallback: Loc| {
        inv.locs
            .get(&(key.to_string(), field))
            .copied()
            .unwrap_or(fallback)
    };
    for (key, name, tenant, loc, _) in &items {
        if let Some(t) = tenant {
            if !tenants.contains_key(t) {
                diags.push(
                    at(
                        field_loc(key, "tenant".into(), *loc),
                        format!("`{name}`: unknown tenant `{t}`"),
                    )
                    .with_hint(format!("declared tenants: {}", known_tenants())),
                );
            }
        }
    }

    // Addresses: the same CIDR twice is ambiguous; overlapping CIDRs of two tenants would let
    // one tenant's address stand for another's.
    let mut claims: Vec<(&IpNet, &str, &str, Option<&str>, Loc)> = Vec::new();
    for (key, name, tenant, item_loc, ips) in &items {
        for ip in ips.iter() {
            let loc = &field_loc(key, format!("ip:{ip}"), *item_loc);
            for (other, okey, oname, otenant, oloc) in &claims {
                if *other == ip && okey != key {
                    diags.push(at(
                        *loc,
                        format!(
                            "`{name}`: {ip} is already claimed by `{oname}` (line {})",
                            oloc.line
                        ),
                    ));
                } else if ip.overlaps(other) && otenant != tenant {
                    diags.push(
                        at(
                            *loc,
                            format!(
                                "`{name}`: {ip} (tenant {}) overlaps {other} of `{oname}` (tenant {}, line {})",
                                tenant.unwrap_or("none"),
                                otenant.unwrap_or("none"),
                                oloc.line
                            ),
                        )
                        .with_hint("an address may belong to one tenant only"),
                    );
                }
            }
            claims.push((ip, key, name, *tenant, *loc));
        }
    }

    // Cgroups: one workload each.
    let mut cgroups: HashMap<&str, (&str, Loc)> = HashMap::new();
    for w in &inv.workloads {
        for c in &w.cgroups {
            if let Some((other, oloc)) = cgroups.insert(c, (&w.name, w.loc)) {
                if other != w.name {
                    diags.push(at(
                        w.loc,
                        format!(
                            "`{}`: cgroup `{c}` is already claimed by `{other}` (line {})",
                            w.name, oloc.line
                        ),
                    ));
                }
            }
        }
    }

    // ATLAS IDs of the defaults.
    for id in inv
        .defaults
        .implicit_deny_atlas
        .iter()
        .chain(&inv.defaults.unknown_subject_atlas)
    {
        if crate::atlas::lookup(id).is_none() {
            let loc = inv.defaults_locs.get(id).copied().unwrap_or_default();
            diags.push(
                at(loc, format!("unknown ATLAS technique `{id}`")).with_hint(format!(
                    "IDs look like AML.T0012 or AML.T0085.000 (ATLAS {})",
                    crate::atlas::version()
                )),
            );
        }
    }
}
