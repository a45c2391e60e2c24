//! The HTTP(S) serving loop shared by `enforcer pdp serve`, `enforcer admission serve` and
//! the agent's `--metrics`: a bounded number of connections, a quarter of them at most from
//! one address, a bounded TLS handshake and request head, a bounded connection lifetime,
//! HTTP/1.1.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// A client must finish its TLS handshake and its request head within this.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed after this long (after the request in flight, which gets
/// [`LAST_REQUEST_TIMEOUT`] more): a client sending a cheap request every few seconds kept
/// its connection, and its slot, forever. Longer than the PDP's longest poll (60 s).
pub(crate) const MAX_CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// How long the request in flight at [`MAX_CONNECTION_LIFETIME`] may still take.
pub(crate) const LAST_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The most bytes a connection's read buffer holds (a request head must fit: 431 above), and
/// its write buffer takes before it waits for the client to read. hyper's default, ~408 KiB,
/// let each of the admission webhook's 256 connections hold up to 1 MB with a long head and
/// a body held back (found by a red-team helper: 245-288 MB); request heads here are a few
/// hundred bytes.
pub(crate) const CONNECTION_BUFFER_BYTES: usize = 16 << 10;

/// An accepted connection, after its TLS handshake when there is one.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// The client end of an accepted connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer {
    /// Its address and port.
    pub addr: SocketAddr,
    /// It presented a TLS client certificate that the acceptor's client verifier accepted
    /// (only an acceptor made with a client CA asks for one: [`super::tls::server_config`]).
    pub certified: bool,
}

/// Accepts connections on `listener` until `shutdown` completes, at most `max_connections`
/// at once (a client over the limit waits in the kernel's backlog) and at most a quarter of
/// them (at least one) from one peer address (a connection beyond is closed at once: one
/// client cannot take every slot from the others), and hands each one to `serve` once its
/// TLS handshake (when `tls` is given) finished within [`HANDSHAKE_TIMEOUT`]. When `shutdown`
/// completes, every connection still open is closed.
pub(crate) async fn accept_until<F, Fut>(
    listener: &TcpListener,
    tls: Option<TlsAcceptor>,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
    serve: F,
) -> Result<()>
where
    F: Fn(Box<dyn Stream>, Peer) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    let limit = Arc::new(Semaphore::new(max_connections));
    let per_peer = (max_connections / 4).max(1);
    let peers: Holders<IpAddr> = Arc::default();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = limit.clone().acquire_owned() => permit.context("connection limit")?,
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(peer_slot) = Slot::take(&peers, peer.ip(), per_peer) else {
            tracing::debug!(%peer, per_peer, "a connection refused: too many from this address");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let tls = tls.clone();
        let serve = serve.clone();
        tasks.spawn(async move {
            let _permit = (permit, peer_slot);
            let mut certified = false;
            let stream: Box<dyn Stream> = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            certified = super::tls::client_certified(stream.get_ref().1);
                            Box::new(stream)
                        }
                        Ok(Err(error)) => {
                            return tracing::debug!(%peer, %error, "TLS handshake failed")
                        }
                        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
                None => Box::new(stream),
            };
            serve(
                stream,
                Peer {
                    addr: peer,
                    certified,
                },
            )
            .await;
        });
        // Reap finished connections so the set does not grow without bound.
        while tasks.try_join_next().is_some() {}
    }
    tasks.shutdown().await;
    Ok(())
}

/// Connections (or consumers) held per key (a peer address, a user), shared by the tasks that
/// hold them.
pub(crate) type Holders<K> = Arc<std::sync::Mutex<HashMap<K, usize>>>;

/// One connection counted against its key in [`Holders`]; given back on drop.
pub(crate) struct Slot<K: std::hash::Hash + Eq + Copy> {
    holders: Holders<K>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Copy> Slot<K> {
    /// A slot for `key`, unless it holds `max` already.
    pub(crate) fn take(holders: &Holders<K>, key: K, max: usize) -> Option<Slot<K>> {
        let mut held = holders.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(key).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Slot {
            holders: holders.clone(),
            key,
        })
    }
}

