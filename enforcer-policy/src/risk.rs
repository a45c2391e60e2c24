//! Risk scores: Cedar decimals, and the runtime overrides `enforcer risk set` makes.
//!
//! A Cedar decimal is a signed 64-bit integer scaled by 10^4: `-922337203685477.5808` to
//! `922337203685477.5807`, with one to four fractional digits. Scores are kept in a canonical
//! text form (no leading zeros, no trailing fractional zeros, always a `.`), so that equal
//! scores are equal strings and group together when compiling.

use std::collections::BTreeMap;

/// Parse a Cedar decimal (`-`? digits, then optionally `.` and one to four digits) into its
/// value scaled by 10^4. A missing fractional part is accepted (`1` is `1.0`), as YAML writes
/// whole numbers without one; Cedar's own `decimal("...")` needs it, which the canonical form
/// always has.
pub fn parse_decimal(s: &str) -> Result<i64, String> {
    const HINT: &str = "expected a Cedar decimal: digits, optionally `-` before and `.` with 1 to 4 digits after (e.g. 0.85)";
    let (negative, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, f),
        None => (body, "0"),
    };
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    if s.is_empty() {
        return Err(format!("empty score: {HINT}"));
    }
    if !digits(int) || !digits(frac) {
        return Err(format!("`{s}` is not a decimal number: {HINT}"));
    }
    if frac.len() > 4 {
        return Err(format!(
            "`{s}` has {} fractional digits; Cedar decimals have at most 4",
            frac.len()
        ));
    }
    let out_of_range = || {
        format!("`{s}` is out of the range of a Cedar decimal (-922337203685477.5808 to 922337203685477.5807)")
    };
    // At most 19 significant digits fit; longer (leading zeros aside) is out of range anyway.
    let int = int.trim_start_matches('0');
    if int.len() > 16 {
        return Err(out_of_range());
    }
    let whole: i128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| out_of_range())?
    };
    let frac_value: i128 = format!("{frac:0<4}").parse().map_err(|_| out_of_range())?;
    let magnitude = whole * 10_000 + frac_value;
    let value = if negative { -magnitude } else { magnitude };
    i64::try_from(value).map_err(|_| out_of_range())
}

/// The canonical text of a scaled decimal: `0.9`, `-1.25`, `3.0`.
pub fn format_decimal(value: i64) -> String {
    let v = value as i128;
    let (sign, abs) = if v < 0 { ("-", -v) } else { ("", v) };
    let frac = format!("{:04}", abs % 10_000);
    let frac = frac.trim_end_matches('0');
    let frac = if frac.is_empty() { "0" } else { frac };
    format!("{sign}{}.{frac}", abs / 10_000)
}

/// Validate a decimal and return its canonical text.
pub fn canonical_decimal(s: &str) -> Result<String, String> {
    parse_decimal(s).map(format_decimal)
}

/// The suffix a policy snapshot carries while risk overrides are in force:
/// `+risk(N):HHHHHHHH`, N the number of overrides and HHHHHHHH the first 8 hex digits of a
/// SHA-256 over the sorted (workload, score) pairs. Empty without overrides.
pub fn overrides_suffix(overrides: &BTreeMap<String, String>) -> String {
    if overrides.is_empty() {
        return String::new();
    }
    let pairs = overrides
        .iter()
        .map(|(w, score)| (w.as_str(), score.as_str()));
    let hex = crate::hash_pairs(pairs, 4);
    format!("+risk({}):{hex}", overrides.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_parse_and_canonicalise() {
        for (input, canonical) in [
            ("0.9", "0.9"),
            ("0.90", "0.9"),
            ("00.9000", "0.9"),
            ("1", "1.0"),
            ("1.0", "1.0"),
            ("-0.0", "0.0"),
            ("-1.25", "-1.25"),
            ("0.0001", "0.0001"),
            ("922337203685477.5807", "922337203685477.5807"),
            ("-922337203685477.5808", "-922337203685477.5808"),
        ] {
            assert_eq!(
                canonical_decimal(input).as_deref(),
                Ok(canonical),
                "{input}"
            );
        }
        for (bad, why) in [
            ("", "empty"),
            ("abc", "not a decimal"),
            ("0.12345", "5 fractional digits"),
            ("+0.5", "not a decimal"),
            (".5", "not a decimal"),
            ("5.", "not a decimal"),
            ("1e3", "not a decimal"),
            ("0.5 ", "not a decimal"),
            ("0,5", "not a decimal"),
            ("--1", "not a decimal"),
            ("NaN", "not a decimal"),
            ("922337203685477.5808", "out of the range"),
            ("-922337203685477.5809", "out of the range"),
            ("99999999999999999999999", "out of the range"),
        ] {
            let e = canonical_decimal(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn suffix_names_the_overrides() {
        let mut o = BTreeMap::new();
        assert_eq!(overrides_suffix(&o), "");
        o.insert("a".to_string(), "0.9".to_string());
        let one = overrides_suffix(&o);
        assert!(one.starts_with("+risk(1):") && one.len() == 9 + 8, "{one}");
        o.insert("a".to_string(), "0.8".to_string());
        assert_ne!(overrides_suffix(&o), one);
        o.insert("b".to_string(), "0.1".to_string());
        assert!(overrides_suffix(&o).starts_with("+risk(2):"));
    }
}
