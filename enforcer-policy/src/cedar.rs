//! Cedar: the schema, the policies with their annotations and source locations, the entities
//! built from the inventory, and the oracle that asks Cedar about one cell.
//!
//! Entity model (documented for users in `policies/README.md`):
//! - principal and resource `Workload::"<name>"`: tenant, purpose, ring, spiffe_id (String,
//!   "" when not set) and risk (decimal);
//! - resource `Endpoint::"<name>"`: tenant, kind (String), datasets (`Set<String>`);
//! - resource `World::"world"`: no attributes;
//! - resource `Node::"host"` (this node's addresses) and `Node::"remote-node"` (every other
//!   node's): no attributes; only where the schema declares `entity Node` (else the nodes'
//!   addresses are UNIDENTIFIED, see `Engine::nodes_unidentified`);
//! - action `Action::"<action>"` of the destination's port (`connect` for any port);
//! - context `{ port: Long, protocol: String }` (the call's port; see `ports` for how a
//!   destination without declared ports is asked).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, PolicyId, PolicySet, Request, RestrictedExpression, Schema, ValidationMode,
    Validator,
};
use serde_json::Value as Json;

use crate::atlas;
use crate::diagnostics::{line_col, Diagnostic, Diagnostics};
use crate::identity::{Identities, Identity, IdentityKind};
use crate::inventory::Inventory;
use crate::{Effect, PolicyRef, Protocol};

/// What the policies read: the only inputs a decision can depend on, besides the action and
/// the context. Computed from the policies' JSON form; see `compile` for how it is used.
#[derive(Clone, Debug, Default)]
pub(crate) struct Analysis {
    /// Attribute names accessed anywhere (`.attr`, `has attr`).
    pub attrs: BTreeSet<String>,
    /// Entity UIDs named anywhere (scope constraints and literals), as (type, id).
    pub uids: HashSet<(String, String)>,
    /// A policy uses `principal` or `resource` as a value other than through an attribute,
    /// a type test, or a comparison with literal entities (e.g. `principal == resource`):
    /// then every entity's UID matters.
    pub uid_sensitive: bool,
    /// A policy uses `context` as a whole value: then both port and protocol matter.
    pub context_whole: bool,
    /// Entities named by a literal whose attributes a policy reads (`Workload::"w".tenant`):
    /// every decision may depend on their attributes, so a compile can only reuse answers
    /// of another inventory if these entities are unchanged in it.
    pub derefs: BTreeSet<(String, String)>,
}

impl Analysis {
    pub fn reads_port(&self) -> bool {
        self.context_whole || self.attrs.contains("port")
    }
    pub fn reads_protocol(&self) -> bool {
        self.context_whole || self.attrs.contains("protocol")
    }

    fn add_policy(&mut self, json: &Json) {
        for scope in ["principal", "action", "resource"] {
            if let Some(s) = json.get(scope) {
                self.collect_uids(s);
            }
        }
        if let Some(conds) = json.get("conditions").and_then(Json::as_array) {
            for c in conds {
                if let Some(body) = c.get("body") {
                    self.walk(body, false);
                }
            }
        }
    }

    /// Every `{"type": T, "id": I}` object below `v`.
    fn collect_uids(&mut self, v: &Json) {
        match v {
            Json::Object(m) => {
                if let (Some(Json::String(t)), Some(Json::String(i)), 2) =
                    (m.get("type"), m.get("id"), m.len())
                {
                    self.uids.insert((t.clone(), i.clone()));
                }
                m.values().for_each(|x| self.collect_uids(x));
            }
            Json::Array(a) => a.iter().for_each(|x| self.collect_uids(x)),
            _ => {}
        }
    }

    /// `var_ok`: a bare variable here is harmless (it is only dereferenced or type-tested).
    fn walk(&mut self, v: &Json, var_ok: bool) {
        let Json::Object(m) = v else {
            if let Json::Array(a) = v {
                a.iter().for_each(|x| self.walk(x, false));
            }
            return;
        };
        if m.len() == 1 {
            let (op, arg) = m.iter().next().unwrap();
            match op.as_str() {
                "Var" => {
                    match arg.as_str() {
                        Some("principal" | "resource") if !var_ok => self.uid_sensitive = true,
                        Some("context") if !var_ok => self.context_whole = true,
                        _ => {}
                    }
                    return;
                }
                "Value" => {
                    self.collect_uids(arg);
                    return;
                }
                "." | "has" => {
                    if let Some(Json::String(a)) = arg.get("attr") {
                        self.attrs.insert(a.clone());
                    }
                    if let Some(l) = arg.get("left") {
                        // Anything but a variable dereferenced: every entity literal in it
                        // may be the one read (conservative).
                        if l.get("Var").is_none() {
                            let mut named = Analysis::default();
                            named.collect_uids(l);
                            self.derefs.extend(named.uids);
                        }
                        self.walk(l, true);
                    }
                    return;
                }
                "is" => {
                    if let Some(l) = arg.get("left") {
                        self.walk(l, true);
                    }
                    if let Some(i) = arg.get("in") {
                        self.walk(i, false);
                    }
                    return;
                }
                "==" | "!=" | "in" => {
                    let (l, r) = (arg.get("left"), arg.get("right"));
                    if let (Some(l), Some(r)) = (l, r) {
                        // Comparing a variable with literal entities depends only on whether
                        // its UID is one of them, and named UIDs are in the signature.
                        let lit_l = is_entity_literal(l);
                        let lit_r = is_entity_literal(r);
                        self.walk(l, lit_r);
                        self.walk(r, lit_l);
                        return;
                    }
                }
                _ => {}
            }
        }
        for (_, x) in m {
            self.walk(x, false);
        }
    }
}

