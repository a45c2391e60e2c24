//! The bearer token: loading it, and checking a request's `Authorization` header in constant
//! time.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// A bearer token. `Debug` never shows it.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// A token as given; surrounding whitespace (a trailing newline) is not part of it.
    pub fn new(raw: &str) -> Result<Self> {
        let token = raw.trim();
        if token.is_empty() {
            bail!("the bearer token is empty");
        }
        // RFC 6750 b64token: what may appear after `Bearer ` in a header.
        if !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b))
        {
            bail!("the bearer token may only contain A-Z a-z 0-9 - . _ ~ + / =");
        }
        Ok(Self(token.to_string()))
    }

    /// Reads a token file (the whole file, trimmed).
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::fs::read_secret(path, "fetch the policy from the PDP as an agent")
            .with_context(|| format!("reading the token file {}", path.display()))?;
        let raw = String::from_utf8(bytes)
            .with_context(|| format!("the token file {} is not UTF-8", path.display()))?;
        Self::new(&raw).with_context(|| format!("token file {}", path.display()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether an `Authorization` header value carries this token. The comparison takes the
    /// same time wherever the first difference is (it does depend on the presented length,
    /// which tells an attacker nothing about the token).
    pub fn matches_header(&self, header: Option<&[u8]>) -> bool {
        let Some(presented) = header.and_then(bearer) else {
            return false;
        };
        constant_time_eq(presented, self.0.as_bytes())
    }
}

/// The credentials of `Bearer <token>` (scheme case-insensitive, RFC 7235).
pub fn bearer(header: &[u8]) -> Option<&[u8]> {
    let header = header.trim_ascii();
    let (scheme, rest) = header.split_at(header.iter().position(|&b| b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Equality of two byte strings whose running time depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let len = a.len().max(b.len());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..len {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    // Keep the optimiser from turning the loop into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer   abc  "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearerabc"), None);
        assert_eq!(bearer(b""), None);
    }

    #[test]
    fn constant_time_equality() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"secret2", b"secret"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn token_checks_the_header() {
        let token = Token::new("s3cr3t-token\n").unwrap();
        assert_eq!(token.as_str(), "s3cr3t-token");
        assert!(token.matches_header(Some(b"Bearer s3cr3t-token")));
        assert!(!token.matches_header(Some(b"Bearer s3cr3t-tokem")));
        assert!(!token.matches_header(Some(b"Bearer s3cr3t-token2")));
        assert!(!token.matches_header(Some(b"s3cr3t-token")));
        assert!(!token.matches_header(None));
        assert!(!format!("{token:?}").contains("s3cr3t"));
    }

    #[test]
    fn bad_tokens_are_refused() {
        assert!(Token::new("  \n").is_err());
        assert!(Token::new("with space").is_err());
        assert!(Token::new("line\nbreak").is_err());
        assert!(Token::new("ok_TOKEN-1.2~3+4/5=").is_ok());
    }
}
