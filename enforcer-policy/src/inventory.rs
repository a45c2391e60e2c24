//! The inventory (`inventory.yaml`): tenants, workloads (subjects and destinations) and
//! endpoints (destinations only), parsed with exact source locations.
//!
//! The file is read as marked YAML events into a small located tree, then walked by hand, so
//! that every error (syntax, type, or semantic such as an unknown tenant or an overlapping
//! CIDR) names the line and column of the offending node, and every problem is reported, not
//! just the first.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::diagnostics::{Diagnostic, Diagnostics};
use crate::identity::{validate_spiffe_id, IpNet};
use crate::limits;
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

/// What the ingress check (`cgroup_skb/ingress` on the node that hosts a destination) does with
/// SYNs to it: `enforce` drops a SYN without a valid identity option or from an identity the
/// policy does not allow, `audit` reports the same without dropping, `off` (the default)
/// checks nothing. Off by default because `enforce` refuses every cluster peer whose node runs
/// no tagging enforcer yet: an operator turns it on per endpoint once every node tags (audit
/// first shows who would be refused).
// Ordered from least to most checked: a namespace's floor is a minimum (`max`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum IngressMode {
    #[default]
    Off,
    Audit,
    Enforce,
}

impl IngressMode {
    /// The `IDENTITIES` flags of this mode.
    pub fn flags(self) -> u32 {
        match self {
            IngressMode::Off => 0,
            IngressMode::Audit => enforcer_common::flags::INGRESS_AUDIT,
            IngressMode::Enforce => enforcer_common::flags::INGRESS_ENFORCE,
        }
    }
}

/// `step_up` on an endpoint: what the agent does when a subject reaches one of the endpoint's
/// datasets outside its learned neighbourhood (`enforcer run --learn`). Written
/// `step_up: { action: quarantine, ttl: 10m }` (or `step_up: quarantine`, TTL
/// [`StepUp::DEFAULT_TTL`]): the subject is quarantined for `ttl`, then released.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StepUp {
    pub action: StepUpAction,
    /// How long the quarantine lasts: from 1 s to [`StepUp::MAX_TTL`].
    pub ttl: std::time::Duration,
}

impl StepUp {
    pub const DEFAULT_TTL: std::time::Duration = std::time::Duration::from_secs(600);
    /// A week: a longer quarantine is a decision for a person (`enforcer quarantine add`).
    pub const MAX_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepUpAction {
    Quarantine,
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
    /// The ingress check on SYNs to this workload's addresses.
    pub ingress: IngressMode,
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
    /// `track: true`: flows to it are recorded (`flow.opened` / `flow.closed`, `enforcer
    /// flows`, revocation) although its kind is not `vector_db` (which is always tracked).
    pub track: bool,
    /// The ingress check on SYNs to this endpoint's addresses.
    pub ingress: IngressMode,
    /// `rate_limit`: each subject's connection budget to this endpoint ([`crate::rate`]).
    pub rate_limit: Option<crate::rate::RateLimitSpec>,
    /// What an anomalous first contact with this endpoint's datasets triggers.
    pub step_up: Option<StepUp>,
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
        match Inventory::parse_partial(file, text) {
            (Some(inv), diags) if diags.is_empty() => Ok(inv),
            (_, diags) => Err(diags),
        }
    }

