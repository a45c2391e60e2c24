//! Bounds on what a policy bundle may make the PDP do.
//!
//! A bundle comes from whoever can write the policy directory or the PDP: it is input, and
//! input must not be able to take the agent down. Every parser gets explicit bounds, checked
//! before the parser runs where the parser itself is the danger (Cedar's parser and
//! `yaml-rust2`'s loader recurse), with an error that names the limit and the location:
//!
//! - bytes per file, number and total bytes of policy files (read with a bound, so a bundle
//!   file that is a symlink to `/dev/zero` or a FIFO cannot stall or exhaust the reader);
//! - YAML: nesting depth and the number of nodes after alias expansion (a "billion laughs"
//!   inventory of 367 bytes would otherwise expand to 9^9 nodes);
//! - Cedar policies: bracket depth and expression depth, estimated on the text before
//!   `cedar-policy` parses it (see [`check_cedar_text`]); the schema: bracket depth.
//!
//! The bounds are not the only defence: [`crate::Bundle::load`] runs on its own thread with a
//! [`LOAD_STACK_BYTES`] stack, far more than a bundle within these bounds needs. What is
//! left on the caller's threads (evaluating and dropping policies, whose depth the bounds
//! keep small) was measured on a 2 MiB thread (the size of a tokio worker's stack), in a
//! debug build, with margin: see `hostile_tests::deep_policies_*` and
//! `hostile_tests::measure_cedar_depth`.

use std::io::Read;
use std::path::Path;

use crate::diagnostics::Diagnostic;

/// The largest `inventory.yaml` (the PDP's wire limit per file is the same).
pub const INVENTORY_BYTES: u64 = 16 << 20;
/// The largest `schema.cedarschema`.
pub const SCHEMA_BYTES: u64 = 1 << 20;
/// The largest single `*.cedar` file.
pub const POLICY_FILE_BYTES: u64 = 1 << 20;
/// All `*.cedar` files together.
pub const POLICY_TOTAL_BYTES: u64 = 8 << 20;
/// The number of `*.cedar` files.
pub const POLICY_FILES: usize = 1000;
/// YAML nesting (mappings and lists inside each other). The inventory's own structure is 5
/// deep; the builder and the tree's drop recurse per level.
pub const YAML_DEPTH: usize = 32;
/// YAML nodes after alias expansion: a 10,000-identity inventory has about 200,000.
pub const YAML_NODES: usize = 2_000_000;
/// Brackets `(` `[` `{` nested inside each other in a Cedar policy. Cedar's parser spends
/// about 40 KiB of stack per bracket in a debug build (200 overflow the 8 MiB main thread;
/// about 50 fit in a 2 MiB tokio worker): 24 parse on a 2 MiB thread with margin.
pub const CEDAR_BRACKET_DEPTH: usize = 24;
/// The depth of a Cedar expression tree, estimated from above on the text (see
/// [`check_cedar_text`]): a chain `a && b && c` is a tree as deep as it is long, and
/// validation, evaluation and drop all recurse through it. Measured in a debug build (see
/// `hostile_tests::measure_cedar_depth`): Cedar evaluates about 150 levels of `&&` and 100
/// of `if` on an 8 MiB stack (the agent's main thread, where it evaluates) before its own
/// guard stops it with "recursion limit reached", and about 30 on a 2 MiB one; parsing and
/// validating a 300-long chain is fine on 8 MiB. 64 leaves a factor of 2 on the main thread;
/// [`crate::Bundle::compile`] runs on a thread of [`LOAD_STACK_BYTES`] anyway.
pub const CEDAR_EXPR_DEPTH: usize = 64;
/// Brackets `<` `{` `[` `(` nested inside each other in the schema.
pub const SCHEMA_BRACKET_DEPTH: usize = 24;
/// Problems listed for one bundle: the rest are counted, not listed (a `policy.rejected`
/// event carries them all on one line).
pub const DIAGNOSTICS: usize = 1000;
/// The stack of the thread that loads a bundle: parsers recurse, and a bound must never be
/// the only defence. Only the pages used are committed.
pub const LOAD_STACK_BYTES: usize = 256 << 20;

