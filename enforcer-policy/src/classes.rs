//! The kernel's policy table keyed by classes instead of identity pairs.
//!
//! A table keyed by (subject, destination) grows with the square of the identities: an
//! allow-all policy over 2,000 label sets needs millions of entries, and one tenant's 256 label
//! sets allowed to each other ~131,000. But most identities decide alike: a subject's *row*
//! (every destination, port and verdict it is allowed or denied) is often the row of many
//! others, and so is a destination's *column*. A class is a set of identities with equal rows
//! (subject classes) or equal columns (destination classes); the kernel table then holds one
//! entry per (subject class, destination class, port, protocol).
//!
//! Why this is exact: if `s` and `s'` have equal rows, the entry of (s, d) equals that of
//! (s', d) for every `d`; if `d` and `d'` have equal columns, that of (s, d) equals that of
//! (s, d'). So the entry is constant on every (subject class x destination class) block, and
//! one representative pair says what all of it gets. Columns are compared over representative
//! subjects only (equal rows make the other subjects' cells copies).
//!
//! The grouping is taken from the table itself, after the compile, rather than from the
//! compile's Cedar signatures: everything that makes two identities decide differently is in
//! their rows and columns already (Service cells judged through backends, per-port deny
//! exceptions, the attributing rule of each entry), so nothing can be merged that the kernel
//! must tell apart, and identities with different signatures that happen to decide alike
//! (every subject under an allow-all policy) share a class. Flags (quarantine, audit, exempt)
//! are not in the table: the kernel reads them per identity before the table.
//!
//! A class's number is its smallest identity id, so numbers are stable across revisions in
//! which the class keeps its smallest member (a standby table is rewritten by difference),
//! and the class table is the identity-keyed table restricted to entries whose subject and
//! destination are the smallest of their classes. [`NO_CLASS`] (0, never an identity of a
//! table) is the class of an identity without a row or column: nothing is keyed by it.

use std::collections::HashMap;

use enforcer_common::{PolicyKey, PolicyValue, NO_CLASS};

/// An identity-keyed table encoded for the kernel: each identity's classes, and the entries
/// keyed by class.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Classes {
    /// Identity -> subject class; identities without a row are absent ([`NO_CLASS`]).
    pub subject: HashMap<u32, u32>,
    /// Identity -> destination class; identities without a column are absent.
    pub destination: HashMap<u32, u32>,
    /// The kernel entries: [`PolicyKey::subject`] and [`PolicyKey::destination`] are classes.
    pub entries: HashMap<PolicyKey, PolicyValue>,
}

/// One cell of a row (destination, port, protocol, value) or column (subject class, ...).
type Cell = (u32, u16, u8, u32, u8);

impl Classes {
    /// Groups the identities of `allows` (an identity-keyed table: allows and deny
    /// exceptions) into classes and keys its entries by them.
    pub fn of<'a>(allows: impl IntoIterator<Item = (&'a PolicyKey, &'a PolicyValue)>) -> Classes {
        let mut by_row: Vec<(PolicyKey, PolicyValue)> =
            allows.into_iter().map(|(k, v)| (*k, *v)).collect();
        by_row.sort_unstable_by_key(|(k, _)| *k);
        let cell = |k: &PolicyKey, v: &PolicyValue, other: u32| -> Cell {
            (other, k.dport, k.protocol, v.rule, v.verdict)
        };

        // Rows, subjects ascending: the first subject with a row is the smallest of its class.
        let mut subject = HashMap::new();
        let mut rows: HashMap<Vec<Cell>, u32> = HashMap::new();
        for row in by_row.chunk_by(|a, b| a.0.subject == b.0.subject) {
            let s = row[0].0.subject;
            let cells: Vec<Cell> = row.iter().map(|(k, v)| cell(k, v, k.destination)).collect();
            let class = *rows.entry(cells).or_insert(s);
            subject.insert(s, class);
        }
        drop(rows);

        // Columns, over representative subjects only (the others' cells are copies).
        let mut by_column: Vec<(PolicyKey, PolicyValue)> = by_row
            .into_iter()
            .filter(|(k, _)| subject.get(&k.subject) == Some(&k.subject))
            .collect();
        by_column.sort_unstable_by_key(|(k, _)| (k.destination, k.subject, k.dport, k.protocol));
        let mut destination = HashMap::new();
        let mut columns: HashMap<Vec<Cell>, u32> = HashMap::new();
        for column in by_column.chunk_by(|a, b| a.0.destination == b.0.destination) {
            let d = column[0].0.destination;
            let cells: Vec<Cell> = column.iter().map(|(k, v)| cell(k, v, k.subject)).collect();
            let class = *columns.entry(cells).or_insert(d);
            destination.insert(d, class);
        }
        drop(columns);