    /// [`Inventory::parse`], also returning the inventory when it has problems (as far as it
    /// could be read; `None` only when the YAML itself is unusable), so that a bundle load can
    /// check it against the policies in the same run. With problems, items whose name is
    /// taken (a duplicate, or `world`) are left out of it: they are reported already and
    /// would only cause confusing follow-up errors.
    pub fn parse_partial(file: &Path, text: &str) -> (Option<Inventory>, Diagnostics) {
        let root = match parse_marked(text) {
            Ok(Some(root)) => root,
            Ok(None) => {
                return (
                    None,
                    Diagnostic::new(file, 1, 1, "the inventory is empty")
                        .with_hint("expected a mapping with `tenants`, `workloads` and `endpoints`")
                        .into(),
                )
            }
            Err(e) => return (None, e.at(file).into()),
        };
        let mut walker = Walker {
            file: file.to_path_buf(),
            diags: Diagnostics::default(),
            locs: HashMap::new(),
            accepted: HashMap::new(),
        };
        let mut inv = walker.inventory(&root);
        // The tree can be large (aliases expanded): free it before the checks.
        drop(root);
        inv.locs = std::mem::take(&mut walker.locs);
        let mut diags = walker.diags;
        check_semantics(file, &inv, &mut diags);
        if !diags.is_empty() {
            diags.sort();
            let mut seen = BTreeSet::new();
            let mut keep = |name: &String| {
                !crate::identity::RESERVED_NAMES.contains(&name.as_str())
                    && seen.insert(name.clone())
            };
            inv.workloads.retain(|w| keep(&w.name));
            inv.endpoints.retain(|e| keep(&e.name));
        }
        (Some(inv), diags)
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

/// A YAML problem found while building the tree: where, and what.
#[derive(Debug)]
struct YamlError {
    loc: Loc,
    message: String,
    hint: Option<String>,
}

impl YamlError {
    fn new(loc: Loc, message: impl Into<String>) -> Self {
        YamlError {
            loc,
            message: message.into(),
            hint: None,
        }
    }
    fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    fn at(self, file: &Path) -> Diagnostic {
        let d = Diagnostic::new(file, self.loc.line, self.loc.column, self.message);
        match self.hint {
            Some(h) => d.with_hint(h),
            None => d,
        }
    }
}

/// An open container: the node, its pending map key, its anchor, and the node count when it
/// was opened (its size is the count at its end minus that).
struct Open {
    node: Node,
    key: Option<Node>,
    anchor: usize,
    nodes_before: usize,
    /// Levels below it so far (0 for a container of scalars).
    height: usize,
}

/// Builds the tree from marked events, within [`limits::YAML_DEPTH`] and
/// [`limits::YAML_NODES`] (aliases count as the nodes they stand for: an alias is a copy).
#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    root: Option<Node>,
    /// Anchor id -> (node, nodes in it, levels in it).
    anchors: HashMap<usize, (Node, usize, usize)>,
    /// Nodes built so far, aliases expanded.
    nodes: usize,
}

impl Builder {
    fn loc(m: &Marker) -> Loc {
        Loc {
            line: m.line() as u32,
            column: m.col() as u32 + 1,
        }
    }

    fn count(&mut self, n: usize, loc: Loc) -> Result<(), YamlError> {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > limits::YAML_NODES {
            return Err(YamlError::new(
                loc,
                format!(
                    "the inventory grows past {} YAML nodes here (aliases count as the nodes they repeat)",
                    limits::YAML_NODES
                ),
            )
            .hint("an alias copies its anchor's node; aliases of aliases multiply (\"billion laughs\"): write the items out"));
        }
        Ok(())
    }

    /// A node `height` levels deep is about to be placed at the current level.
    fn check_depth(&self, height: usize, loc: Loc) -> Result<(), YamlError> {
        let depth = self.stack.len() + height + 1;
        if depth > limits::YAML_DEPTH {
            return Err(YamlError::new(
                loc,
                format!(
                    "YAML nested {depth} levels deep here; the limit is {}",
                    limits::YAML_DEPTH
                ),
            )
            .hint("the inventory's own structure is 5 levels deep"));
        }
        Ok(())
    }

    fn open(&mut self, value: Value, loc: Loc, anchor: usize) -> Result<(), YamlError> {
        self.check_depth(0, loc)?;
        self.count(1, loc)?;
        self.stack.push(Open {
            node: Node { value, loc },
            key: None,
            anchor,
            nodes_before: self.nodes - 1,
            height: 0,
        });
        Ok(())
    }

    /// Places a finished node (`size` nodes, `height` levels below it) in its parent. An
    /// anchored node is kept as a copy for its aliases: the copy counts as nodes too.
    fn push_value(
        &mut self,
        node: Node,
        anchor: usize,
        size: usize,
        height: usize,
    ) -> Result<(), YamlError> {
        if anchor > 0 {
            self.count(size, node.loc)?;
            self.anchors.insert(anchor, (node.clone(), size, height));
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(parent) => {
                parent.height = parent.height.max(height + 1);
                match &mut parent.node.value {
                    Value::Seq(items) => items.push(node),
                    Value::Map(entries) => match parent.key.take() {
                        None => parent.key = Some(node),
                        Some(k) => entries.push((k, node)),
                    },
                    Value::Scalar(..) => unreachable!("scalars have no children"),
                }
            }
        }
        Ok(())
    }

    fn no_tag(tag: &Option<yaml_rust2::parser::Tag>, loc: Loc) -> Result<(), YamlError> {
        match tag {
            None => Ok(()),
            Some(t) => Err(YamlError::new(
                loc,
                format!(
                    "YAML tags are not supported (`{}{}`)",
                    match t.handle.as_str() {
                        "tag:yaml.org,2002:" => "!!",
                        h => h,
                    },
                    t.suffix
                ),
            )
            .hint("remove the tag: every value of the inventory is read as text")),
        }
    }