impl<K: std::hash::Hash + Eq + Copy> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut held = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// Serves HTTP/1.1 on one connection: every request goes to `handler`; the request head must
/// arrive within [`HANDSHAKE_TIMEOUT`], and the connection ends after
/// [`MAX_CONNECTION_LIFETIME`] (the request in flight then finishes first, within
/// [`LAST_REQUEST_TIMEOUT`]).
pub(crate) async fn serve_http<S, H, Fut>(stream: S, peer: SocketAddr, handler: H)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let handler = Arc::new(handler);
    let service = service_fn(move |request| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler(request).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .max_buf_size(CONNECTION_BUFFER_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = tokio::time::sleep(MAX_CONNECTION_LIFETIME) => {
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(LAST_REQUEST_TIMEOUT, connection).await {
                Ok(result) => result,
                Err(_) => return tracing::debug!(%peer, "connection closed: its last request took too long"),
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpSocket;

    /// A plain HTTP server on a loopback port of its own with `max` connections, answering
    /// every request with 200.
    async fn server(max: usize) -> (SocketAddr, tokio::task::JoinHandle<Result<()>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            accept_until(
                &listener,
                None,
                max,
                std::future::pending(),
                |stream, peer: Peer| {
                    serve_http(stream, peer.addr, |_| async {
                        Response::new(Full::new(Bytes::from_static(b"ok")))
                    })
                },
            )
            .await
        });
        (addr, task)
    }

    /// A connection from `from` to `to` that has sent one request and read its answer.
    async fn served(from: &str, to: SocketAddr) -> Option<tokio::net::TcpStream> {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let mut stream = socket.connect(to).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .ok()?;
        let mut answer = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
            .await
            .unwrap()
            .ok()?;
        String::from_utf8_lossy(&answer[..n])
            .starts_with("HTTP/1.1 200")
            .then_some(stream)
    }

    #[test]
    fn slots_are_counted_per_key_and_given_back_on_drop() {
        let holders: Holders<u32> = Arc::default();
        let first: Vec<_> = (0..2)
            .map(|_| Slot::take(&holders, 7, 2).unwrap())
            .collect();
        assert!(
            Slot::take(&holders, 7, 2).is_none(),
            "a third slot of key 7"
        );
        let other = Slot::take(&holders, 8, 2).expect("another key");
        drop(first);
        assert!(
            Slot::take(&holders, 7, 2).is_some(),
            "key 7's slots were not given back"
        );
        drop(other);
        assert!(
            holders.lock().unwrap().is_empty(),
            "{:?}",
            holders.lock().unwrap()
        );
    }

    /// One address cannot take every slot: beyond a quarter its connections are closed at
    /// once, while another address is still served.
    #[tokio::test]
    async fn one_address_gets_a_quarter_of_the_connections() {
        let (addr, task) = server(8).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(served("127.0.0.1", addr).await.expect("within its quarter"));
        }
        assert!(
            served("127.0.0.1", addr).await.is_none(),
            "a third connection from one address of 8 was served"
        );
        assert!(
            served("127.0.0.2", addr).await.is_some(),
            "another address was refused"
        );
        // A slot given back is there again.
        drop(held.pop());
        let again = async {
            loop {
                if served("127.0.0.1", addr).await.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), again)
            .await
            .expect("the freed slot was not given back");
        task.abort();
    }

    /// A client that keeps its connection busy with cheap requests loses it after
    /// MAX_CONNECTION_LIFETIME (it kept it, and its slot, forever).
    #[tokio::test(start_paused = true)]
    async fn a_connection_ends_after_its_lifetime_however_busy() {
        let (addr, task) = server(8).await;
        let mut stream = served("127.0.0.1", addr).await.unwrap();
        let start = tokio::time::Instant::now();
        let mut answer = [0u8; 512];
        loop {
            assert!(
                start.elapsed() < MAX_CONNECTION_LIFETIME + Duration::from_secs(30),
                "the connection outlived its lifetime"
            );
            tokio::time::sleep(HANDSHAKE_TIMEOUT - Duration::from_secs(1)).await;
            if stream
                .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
                .await
                .is_err()
            {
                break;
            }
            match stream.read(&mut answer).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        assert!(start.elapsed() >= MAX_CONNECTION_LIFETIME - HANDSHAKE_TIMEOUT);
        task.abort();
    }
}
