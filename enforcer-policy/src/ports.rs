//! `context.port` on destinations that declare no ports.
//!
//! The kernel keys the policy table by (subject, destination, port, protocol). A destination
//! with declared ports is compiled port by port, so any use of the port is exact there. A
//! destination without declared ports has one any-port entry per protocol, and Cedar's
//! decision may still depend on the port: `forbid ... when { context.port == 25 }` on World.
//! The compile then needs Cedar's decision as a function of the port over 1..=65535, with
//! a finite number of questions. That is possible when every use of `context.port` is
//!
//! - a comparison with an integer literal: `==`, `!=`, `<`, `<=`, `>`, `>=`, either side;
//! - membership in a set of literals: `[25, 465].contains(context.port)`.
//!
//! Then each such test is constant between the literals, so the decision is constant on each
//! literal and on each open interval between two consecutive literals: asking Cedar at every
//! literal `k` in 1..=65535, at `k - 1`, `k + 1`, and at 1 and 65535 asks once in every such
//! region ([`breakpoints`]; the region of a port is that of the largest breakpoint at or
//! below it). Anything else (arithmetic on the port, a comparison with an attribute, the
//! port or the whole `context` passed on) is rejected at load, at its `file:line:column`.
//!
//! `context.protocol` needs nothing: the protocol is part of the table key, and every cell
//! is asked of Cedar per protocol.
//!
//! The compile ([`crate::compile`]) writes the majority decision over 1..=65535 as the
//! any-port cell and the other ports as exact entries: deny exceptions (`entry::DENY`) under
//! an any-port allow, plain allows under a default deny. Port 0 is judged by the any-port
//! entry: no socket can listen on port 0 (TCP connects to it are refused, UDP sends fail),
//! so no call there can reach anything. More than [`MAX_PORT_EXCEPTIONS`] exact entries for
//! one cell is a compile error naming the policy, never an approximation.

use cedar_policy_core::ast::{BinaryOp, Expr, ExprKind, Literal, Var};

/// The most exact-port entries one (subject, destination, protocol) cell may need; more is
/// a compile error ("declare ports on the destination"). 4,096 keeps a cell at 1/64 of a
/// policy table (262,144 entries) while allowing port ranges like `context.port < 1024`.
pub const MAX_PORT_EXCEPTIONS: usize = 4096;

/// The most distinct values a bundle may compare `context.port` with. Each one splits the
/// port range of every destination without declared ports, and the compile asks Cedar at
/// each split (three questions a value), per group of cells: without a bound, a 384 KB
/// bundle of port sets kept a compile busy for minutes. 256 covers any hand-written list of
/// service ports many times over.
pub const MAX_PORT_VALUES: usize = 256;

/// What one policy does with `context.port`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PortUse {
    /// The integer literals the port is compared with (any order, may repeat).
    pub literals: Vec<i64>,
    /// Byte offset of its first read of `context.port`, if it reads it.
    pub first_read: Option<usize>,
}

/// One policy's [`PortUse`] as the engine keeps it: its literals, and the line and column of
/// its first read of the port.
pub(crate) type PortRead = (Vec<i64>, Option<(u32, u32)>);

/// A use of `context` the compile cannot follow exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PortProblem {
    /// Byte offset in the policy file.
    pub offset: usize,
    pub message: String,
    pub hint: String,
}

const HINT: &str = "compare `context.port` directly with an integer literal (`context.port == 25`, `!=`, `<`, `<=`, `>`, `>=`) or test it against a set of literals (`[25, 465].contains(context.port)`); for anything else declare the ports on the destination in inventory.yaml (each declared port is asked of Cedar exactly)";

/// Check one policy's conditions: the literals `context.port` is compared with, and every
/// use of `context` that is not one of the forms above.
pub(crate) fn analyse(policy: &cedar_policy_core::ast::Policy) -> (PortUse, Vec<PortProblem>) {
    let mut out = PortUse::default();
    let mut problems = Vec::new();
    if let Some(body) = policy.non_scope_constraints() {
        walk(body, None, &mut out, &mut problems);
    }
    problems.dedup_by(|a, b| a.offset == b.offset);
    (out, problems)
}

fn offset(e: &Expr) -> Option<usize> {
    e.source_loc().map(|l| l.start())
}

fn is_context(e: &Expr) -> bool {
    matches!(e.expr_kind(), ExprKind::Var(Var::Context))
}

/// `context.port` (or `context["port"]`).
fn is_port(e: &Expr) -> bool {
    matches!(e.expr_kind(), ExprKind::GetAttr { expr, attr } if is_context(expr) && attr == "port")
}

