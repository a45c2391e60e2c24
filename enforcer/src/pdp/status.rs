//! What a node knows about its PDP: where the policy comes from, when it last heard from it,
//! what went wrong, and how stale its bundle is. Written as JSON next to the bundle directory
//! after every attempt, so that `enforcer status` (another process) can show it.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The status file of a bundle directory: `<target_dir>/../pdp-status.json`.
pub fn status_file(target_dir: &Path) -> PathBuf {
    target_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join("pdp-status.json")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PdpStatus {
    /// The PDP's URL.
    pub url: String,
    /// When the PDP last answered with a bundle or confirmed ours (RFC 3339 in JSON).
    #[serde(with = "rfc3339_opt")]
    pub last_success: Option<SystemTime>,
    /// When the last request ended, well or badly.
    #[serde(with = "rfc3339_opt")]
    pub last_attempt: Option<SystemTime>,
    /// Why the last attempt failed; `None` after a success.
    pub last_error: Option<String>,
    /// The revision in the bundle directory (what the agent enforces once it has loaded it).
    pub revision: Option<String>,
    /// Seconds since `last_success`; `None` when the PDP was never reached. When read from the
    /// file ([`read_status`]) it is recomputed at reading time.
    pub stale_seconds: Option<u64>,
    /// Failed attempts since the last success.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// Failed attempts since the sync task started (a counter: `enforcer_pdp_sync_errors_total`).
    #[serde(default)]
    pub errors_total: u64,
}

impl PdpStatus {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_string(),
            last_success: None,
            last_attempt: None,
            last_error: None,
            revision: None,
            stale_seconds: None,
            consecutive_failures: 0,
            errors_total: 0,
        }
    }

    /// This status with `stale_seconds` as of `now`.
    pub fn at(mut self, now: SystemTime) -> Self {
        self.stale_seconds = self
            .last_success
            .map(|t| now.duration_since(t).unwrap_or_default().as_secs());
        self
    }
}

/// Reads a status file written by a node's sync task, with `stale_seconds` as of now.
/// `Ok(None)` when there is none (the agent does not use a remote PDP).
pub fn read_status(file: &Path) -> Result<Option<PdpStatus>> {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let status: PdpStatus =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    Ok(Some(status.at(SystemTime::now())))
}

mod rfc3339_opt {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| humantime::parse_rfc3339(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn status_file_sits_beside_the_bundle() {
        assert_eq!(
            status_file(Path::new("/run/enforcer/x/pdp-bundle")),
            Path::new("/run/enforcer/x/pdp-status.json")
        );
        assert_eq!(
            status_file(Path::new("bundle")),
            Path::new("./pdp-status.json")
        );
    }

    #[test]
    fn round_trips_as_json_with_staleness() {
        let t = humantime::parse_rfc3339("2026-01-02T03:04:05.678Z").unwrap();
        let status = PdpStatus {
            last_success: Some(t),
            last_attempt: Some(t + Duration::from_secs(30)),
            last_error: Some("connection refused".into()),
            revision: Some("sha256:0123456789abcdef".into()),
            consecutive_failures: 3,
            ..PdpStatus::new("https://pdp:8443")
        }
        .at(t + Duration::from_secs(90));
        assert_eq!(status.stale_seconds, Some(90));
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["last_success"], "2026-01-02T03:04:05.678Z");
        assert_eq!(json["stale_seconds"], 90);
        let back: PdpStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
        assert_eq!(PdpStatus::new("u").at(t).stale_seconds, None);
    }

    #[test]
    fn reading_recomputes_staleness() {
        let dir = crate::pdp::files::tests::TestDir::new("status");
        let file = dir.0.join("pdp-status.json");
        assert_eq!(read_status(&file).unwrap(), None);
        let old = SystemTime::now() - Duration::from_secs(100);
        let status = PdpStatus {
            last_success: Some(old),
            stale_seconds: Some(0),
            ..PdpStatus::new("u")
        };
        std::fs::write(&file, serde_json::to_vec(&status).unwrap()).unwrap();
        let read = read_status(&file).unwrap().unwrap();
        assert!(read.stale_seconds.unwrap() >= 100, "{read:?}");
    }
}
