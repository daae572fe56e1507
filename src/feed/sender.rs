//! Delivery to the sink as CockroachDB's webhook sink does it: batches cut by bytes and time,
//! one request in flight, every non-2xx or transport error retried with exponential backoff,
//! resolved timestamps only after everything before them was acknowledged.

use super::encode;
use super::pgoutput::Lsn;
use super::source::Item;
use super::{FeedArgs, FeedStats};
use crate::metrics as m;
use crate::server::client::Client;
use bytes::Bytes;
use rand::Rng;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How many acknowledged batches `--chaos` may pick from.
const CHAOS_HISTORY: usize = 8;

pub(super) struct Sender {
    client: Client,
    path: String,
    flush_bytes: usize,
    flush_frequency: Duration,
    chaos: f64,
    timeout: Duration,
    backoff: Duration,
    max_backoff: Duration,
    stats: Arc<FeedStats>,
    slot: String,
}

/// Messages waiting to be sent.
#[derive(Default)]
struct Pending {
    messages: Vec<String>,
    bytes: usize,
    since: Option<Instant>,
    /// Newest `updated` nanos among the messages.
    newest: i64,
}

impl Sender {
    pub(super) fn new(
        args: &FeedArgs,
        client: Client,
        path: String,
        stats: Arc<FeedStats>,
    ) -> Self {
        Sender {
            client,
            path,
            flush_bytes: usize::try_from(args.flush_bytes).unwrap_or(usize::MAX),
            flush_frequency: args.flush_frequency,
            chaos: args.chaos,
            timeout: args.client_timeout,
            backoff: args.retry_backoff,
            max_backoff: args.retry_max_backoff,
            stats,
            slot: args.slot.clone(),
        }
    }