    fn on_event(&mut self, ev: Event, mark: Marker) -> Result<(), YamlError> {
        let loc = Builder::loc(&mark);
        match ev {
            Event::Scalar(s, style, anchor, tag) => {
                Builder::no_tag(&tag, loc)?;
                self.check_depth(0, loc)?;
                self.count(1, loc)?;
                let plain = style == TScalarStyle::Plain;
                let node = Node {
                    value: Value::Scalar(s, plain),
                    loc,
                };
                self.push_value(node, anchor, 1, 0)?;
            }
            Event::SequenceStart(anchor, tag) => {
                Builder::no_tag(&tag, loc)?;
                self.open(Value::Seq(vec![]), loc, anchor)?;
            }
            Event::MappingStart(anchor, tag) => {
                Builder::no_tag(&tag, loc)?;
                self.open(Value::Map(vec![]), loc, anchor)?;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(mut open) = self.stack.pop() {
                    // A block mapping's start mark is unreliable; its first key is exact.
                    if let Value::Map(entries) = &open.node.value {
                        if let Some((k, _)) = entries.first() {
                            open.node.loc = k.loc;
                        }
                    }
                    let size = self.nodes - open.nodes_before;
                    self.push_value(open.node, open.anchor, size, open.height)?;
                }
            }
            Event::Alias(id) => {
                let Some((size, height)) = self.anchors.get(&id).map(|(_, s, h)| (*s, *h)) else {
                    return Err(YamlError::new(
                        loc,
                        "this alias refers to a node that contains it",
                    )
                    .hint("a node cannot repeat itself; write the items out"));
                };
                // Checked before the copy is made.
                self.check_depth(height, loc)?;
                self.count(size, loc)?;
                let Some(mut node) = self.anchors.get(&id).map(|(n, _, _)| n.clone()) else {
                    unreachable!("looked up above")
                };
                // Errors in the copy point at the alias, the place it is used.
                node.loc = loc;
                self.push_value(node, 0, size, height)?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// `loc`, or the end of `text` when `loc` lies past it: the scanner reports an error at the
/// end of input on the line after the last one when the file does not end in a newline, and
/// a location must name a place the file has.
fn within_text(loc: Loc, text: &str) -> Loc {
    let lines = text.lines().count().max(1) as u32;
    if loc.line <= lines {
        return loc;
    }
    let last = text.lines().last().unwrap_or("");
    Loc {
        line: lines,
        column: last.chars().count() as u32 + 1,
    }
}

/// The single YAML document of `text` as a located tree (`None`: empty). The events are
/// pulled one by one (the parser's own `load` recurses per nesting level, before any bound
/// could be checked); a second document is an error, not ignored.
fn parse_marked(text: &str) -> Result<Option<Node>, YamlError> {
    let mut b = Builder::default();
    let mut parser = Parser::new_from_str(text);
    let mut documents = 0;
    loop {
        let (ev, mark) = parser.next_token().map_err(|e| {
            let m = e.marker();
            let loc = within_text(
                Loc {
                    line: m.line() as u32,
                    column: m.col() as u32 + 1,
                },
                text,
            );
            // The scanner looks ahead, and stops at 255 open flow brackets before the builder
            // has seen the 33rd: the same limit, exceeded further on.
            if e.info().contains("recursion limit exceeded") {
                YamlError::new(
                    loc,
                    format!(
                        "YAML nested more than 255 levels deep here; the limit is {}",
                        limits::YAML_DEPTH
                    ),
                )
            } else {
                YamlError::new(loc, format!("YAML syntax error: {}", e.info()))
            }
        })?;
        match ev {
            Event::StreamEnd => break,
            Event::DocumentStart => {
                documents += 1;
                if documents > 1 {
                    return Err(YamlError::new(
                        Builder::loc(&mark),
                        "a second YAML document starts here; the inventory is one document",
                    )
                    .hint("remove the `---` (or `...`) line: what follows it would not be read"));
                }
            }
            ev => b.on_event(ev, mark)?,
        }
    }
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
            // Names, kinds and IDs are printed (explain, logs): a line break or an escape
            // sequence in one would forge output lines or drive the terminal.
            Value::Scalar(s, _) if s.chars().any(char::is_control) => {
                self.err(
                    node.loc,
                    format!(
                        "{what} {s:?} contains a control character (a line break, tab, escape...)"
                    ),
                );
                // Still the field's value (the bundle is rejected anyway): no second error
                // saying the field is missing.
                Some(s.clone())
            }
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

    /// The addresses of one item, each in its canonical form ([`canonical_net`]); the same
    /// network twice (in any spelling) is an error.
    fn ips(&mut self, node: &Node) -> Vec<(IpNet, Loc)> {
        let mut out: Vec<(IpNet, Loc)> = Vec::new();
        for item in self.seq(node, "ips") {
            let Some(s) = self.string(item, "an IP address or CIDR") else {
                continue;
            };
            match canonical_net(&s) {
                Ok(net) => {
                    if let Some((_, first)) = out.iter().find(|(n, _)| *n == net) {
                        let line = first.line;
                        self.err(
                            item.loc,
                            format!("`{s}` is {net}, already listed on line {line}"),
                        );
                    } else {
                        out.push((net, item.loc));
                    }
                }
                Err((msg, hint)) => {
                    self.err_hint(item.loc, format!("invalid IP or CIDR `{s}`: {msg}"), hint)
                }
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
                    "protocol" => match self.string(v, "protocol") {
                        Some(text) => match text.parse::<Protocol>() {
                            Ok(p) => protocol = p,
                            Err(_) => {
                                ok = false;
                                self.err_hint(
                                    v.loc,
                                    format!("invalid protocol `{text}`"),
                                    "use `tcp` or `udp` (lowercase)",
                                );
                            }
                        },
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

    /// An endpoint's `rate_limit` ([`crate::rate`]); every bad field is reported with its
    /// location, and the limit is then left out (the bundle is rejected anyway).
    fn rate_limit(&mut self, node: &Node) -> Option<crate::rate::RateLimitSpec> {
        let fields = self.map(node, "rate_limit", &crate::rate::FIELDS)?;
        let mut values: [Option<i64>; 3] = [None; 3];
        let mut ok = true;
        // Every problem at once: a missing rate is reported beside a bad burst, but not
        // beside a bad rate (reported already).
        let rate_given = fields.iter().any(|(k, _)| *k == "connections_per_second");
        for (k, v) in fields {
            let text = match &v.value {
                Value::Scalar(s, _) => s.clone(),
                _ => String::new(),
            };
            match crate::rate::parse_field(k, &text) {
                Ok(n) => {
                    let i = crate::rate::FIELDS.iter().position(|f| *f == k);
                    values[i.expect("`map` lets through only the fields it was given")] = Some(n);
                }
                Err((what, hint)) => {
                    ok = false;
                    self.err_hint(v.loc, what, hint);
                }
            }
        }
        let [per_second, burst, halving] = values;
        let Some(per_second_e4) = per_second else {
            if !rate_given {
                self.err(
                    node.loc,
                    "rate_limit: missing field `connections_per_second`",
                );
            }
            return None;
        };
        if !ok {
            return None;
        }
        Some(crate::rate::RateLimitSpec::from_fields(
            per_second_e4,
            burst.map(|b| b as u64),
            halving,
            node.loc,
        ))
    }

    fn ingress(&mut self, node: &Node) -> IngressMode {
        match self.string(node, "ingress").as_deref() {
            None | Some("off") => IngressMode::Off,
            Some("audit") => IngressMode::Audit,
            Some("enforce") => IngressMode::Enforce,
            Some(other) => {
                self.err_hint(
                    node.loc,
                    format!("unknown ingress mode `{other}`"),
                    "enforce | audit | off",
                );
                IngressMode::Off
            }
        }
    }

    /// `step_up: quarantine` or `step_up: { action: quarantine, ttl: 10m }`.
    fn step_up(&mut self, node: &Node) -> Option<StepUp> {
        const HINT: &str = "step_up: { action: quarantine, ttl: 10m } (ttl from 1s to 7d)";
        let action = |walker: &mut Self, node: &Node| match walker.string(node, "step_up action") {
            Some(a) if a == "quarantine" => Some(StepUpAction::Quarantine),
            Some(other) => {
                walker.err_hint(node.loc, format!("unknown step_up action `{other}`"), HINT);
                None
            }
            None => None,
        };
        if let Value::Scalar(..) = node.value {
            return Some(StepUp {
                action: action(self, node)?,
                ttl: StepUp::DEFAULT_TTL,
            });
        }
        let fields = self.map(node, "step_up", &["action", "ttl"])?;
        let mut step_up = StepUp {
            action: StepUpAction::Quarantine,
            ttl: StepUp::DEFAULT_TTL,
        };
        let mut has_action = false;
        let mut ok = true;
        // Every problem at once: a missing action is reported beside a bad ttl, but not
        // beside a bad action (reported already).
        let action_given = fields.iter().any(|(k, _)| *k == "action");
        for (k, v) in fields {
            match k {
                "action" => match action(self, v) {
                    Some(a) => (step_up.action, has_action) = (a, true),
                    None => ok = false,
                },
                "ttl" => {
                    let text = self.string(v, "ttl").unwrap_or_default();
                    match humantime::parse_duration(&text) {
                        Ok(ttl) if (Duration::from_secs(1)..=StepUp::MAX_TTL).contains(&ttl) => {
                            step_up.ttl = ttl
                        }
                        Ok(_) => {
                            ok = false;
                            self.err_hint(
                                v.loc,
                                format!("step_up ttl `{text}` is out of range"),
                                HINT,
                            );
                        }
                        Err(error) => {
                            ok = false;
                            self.err_hint(
                                v.loc,
                                format!("invalid step_up ttl `{text}`: {error}"),
                                HINT,
                            );
                        }
                    }
                }
                _ => unreachable!("`map` lets through only the fields it was given"),
            }
        }
        if !action_given {
            self.err_hint(node.loc, "step_up: missing field `action`", HINT);
            return None;
        }
        ok &= has_action;
        ok.then_some(step_up)
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
                "ingress",
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
            ingress: IngressMode::Off,
            loc: node.loc,
        };
        for (k, v) in fields {
            match k {
                "ingress" => w.ingress = self.ingress(v),
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
            &[
                "name",
                "tenant",
                "kind",
                "ips",
                "ports",
                "datasets",
                "track",
                "ingress",
                "rate_limit",
                "step_up",
            ],
        )?;
        let mut item = ItemFields::default();
        let mut step_up_at = None;
        let mut e = Endpoint {
            name: String::new(),
            tenant: None,
            kind: String::new(),
            ips: vec![],
            ports: vec![],
            datasets: vec![],
            track: false,
            ingress: IngressMode::Off,
            rate_limit: None,
            step_up: None,
            loc: node.loc,
        };
        for (k, v) in fields {
            match k {
                "ingress" => e.ingress = self.ingress(v),
                "rate_limit" => e.rate_limit = self.rate_limit(v),
                "kind" => e.kind = self.string(v, "kind").unwrap_or_default(),
                "track" => e.track = self.bool(v, "track"),
                "step_up" => {
                    step_up_at = Some(v.loc);
                    e.step_up = self.step_up(v)
                }
                "datasets" => {
                    let datasets = self.strings(v, "datasets");
                    for (name, at) in &datasets {
                        // The learner names a pod's datasets `<tenant>/<dataset>` and a
                        // destination without datasets `endpoint:<name>`: an operator's name
                        // of either form could be pre-learned or burnt by a tenant's pod
                        // (red-team review 39).
                        if name.contains('/') || name.starts_with("endpoint:") {
                            self.err_hint(
                                *at,
                                format!("dataset `{name}`: `/` and the prefix `endpoint:` are reserved"),
                                "a pod's datasets are learned as `<tenant>/<dataset>`, a destination without datasets as `endpoint:<name>`; name yours otherwise (e.g. `acme-kb`)",
                            );
                        }
                    }
                    e.datasets = datasets.into_iter().map(|(s, _)| s).collect()
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
        if let Some(known) = near_miss_kind(&e.kind) {
            // `vector_db` turns on tracking, the identity option and every policy reading
            // the kind: a typo silently turned all of that off (review 40).
            self.err_hint(
                e.loc,
                format!(
                    "endpoint `{}`: kind `{}` is not a known kind: did you mean `{known}`?",
                    e.name, e.kind
                ),
                format!(
                    "{}; a kind of your own must not be a near-miss of one of them",
                    KNOWN_KINDS.join(" | ")
                ),
            );
        }
        // A step-up acts on the first contact a flow record reports: an untracked endpoint
        // has none, so its step-up could never fire (red-team review 39).
        if let (Some(at), false, false) = (
            step_up_at,
            e.kind == "vector_db" || e.track,
            e.kind.is_empty(),
        ) {
            self.err_hint(
                at,
                format!(
                    "endpoint `{}`: step_up needs a tracked endpoint (kind `{}` is not tracked)",
                    e.name, e.kind
                ),
                "add `track: true` to the endpoint (kind vector_db is tracked by itself)",
            );
        }
        Some(e)
    }
}

/// The endpoint kinds the product (`vector_db`: tracked, tagged) and the usual policies read.
const KNOWN_KINDS: [&str; 4] = ["vector_db", "feature_store", "model_registry", "llm_api"];

/// The known kind `kind` is a near-miss of (another case or separator, or at most two edits
/// away), if it is not one itself.
fn near_miss_kind(kind: &str) -> Option<&'static str> {
    if kind.is_empty() || KNOWN_KINDS.contains(&kind) {
        return None;
    }
    let folded = kind.to_ascii_lowercase().replace(['-', ' ', '.'], "_");
    KNOWN_KINDS
        .iter()
        .find(|known| folded == **known || strsim::levenshtein(&folded, known) <= 2)
        .copied()
}

// ---------------------------------------------------------------------------------------------
// Addresses: one spelling per address.

/// An inventory address or network in the one form the kernel's maps and the overlap checks
/// use, or why it is refused (message, hint). The kernel judges an IPv4-mapped IPv6
/// destination (`::ffff:a.b.c.d`) as IPv4, so two spellings of one address must become one
/// entry:
///
/// - IPv4-mapped IPv6 hosts and networks (`::ffff:0:0/96` and longer) become IPv4
///   (`::ffff:10.0.0.0/120` is `10.0.0.0/24`); a shorter IPv6 network that spans the
///   mapped range is refused (its IPv4 part would never match);
/// - host bits after the prefix (`10.0.0.5/24`) are refused, not normalised: the writer
///   meant either the host or the network, and the hint names both;
/// - a network containing an unspecified address (`0.0.0.0`, `::`; so also `0.0.0.0/0` and
///   `::/0`) is refused: the kernel sends `0.0.0.0` to loopback, and a catch-all would give
///   every address not otherwise listed to one item (they belong to WORLD);
/// - the deprecated IPv4-compatible form `::a.b.c.d` (inside `::/96`, other than `::1`) is
///   refused: it is not the IPv4 address it looks like;
/// - zone ids (`fe80::1%eth0`), leading zeros in IPv4 (`010.0.0.1`, octal to some tools)
///   and prefix lengths other than plain decimal (`/024`, `/+24`) are refused.
pub fn canonical_net(s: &str) -> Result<IpNet, (String, String)> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let refuse = |msg: String, hint: &str| Err((msg, hint.to_string()));
    let form = "write an IPv4 or IPv6 address, optionally with a prefix: 127.10.1.2/32";
    let (addr_text, prefix_text) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    if addr_text.contains('%') {
        return refuse(
            "zone ids are not supported".into(),
            "an inventory address means the same on every interface: write it without `%zone`",
        );
    }
    let addr: IpAddr = match addr_text.parse() {
        Ok(a) => a,
        Err(_) => {
            let leading_zero = addr_text.split('.').any(|o| {
                o.len() > 1 && o.starts_with('0') && o.bytes().all(|b| b.is_ascii_digit())
            });
            return if leading_zero && addr_text.contains('.') {
                refuse(
                    "leading zeros in an IPv4 address".into(),
                    "some tools read `010` as octal (8): write the octets in plain decimal",
                )
            } else {
                refuse("not an IP address".into(), form)
            };
        }
    };
    let width: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix_text {
        None => width,
        Some(p) => {
            let plain = !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (p == "0" || !p.starts_with('0'));
            match p.parse::<u8>() {
                Ok(n) if plain && n <= width => n,
                _ => {
                    return refuse(
                        format!("the prefix length must be 0 to {width}, in plain decimal"),
                        form,
                    )
                }
            }
        }
    };
    let bits = |a: IpAddr| match a {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    };
    let mask = |prefix: u8, width: u8| -> u128 {
        let all = if width == 32 { 0xffff_ffff } else { !0u128 };
        if prefix == 0 {
            0
        } else {
            (all << (width - prefix)) & all
        }
    };
    let host = bits(addr) & !mask(prefix, width) & mask(width, width);
    if host != 0 {
        let network = bits(addr) & mask(prefix, width);
        let network = match addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(network as u32)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(network)),
        };
        return Err((
            "host bits are set after the prefix".into(),
            format!("write the network {network}/{prefix}, or the single address {addr}/{width}"),
        ));
    }
    let net = match addr {
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() && prefix >= 96 => IpNet {
            addr: IpAddr::V4(a.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)),
            prefix: prefix - 96,
        },
        _ => IpNet { addr, prefix },
    };
    let unspecified = match net.addr {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    if net.contains(&unspecified) {
        let which = if net.prefix == 0 {
            "it claims every address"
        } else {
            "it contains the unspecified address"
        };
        return refuse(
            format!("{net}: {which}"),
            "0.0.0.0 and :: are not destinations (the kernel sends them to loopback), and addresses no item lists belong to WORLD: list the item's own addresses",
        );
    }
    if let IpAddr::V6(a) = net.addr {
        let mapped = IpNet {
            addr: IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0)),
            prefix: 96,
        };
        if net.prefix < 96 && net.overlaps(&mapped) {
            return refuse(
                format!("{net} spans the IPv4-mapped range ::ffff:0:0/96"),
                "the kernel judges IPv4-mapped destinations as IPv4: list the IPv4 part separately, as IPv4",
            );
        }
        let compatible = IpNet {
            addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            prefix: 96,
        };
        if compatible.contains(&IpAddr::V6(a)) && a != Ipv6Addr::LOCALHOST {
            return refuse(
                format!("`{a}` is a deprecated IPv4-compatible IPv6 address"),
                "it is not the IPv4 address it shows: write the IPv4 address (a.b.c.d) or its mapped form ::ffff:a.b.c.d",
            );
        }
    }
    Ok(net)
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

    // Names: unique across workloads and endpoints, none of the reserved identities'.
    let items = items(inv);
    let mut names: HashMap<&str, Loc> = HashMap::new();
    for (_, name, _, loc, _) in &items {
        let why = match *name {
            crate::identity::WORLD_NAME => {
                "`world` is the identity of every address not in the inventory"
            }
            crate::identity::UNIDENTIFIED_NAME => {
                "`unidentified` holds the cluster addresses the agent refused to identify"
            }
            crate::identity::HOST_NAME => {
                "`host` is this node's addresses (Cedar `Node::\"host\"`)"
            }
            crate::identity::REMOTE_NODE_NAME => {
                "`remote-node` is the other nodes' addresses (Cedar `Node::\"remote-node\"`)"
            }
            _ => "",
        };
        if !why.is_empty() {
            diags.push(at(*loc, format!("the name `{name}` is reserved")).with_hint(why));
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

#[cfg(test)]
mod ingress_tests {
    use super::*;

    const BASE: &str = "tenants: [acme]\nendpoints:\n  - name: acme-vectors\n    tenant: acme\n    kind: vector_db\n    ips: [127.84.0.10/32]\n";

    #[test]
    fn ingress_mode_is_parsed_defaults_off_and_names_a_bad_value() {
        let f = Path::new("inventory.yaml");
        let inv = Inventory::parse(f, BASE).unwrap();
        assert_eq!(inv.endpoints[0].ingress, IngressMode::Off);
        for (text, mode) in [
            ("enforce", IngressMode::Enforce),
            ("audit", IngressMode::Audit),
            ("off", IngressMode::Off),
        ] {
            let inv = Inventory::parse(f, &format!("{BASE}    ingress: {text}\n")).unwrap();
            assert_eq!(inv.endpoints[0].ingress, mode);
        }
        let err = Inventory::parse(f, &format!("{BASE}    ingress: block\n")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("inventory.yaml:7") && text.contains("unknown ingress mode `block`"),
            "{text}"
        );
        assert_eq!(
            IngressMode::Enforce.flags(),
            enforcer_common::flags::INGRESS_ENFORCE
        );
    }

    #[test]
    fn rate_limit_is_parsed_defaulted_and_bad_values_are_located() {
        let f = Path::new("inventory.yaml");
        assert_eq!(
            Inventory::parse(f, BASE).unwrap().endpoints[0].rate_limit,
            None
        );
        let with = |body: &str| format!("{BASE}    rate_limit: {body}\n");
        let inv = Inventory::parse(
            f,
            &with("{connections_per_second: 2.5, burst: 4, risk_halving: 0.25}"),
        )
        .unwrap();
        let spec = inv.endpoints[0].rate_limit.clone().unwrap();
        assert_eq!(
            (spec.per_second_e4, spec.burst, spec.risk_halving_e4),
            (25_000, 4, Some(2_500))
        );
        // Default burst: one second's worth, rounded up.
        let inv = Inventory::parse(f, &with("{connections_per_second: 2.5}")).unwrap();
        let spec = inv.endpoints[0].rate_limit.clone().unwrap();
        assert_eq!((spec.burst, spec.risk_halving_e4), (3, None));
        for (body, column, message) in [
            (
                "{connections_per_second: 0}",
                42,
                "invalid connections_per_second `0`",
            ),
            (
                "{connections_per_second: -3}",
                42,
                "invalid connections_per_second `-3`",
            ),
            (
                "{connections_per_second: fast}",
                42,
                "invalid connections_per_second `fast`",
            ),
            (
                "{connections_per_second: 5, burst: 0}",
                52,
                "invalid burst `0`",
            ),
            (
                "{connections_per_second: 5, burst: 1.5}",
                52,
                "invalid burst `1.5`",
            ),
            (
                "{connections_per_second: 5, risk_halving: 0}",
                59,
                "invalid risk_halving `0`",
            ),
            ("{burst: 3}", 18, "missing field `connections_per_second`"),
            ("{connections_per_second: 5, rate: 3}", 0, "rate"),
        ] {
            let err = Inventory::parse(f, &with(body)).unwrap_err().to_string();
            let at = if column == 0 {
                "inventory.yaml:7:".to_string()
            } else {
                format!("inventory.yaml:7:{column}")
            };
            assert!(err.contains(&at) && err.contains(message), "{body}: {err}");
        }
        // Every problem at once: the missing rate beside the bad burst.
        let err = Inventory::parse(f, &with("{burst: 0}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing field `connections_per_second`")
                && err.contains("invalid burst `0`"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod step_up_tests {
    use super::*;

    const BASE: &str = "tenants: [acme]\nendpoints:\n  - name: acme-vectors\n    tenant: acme\n    kind: vector_db\n    ips: [127.93.0.10/32]\n";

    #[test]
    fn step_up_is_parsed_and_a_bad_one_is_located() {
        let f = Path::new("inventory.yaml");
        assert_eq!(
            Inventory::parse(f, BASE).unwrap().endpoints[0].step_up,
            None
        );
        let inv = Inventory::parse(
            f,
            &format!("{BASE}    step_up: {{action: quarantine, ttl: 3s}}\n"),
        )
        .unwrap();
        assert_eq!(
            inv.endpoints[0].step_up,
            Some(StepUp {
                action: StepUpAction::Quarantine,
                ttl: Duration::from_secs(3)
            })
        );
        let inv = Inventory::parse(f, &format!("{BASE}    step_up: quarantine\n")).unwrap();
        assert_eq!(inv.endpoints[0].step_up.unwrap().ttl, StepUp::DEFAULT_TTL);
        for (text, wanted) in [
            (
                "{action: quarantine, ttl: soon}",
                "inventory.yaml:7:40: error: invalid step_up ttl `soon`",
            ),
            (
                "{action: quarantine, ttl: 30d}",
                "inventory.yaml:7:40: error: step_up ttl `30d` is out of range",
            ),
            (
                "{action: throttle, ttl: 1m}",
                "inventory.yaml:7:23: error: unknown step_up action `throttle`",
            ),
            (
                "{ttl: 1m}",
                "inventory.yaml:7:15: error: step_up: missing field `action`",
            ),
            (
                "{action: quarantine, tll: 1m}",
                "inventory.yaml:7:35: error: step_up: unknown field `tll`",
            ),
        ] {
            let err = Inventory::parse(f, &format!("{BASE}    step_up: {text}\n")).unwrap_err();
            let err = err.to_string();
            assert!(err.contains(wanted), "{text}: {err}");
        }
        // Every problem at once: the missing action beside the bad ttl.
        let err = Inventory::parse(f, &format!("{BASE}    step_up: {{ttl: soon}}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("7:15: error: step_up: missing field `action`")
                && err.contains("7:20: error: invalid step_up ttl `soon`"),
            "{err}"
        );
    }

    /// A dataset name of the learner's own forms (`<tenant>/<dataset>`, `endpoint:<name>`)
    /// is refused: a tenant's pod could pre-learn or burn it (red-team review 39).
    #[test]
    fn dataset_names_of_the_learners_own_forms_are_refused() {
        let f = Path::new("inventory.yaml");
        for name in ["acme/kb", "endpoint:acme-vectors"] {
            let err = Inventory::parse(f, &format!("{BASE}    datasets: [\"{name}\"]\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("inventory.yaml:7:16: error: dataset `{name}`: `/` and the prefix `endpoint:` are reserved")),
                "{name}: {err}"
            );
        }
        assert!(Inventory::parse(f, &format!("{BASE}    datasets: [acme-kb]\n")).is_ok());
    }

    /// A near-miss of a known kind is refused with the kind it likely meant (review 40); a
    /// kind of one's own that is no near-miss is accepted.
    #[test]
    fn a_near_miss_of_a_known_kind_is_refused() {
        let f = Path::new("inventory.yaml");
        for (kind, meant) in [
            ("vectordb", "vector_db"),
            ("Vector-DB", "vector_db"),
            ("Feature-Store", "feature_store"),
            ("llm-api", "llm_api"),
        ] {
            let text = BASE.replace("kind: vector_db", &format!("kind: {kind}"));
            let err = Inventory::parse(f, &text).unwrap_err().to_string();
            assert!(
                err.contains(&format!(
                    "kind `{kind}` is not a known kind: did you mean `{meant}`?"
                )),
                "{kind}: {err}"
            );
        }
        let own = BASE.replace("kind: vector_db", "kind: reranker");
        assert!(Inventory::parse(f, &own).is_ok());
    }

    /// A step-up acts on the first contact a flow record reports: on an untracked endpoint
    /// it could never fire, so it is refused where it is written (red-team review 39).
    #[test]
    fn a_step_up_needs_a_tracked_endpoint() {
        let f = Path::new("inventory.yaml");
        let store = "tenants: [acme]\nendpoints:\n  - name: acme-store\n    tenant: acme\n    kind: feature_store\n    ips: [127.93.0.11/32]\n";
        let err = Inventory::parse(f, &format!("{store}    step_up: quarantine\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("inventory.yaml:7:14: error: endpoint `acme-store`: step_up needs a tracked endpoint"),
            "{err}"
        );
        let tracked = format!("{store}    track: true\n    step_up: quarantine\n");
        assert!(Inventory::parse(f, &tracked).unwrap().endpoints[0]
            .step_up
            .is_some());
    }
}
