//! The agent's local control socket: `enforcer risk set` and `enforcer quarantine ...` talk
//! to the running agent through it. One JSON request line, one JSON response line. The socket
//! is mode 0600 and the agent also checks the peer's credentials: root only.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Set a workload's risk score (a Cedar decimal) and re-evaluate its row.
    RiskSet {
        workload: String,
        score: String,
    },
    /// Lift a quarantine.
    QuarantineRelease {
        workload: String,
    },
    /// Quarantine a workload by hand.
    QuarantineAdd {
        workload: String,
    },
    QuarantineList,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<String>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Self {
            ok: true,
            message: message.into(),
            items: Vec::new(),
        }
    }
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            message: message.into(),
            items: Vec::new(),
        }
    }
}

/// A request on its way to the agent's main loop, which owns the policy and the maps.
pub type Pending = (Request, oneshot::Sender<Response>);

/// Binds the socket and forwards each request to `requests`.
pub fn listen(
    state_dir: &Path,
    requests: mpsc::Sender<Pending>,
) -> Result<tokio::task::JoinHandle<()>> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let path = socket_path(state_dir);
    // A socket file left by a killed agent would make bind fail.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let requests = requests.clone();
            tokio::spawn(async move {
                if let Err(error) = serve_one(stream, requests).await {
                    tracing::warn!("control socket: {error:#}");
                }
            });
        }
    }))
}

/// The request line's bound (a request is a few hundred bytes; a bundle is never sent here).
const MAX_REQUEST: u64 = 1 << 20;
/// How long a client may take to send its request line.
const REQUEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

async fn serve_one(stream: UnixStream, requests: mpsc::Sender<Pending>) -> Result<()> {
    let peer = stream
        .peer_cred()
        .context("reading the peer's credentials")?;
    let (read, mut write) = stream.into_split();
    let response = if peer.uid() != 0 {
        Response::error(format!("permission denied: uid {} is not root", peer.uid()))
    } else {
        // Bounded in size and time like the events socket's request: a request is a line of a
        // few hundred bytes, and a connection that never finishes it must not keep a task
        // and a growing buffer.
        let mut line = String::new();
        let mut read = tokio::io::AsyncReadExt::take(AsyncBufReader::new(read), MAX_REQUEST);
        tokio::time::timeout(REQUEST_DEADLINE, read.read_line(&mut line))
            .await
            .context("no request line within 10 s")??;
        match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                tracing::info!(?request, pid = ?peer.pid(), "control request");
                let (reply, answer) = oneshot::channel();
                requests
                    .send((request, reply))
                    .await
                    .context("the agent is stopping")?;
                answer.await.context("the agent dropped the request")?
            }
            Err(error) => Response::error(format!("malformed request: {error}")),
        }
    };
    let mut line = serde_json::to_vec(&response)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    Ok(())
}

/// Client side, for the CLI: sends one request to the agent behind `state_dir`.
pub fn call(state_dir: &Path, request: &Request) -> Result<Response> {
    let path = socket_path(state_dir);
    let mut stream = StdUnixStream::connect(&path)
        .with_context(|| format!("connecting to the agent's control socket {} (is `enforcer run` running with this --pin-path/--state-dir?)", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    if answer.is_empty() {
        bail!("the agent closed the control socket without an answer");
    }
    serde_json::from_str(&answer).context("malformed answer from the agent")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that connects and never finishes its request is hung up on (it kept a task
    /// and a growing buffer for as long as it liked).
    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_sends_its_request_is_hung_up_on() {
        let dir = std::env::temp_dir().join(format!("control-stall-{}", std::process::id()));
        let (tx, _rx) = mpsc::channel(1);
        let server = listen(&dir, tx).unwrap();
        let mut client = UnixStream::connect(socket_path(&dir)).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut client, b"{\"quarantine_list\"")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let hung_up = tokio::time::timeout(
            REQUEST_DEADLINE + std::time::Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_to_end(&mut client, &mut rest),
        )
        .await;
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(hung_up.is_ok(), "still connected after the deadline");
    }
}