fn is_entity_literal(v: &Json) -> bool {
    match v {
        Json::Object(m) if m.len() == 1 => match m.iter().next().unwrap() {
            (k, x) if k == "Value" => {
                x.get("__entity").is_some()
                    || x.as_array()
                        .is_some_and(|a| a.iter().all(|e| e.get("__entity").is_some()))
            }
            (k, Json::Array(items)) if k == "Set" => items.iter().all(is_entity_literal),
            _ => false,
        },
        _ => false,
    }
}

/// Operations that can fail at evaluation time even in strictly validated policies. A failing
/// forbid is skipped by Cedar (which would turn the error into an allow), and a failing
/// permit is a latent bug: both are rejected.
fn can_error(v: &Json) -> Option<&'static str> {
    const OPS: [(&str, &str); 8] = [
        ("+", "integer addition can overflow"),
        ("-", "integer subtraction can overflow"),
        ("*", "integer multiplication can overflow"),
        ("neg", "integer negation can overflow"),
        ("getTag", "`getTag` fails when the tag is missing"),
        ("offset", "datetime `offset` can overflow"),
        ("durationSince", "`durationSince` can overflow"),
        ("toDate", "`toDate` can overflow"),
    ];
    match v {
        Json::Object(m) => {
            if m.len() == 1 {
                let (op, arg) = m.iter().next().unwrap();
                if let Some((_, why)) = OPS.iter().find(|(o, _)| o == op) {
                    return Some(why);
                }
                // Extension constructors are only safe on literals (validated up front).
                if matches!(op.as_str(), "decimal" | "ip" | "datetime" | "duration") {
                    if let Some(args) = arg.as_array() {
                        if args.iter().any(|a| a.get("Value").is_none()) {
                            return Some("an extension constructor on a computed string can fail");
                        }
                    }
                }
            }
            m.values().find_map(can_error)
        }
        Json::Array(a) => a.iter().find_map(can_error),
        _ => None,
    }
}

/// The result of one Cedar request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Answer {
    pub allowed: bool,
    /// Rule numbers of the determining policies (satisfied permits when allowed, satisfied
    /// forbids when denied; empty for an implicit deny).
    pub rules: Vec<u32>,
}

/// Schema, policies, entities, ready to answer requests.
pub(crate) struct Engine {
    schema: Schema,
    pset: PolicySet,
    /// Every policy, numbered: the number is `PolicyValue.rule`.
    pub rules: Vec<PolicyRef>,
    rule_of: HashMap<PolicyId, u32>,
    entities: Entities,
    /// The Cedar UID of each identity, by identity index.
    uids: Vec<EntityUid>,
    actions: HashMap<String, EntityUid>,
    /// What all policies read together.
    pub analysis: Analysis,
    /// Each policy alone (by rule number), with what it reads: compile evaluates policies
    /// one by one, grouped by each policy's own signature (see `compile`).
    pub singles: Vec<(PolicySet, Analysis)>,
    /// By rule number: the integer literals the policy compares `context.port` with, and
    /// where it first reads the port (see `ports`).
    pub port_reads: Vec<crate::ports::PortRead>,
    /// Node addresses made UNIDENTIFIED because the schema declares no `Node` entity type
    /// (see `Identities::nodes_unidentified`); 0 when it does.
    pub nodes_unidentified: usize,
    authorizer: Authorizer,
}

/// A Cedar error (a `miette::Diagnostic`) as located diagnostics in `file`.
fn located(file: &Path, text: &str, err: &dyn miette::Diagnostic, fallback: usize) -> Diagnostic {
    let offset = err
        .labels()
        .and_then(|mut l| l.next())
        .map(|l| l.offset())
        .unwrap_or(fallback);
    let mut message = err.to_string();
    // Cedar puts the useful detail of wrapper errors in related diagnostics.
    if let Some(related) = err.related() {
        for r in related {
            message.push_str(": ");
            message.push_str(&r.to_string());
        }
    }
    let d = Diagnostic::at_offset(file, text, offset, message);
    match err.help() {
        Some(h) => d.with_hint(h.to_string()),
        None => d,
    }
}

fn uid(ty: &str, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(type_name(ty), EntityId::new(id))
}

