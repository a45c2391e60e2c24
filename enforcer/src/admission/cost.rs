//! What reviewing a body costs in memory, known before it is parsed.
//!
//! Decoded, JSON takes more memory than its text, and how much more depends on what it says:
//! a value is a node of a tree (`serde`'s buffer for the envelope's unknown fields, the
//! `RawExtension` of `request.options`), a string, a map entry, or an element of a pod's
//! list. The webhook's body is written by whoever reaches its port, so the bytes a body may
//! hold do not bound what reviewing it takes: before this bound, one 4 MiB body of
//! `{"name":""}` volumes made the webhook allocate 3 GiB, and a body of `[]`s 280 MiB.
//!
//! So a body's values are counted first ([`json_values`], one pass that builds nothing),
//! and its review holds [`charge`] (per value, per byte, and per byte of its longest string)
//! of [`PARSE_BUDGET_BYTES`], shared
//! by the reviews in progress. The figures are upper bounds measured on the dearest shapes
//! (test `admission_memory`); what a pod's review builds beyond its decoded fields is bounded
//! by the pod's own rules (`MAX_JUDGED_ITEMS`, `confine::MAX_FINDINGS`, `NAME_BYTES`).

use std::cell::Cell;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// The most memory reviewing one JSON value of a body may take, in bytes: the dearest shape
/// measured, a list of `{"name":""}` containers, takes 222 (README, "Admission webhook").
pub const PARSE_BYTES_PER_VALUE: u64 = 320;

/// The most memory reviewing one byte of a body may take beyond its values' share: the
/// collected body (what was read), the strings decoded from it, their copy in the spec that
/// is judged, and room (the dearest shape measured, a long container name, takes 3).
pub const PARSE_BYTES_PER_BYTE: u64 = 4;

/// The memory the reviews in progress may take at once, in bytes: a review whose [`charge`]
/// is more is refused (at most 131,072 values), and reviews wait for their share of it. A
/// pod's review holds a few thousand values in tens of KiB: a few MiB.
pub const PARSE_BUDGET_BYTES: u64 = 40 << 20;

/// The most memory the body's longest string may take once more, per byte: a review stops
/// at its first decoding error, and serde's error for a string where something else was
/// expected quotes it escaped (DEL, one byte in JSON, is `\u{7f}`: 6), in a `String` grown
/// by doubling, then copied (the dearest shape measured takes 16: test `admission_memory`).
pub const PARSE_BYTES_PER_STRING_BYTE: u64 = 20;

/// What reviewing a body of `bytes` bytes with this [`Census`] may take, in bytes.
pub fn charge(census: Census, bytes: u64) -> u64 {
    census
        .values
        .saturating_mul(PARSE_BYTES_PER_VALUE)
        .saturating_add(bytes.saturating_mul(PARSE_BYTES_PER_BYTE))
        .saturating_add(
            census
                .longest_string
                .saturating_mul(PARSE_BYTES_PER_STRING_BYTE),
        )
}

/// What [`census`] counts of a body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Its JSON values: every scalar, string, array and object, and every object key.
    pub values: u64,
    /// The bytes of its longest string (key or value), unescaped.
    pub longest_string: u64,
}

/// The JSON values of `body` and its longest string ([`Census`]); `Err` with serde_json's
/// message (line and column) when it is not one JSON value. Nothing is built: strings are
/// borrowed or unescaped into the parser's scratch buffer, and nesting is bounded by
/// serde_json's recursion limit (128).
pub fn census(body: &[u8]) -> Result<Census, serde_json::Error> {
    let longest = Cell::new(0);
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let values = Count(&longest).deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(Census {
        values,
        longest_string: longest.get(),
    })
}

/// The JSON values of `body` ([`census`]).
pub fn json_values(body: &[u8]) -> Result<u64, serde_json::Error> {
    census(body).map(|c| c.values)
}

/// Counts one value and what it holds, and keeps the longest string's length.
#[derive(Clone, Copy)]
struct Count<'a>(&'a Cell<u64>);

impl<'de> DeserializeSeed<'de> for Count<'_> {
    type Value = u64;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! one {
    ($($name:ident: $ty:ty),*) => {
        $(fn $name<E>(self, _: $ty) -> Result<u64, E> {
            Ok(1)
        })*
    };
}

impl<'de> Visitor<'de> for Count<'_> {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    one!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64);

    fn visit_str<E>(self, s: &str) -> Result<u64, E> {
        self.0.set(self.0.get().max(s.len() as u64));
        Ok(1)
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<u64, E> {
        self.0.set(self.0.get().max(s.len() as u64));
        Ok(1)
    }

    fn visit_unit<E>(self) -> Result<u64, E> {
        Ok(1)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        let mut values = 1u64;
        while let Some(n) = seq.next_element_seed(self)? {
            values = values.saturating_add(n);
        }
        Ok(values)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
        let mut values = 1u64;
        while let Some(key) = map.next_key_seed(self)? {
            let value = map.next_value_seed(self)?;
            values = values.saturating_add(key).saturating_add(value);
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_and_key_is_counted_and_bad_json_is_named() {
        assert_eq!(json_values(b"1").unwrap(), 1);
        assert_eq!(json_values(br#" "a\"b" "#).unwrap(), 1);
        assert_eq!(json_values(b"[]").unwrap(), 1);
        assert_eq!(json_values(b"[[],{},null,true,-1.5]").unwrap(), 6);
        assert_eq!(json_values(br#"{"a":{"b":[1,2]},"c":""}"#).unwrap(), 9);
        let counted = census(br#"{"key":["a\u00e9b", "ab"]}"#).unwrap();
        assert_eq!(
            counted,
            Census {
                values: 5,
                longest_string: 4
            }
        );
        for (bad, why) in [
            (&b""[..], "EOF while parsing a value at line 1 column 0"),
            (b"[1,", "EOF while parsing a value at line 1 column 3"),
            (b"[1] 2", "trailing characters at line 1 column 5"),
            (b"{1:2}", "key must be a string at line 1 column 2"),
        ] {
            assert_eq!(json_values(bad).unwrap_err().to_string(), why);
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let error = json_values(deep.as_bytes()).unwrap_err().to_string();
        assert!(error.starts_with("recursion limit exceeded"), "{error}");
    }
}