    /// Sends items until cancelled or the reader hangs up. `acked` receives the end LSN of every
    /// transaction once all its messages were acknowledged.
    pub(super) async fn run(
        self,
        mut items: mpsc::Receiver<Item>,
        acked: watch::Sender<Lsn>,
        cancel: CancellationToken,
    ) {
        let mut pending = Pending::default();
        // End LSN of the newest transaction whose messages are all in `pending` or sent.
        let mut complete: Option<Lsn> = None;
        let mut history: VecDeque<Bytes> = VecDeque::with_capacity(CHAOS_HISTORY);
        loop {
            let deadline = pending
                .since
                .map(|s| s + self.flush_frequency)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let item = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(deadline.into()) => None,
                item = items.recv() => match item {
                    Some(i) => Some(i),
                    None => {
                        // The reader stopped: deliver what we hold, then end.
                        self.flush(&mut pending, complete, &acked, &mut history, &cancel).await;
                        return;
                    }
                },
            };
            match item {
                None => {
                    if !self
                        .flush(&mut pending, complete, &acked, &mut history, &cancel)
                        .await
                    {
                        return;
                    }
                }
                Some(Item::Rows {
                    messages,
                    end_lsn,
                    updated_nanos,
                }) => {
                    for msg in messages {
                        if pending.bytes + msg.len() > self.flush_bytes
                            && !pending.messages.is_empty()
                            && !self
                                .flush(&mut pending, complete, &acked, &mut history, &cancel)
                                .await
                        {
                            return;
                        }
                        pending.bytes += msg.len() + 1;
                        pending.since.get_or_insert_with(Instant::now);
                        pending.messages.push(msg);
                    }
                    pending.newest = pending.newest.max(updated_nanos);
                    if end_lsn.is_some() {
                        complete = end_lsn;
                    }
                    if pending.bytes >= self.flush_bytes
                        && !self
                            .flush(&mut pending, complete, &acked, &mut history, &cancel)
                            .await
                    {
                        return;
                    }
                }
                Some(Item::Resolved { at, lsn }) => {
                    if !self
                        .flush(&mut pending, complete, &acked, &mut history, &cancel)
                        .await
                    {
                        return;
                    }
                    let body = Bytes::from(encode::resolved(at));
                    if !self.post(body, "resolved", &cancel).await {
                        return;
                    }
                    debug!(slot = %self.slot, resolved = %at, "resolved timestamp acknowledged");
                    self.stats.resolved_sent.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .resolved_nanos
                        .fetch_max(at.nanos(), Ordering::Relaxed);
                    metrics::counter!(m::FEED_RESOLVED, m::LABEL_FEED => self.slot.clone())
                        .increment(1);
                    if let Some(lag) = self.stats.lag() {
                        metrics::gauge!(m::FEED_LAG, m::LABEL_FEED => self.slot.clone()).set(lag);
                    }
                    acked.send_if_modified(|cur| {
                        let newer = lsn > *cur;
                        if newer {
                            *cur = lsn;
                        }
                        newer
                    });
                }
            }
        }
    }

    /// Sends `pending` (if any) until acknowledged; false when cancelled first.
    async fn flush(
        &self,
        pending: &mut Pending,
        complete: Option<Lsn>,
        acked: &watch::Sender<Lsn>,
        history: &mut VecDeque<Bytes>,
        cancel: &CancellationToken,
    ) -> bool {
        if pending.messages.is_empty() {
            return true;
        }
        let body = Bytes::from(encode::payload(&pending.messages));
        let n = pending.messages.len() as u64;
        if !self.post(body.clone(), "batch", cancel).await {
            return false;
        }
        debug!(slot = %self.slot, messages = n, bytes = body.len(), "batch acknowledged");
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.messages.fetch_add(n, Ordering::Relaxed);
        self.stats
            .bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        self.stats
            .updated_nanos
            .fetch_max(pending.newest, Ordering::Relaxed);
        let label = || (m::LABEL_FEED, self.slot.clone());
        metrics::counter!(m::FEED_BATCHES, &[label()]).increment(1);
        metrics::counter!(m::FEED_MESSAGES, &[label()]).increment(n);
        metrics::counter!(m::FEED_BYTES, &[label()]).increment(body.len() as u64);
        *pending = Pending::default();
        if let Some(lsn) = complete {
            acked.send_if_modified(|cur| {
                let newer = lsn > *cur;
                if newer {
                    *cur = lsn;
                }
                newer
            });
        }
        if self.chaos > 0.0 {
            // Re-send an earlier (or this) batch now, so the sink sees 1, 2, 3, 2, 4.
            let pick = {
                let mut rng = rand::rng();
                (!history.is_empty() && rng.random_bool(self.chaos))
                    .then(|| rng.random_range(0..history.len()))
            };
            if let Some(i) = pick {
                let again = history[i].clone();
                debug!(slot = %self.slot, "chaos: re-sending an earlier batch");
                if !self.post(again, "chaos re-send", cancel).await {
                    return false;
                }
                self.stats.chaos_resends.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::FEED_CHAOS_RESENDS, &[label()]).increment(1);
            }
            if history.len() == CHAOS_HISTORY {
                history.pop_front();
            }
            history.push_back(body);
        }
        true
    }

    /// Posts until a 2xx answer; false when cancelled first.
    async fn post(&self, body: Bytes, what: &str, cancel: &CancellationToken) -> bool {
        let mut delay = self.backoff;
        for attempt in 1u64.. {
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return false,
                r = tokio::time::timeout(self.timeout, self.client.post(&self.path, body.clone())) => r,
            };
            let failure = match outcome {
                Ok(Ok((status, _))) if status.is_success() => return true,
                Ok(Ok((status, text))) => format!(
                    "status {}: {}",
                    status.as_u16(),
                    text.lines()
                        .next()
                        .unwrap_or("")
                        .chars()
                        .take(200)
                        .collect::<String>()
                ),
                Ok(Err(e)) => crate::error::ErrorChain(&e).to_string(),
                Err(_) => format!("no answer within {:?}", self.timeout),
            };
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::FEED_RETRIES, m::LABEL_FEED => self.slot.clone()).increment(1);
            warn!(slot = %self.slot, what, attempt, error = %failure, retry_in = ?delay, "sink request failed; retrying");
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(self.max_backoff);
        }
        false
    }
}