/// The `EntityTypeName` of `ty`. Parsing one runs Cedar's parser (a lexer built per call),
/// which dominated a load when done for every entity: the fixed types are parsed once.
fn type_name(ty: &str) -> EntityTypeName {
    use std::sync::OnceLock;
    const FIXED: [&str; 5] = ["Workload", "Endpoint", "World", "Node", "Action"];
    static PARSED: OnceLock<Vec<EntityTypeName>> = OnceLock::new();
    #[allow(clippy::expect_used)]
    let parse =
        |t: &str| EntityTypeName::from_str(t).expect("entity type names are fixed identifiers");
    match FIXED.iter().position(|&t| t == ty) {
        Some(i) => PARSED.get_or_init(|| FIXED.map(parse).to_vec())[i].clone(),
        None => parse(ty),
    }
}

pub(crate) fn action_uid(action: &str) -> EntityUid {
    uid("Action", action)
}

/// `RestrictedExpression::new_decimal(score)`, made once per score and thread: it parses
/// the extension's name with Cedar's parser on every call, which dominated building the
/// entities of thousands of cluster workloads.
fn decimal(score: &str) -> RestrictedExpression {
    use std::cell::RefCell;
    thread_local! {
        static MADE: RefCell<HashMap<String, RestrictedExpression>> = RefCell::new(HashMap::new());
    }
    MADE.with(|made| {
        let mut made = made.borrow_mut();
        if let Some(e) = made.get(score) {
            return e.clone();
        }
        // Scores are few (the inventory's, and run-time overrides): a bound, not a cache policy.
        if made.len() >= 1024 {
            made.clear();
        }
        let e = RestrictedExpression::new_decimal(score);
        made.insert(score.to_string(), e.clone());
        e
    })
}

pub(crate) fn entity(ident: &Identity) -> Result<Entity, String> {
    let s = |v: &Option<String>| RestrictedExpression::new_string(v.clone().unwrap_or_default());
    let mut attrs = HashMap::new();
    match ident.kind {
        IdentityKind::Workload => {
            attrs.insert("tenant".into(), s(&ident.tenant));
            attrs.insert("purpose".into(), s(&ident.purpose));
            attrs.insert("ring".into(), s(&ident.ring));
            attrs.insert("spiffe_id".into(), s(&ident.spiffe_id));
            attrs.insert("risk".into(), decimal(&ident.risk));
        }
        IdentityKind::Endpoint => {
            attrs.insert("tenant".into(), s(&ident.tenant));
            attrs.insert("kind".into(), s(&ident.endpoint_kind));
            attrs.insert(
                "datasets".into(),
                RestrictedExpression::new_set(
                    ident
                        .datasets
                        .iter()
                        .cloned()
                        .map(RestrictedExpression::new_string),
                ),
            );
        }
        IdentityKind::World
        | IdentityKind::Node
        | IdentityKind::Service
        | IdentityKind::Unidentified => {}
    }
    Entity::new(
        uid(ident.kind.cedar_type(), &ident.name),
        attrs,
        HashSet::new(),
    )
    .map_err(|e| e.to_string())
}

pub(crate) fn context(port: u16, protocol: Protocol) -> Context {
    #[allow(clippy::expect_used)]
    Context::from_pairs([
        (
            "port".to_string(),
            RestrictedExpression::new_long(port as i64),
        ),
        (
            "protocol".to_string(),
            RestrictedExpression::new_string(protocol.to_string()),
        ),
    ])
    .expect("a record of a long and a string is a valid context")
}

/// The policy files of a bundle, in name order.
pub(crate) struct Sources {
    pub schema: (PathBuf, String),
    pub policies: Vec<(PathBuf, String)>,
}