fn literal(e: &Expr) -> Option<&Literal> {
    match e.expr_kind() {
        ExprKind::Lit(l) => Some(l),
        _ => None,
    }
}

fn record(l: &Literal, port: &Expr, out: &mut PortUse) {
    if let Literal::Long(k) = l {
        out.literals.push(*k);
    }
    // A comparison with a literal of another type is constant (false, or rejected by
    // strict validation): nothing to split at.
    if out.first_read.is_none() {
        out.first_read = offset(port);
    }
}

/// `context.protocol`.
fn is_protocol(e: &Expr) -> bool {
    matches!(e.expr_kind(), ExprKind::GetAttr { expr, attr } if is_context(expr) && attr == "protocol")
}

/// A string literal `context.protocol` is compared with that it never holds (`"TCP"`,
/// `"icmp"`): the comparison is constant, so a forbid written with it silently never
/// applies. Only `tcp` and `udp` reach Cedar ([`crate::Protocol`]).
fn check_protocol_literal(l: &Expr, problems: &mut Vec<PortProblem>) {
    if let Some(Literal::String(v)) = literal(l) {
        if v.parse::<crate::Protocol>().is_err() {
            problems.push(PortProblem {
                offset: offset(l).unwrap_or(0),
                message: format!(
                    "`context.protocol` is never \"{v}\": it is \"tcp\" or \"udp\" (lower case), so this comparison never holds"
                ),
                hint: "write \"tcp\" or \"udp\"; other protocols never reach a policy (sock_create refuses their sockets)".into(),
            });
        }
    }
}

/// `parent`: the expression `e` is an operand of, for the message.
fn walk(e: &Expr, parent: Option<&Expr>, out: &mut PortUse, problems: &mut Vec<PortProblem>) {
    match e.expr_kind() {
        ExprKind::BinaryApp {
            op: BinaryOp::Eq,
            arg1,
            arg2,
        } if is_protocol(arg1) || is_protocol(arg2) => {
            check_protocol_literal(arg1, problems);
            check_protocol_literal(arg2, problems);
        }
        ExprKind::BinaryApp {
            op: BinaryOp::Contains,
            arg1,
            arg2,
        } if is_protocol(arg2) => {
            if let ExprKind::Set(items) = arg1.expr_kind() {
                for item in items.iter() {
                    check_protocol_literal(item, problems);
                }
            }
        }
        ExprKind::BinaryApp {
            op: BinaryOp::Eq | BinaryOp::Less | BinaryOp::LessEq,
            arg1,
            arg2,
        } => {
            if is_port(arg1) {
                if let Some(l) = literal(arg2) {
                    record(l, arg1, out);
                    return;
                }
            }
            if is_port(arg2) {
                if let Some(l) = literal(arg1) {
                    record(l, arg2, out);
                    return;
                }
            }
        }
        ExprKind::BinaryApp {
            op: BinaryOp::Contains,
            arg1,
            arg2,
        } if is_port(arg2) => {
            if let ExprKind::Set(items) = arg1.expr_kind() {
                let lits: Option<Vec<&Literal>> = items.iter().map(literal).collect();
                if let Some(lits) = lits {
                    for l in lits {
                        record(l, arg2, out);
                    }
                    if items.is_empty() && out.first_read.is_none() {
                        out.first_read = offset(arg2);
                    }
                    return;
                }
            }
        }
        ExprKind::GetAttr { expr, attr } | ExprKind::HasAttr { expr, attr } if is_context(expr) => {
            if attr == "port" && matches!(e.expr_kind(), ExprKind::GetAttr { .. }) {
                // A read of the port in any other position.
                if out.first_read.is_none() {
                    out.first_read = offset(e);
                }
                let at = parent.unwrap_or(e);
                let snippet = at
                    .source_loc()
                    .and_then(|l| l.snippet())
                    .unwrap_or("context.port");
                problems.push(PortProblem {
                    offset: offset(at).or(offset(e)).unwrap_or(0),
                    message: format!(
                        "`{snippet}` uses `context.port` in a way the kernel table cannot represent exactly on destinations that declare no ports"
                    ),
                    hint: HINT.into(),
                });
            }
            // `context.protocol`, `context has port`: exact (the protocol is in the key).
            return;
        }
        ExprKind::Var(Var::Context) => {
            let at = parent.unwrap_or(e);
            let snippet = at
                .source_loc()
                .and_then(|l| l.snippet())
                .unwrap_or("context");
            problems.push(PortProblem {
                offset: offset(e).unwrap_or(0),
                message: format!(
                    "`{snippet}` uses `context` as a whole value, which passes the port on where the compile cannot follow it"
                ),
                hint: format!("read its fields instead (`context.protocol == \"tcp\"`); {HINT}"),
            });
            return;
        }
        _ => {}
    }
    for child in children(e) {
        walk(child, Some(e), out, problems);
    }
}

