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
//! and its review holds [`charge`] (per value and per byte) of [`PARSE_BUDGET_BYTES`], shared
//! by the reviews in progress. The figures are upper bounds measured on the dearest shapes
//! (test `admission_memory`); what a pod's review builds beyond its decoded fields is bounded
//! by the pod's own rules (`MAX_JUDGED_ITEMS`, `confine::MAX_FINDINGS`, `NAME_BYTES`).

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

/// What reviewing a body of `bytes` bytes holding `values` JSON values may take, in bytes.
pub fn charge(values: u64, bytes: u64) -> u64 {
    values
        .saturating_mul(PARSE_BYTES_PER_VALUE)
        .saturating_add(bytes.saturating_mul(PARSE_BYTES_PER_BYTE))
}

/// The JSON values of `body`: every scalar, string, array and object, and every object key,
/// at any depth; `Err` with serde_json's message (line and column) when it is not one JSON
/// value. Nothing is built: strings are borrowed or unescaped into the parser's scratch
/// buffer, and nesting is bounded by serde_json's recursion limit (128).
pub fn json_values(body: &[u8]) -> Result<u64, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let values = Count.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(values)
}

/// Counts one value and what it holds.
#[derive(Clone, Copy)]
struct Count;

impl<'de> DeserializeSeed<'de> for Count {
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

impl<'de> Visitor<'de> for Count {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    one!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str,
         visit_borrowed_str: &'de str);

    fn visit_unit<E>(self) -> Result<u64, E> {
        Ok(1)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        let mut values = 1u64;
        while let Some(n) = seq.next_element_seed(Count)? {
            values = values.saturating_add(n);
        }
        Ok(values)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
        let mut values = 1u64;
        while let Some(key) = map.next_key_seed(Count)? {
            let value = map.next_value_seed(Count)?;
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
