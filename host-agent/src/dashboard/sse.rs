//! The live stream (`GET /events`, Server-Sent Events): what the relay pushed, passed on to open
//! pages without a reload.
//!
//! - `alarms`: the Emergencies list, rendered for this session (its ack forms carry the
//!   session's CSRF token); the page swaps it in and announces new alarms.
//! - `jobs`, `devices`, `rollouts`: a job, a device or a rollout changed; the page fetches its table again (the job list
//!   is the relay's answer to `list`, which the model does not copy).
//! - `link`: `up` or `down`, the dashboard's session to the relay.
//!
//! SSE rather than a WebSocket: one direction is all we need, the browser reconnects by itself,
//! and axum ships it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::auth::Session;
use super::html;
use super::model::{Change, Model};

/// The stream for one page. It starts with the current alarms and link state, so a page that
/// (re)connects is never behind. It ends at `stop`, so a shutdown does not wait on open pages.
pub fn stream(
    model: Arc<Model>,
    session: Session,
    stop: CancellationToken,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = model.subscribe();
    let start = vec![Change::Link, Change::Alarms];
    let state = (model, session, rx, start, stop);
    let events = futures_util::stream::unfold(
        state,
        |(model, session, mut rx, mut queue, stop)| async move {
            loop {
                if let Some(change) = queue.pop() {
                    let event = event_for(&model, &session, change);
                    return Some((Ok(event), (model, session, rx, queue, stop)));
                }
                let next = tokio::select! {
                    () = stop.cancelled() => return None,
                    next = rx.recv() => next,
                };
                match next {
                    Ok(change) => queue.push(change),
                    // Too slow to keep up: send everything afresh.
                    Err(RecvError::Lagged(_)) => queue.extend([
                        Change::Link,
                        Change::Devices,
                        Change::Jobs,
                        Change::Rollouts,
                        Change::Alarms,
                    ]),
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    );
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

fn event_for(model: &Model, session: &Session, change: Change) -> Event {
    match change {
        Change::Alarms => {
            let alarms = model.active_alarms();
            Event::default()
                .event("alarms")
                .data(html::alarms(&alarms, &session.csrf).into_string())
        }
        Change::Devices => Event::default().event("devices").data("changed"),
        Change::Jobs => Event::default().event("jobs").data("changed"),
        Change::Rollouts => Event::default().event("rollouts").data("changed"),
        Change::Link => {
            Event::default()
                .event("link")
                .data(if model.linked() { "up" } else { "down" })
        }
    }
}