        let entries = by_column
            .into_iter()
            .filter(|(k, _)| destination.get(&k.destination) == Some(&k.destination))
            .collect();
        Classes {
            subject,
            destination,
            entries,
        }
    }

    /// `identity`'s subject class ([`NO_CLASS`] without a row).
    pub fn subject_class(&self, identity: u32) -> u32 {
        self.subject.get(&identity).copied().unwrap_or(NO_CLASS)
    }

    /// `identity`'s destination class ([`NO_CLASS`] without a column).
    pub fn destination_class(&self, identity: u32) -> u32 {
        self.destination.get(&identity).copied().unwrap_or(NO_CLASS)
    }

    /// Distinct subject and destination classes.
    pub fn counts(&self) -> (usize, usize) {
        let distinct = |m: &HashMap<u32, u32>| m.iter().filter(|(id, class)| id == class).count();
        (distinct(&self.subject), distinct(&self.destination))
    }
}

/// The identity-keyed table a class table means, given each identity's (subject class,
/// destination class) in it: every entry fans out to its classes' members. Entries of classes
/// without members are not in it (no call can reach them).
pub fn decode<'a>(
    entries: impl IntoIterator<Item = (&'a PolicyKey, &'a PolicyValue)>,
    classes: impl IntoIterator<Item = (u32, u32, u32)>,
) -> HashMap<PolicyKey, PolicyValue> {
    let mut subjects: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut destinations: HashMap<u32, Vec<u32>> = HashMap::new();
    for (id, s, d) in classes {
        if s != NO_CLASS {
            subjects.entry(s).or_default().push(id);
        }
        if d != NO_CLASS {
            destinations.entry(d).or_default().push(id);
        }
    }
    let mut table = HashMap::new();
    for (k, v) in entries {
        let (Some(ss), Some(ds)) = (subjects.get(&k.subject), destinations.get(&k.destination))
        else {
            continue;
        };
        for &s in ss {
            for &d in ds {
                let key = PolicyKey {
                    subject: s,
                    destination: d,
                    ..*k
                };
                table.insert(key, *v);
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(subject: u32, destination: u32, dport: u16) -> PolicyKey {
        PolicyKey {
            subject,
            destination,
            dport,
            protocol: 6,
            _pad: 0,
        }
    }

    fn round_trip(table: &HashMap<PolicyKey, PolicyValue>) -> Classes {
        let classes = Classes::of(table);
        let ids: std::collections::BTreeSet<u32> = table
            .keys()
            .flat_map(|k| [k.subject, k.destination])
            .collect();
        let decoded = decode(
            &classes.entries,
            ids.iter()
                .map(|&i| (i, classes.subject_class(i), classes.destination_class(i))),
        );
        assert_eq!(&decoded, table);
        classes
    }

    proptest::proptest! {
        /// Any table, however irregular: its classes decode back to exactly it, and no
        /// class table is larger than the pair table.
        #[test]
        fn any_table_round_trips(cells in proptest::collection::vec(
            (256u32..272, 256u32..272, proptest::sample::select(vec![0u16, 22, 443]),
             0u32..3, proptest::bool::ANY),
            0..200,
        )) {
            let table: HashMap<PolicyKey, PolicyValue> = cells
                .into_iter()
                .map(|(s, d, port, rule, allow)| {
                    let v = if allow || port == 0 {
                        PolicyValue::allow(rule)
                    } else {
                        PolicyValue::deny(rule)
                    };
                    (key(s, d, port), v)
                })
                .collect();
            let classes = round_trip(&table);
            proptest::prop_assert!(classes.entries.len() <= table.len());
        }
    }

    #[test]
    fn allow_all_is_one_entry_per_port_shape() {
        // 300 identities, each subject and destination, all allowed on any port.
        let mut table = HashMap::new();
        for s in 256..556 {
            for d in 256..556 {
                table.insert(key(s, d, 0), PolicyValue::allow(0));
            }
        }
        let classes = round_trip(&table);
        assert_eq!(classes.entries.len(), 1);
        assert_eq!(classes.counts(), (1, 1));
    }

    #[test]
    fn tenants_and_exceptions_keep_their_own_classes() {
        // Two tenants of 50 allowed within themselves; one subject with a deny exception
        // on port 22 towards tenant A; one destination that declares port 443 only.
        let mut table = HashMap::new();
        for t in 0..2u32 {
            for s in 0..50 {
                for d in 0..50 {
                    table.insert(
                        key(256 + t * 100 + s, 256 + t * 100 + d, 0),
                        PolicyValue::allow(t),
                    );
                }
            }
        }
        for d in 0..50 {
            table.insert(key(300, 256 + d, 22), PolicyValue::deny(7));
        }
        for s in 0..50 {
            table.remove(&key(256 + s, 305, 0));
            table.insert(key(256 + s, 305, 443), PolicyValue::allow(0));
        }
        let classes = round_trip(&table);
        // Subjects: tenant A, the exception, tenant B. Destinations: A, the 443 one, B.
        assert_eq!(classes.counts(), (3, 3));
        assert!(classes.entries.len() < 20, "{}", classes.entries.len());
        assert_eq!(classes.subject_class(300), 300);
        assert_eq!(classes.subject_class(301), 256);
        assert_eq!(classes.destination_class(305), 305);
        assert_eq!(classes.subject_class(999), NO_CLASS);
    }
}