impl Engine {
    /// Parse and validate everything Cedar-related, collecting every problem in `diags`.
    /// Returns an engine only when there was no problem at all.
    pub fn load(
        src: &Sources,
        inv: Option<&Inventory>,
        ids: Option<&mut Identities>,
        diags: &mut Diagnostics,
    ) -> Option<Engine> {
        let start = diags.len();
        let (schema_file, schema_text) = &src.schema;
        let schema_bound = crate::limits::check_schema_text(
            schema_file,
            schema_text,
            crate::limits::SCHEMA_BRACKET_DEPTH,
        );
        let parsed_schema = match schema_bound {
            Some(d) => {
                diags.push(d);
                None
            }
            None => Some(Schema::from_cedarschema_str(schema_text)),
        };
        let schema = match parsed_schema {
            None => None,
            Some(Ok((schema, warnings))) => {
                for w in warnings {
                    tracing::warn!(file = %schema_file.display(), "schema: {w}");
                }
                Some(schema)
            }
            Some(Err(e)) => {
                diags.push(located(schema_file, schema_text, &e, 0));
                None
            }
        };
        // A schema written before nodes were entities: their addresses stay denied to all.
        // One that declares them is checked as if they had addresses, so that a mistake in
        // it shows when the bundle is written, not when the cluster's nodes first appear.
        let nodes_declared = schema.as_ref().is_some_and(|schema| {
            schema
                .entity_types()
                .any(|t| t.to_string() == IdentityKind::Node.cedar_type())
        });
        let mut nodes_unidentified = 0;
        let ids: Option<&Identities> = ids.map(|ids| {
            if schema.is_some() && !nodes_declared {
                nodes_unidentified = ids.nodes_unidentified();
            }
            &*ids
        });

        // Policies: each file parsed on its own, so spans are offsets into that file.
        let mut pset = PolicySet::new();
        let mut rules: Vec<PolicyRef> = Vec::new();
        let mut rule_of = HashMap::new();
        let mut file_of: HashMap<PolicyId, (usize, usize)> = HashMap::new(); // file index, offset
        let mut ann_ids: HashMap<String, (PathBuf, u32)> = HashMap::new();
        let mut analysis = Analysis::default();
        let mut singles: Vec<(PolicySet, Analysis)> = Vec::new();
        let mut port_reads: Vec<crate::ports::PortRead> = Vec::new();
        // Every distinct value `context.port` is compared with, across the bundle: each one
        // splits the ports of every destination without declared ports (see `ports`).
        let mut port_values: std::collections::BTreeSet<i64> = std::collections::BTreeSet::new();
        // Reads of entities the inventory lacks: they do not stand in the way of validation.
        let mut missing: Vec<Diagnostic> = Vec::new();
        for (fi, (file, text)) in src.policies.iter().enumerate() {
            // Bounded before Cedar's parser, which recurses per level, sees the text.
            if let Some(d) = crate::limits::check_cedar_text(
                file,
                text,
                crate::limits::CEDAR_BRACKET_DEPTH,
                crate::limits::CEDAR_EXPR_DEPTH,
            ) {
                diags.push(d);
                continue;
            }
            let parsed = match PolicySet::from_str(text) {
                Ok(p) => p,
                Err(errs) => {
                    for e in errs.iter() {
                        diags.push(located(file, text, e, 0));
                    }
                    continue;
                }
            };
            if parsed.policies().next().is_none() && parsed.templates().next().is_none() {
                diags.push(
                    Diagnostic::new(file, 1, 1, "no policy in this file (it is empty or only comments)")
                        .with_hint("an empty policy file is usually a truncated write; to remove its policies, delete the file"),
                );
            }
            // The core parser gives each policy's source location (same ids, same order).
            let core = cedar_policy_core::parser::parse_policyset(text).ok();
            for t in parsed.templates() {
                // At the template itself, named by its @id where it has one.
                let offset = core
                    .as_ref()
                    .and_then(|c| {
                        c.all_templates()
                            .find(|ct| {
                                AsRef::<str>::as_ref(ct.id()) == AsRef::<str>::as_ref(t.id())
                            })
                            .and_then(|ct| ct.loc().map(|l| l.start()))
                    })
                    .unwrap_or(0);
                let (line, column) = line_col(text, offset);
                let name = match t.annotation("id") {
                    Some(v) if !v.trim().is_empty() => v.to_string(),
                    _ => t.id().to_string(),
                };
                diags.push(
                    Diagnostic::new(file, line, column, format!("template `{name}` is not supported"))
                        .with_hint("write static policies; `?principal`/`?resource` slots have no meaning here"),
                );
            }
            let core_policy = |id: &PolicyId| {
                core.as_ref().and_then(|c| {
                    c.policies()
                        .find(|p| AsRef::<str>::as_ref(p.id()) == AsRef::<str>::as_ref(id))
                        .cloned()
                })
            };
            let fname = file.file_name().map_or_else(
                || file.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            let mut policies: Vec<_> = parsed.policies().collect();
            policies.sort_by_key(|p| {
                AsRef::<str>::as_ref(p.id())
                    .trim_start_matches("policy")
                    .parse::<u64>()
                    .unwrap_or(0)
            });
            for p in policies {
                let cp = core_policy(p.id());
                let offset = cp
                    .as_ref()
                    .and_then(|c| c.loc().map(|l| l.start()))
                    .unwrap_or(0);
                let (line, column) = line_col(text, offset);
                let ann_loc = |key: &str| -> (u32, u32) {
                    cp.as_ref()
                        .and_then(|c| {
                            c.annotations()
                                .find(|(k, _)| k.as_ref() == key)
                                .and_then(|(_, a)| a.loc.as_ref().map(|l| l.start()))
                        })
                        .map_or((line, column), |o| line_col(text, o))
                };
                let at = |(l, c): (u32, u32), msg: String| Diagnostic::new(file, l, c, msg);

                let new_id = PolicyId::new(format!("{fname}:{}", p.id()));
                let id = match p.annotation("id") {
                    // A line break or other control character in an id would split the
                    // line it is printed on (`policy explain`, logs) into lines that look
                    // like other output.
                    Some(v) if v.chars().any(char::is_control) => {
                        diags.push(at(
                            ann_loc("id"),
                            format!(
                                "@id {v:?} contains a control character (a line break, tab...)"
                            ),
                        ));
                        new_id.to_string()
                    }
                    Some(v) if !v.trim().is_empty() => v.to_string(),
                    Some(_) => {
                        diags.push(at(ann_loc("id"), "@id must not be empty".into()));
                        new_id.to_string()
                    }
                    None => new_id.to_string(),
                };
                if let Some((ofile, oline)) = ann_ids.get(&id) {
                    diags.push(at(
                        ann_loc("id"),
                        format!(
                            "duplicate policy id `{id}` (also {}:{oline})",
                            ofile.display()
                        ),
                    ));
                } else {
                    ann_ids.insert(id.clone(), (file.clone(), line));
                }
                let mut techniques = Vec::new();
                if let Some(list) = p.annotation("atlas") {
                    for tid in list.split(',').map(str::trim) {
                        match atlas::lookup(tid) {
                            Some(t) => techniques.push(t),
                            None => diags.push(
                                at(ann_loc("atlas"), format!("unknown ATLAS technique `{tid}`"))
                                    .with_hint(format!(
                                        "IDs look like AML.T0085.000; see enforcer-policy/data/atlas/techniques.tsv (ATLAS {})",
                                        atlas::version()
                                    )),
                            ),
                        }
                    }
                }
                let effect = match p.effect() {
                    cedar_policy::Effect::Permit => Effect::Permit,
                    cedar_policy::Effect::Forbid => Effect::Forbid,
                };
                // An annotation the enforcer does not read would silently not apply (a
                // `@quarantin` typo is a forbid that never quarantines): only these exist.
                const KNOWN: [&str; 4] = ["id", "atlas", "quarantine", "description"];
                for (key, _) in p.annotations() {
                    if !KNOWN.contains(&key) {
                        diags.push(
                            at(ann_loc(key), format!("unknown annotation `@{key}`")).with_hint(
                                "the enforcer reads @id, @atlas and @quarantine; @description is for people",
                            ),
                        );
                    }
                }
                let quarantine = p.annotation("quarantine").is_some();
                // `@quarantine("false")` would read as "do not quarantine" and quarantine.
                if p.annotation("quarantine").is_some_and(|v| !v.is_empty()) {
                    diags.push(
                        at(ann_loc("quarantine"), "@quarantine takes no value".into()).with_hint(
                            "write `@quarantine` alone to quarantine on this forbid, or remove it",
                        ),
                    );
                }
                if quarantine && effect == Effect::Permit {
                    diags.push(at(
                        ann_loc("quarantine"),
                        "@quarantine applies to forbid policies only".into(),
                    ));
                }
                match p.to_json() {
                    Ok(json) => {
                        analysis.add_policy(&json);
                        let mut own = Analysis::default();
                        own.add_policy(&json);
                        let mut single = PolicySet::new();
                        // An id clash is reported below, when the policy joins `pset`.
                        let _ = single.add(p.new_id(new_id.clone()));
                        singles.push((single, own));
                        if let (Some(ids), Some(cp)) = (ids, cp.as_ref()) {
                            for (ty, name, loc) in missing_derefs(cp, ids) {
                                let at_loc = loc.map_or((line, column), |o| line_col(text, o));
                                let hint = match ids.index_of(&name).map(|i| ids.at(i).kind) {
                                    Some(kind) => format!(
                                        "`{name}` in {} is of type {}, not {ty}",
                                        crate::INVENTORY_FILE,
                                        kind.cedar_type()
                                    ),
                                    None => format!(
                                        "no workload or endpoint named `{name}` in {}",
                                        crate::INVENTORY_FILE
                                    ),
                                };
                                missing.push(
                                    at(
                                        at_loc,
                                        format!("policy `{id}` reads attributes of {ty}::{name:?}, which does not exist"),
                                    )
                                    .with_hint(hint),
                                );
                            }
                        }
                        if let Some(why) = can_error(&json) {
                            diags.push(
                                at((line, column), format!("policy `{id}` can fail at evaluation time: {why}"))
                                    .with_hint("a failing forbid is skipped and would let the call through; rewrite the condition without it"),
                            );
                        }
                    }
                    Err(e) => {
                        diags.push(at((line, column), format!("policy `{id}`: {e}")));
                        singles.push((PolicySet::new(), Analysis::default()));
                    }
                }
                // `context.port` must be analysable (see `ports`): the compile asks Cedar
                // at its literals for destinations without declared ports.
                let (port_use, problems) =
                    cp.as_ref().map(crate::ports::analyse).unwrap_or_default();
                for pr in problems {
                    // Reported after validation, which they do not stand in the way of.
                    missing.push(
                        at(
                            line_col(text, pr.offset),
                            format!("policy `{id}`: {}", pr.message),
                        )
                        .with_hint(pr.hint),
                    );
                }
                let before = port_values.len();
                port_values.extend(port_use.literals.iter().copied());
                if port_values.len() > crate::ports::MAX_PORT_VALUES
                    && before <= crate::ports::MAX_PORT_VALUES
                {
                    missing.push(
                        at(
                            port_use
                                .first_read
                                .map(|o| line_col(text, o))
                                .unwrap_or((line, column)),
                            format!(
                                "policy `{id}`: the bundle compares `context.port` with {} distinct values up to here; the limit is {}",
                                port_values.len(),
                                crate::ports::MAX_PORT_VALUES
                            ),
                        )
                        .with_hint("each value splits the ports of every destination without declared ports, and the compile asks Cedar at each split; declare the ports on the destination in inventory.yaml instead"),
                    );
                }
                port_reads.push((
                    port_use.literals,
                    port_use.first_read.map(|o| line_col(text, o)),
                ));
                let rule = rules.len() as u32;
                rules.push(PolicyRef {
                    id,
                    effect,
                    file: file.clone(),
                    line,
                    atlas: techniques,
                    quarantine,
                });
                rule_of.insert(new_id.clone(), rule);
                file_of.insert(new_id.clone(), (fi, offset));
                if let Err(e) = pset.add(p.new_id(new_id)) {
                    diags.push(at((line, column), e.to_string()));
                }
            }
        }

        diags.0.extend(missing);
        let schema = schema?;
        // Every policy that parsed is validated, whatever else is wrong (in it or elsewhere):
        // one run lists every problem. A policy is named by its `@id` where it has one.
        let result = Validator::new(schema.clone()).validate(&pset, ValidationMode::Strict);
        for e in result.validation_errors() {
            let (fi, offset) = file_of.get(e.policy_id()).copied().unwrap_or((0, 0));
            let (file, text) = &src.policies[fi];
            let mut d = located(file, text, e, offset);
            if let Some(&rule) = rule_of.get(e.policy_id()) {
                let internal = format!("`{}`", e.policy_id());
                let named = format!("`{}`", rules[rule as usize].id);
                d.message = d.message.replace(&internal, &named);
            }
            diags.push(d);
        }

        // The inventory against the schema: entities and the actions of declared ports.
        let (Some(inv), Some(ids)) = (inv, ids) else {
            return None;
        };
        let schema_loc = |msg: String| Diagnostic::new(schema_file, 1, 1, msg);
        let mut uids = Vec::with_capacity(ids.len());
        let mut ents = Vec::with_capacity(ids.len());
        let mut entity_of: Vec<&Identity> = Vec::with_capacity(ids.len());
        for ident in ids.iter() {
            uids.push(uid(ident.kind.cedar_type(), &ident.name));
            if matches!(
                ident.kind,
                IdentityKind::Service | IdentityKind::Unidentified
            ) || (ident.kind == IdentityKind::Node && !nodes_declared)
            {
                // Judged as its backends, or never judged (nodes the schema does not
                // declare: their addresses are UNIDENTIFIED): no entity, and no request ever
                // names it.
                continue;
            }
            match entity(ident) {
                Ok(e) => {
                    ents.push(e);
                    entity_of.push(ident);
                }
                Err(e) => diags.push(item_diag(inv, ident, format!("`{}`: {e}", ident.name))),
            }
        }
        let entities = match Entities::from_entities(ents.clone(), Some(&schema)) {
            Ok(e) => Some(e),
            Err(_) => {
                // Find the culprits one by one, to point at them (one per kind and source:
                // every cluster workload has the same attribute types).
                let mut cluster_reported: HashSet<IdentityKind> = HashSet::new();
                for (ident, e) in entity_of.iter().copied().zip(&ents) {
                    if ident.is_cluster() && !cluster_reported.insert(ident.kind) {
                        continue;
                    }
                    if let Err(err) = Entities::from_entities([e.clone()], Some(&schema)) {
                        diags.push(
                            item_diag(
                                inv,
                                ident,
                                format!("`{}` does not fit the schema: {err}", ident.name),
                            )
                            .with_hint(format!(
                                "see {} and policies/README.md (entity model)",
                                schema_file.display()
                            )),
                        );
                    }
                }
                None
            }
        };

        let declared: HashSet<String> = schema
            .actions()
            .filter(|a| a.type_name().to_string() == "Action")
            .map(|a| a.id().unescaped().to_string())
            .collect();
        let mut actions = HashMap::new();
        let mut checked: HashSet<(String, IdentityKind)> = HashSet::new();
        // A destination without declared ports is asked as its any-port cell.
        let any_port = crate::inventory::Port {
            port: 0,
            protocol: Protocol::Tcp,
            action: crate::DEFAULT_ACTION.into(),
            loc: Default::default(),
        };
        for ident in ids.iter().filter(|i| {
            (i.is_destination() && i.kind != IdentityKind::Service)
                || (i.kind == IdentityKind::Node && nodes_declared)
        }) {
            let ports = if ident.ports.is_empty() {
                std::slice::from_ref(&any_port)
            } else {
                ident.ports.as_slice()
            };
            for port in ports {
                let diag = |msg: String| {
                    if port.loc.line > 0 {
                        Diagnostic::new(&inv.file, port.loc.line, port.loc.column, msg)
                    } else if matches!(ident.kind, IdentityKind::World | IdentityKind::Node) {
                        schema_loc(msg)
                    } else {
                        item_diag(inv, ident, msg)
                    }
                };
                if !declared.contains(&port.action) {
                    let mut known: Vec<_> = declared.iter().cloned().collect();
                    known.sort();
                    diags.push(
                        diag(format!(
                            "action `{}` is not declared in the schema",
                            port.action
                        ))
                        .with_hint(format!("declared actions: {}", known.join(", "))),
                    );
                    continue;
                }
                let a = action_uid(&port.action);
                actions.insert(port.action.clone(), a.clone());
                if !checked.insert((port.action.clone(), ident.kind)) {
                    continue;
                }
                // One schema-checked request per (action, resource type): the hot path can
                // then skip request validation.
                let principal = uid("Workload", "schema-check");
                let resource = uid(ident.kind.cedar_type(), &ident.name);
                if let Err(e) = Request::new(
                    principal,
                    a,
                    resource,
                    context(port.port, port.protocol),
                    Some(&schema),
                ) {
                    diags.push(diag(format!(
                        "`{}` cannot be reached with action `{}`: {e}",
                        ident.name, port.action
                    )).with_hint(format!(
                        "the action's `appliesTo` in {} must list principal Workload, resource {} and context {{ port: Long, protocol: String }}",
                        schema_file.display(), ident.kind.cedar_type()
                    )));
                }
            }
        }

        if diags.len() > start {
            return None;
        }
        Some(Engine {
            schema,
            pset,
            rules,
            rule_of,
            entities: entities?,
            uids,
            actions,
            analysis,
            singles,
            port_reads,
            nodes_unidentified,
            authorizer: Authorizer::new(),
        })
    }

    /// Replace one entity (a risk override), checked against the schema. On error nothing
    /// changes.
    pub fn replace_entity(&mut self, ident: &Identity) -> Result<(), String> {
        let e = entity(ident)?;
        let entities = std::mem::replace(&mut self.entities, Entities::empty());
        let backup = entities.clone();
        match entities.upsert_entities([e], Some(&self.schema)) {
            Ok(updated) => {
                self.entities = updated;
                Ok(())
            }
            Err(err) => {
                self.entities = backup;
                Err(err.to_string())
            }
        }
    }

    /// The request for one cell, checked against `schema` if given.
    fn request(
        &self,
        subject: usize,
        action: &str,
        destination: usize,
        port: u16,
        protocol: Protocol,
        schema: Option<&Schema>,
    ) -> Result<Request, String> {
        let action = match self.actions.get(action) {
            Some(a) => a.clone(),
            None => action_uid(action),
        };
        Request::new(
            self.uids[subject].clone(),
            action,
            self.uids[destination].clone(),
            context(port, protocol),
            schema,
        )
        .map_err(|e| e.to_string())
    }

    /// Whether policy `rule` alone is satisfied by the request. Cedar's decision is a pure
    /// function of which policies are satisfied (deny if a forbid is, else allow if a permit
    /// is), so combining these answers reproduces `ask` exactly.
    pub fn satisfied(
        &self,
        rule: usize,
        subject: usize,
        action: &str,
        destination: usize,
        port: u16,
        protocol: Protocol,
    ) -> Result<bool, String> {
        let request = self.request(subject, action, destination, port, protocol, None)?;
        let response =
            self.authorizer
                .is_authorized(&request, &self.singles[rule].0, &self.entities);
        if let Some(err) = response.diagnostics().errors().next() {
            return Err(err.to_string());
        }
        let satisfied = response.diagnostics().reason().next().is_some();
        Ok(satisfied)
    }

    /// Ask Cedar about one request. `validate`: check the request against the schema (the
    /// oracle does; the compiler checked each (action, type) once at load).
    pub fn ask(
        &self,
        subject: usize,
        action: &str,
        destination: usize,
        port: u16,
        protocol: Protocol,
        validate: bool,
    ) -> Result<Answer, String> {
        let schema = validate.then_some(&self.schema);
        let request = self.request(subject, action, destination, port, protocol, schema)?;
        let response = self
            .authorizer
            .is_authorized(&request, &self.pset, &self.entities);
        let diagnostics = response.diagnostics();
        if let Some(err) = diagnostics.errors().next() {
            // Any evaluation error rejects the bundle: a skipped forbid could allow.
            return Err(err.to_string());
        }
        let mut rules: Vec<u32> = diagnostics
            .reason()
            .filter_map(|id| self.rule_of.get(id).copied())
            .collect();
        rules.sort_unstable();
        Ok(Answer {
            allowed: response.decision() == CedarDecision::Allow,
            rules,
        })
    }
}

/// The inventory entities a policy reads attributes of (`Endpoint::"e".tenant`) that the
/// inventory does not have: (type, name, byte offset of the literal if known), each once.
/// Cedar fails on such a read (`entity does not exist`). Only `.` reads count: `has` is
/// false for a missing entity. Every entity literal in the dereferenced expression is
/// checked (conservative, as `Analysis::derefs`).
fn missing_derefs(
    policy: &cedar_policy_core::ast::Policy,
    ids: &Identities,
) -> Vec<(String, String, Option<usize>)> {
    use cedar_policy_core::ast::{ExprKind, Literal};
    let mut found: Vec<(String, String, Option<usize>)> = Vec::new();
    let Some(body) = policy.non_scope_constraints() else {
        return found;
    };
    for e in body.subexpressions() {
        let ExprKind::GetAttr { expr, .. } = e.expr_kind() else {
            continue;
        };
        for x in expr.subexpressions() {
            let ExprKind::Lit(Literal::EntityUID(u)) = x.expr_kind() else {
                continue;
            };
            let ty = u.entity_type().to_string();
            let name = AsRef::<str>::as_ref(u.eid()).to_string();
            let kind = match ty.as_str() {
                "Workload" => IdentityKind::Workload,
                "Endpoint" => IdentityKind::Endpoint,
                "World" => IdentityKind::World,
                "Node" => IdentityKind::Node,
                _ => continue, // Not an inventory entity: the validator judges it.
            };
            let exists = ids.index_of(&name).is_some_and(|i| ids.at(i).kind == kind);
            if exists || found.iter().any(|(t, n, _)| *t == ty && *n == name) {
                continue;
            }
            let loc = x.source_loc().map(|l| l.start());
            found.push((ty, name, loc));
        }
    }
    found.sort_by_key(|(_, _, loc)| *loc);
    found
}

/// A diagnostic at an identity's entry in the inventory (at the inventory's start for a
/// cluster identity, which has no entry, with a word saying where it comes from).
fn item_diag(inv: &Inventory, ident: &Identity, msg: String) -> Diagnostic {
    if ident.is_cluster() {
        return Diagnostic::new(
            &inv.file,
            1,
            1,
            format!("{msg} (a workload from the Kubernetes cluster state)"),
        );
    }
    let loc = inv
        .workloads
        .iter()
        .find(|w| w.name == ident.name)
        .map(|w| w.loc)
        .or_else(|| {
            inv.endpoints
                .iter()
                .find(|e| e.name == ident.name)
                .map(|e| e.loc)
        })
        .unwrap_or_default();
    Diagnostic::new(&inv.file, loc.line, loc.column, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn analyse(src: &str) -> Analysis {
        let mut a = Analysis::default();
        for p in PolicySet::from_str(src).unwrap().policies() {
            a.add_policy(&p.to_json().unwrap());
        }
        a
    }

    #[test]
    fn analysis_collects_attributes_and_uids() {
        let a = analyse(
            r#"permit (principal == Workload::"a", action, resource) when { principal.tenant == resource.tenant && resource has kind };
               forbid (principal, action, resource) when { resource == Endpoint::"e" || context.port == 1 };"#,
        );
        assert!(a.attrs.contains("tenant") && a.attrs.contains("kind") && a.attrs.contains("port"));
        assert!(a.uids.contains(&("Workload".into(), "a".into())));
        assert!(a.uids.contains(&("Endpoint".into(), "e".into())));
        assert!(!a.uid_sensitive && !a.context_whole);
        assert!(a.derefs.is_empty());
        let d = analyse(
            r#"permit (principal, action, resource) when { principal.tenant == Endpoint::"e".tenant && (if principal.ring == "x" then Workload::"a" else Workload::"b") has ring };"#,
        );
        let want: BTreeSet<(String, String)> =
            [("Endpoint", "e"), ("Workload", "a"), ("Workload", "b")]
                .map(|(t, i)| (t.to_string(), i.to_string()))
                .into();
        assert_eq!(d.derefs, want);
        assert!(a.reads_port() && !a.reads_protocol());
        assert!(
            analyse("permit (principal, action, resource) when { principal == resource };")
                .uid_sensitive
        );
        assert!(
            analyse(
                "permit (principal, action, resource) when { [principal].contains(resource) };"
            )
            .uid_sensitive
        );
        assert!(!analyse(r#"permit (principal, action, resource) when { principal in [Workload::"x", Workload::"y"] };"#).uid_sensitive);
    }

    #[test]
    fn erroring_operations_are_found() {
        let src = "forbid (principal, action, resource) when { context.port + 1 > 2 };";
        let p = PolicySet::from_str(src).unwrap();
        let json = p.policies().next().unwrap().to_json().unwrap();
        assert!(can_error(&json).is_some());
        let src = r#"forbid (principal, action, resource) when { decimal("0.5").lessThan(decimal("1.0")) };"#;
        let p = PolicySet::from_str(src).unwrap();
        let json = p.policies().next().unwrap().to_json().unwrap();
        assert_eq!(can_error(&json), None);
    }
}
