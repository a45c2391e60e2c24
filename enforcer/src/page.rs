//! Paging (`--page-webhook URL`): an anomaly that stepped a subject up is POSTed as JSON to an
//! on-call webhook. The pager is its own task behind a bounded queue: [`Pager::page`] never
//! waits, so a slow or dead webhook can hold up neither the agent's loop nor the ring-buffer
//! drain. Each page is tried [`ATTEMPTS`] times with exponential backoff, then dropped; a
//! page that finds the queue full is dropped at once. Both are logged and counted
//! ([`PageCounts`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Pages waiting for the webhook; beyond this a page is dropped (and counted).
pub const QUEUE: usize = 64;
/// Tries per page (the first included).
pub const ATTEMPTS: u32 = 5;
/// The wait before the second try; doubled before each further one (0.2, 0.4, 0.8, 1.6 s:
/// a page gives up about 3 s after it was first tried, so a dead webhook holds no page long).
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// One try (connect, send, answer) gives up after this long.
const TRY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where pages go: `http://HOST:PORT/PATH` (HTTP only: the webhook is expected on the node's
/// network or behind a local relay). Shown (`Display`, `Debug`) as `http://HOST:PORT` only:
/// on-call webhooks carry their credential in the path or the query (Slack's
/// `/services/T/B/<secret>`, `?token=`, `?code=`), and the agent's log is read more widely than
/// its command line (red-team review 73 L1).
#[derive(Clone)]
pub struct Webhook {
    uri: Uri,
    authority: String,
}

impl Webhook {
    /// Parses `--page-webhook`. Errors: not an absolute `http://` URL.
    pub fn parse(text: &str) -> Result<Webhook> {
        // Errors name the URL without its path, query or credentials (see `Display`): the
        // agent's start error is logged, and in a crash loop logged again at every restart.
        let text_shown = shown(text);
        let text_shown = text_shown.as_str();
        let uri: Uri = text
            .parse()
            .with_context(|| format!("--page-webhook {text_shown:?} is not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                bail!("--page-webhook {text_shown:?}: scheme {other}:// is not supported (http:// only)")
            }
            None => {
                bail!("--page-webhook {text_shown:?}: give an absolute URL, http://HOST:PORT/PATH")
            }
        }
        let Some(authority) = uri.authority() else {
            bail!("--page-webhook {text_shown:?} has no host");
        };
        // `http::Uri` takes a port it cannot read (`:99999`, `:abc`, `:`) as none, which
        // would page port 80; and credentials in the URL would be sent as the host.
        if authority.as_str().contains('@') {
            bail!("--page-webhook {text_shown:?}: credentials in the URL are not supported");
        }
        let authority = match (authority.port_u16(), authority.as_str().rsplit_once(':')) {
            (Some(_), _) => authority.to_string(),
            (None, Some((_, port))) if !port.ends_with(']') => {
                // Not the port's text: with credentials cut short by a `/` it is theirs.
                bail!("--page-webhook {text_shown:?}: invalid port (1-65535)")
            }
            (None, _) => format!("{}:80", authority.host()),
        };
        if uri.port_u16() == Some(0) {
            bail!("--page-webhook {text_shown:?}: invalid port (1-65535)");
        }
        Ok(Webhook { uri, authority })
    }

    fn target(&self) -> &str {
        self.uri.path_and_query().map_or("/", |p| p.as_str())
    }
}

/// A URL as messages show it: the scheme and authority without credentials (`user:pass@`),
/// then `/...` when anything followed (a path, a query: where webhooks keep their secret).
fn shown(text: &str) -> String {
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), text),
    };
    // Credentials end at the first `@` (one of theirs is `%40`), and may hold a `/` (which
    // then ends the authority as a parser reads it): what comes before an `@` that no `?` or
    // `#` precedes is left out.
    let query = rest.find(['?', '#']).unwrap_or(rest.len());
    let rest = match rest[..query].find('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let tail = if end < rest.len() { "/..." } else { "" };
    crate::admission::text::cut(&format!("{scheme}{authority}{tail}"), 300)
}

impl std::fmt::Display for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Parsing allows `http://` only; `authority` has the port, 80 when none was given.
        write!(f, "http://{}", self.authority)
    }
}

/// As `Display`: `RunOptions`, which holds one, derives `Debug`.
impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Webhook({self})")
    }
}

/// What the pager did since the agent started.
#[derive(Debug, Default)]
pub struct PageCounts {
    /// Pages the webhook accepted (a 2xx answer).
    pub sent: AtomicU64,
    /// Tries that failed (refused, timed out, or a non-2xx answer).
    pub failed_tries: AtomicU64,
    /// Pages given up after [`ATTEMPTS`] tries.
    pub given_up: AtomicU64,
    /// Pages dropped because [`QUEUE`] pages were already waiting.
    pub dropped: AtomicU64,
}

/// The handle the agent pages through.
#[derive(Clone)]
pub struct Pager {
    tx: mpsc::Sender<serde_json::Value>,
    counts: Arc<PageCounts>,
}

impl Pager {
    /// Starts the pager task (on the current tokio runtime).
    pub fn spawn(webhook: Webhook) -> Pager {
        let (tx, rx) = mpsc::channel(QUEUE);
        let counts = Arc::new(PageCounts::default());
        tokio::spawn(deliver(webhook, rx, counts.clone()));
        Pager { tx, counts }
    }

