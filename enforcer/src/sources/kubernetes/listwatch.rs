//! The pods' list-then-watch: kube's `watcher` for one difference, the list is read as
//! protobuf ([`super::proto`]; kube reads JSON only, and most of a cold sync at 20,000 pods
//! was the API server writing the list as JSON).
//!
//! It yields the events `kube::runtime::watcher` yields, with its semantics, so the
//! reflector, the backoff and [`super::watch_resource`] take it unchanged: `Init`, one
//! `InitApply` per listed pod, `InitDone`, then `Apply` / `Delete` from a watch that starts
//! at the list's `resourceVersion`, resumes from the last one it saw when the server ends it
//! (every [`super::WATCH_TIMEOUT_SECS`], or silence for that long plus a margin: a server
//! that vanished without closing the connection), and relists after `410 Gone`. An error is
//! yielded once and the stream goes on from where it was on its next poll (the backoff
//! wrapped around it spaces the retries).

use std::collections::VecDeque;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::runtime::watcher::{Error, Event};
use kube::{Api, Client, ResourceExt};

use super::proto;
use super::wire::WirePod;

/// How long past the server's own watch timeout a silent watch is given up (kube's
/// watcher: 5 s).
const IDLE_MARGIN: Duration = Duration::from_secs(5);

enum State {
    /// Nothing listed: list next.
    Empty,
    /// Listed: these pods still to be yielded, then `InitDone`.
    Listing {
        pods: VecDeque<WirePod>,
        resource_version: String,
    },
    /// Listed (or a watch ended): watch from here.
    Listed { resource_version: String },
    Watching {
        resource_version: String,
        stream: BoxStream<'static, kube::Result<WatchEvent<WirePod>>>,
    },
}

/// Every pod of the cluster, listed as protobuf from the API server's watch cache
/// (`resourceVersion=0`, as the other parts' watchers list), then watched with
/// `timeout_secs` per watch request.
pub fn pods(
    client: Client,
    timeout_secs: u32,
) -> impl Stream<Item = Result<Event<WirePod>, Error>> + Send {
    let api = Api::<WirePod>::all(client.clone());
    let params = WatchParams::default().timeout(timeout_secs);
    let idle = Duration::from_secs(u64::from(timeout_secs)) + IDLE_MARGIN;
    futures::stream::unfold((State::Empty, true), move |(mut state, mut init)| {
        let (client, api, params) = (client.clone(), api.clone(), params.clone());
        async move {
            // A step that yields nothing (a bookmark, a watch that ended) goes on to the
            // next at once, as kube's watcher trampolines.
            loop {
                if init {
                    // kube's watcher says `Init` before every list: the reflector starts
                    // buffering a new store.
                    return Some((Ok(Event::Init), (state, false)));
                }
                let (item, next) = step(&client, &api, &params, idle, state).await;
                init = matches!(next, State::Empty);
                state = next;
                if let Some(item) = item {
                    return Some((item, (state, init)));
                }
            }
        }
    })
}

async fn step(
    client: &Client,
    api: &Api<WirePod>,
    params: &WatchParams,
    idle: Duration,
    state: State,
) -> (Option<Result<Event<WirePod>, Error>>, State) {
    match state {
        State::Empty => match list(client).await {
            Ok((pods, resource_version)) if !resource_version.is_empty() => (
                None,
                State::Listing {
                    pods: pods.into(),
                    resource_version,
                },
            ),
            Ok(_) => (Some(Err(Error::NoResourceVersion)), State::Empty),
            Err(e) => (Some(Err(Error::InitialListFailed(e))), State::Empty),
        },
        State::Listing {
            mut pods,
            resource_version,
        } => match pods.pop_front() {
            Some(pod) => (
                Some(Ok(Event::InitApply(pod))),
                State::Listing {
                    pods,
                    resource_version,
                },
            ),
            None => (
                Some(Ok(Event::InitDone)),
                State::Listed { resource_version },
            ),
        },
        State::Listed { resource_version } => match api.watch(params, &resource_version).await {
            Ok(stream) => (
                None,
                State::Watching {
                    resource_version,
                    stream: stream.boxed(),
                },
            ),
            // Refused as too old to start from (some servers answer 410 here, not in the
            // stream): list again, or the watch would be asked for from there for ever.
            Err(kube::Error::Api(status)) if status.code == 410 => (
                Some(Err(Error::WatchStartFailed(kube::Error::Api(status)))),
                State::Empty,
            ),
            Err(e) => (
                Some(Err(Error::WatchStartFailed(e))),
                State::Listed { resource_version },
            ),
        },
        State::Watching {
            resource_version,
            mut stream,
        } => {
            let next = tokio::time::timeout(idle, stream.next())
                .await
                .ok()
                .flatten();
            match next {
                Some(Ok(WatchEvent::Added(pod) | WatchEvent::Modified(pod))) => {
                    watched(Event::Apply, pod, stream)
                }
                Some(Ok(WatchEvent::Deleted(pod))) => watched(Event::Delete, pod, stream),
                Some(Ok(WatchEvent::Bookmark(b))) => (
                    None,
                    State::Watching {
                        resource_version: b.metadata.resource_version,
                        stream,
                    },
                ),
                // 410 Gone: the version is too old to resume from; list again.
                Some(Ok(WatchEvent::Error(status))) if status.code == 410 => {
                    (Some(Err(Error::WatchError(status.boxed()))), State::Empty)
                }
                Some(Ok(WatchEvent::Error(status))) => (
                    Some(Err(Error::WatchError(status.boxed()))),
                    State::Watching {
                        resource_version,
                        stream,
                    },
                ),
                Some(Err(e)) => (
                    Some(Err(Error::WatchFailed(e))),
                    State::Watching {
                        resource_version,
                        stream,
                    },
                ),
                // Ended by the server (its timeout) or silent too long: resume.
                None => (None, State::Listed { resource_version }),
            }
        }
    }
}

/// A watched pod as `event`, the watch going on from its version (a pod without one cannot
/// be resumed from: list again, as kube's watcher does).
fn watched(
    event: fn(WirePod) -> Event<WirePod>,
    pod: WirePod,
    stream: BoxStream<'static, kube::Result<WatchEvent<WirePod>>>,
) -> (Option<Result<Event<WirePod>, Error>>, State) {
    match pod.resource_version().filter(|v| !v.is_empty()) {
        Some(resource_version) => (
            Some(Ok(event(pod))),
            State::Watching {
                resource_version,
                stream,
            },
        ),
        None => (Some(Err(Error::NoResourceVersion)), State::Empty),
    }
}

/// Every pod, page after page should the server page the answer (it does not for
/// `resourceVersion=0`, answered whole from its watch cache); the last page's version.
async fn list(client: &Client) -> kube::Result<(Vec<WirePod>, String)> {
    let mut params = ListParams::default().match_any();
    let mut all = Vec::new();
    loop {
        let page = proto::list_pods(client, &params, proto::Encoding::Protobuf).await?;
        tracing::info!(
            pods = page.pods.len(),
            encoding = ?page.answered,
            answered_ms = page.head.as_secs_f64() * 1e3,
            received_ms = page.body.as_secs_f64() * 1e3,
            decoded_ms = page.decode.as_secs_f64() * 1e3,
            "kubernetes: pods listed"
        );
        all.extend(page.pods);
        if page.continue_token.is_empty() {
            return Ok((all, page.resource_version));
        }
        // A continued list names no version of its own (the token holds it).
        params = ListParams::default();
        params.continue_token = Some(page.continue_token);
    }
}
