//! The PDP's protocol code driven by bytes, for the fuzz targets in `fuzz/` (`cargo xtask
//! fuzz`). Only with the `fuzzing` feature (and in tests): not part of the agent's API.
//!
//! Both sides run the real code over an in-memory stream, so what is fuzzed is what a socket
//! reaches: on the server, hyper's HTTP/1 parsing and then `respond` (token, path, method,
//! `wait`, `If-None-Match`, long poll); on the agent, the response's status, headers, body
//! limit and JSON, and then `install` (stage, validate, revision check, swap). Run these on a
//! paused tokio clock: every timeout then fires at once, whatever the bytes make the code wait
//! for.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use super::files::{read_bundle_files, validate};
pub use super::WireBundle;

use super::auth::Token;
use super::http::PdpUrl;

/// The bearer token the fuzzed server accepts and the fuzzed agent presents.
pub const TOKEN: &str = "fuzz-token";

/// How long (on the paused clock) one exchange may take: longer than every timeout of the
/// code (a long poll, the header read timeout), so each of them fires first.
const EXCHANGE: Duration = Duration::from_secs(3600);

/// One connection to the PDP server, which serves `body` as revision `revision`: the client
/// sends `request` and keeps its side open (hyper drops a connection at the client's EOF);
/// returns every byte the server wrote before it closed the connection or [`EXCHANGE`] ran
/// out.
pub async fn serve_bytes(request: &[u8], revision: &str, body: Bytes) -> Vec<u8> {
    let (client, server) = tokio::io::duplex(64 << 10);
    let token = Token::new(TOKEN).expect("TOKEN is a valid token");
    let server = super::serve::serve_stream(server, token, revision.to_string(), body);
    let (mut read, mut write) = tokio::io::split(client);
    let mut answer = Vec::new();
    {
        let send = async {
            // Fails once the server has closed: what it read is what it got.
            let _ = write.write_all(request).await;
            std::future::pending::<()>().await
        };
        let receive = read.read_to_end(&mut answer);
        let _ = tokio::time::timeout(EXCHANGE, async { tokio::join!(server, send, receive) }).await;
    }
    answer
}

/// The agent's request for the bundle (with `have` as its current revision), answered by a
/// PDP that reads the request head and writes `response`, then closes: what `sync` makes of
/// it (`None` for "not modified").
pub async fn fetch_bytes(response: &[u8], have: Option<&str>) -> Result<Option<WireBundle>> {
    let (client, server) = tokio::io::duplex(64 << 10);
    let pdp = async move {
        let (mut read, mut write) = tokio::io::split(server);
        let mut head = Vec::new();
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = write.write_all(response).await;
        let _ = write.shutdown().await;
    };
    let url = PdpUrl::parse("http://127.0.0.1:1").expect("a valid URL");
    let token = Token::new(TOKEN).expect("TOKEN is a valid token");
    let authority = url.authority();
    let agent = tokio::time::timeout(
        EXCHANGE,
        super::sync::request_bundle(
            Box::new(client),
            &url,
            &authority,
            &token,
            have,
            super::sync::LONG_POLL,
        ),
    );
    let ((), fetched) = tokio::join!(pdp, agent);
    fetched.context("the PDP did not answer in time")?
}

/// Installs a bundle from the PDP into `target`, as the sync task does.
pub fn install(wire: WireBundle, target: &Path) -> Result<String> {
    let status = std::sync::Mutex::new(super::PdpStatus::new("fuzz"));
    super::sync::install(wire, target, &status)
}

/// The fuzz targets are only as good as what these entry points reach: the real handling
/// of a request and of an answer, not an early error of the in-memory plumbing.
#[cfg(test)]
mod tests {
    use super::*;

    const REVISION: &str = "sha256:0011223344556677";

    async fn serve(request: &str) -> String {
        let body = Bytes::from_static(b"{\"revision\":\"sha256:0011223344556677\",\"files\":{}}");
        String::from_utf8(serve_bytes(request.as_bytes(), REVISION, body).await).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn the_server_answers_as_over_a_socket() {
        let get = format!("GET /v1/bundle HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
        let answer = serve(&get).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(
            answer.contains(&format!("etag: \"{REVISION}\"")),
            "{answer}"
        );
        assert!(answer.ends_with("\"files\":{}}"), "{answer}");

        let answer = serve("GET /v1/bundle HTTP/1.1\r\nAuthorization: Bearer nope\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
        assert!(!answer.contains("files"), "{answer}");

        // A long poll on the current revision ends (on the paused clock) with 304; a second,
        // pipelined request on the same connection is answered too.
        let poll = format!(
            "GET /v1/bundle?wait=30 HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\
             If-None-Match: \"{REVISION}\"\r\n\r\n{get}"
        );
        let answer = serve(&poll).await;
        assert!(
            answer.starts_with("HTTP/1.1 304 Not Modified\r\n"),
            "{answer}"
        );
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 2, "{answer}");

        let answer = serve("GARBAGE\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    }

    fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[tokio::test(start_paused = true)]
    async fn the_agent_reads_answers_as_over_a_socket() {
        let json = format!("{{\"revision\":\"{REVISION}\",\"files\":{{\"a.cedar\":\"x\"}}}}");
        let wire = fetch_bytes(&response("200 OK", "application/json", &json), None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(wire.revision, REVISION);
        assert_eq!(wire.files["a.cedar"], "x");

        let not_modified = b"HTTP/1.1 304 Not Modified\r\n\r\n";
        assert!(fetch_bytes(not_modified, Some(REVISION))
            .await
            .unwrap()
            .is_none());

        let error = fetch_bytes(&response("401 Unauthorized", "text/plain", "no\n"), None)
            .await
            .unwrap_err();
        assert!(
            format!("{error:#}").contains("refused our token"),
            "{error:#}"
        );
        let error = fetch_bytes(&response("200 OK", "text/html", "<p>"), None)
            .await
            .unwrap_err();
        assert!(format!("{error:#}").contains("not JSON"), "{error:#}");
        // An answer that never completes ends with the exchange's timeout, not a hang.
        let error = fetch_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{", None)
            .await
            .unwrap_err();
        assert!(!format!("{error:#}").is_empty());
    }
}