    /// Queues `body`; never waits. A full queue drops it (logged and counted).
    pub fn page(&self, body: serde_json::Value) {
        if self.tx.try_send(body).is_err() {
            let dropped = self.counts.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::error!(
                dropped,
                queue = QUEUE,
                "page dropped: the webhook queue is full"
            );
        }
    }

    pub fn counts(&self) -> &PageCounts {
        &self.counts
    }
}

async fn deliver(
    webhook: Webhook,
    mut rx: mpsc::Receiver<serde_json::Value>,
    counts: Arc<PageCounts>,
) {
    while let Some(body) = rx.recv().await {
        let body = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            let result = match tokio::time::timeout(TRY_TIMEOUT, post(&webhook, body.clone())).await
            {
                Ok(result) => result,
                Err(_) => Err(anyhow::anyhow!("no answer within {TRY_TIMEOUT:?}")),
            };
            match result {
                Ok(()) => {
                    counts.sent.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%webhook, attempt, "page sent");
                    break;
                }
                Err(error) => {
                    counts.failed_tries.fetch_add(1, Ordering::Relaxed);
                    if attempt == ATTEMPTS {
                        let given_up = counts.given_up.fetch_add(1, Ordering::Relaxed) + 1;
                        tracing::error!(%webhook, attempts = ATTEMPTS, given_up, "page not delivered, given up: {error:#}");
                    } else {
                        tracing::warn!(%webhook, attempt, retry_in_ms = backoff.as_millis() as u64, "page failed: {error:#}");
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                }
            }
        }
    }
}

/// One POST; Ok on a 2xx answer.
async fn post(webhook: &Webhook, body: Bytes) -> Result<()> {
    let tcp = TcpStream::connect(&webhook.authority)
        .await
        .with_context(|| format!("connecting to {}", webhook.authority))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .context("HTTP handshake")?;
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::post(webhook.target())
        .header(header::HOST, &webhook.authority)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .context("building the request")?;
    let answer = sender
        .send_request(request)
        .await
        .context("sending the page");
    connection.abort();
    let status = answer?.status();
    if !status.is_success() {
        bail!("the webhook answered {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls() {
        let hook = Webhook::parse("http://127.93.0.1:8080/page?team=sec").unwrap();
        assert_eq!(hook.authority, "127.93.0.1:8080");
        assert_eq!(hook.target(), "/page?team=sec");
        let hook = Webhook::parse("http://pager.local").unwrap();
        assert_eq!(hook.authority, "pager.local:80");
        assert_eq!(hook.target(), "/");
        let err = Webhook::parse("https://pager.local/x").unwrap_err();
        assert!(err.to_string().contains("http:// only"), "{err}");
        assert!(Webhook::parse("/relative").is_err());
        assert_eq!(
            Webhook::parse("http://[::1]:9000/p").unwrap().authority,
            "[::1]:9000"
        );
        assert_eq!(
            Webhook::parse("http://[::1]/p").unwrap().authority,
            "[::1]:80"
        );
        // A port `http::Uri` cannot read would have paged port 80 (red-team review 39).
        for bad in [
            "http://pager:99999/x",
            "http://pager:abc/x",
            "http://pager:/x",
            "http://pager:0/x",
            "http://pager:00/x",
        ] {
            let err = Webhook::parse(bad).unwrap_err();
            assert!(err.to_string().contains("invalid port"), "{bad}: {err}");
        }
        let err = Webhook::parse("http://u:p@pager:8080/x").unwrap_err();
        assert!(err.to_string().contains("credentials"), "{err}");
    }

    /// A refused URL's error is the agent's start error, logged at every restart of a crash
    /// loop: it names the URL without its path, query or credentials (red-team review 73 L1).
    #[test]
    fn a_refused_url_is_named_without_its_secret() {
        for (bad, kept) in [
            (
                "https://hooks.slack.com/services/T0/B0/SECRET",
                "https://hooks.slack.com/...",
            ),
            ("http://u:SECRET@pager:8080/x", "http://pager:8080/..."),
            (
                "http://pager:99999/x?token=SECRET",
                "http://pager:99999/...",
            ),
            ("hooks.slack.com/services/SECRET", "hooks.slack.com/..."),
            ("http://u:SE/CRET@pager:8080/x", "http://pager:8080/..."),
        ] {
            let err = format!("{:#}", Webhook::parse(bad).unwrap_err());
            assert!(!err.contains("SECRET"), "{bad}: {err}");
            assert!(err.contains(kept), "{bad}: {err}");
        }
    }

    /// Webhooks carry their credential in the path or query (Slack's `/services/T/B/<secret>`,
    /// `?token=`, `?code=`), and every try was logged with the whole URL (red-team review 73
    /// L1): the log form is the scheme, host and port only; the request keeps the URL.
    #[test]
    fn the_log_form_hides_path_and_query() {
        let hook = Webhook::parse("http://h:9/services/T/B/SECRET?token=x").unwrap();
        for shown in [format!("{hook}"), format!("{hook:?}")] {
            assert!(
                !shown.contains("SECRET") && !shown.contains("token") && !shown.contains("/T/B"),
                "{shown}"
            );
            assert!(shown.contains("http://h:9"), "{shown}");
        }
        assert_eq!(hook.to_string(), "http://h:9");
        assert_eq!(
            Webhook::parse("http://pager.local/p?code=c")
                .unwrap()
                .to_string(),
            "http://pager.local:80"
        );
        assert_eq!(
            Webhook::parse("http://[::1]:9000/p").unwrap().to_string(),
            "http://[::1]:9000"
        );
        assert_eq!(hook.target(), "/services/T/B/SECRET?token=x");
    }
}
