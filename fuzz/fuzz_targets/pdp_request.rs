//! The PDP server's side of a connection: arbitrary bytes from a client (one request, several
//! pipelined, or garbage) through hyper and the PDP's request handling. Never a panic; every
//! response is HTTP/1.x; the bundle is never sent to a client that did not present the token.
#![no_main]

use bytes::Bytes;
use enforcer::pdp::fuzzing::{serve_bytes, TOKEN};
use enforcer_fuzz::runtime;
use libfuzzer_sys::fuzz_target;

const REVISION: &str = "sha256:00112233445566778899aabbccddeeff";
/// In the served body and nowhere else: its presence in an answer means the bundle was sent.
const SECRET: &str = "bundle-content-6f1c2d";

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let body = Bytes::from(format!(
        "{{\"revision\":\"{REVISION}\",\"files\":{{\"x.cedar\":\"// {SECRET}\"}}}}"
    ));
    let answer = runtime().block_on(serve_bytes(data, REVISION, body));
    assert!(
        // HTTP/1.0 requests are answered in HTTP/1.0.
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 ") || answer.starts_with(b"HTTP/1.0 "),
        "not an HTTP/1.x response: {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );
    if find(&answer, SECRET.as_bytes()) {
        assert!(
            find(data, TOKEN.as_bytes()),
            "the bundle was served to a request without the token"
        );
    }
});