/// Reads `path` as UTF-8 text of at most `limit` bytes. Refuses anything but a regular file
/// (opened without blocking, so a FIFO cannot stall the load), and reads at most
/// `limit + 1` bytes whatever the file claims its size is.
pub(crate) fn read_text(path: &Path, limit: u64, what: &str) -> Result<String, Diagnostic> {
    use std::os::unix::fs::OpenOptionsExt;
    let at_start = |msg: String| Diagnostic::new(path, 1, 1, msg);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| at_start(format!("cannot read: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| at_start(format!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(at_start(format!(
            "not a regular file ({}): a bundle file must be a file",
            file_type(&meta)
        )));
    }
    let too_big = |n: u64| {
        at_start(format!(
            "{what} is {n} bytes or more; the limit is {limit} bytes"
        ))
        .with_hint(
            "a bundle file this large is a mistake or an attack; split policies over several files",
        )
    };
    if meta.len() > limit {
        return Err(too_big(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| at_start(format!("cannot read: {e}")))?;
    if bytes.len() as u64 > limit {
        return Err(too_big(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let text = String::from_utf8_lossy(&e.as_bytes()[..valid]);
        Diagnostic::at_offset(path, &text, valid, "not valid UTF-8 here")
            .with_hint("bundle files are UTF-8 text")
    })
}

fn file_type(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a file"
    }
}

/// Operator classes of Cedar's grammar, loosest first: an expression's tree nests one level
/// per operator, and a chain of one class is as deep as it is long.
const GROUP: usize = 0; // `,` `:` separate the items of a bracket
const IF: usize = 1; // `if` (`then` and `else` separate its parts)
const OR: usize = 2;
const AND: usize = 3;
const REL: usize = 4; // == != < <= > >= in has like is
const ADD: usize = 5; // + and binary -
const MUL: usize = 6; // *
const TIGHT: usize = 7; // unary ! and -, member access `.`, and the operands themselves
const CLASSES: usize = 8;

/// One open bracket (or a policy's top level) of [`check_cedar_text`]: per class, the
/// operators of the current chain and the deepest finished operand chain below it.
#[derive(Clone, Copy, Default)]
struct Chain {
    count: [usize; CLASSES],
    best: [usize; CLASSES],
    /// The depth of everything enclosing this bracket when it opened.
    base: usize,
}

impl Chain {
    /// The depth of the expression so far (a chain of class c sits on its deepest operand,
    /// which is a chain of the next tighter class).
    fn value(&self) -> usize {
        (0..CLASSES)
            .rev()
            .fold(0, |v, c| self.count[c] + self.best[c].max(v))
    }
    /// An operator of class `c` (or a separator at `c`, `counted` false): the chains of
    /// tighter classes end, and their depth becomes an operand of this one.
    fn op(&mut self, c: usize, counted: bool) {
        let mut v = 0;
        for t in (c + 1..CLASSES).rev() {
            v = self.count[t] + self.best[t].max(v);
            self.count[t] = 0;
            self.best[t] = 0;
        }
        self.best[c] = self.best[c].max(v);
        if counted {
            self.count[c] += 1;
        }
    }
}

/// An estimate, from above, of how deep Cedar's parser and its expression tree nest for
/// `text`, checked before `cedar-policy` sees it; a diagnostic at the first place a limit is
/// exceeded.
///
/// A light tokenizer (strings and `//` comments skipped) follows Cedar's precedence: a
/// bracket `(` `[` `{` adds a level; inside it, a chain of one operator class (`a && b && c`)
/// adds one level per operator on top of its deepest operand, which is a chain of the next
/// tighter class (`||` over `&&` over comparisons over `+ -` over `*` over unary, `.` and
/// operands; `if` loosest). The result is at least the depth of the tree Cedar builds, since
/// every node with children comes from one such token. `max_brackets` bounds the brackets
/// alone (Cedar's parser spends most stack per bracket), `max_depth` the whole.
pub(crate) fn check_cedar_text(
    file: &Path,
    text: &str,
    max_brackets: usize,
    max_depth: usize,
) -> Option<Diagnostic> {
    let b = text.as_bytes();
    let too_deep = |at: usize, depth: usize| {
        Diagnostic::at_offset(
            file,
            text,
            at,
            format!("the expression nests about {depth} levels deep here; the limit is {max_depth}"),
        )
        .with_hint("each bracket and each operator of a chain (&& || + . if ...) adds a level: test a set with `in [...]` or `.contains(...)`, or split the condition over several policies")
    };
    // The policy's top level, then one entry per open bracket.
    let mut stack: Vec<Chain> = vec![Chain::default()];
    // Whether the last token ended an operand (then `-` is binary).
    let mut after_operand = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        // (class, counted) of an operator or separator token.
        let mut op: Option<(usize, bool)> = None;
        match c {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                after_operand = true;
            }
            b'(' | b'[' | b'{' => {
                let top = stack.last().copied().unwrap_or_default();
                if stack.len() > max_brackets {
                    return Some(
                        Diagnostic::at_offset(
                            file,
                            text,
                            start,
                            format!(
                                "brackets nest {} deep here; the limit is {max_brackets}",
                                stack.len()
                            ),
                        )
                        .with_hint("a policy this deep is unreadable and could exhaust the parser's stack; flatten the condition"),
                    );
                }
                stack.push(Chain {
                    base: top.base + top.value() + 1,
                    ..Chain::default()
                });
                after_operand = false;
            }
            b')' | b']' | b'}' => {
                if stack.len() > 1 {
                    let inner = stack.pop().unwrap_or_default();
                    let depth = 1 + inner.value();
                    if let Some(top) = stack.last_mut() {
                        top.best[TIGHT] = top.best[TIGHT].max(depth);
                        if top.base + top.value() > max_depth {
                            return Some(too_deep(start, top.base + top.value()));
                        }
                    }
                }
                after_operand = true;
            }
            b';' if stack.len() == 1 => {
                stack[0] = Chain::default();
                after_operand = false;
            }
            b',' => op = Some((GROUP, false)),
            b':' if b.get(i + 1) == Some(&b':') => {
                i += 1; // a path `Action::"x"`: part of an operand
            }
            b':' => op = Some((GROUP, false)),
            b'&' | b'|' if b.get(i + 1) == Some(&c) => {
                op = Some((if c == b'&' { AND } else { OR }, true));
                i += 1;
            }
            b'=' | b'!' | b'<' | b'>' => {
                if b.get(i + 1) == Some(&b'=') {
                    i += 1;
                    op = Some((REL, true));
                } else if c == b'!' {
                    op = Some((TIGHT, true));
                } else {
                    op = Some((REL, true));
                }
            }
            b'+' => op = Some((ADD, true)),
            b'-' if after_operand => op = Some((ADD, true)),
            b'-' | b'.' => op = Some((TIGHT, true)),
            b'*' => op = Some((MUL, true)),
            c if c.is_ascii_alphanumeric() || c == b'_' => {
                while i + 1 < b.len() && (b[i + 1].is_ascii_alphanumeric() || b[i + 1] == b'_') {
                    i += 1;
                }
                match &text[start..=i] {
                    "if" => op = Some((IF, true)),
                    "then" | "else" => op = Some((IF, false)),
                    "in" | "has" | "like" | "is" => op = Some((REL, true)),
                    _ => after_operand = true,
                }
            }
            _ => {}
        }
        i += 1;
        if let Some((class, counted)) = op {
            after_operand = false;
            if let Some(top) = stack.last_mut() {
                if class == TIGHT {
                    top.count[TIGHT] += 1;
                } else {
                    top.op(class, counted);
                }
                let depth = top.base + top.value();
                if depth > max_depth {
                    return Some(too_deep(start, depth));
                }
            }
        }
    }
    None
}

/// Bracket depth of the schema text (`<` `{` `[` `(`), skipping strings and comments.
pub(crate) fn check_schema_text(
    file: &Path,
    text: &str,
    max_brackets: usize,
) -> Option<Diagnostic> {
    let b = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'<' | b'{' | b'[' | b'(' => {
                depth += 1;
                if depth > max_brackets {
                    return Some(
                        Diagnostic::at_offset(
                            file,
                            text,
                            i,
                            format!("types nest {depth} deep here; the limit is {max_brackets}"),
                        )
                        .with_hint("flatten the type: nested records and sets this deep are a mistake or an attack"),
                    );
                }
            }
            b'>' | b'}' | b']' | b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}