/// The direct operands of `e`.
fn children(e: &Expr) -> Vec<&Expr> {
    match e.expr_kind() {
        ExprKind::If {
            test_expr,
            then_expr,
            else_expr,
        } => vec![test_expr, then_expr, else_expr],
        ExprKind::And { left, right } | ExprKind::Or { left, right } => vec![left, right],
        ExprKind::UnaryApp { arg, .. } => vec![arg],
        ExprKind::BinaryApp { arg1, arg2, .. } => vec![arg1, arg2],
        ExprKind::ExtensionFunctionApp { args, .. } => args.iter().collect(),
        ExprKind::GetAttr { expr, .. }
        | ExprKind::HasAttr { expr, .. }
        | ExprKind::ExtHasAttr { expr, .. }
        | ExprKind::Like { expr, .. }
        | ExprKind::Is { expr, .. } => vec![expr],
        ExprKind::Set(items) => items.iter().collect(),
        ExprKind::Record(fields) => fields.values().collect(),
        _ => vec![],
    }
}

/// The ports to ask Cedar at, ascending: every literal in 1..=65535, its neighbours in that
/// range, 1 and 65535. The decision at any port equals the decision at the largest of
/// these at or below it (see the module documentation).
pub(crate) fn breakpoints<'a>(literals: impl IntoIterator<Item = &'a i64>) -> Vec<u16> {
    let mut points = vec![1u16, 65535];
    for &k in literals {
        for p in [k.saturating_sub(1), k, k.saturating_add(1)] {
            if (1..=65535).contains(&p) {
                points.push(p as u16);
            }
        }
    }
    points.sort_unstable();
    points.dedup();
    points
}

/// The index in `points` (from [`breakpoints`]) of the region `port` (>= 1) belongs to.
pub(crate) fn region(points: &[u16], port: u16) -> usize {
    points.partition_point(|&p| p <= port).saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uses(src: &str) -> (PortUse, Vec<PortProblem>) {
        let ps = cedar_policy_core::parser::parse_policyset(src).unwrap();
        let p = ps.policies().next().unwrap();
        analyse(p)
    }

    #[test]
    fn literal_comparisons_and_sets_are_analysed() {
        let src = "permit (principal, action, resource) when { context.port == 25 || 1024 > context.port || context.port >= 70000 || [80, 443].contains(context.port) || context.port != -3 || context.protocol == \"tcp\" };";
        let (u, problems) = uses(src);
        assert_eq!(problems, vec![]);
        let mut lits = u.literals.clone();
        lits.sort();
        assert_eq!(lits, vec![-3, 25, 80, 443, 1024, 70000]);
        assert_eq!(u.first_read, Some(src.find("context.port").unwrap()));
        assert_eq!(
            breakpoints(&u.literals),
            vec![1, 24, 25, 26, 79, 80, 81, 442, 443, 444, 1023, 1024, 1025, 65535]
        );
        let pts = breakpoints(&u.literals);
        assert_eq!(pts[region(&pts, 1)], 1);
        assert_eq!(pts[region(&pts, 23)], 1);
        assert_eq!(pts[region(&pts, 27)], 26);
        assert_eq!(pts[region(&pts, 65534)], 1025);
        assert_eq!(pts[region(&pts, 65535)], 65535);
        assert_eq!(
            uses("permit (principal, action, resource);"),
            Default::default()
        );
    }

    #[test]
    fn other_uses_are_problems_at_their_expression() {
        for (src, at) in [
            (
                "forbid (principal, action, resource) when { context.port + 1 > 2 };",
                "context.port + 1",
            ),
            (
                "forbid (principal, action, resource) when { context.port == principal.risk_port };",
                "context.port == principal.risk_port",
            ),
            (
                "forbid (principal, action, resource) when { [context.port].contains(25) };",
                "[context.port]",
            ),
            (
                "forbid (principal, action, resource) when { [25, principal.p].contains(context.port) };",
                "[25, principal.p].contains(context.port)",
            ),
            (
                "forbid (principal, action, resource) when { context == {port: 25, protocol: \"tcp\"} };",
                "context",
            ),
        ] {
            let (_, problems) = uses(src);
            assert_eq!(problems.len(), 1, "{src}: {problems:?}");
            assert_eq!(problems[0].offset, src.find(at).unwrap(), "{src}");
            assert!(problems[0].message.contains(at), "{}", problems[0].message);
        }
    }
}
