//! The pure parts of the protocol: entity tags, the `wait` query parameter, PDP URLs and which
//! addresses count as loopback.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{BUNDLE_PATH, MAX_WAIT_SECS};

/// The `ETag` of a revision: a strong entity tag, `"sha256:..."`.
pub fn etag(revision: &str) -> String {
    format!("\"{revision}\"")
}

/// Whether an `If-None-Match` header value names `revision` (RFC 9110 13.1.2: a list of
/// entity tags, weak comparison, or `*`).
pub fn if_none_match_hits(header: &str, revision: &str) -> bool {
    header.split(',').map(str::trim).any(|tag| {
        if tag == "*" {
            return true;
        }
        let tag = tag.strip_prefix("W/").unwrap_or(tag);
        tag.len() >= 2
            && tag.starts_with('"')
            && tag.ends_with('"')
            && &tag[1..tag.len() - 1] == revision
    })
}

/// The long-poll wait of a request's query string (`wait=SECONDS`), capped at
/// [`MAX_WAIT_SECS`]; zero when absent. Other parameters are ignored.
pub fn parse_wait(query: Option<&str>) -> Result<Duration> {
    let mut wait = Duration::ZERO;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "wait" {
            let secs: u64 = value
                .parse()
                .with_context(|| format!("wait={value:?} is not a number of seconds"))?;
            wait = Duration::from_secs(secs.min(MAX_WAIT_SECS));
        }
    }
    Ok(wait)
}

/// Whether plain HTTP may listen on `addr`: loopback only (also `::ffff:127.x.y.z`).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// A parsed `--pdp` URL: `http://127.0.0.1:8443` or `https://pdp.example:8443/prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PdpUrl {
    pub https: bool,
    /// Host name or IP address, without brackets.
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash (empty for none).
    pub prefix: String,
}

impl PdpUrl {
    pub fn parse(url: &str) -> Result<Self> {
        let url = url.trim();
        let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            bail!("PDP URL {url:?} must start with https:// (or http:// on loopback)");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            bail!("PDP URL {url:?}: credentials go in the token file, not the URL");
        }
        if path.contains('?') || path.contains('#') {
            bail!("PDP URL {url:?} must not have a query or fragment");
        }
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .with_context(|| format!("PDP URL {url:?}: unclosed '['"))?;
            let port = match after {
                "" => default_port,
                p => p
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok())
                    .with_context(|| format!("PDP URL {url:?}: bad port"))?,
            };
            host.parse::<std::net::Ipv6Addr>()
                .with_context(|| format!("PDP URL {url:?}: bad IPv6 address"))?;
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (
                    host.to_string(),
                    port.parse()
                        .with_context(|| format!("PDP URL {url:?}: bad port {port:?}"))?,
                ),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            bail!("PDP URL {url:?} has no host");
        }
        let parsed = Self {
            https,
            host,
            port,
            prefix: path.trim_end_matches('/').to_string(),
        };
        if !https && !parsed.is_loopback() {
            bail!(
                "PDP URL {url:?}: plain http:// would send the token in clear text; it is allowed \
                 only to a loopback address (127.0.0.0/8, ::1, localhost). Use https://"
            );
        }
        Ok(parsed)
    }

    /// Whether the host is a loopback address or `localhost`.
    pub fn is_loopback(&self) -> bool {
        match self.host.parse::<IpAddr>() {
            Ok(ip) => ip.to_canonical().is_loopback(),
            Err(_) => self.host.eq_ignore_ascii_case("localhost"),
        }
    }

    /// `host:port` for connecting (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The request target of the bundle with a long-poll wait.
    pub fn bundle_target(&self, wait: Duration) -> String {
        format!("{}{BUNDLE_PATH}?wait={}", self.prefix, wait.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_round_trip_through_if_none_match() {
        let rev = "sha256:0123456789abcdef";
        assert_eq!(etag(rev), "\"sha256:0123456789abcdef\"");
        assert!(if_none_match_hits(&etag(rev), rev));
        assert!(if_none_match_hits(&format!("W/{}", etag(rev)), rev));
        assert!(if_none_match_hits(
            &format!("\"other\", {}", etag(rev)),
            rev
        ));
        assert!(if_none_match_hits("*", rev));
        assert!(!if_none_match_hits("\"sha256:0123456789abcdee\"", rev));
        assert!(
            !if_none_match_hits(rev, rev),
            "unquoted is not an entity tag"
        );
        assert!(!if_none_match_hits("\"", rev));
        assert!(!if_none_match_hits("", rev));
    }

    #[test]
    fn wait_is_parsed_and_capped() {
        assert_eq!(parse_wait(None).unwrap(), Duration::ZERO);
        assert_eq!(parse_wait(Some("")).unwrap(), Duration::ZERO);
        assert_eq!(parse_wait(Some("wait=5")).unwrap(), Duration::from_secs(5));
        assert_eq!(
            parse_wait(Some("x=1&wait=3600")).unwrap(),
            Duration::from_secs(MAX_WAIT_SECS)
        );
        assert!(parse_wait(Some("wait=-1")).is_err());
        assert!(parse_wait(Some("wait=soon")).is_err());
    }

    #[test]
    fn loopback_listen_addresses() {
        for ok in [
            "127.0.0.1:1",
            "127.3.4.5:80",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_loopback(&ok.parse().unwrap()), "{ok}");
        }
        for no in ["0.0.0.0:1", "[::]:1", "10.0.0.1:1", "[::ffff:10.0.0.1]:1"] {
            assert!(!is_loopback(&no.parse().unwrap()), "{no}");
        }
    }

    #[test]
    fn urls() {
        let u = PdpUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            u,
            PdpUrl {
                https: false,
                host: "127.0.0.1".into(),
                port: 8080,
                prefix: String::new()
            }
        );
        assert_eq!(
            u.bundle_target(Duration::from_secs(25)),
            "/v1/bundle?wait=25"
        );
        let u = PdpUrl::parse("https://pdp.example.com/base/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.https),
            ("pdp.example.com", 443, true)
        );
        assert_eq!(u.bundle_target(Duration::ZERO), "/base/v1/bundle?wait=0");
        let u = PdpUrl::parse("http://[::1]:9").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9));
        assert_eq!(u.authority(), "[::1]:9");
        assert!(PdpUrl::parse("http://localhost:9").is_ok());
        // Clear text to anything but loopback is refused.
        assert!(PdpUrl::parse("http://10.1.2.3:80").is_err());
        assert!(PdpUrl::parse("http://pdp.example.com").is_err());
        for bad in [
            "ftp://x",
            "127.0.0.1:80",
            "https://",
            "https://h:port",
            "https://u:p@h",
            "https://h/?q",
            "https://[::1",
        ] {
            assert!(PdpUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
