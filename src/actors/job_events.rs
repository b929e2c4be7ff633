//! The channel a job's events take to the request that waits for them, bounded by what
//! that request has not read yet.
//!
//! The actors that send (node proxies, the Completion, the cluster's relay) never wait on
//! a game, so the channel cannot make them: it is unbounded for them. But a streamed answer
//! is pulled by the game's socket, and a game that stops reading (its client hung, or it
//! means harm) would have every token of every choice held here until the answer ends: up
//! to `n × max_tokens` events, about 70 MB for a request with `top_logprobs: 20`, and as
//! many requests as its limits admit. So the channel counts the bytes its unread events
//! hold; an event that would take them past the limit is refused, and from then on the
//! sender reads the channel as closed: the job ends as if the game had hung up (the node
//! stops, the tokens it made are billed and paid). The request reads what is left, then
//! a last event that says why: [`ServeError::NotRead`].
//!
//! Only tokens (text and log probabilities) count against the limit: a job's few control
//! events (its end, a failure, a reset) always pass while the channel is open, so that a
//! game reading normally never loses its `Done` to the limit.
//!
//! Tokens the server held where the game could not read them (a forwarded job's events
//! waiting behind a lost one, [`EventSender::send_released`]) pass too, all at once, and
//! raise the limit by what they weigh until the game has read that much: the game did
//! not fall behind, the network held them. The raise is [`MAX_ALLOWANCE`] at most, so a
//! game that stops reading holds no more than the limit and that.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::error::ServeError;
use super::messages::JobEvent;

/// The most released tokens raise a reader's limit by, however many holes they came from
/// (a forwarded job holds at most as much behind one hole).
pub const MAX_ALLOWANCE: usize = 16 << 20;

/// The request reading these events has gone, or fell too far behind: the event was not
/// sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// What both ends share: the bytes unread events hold, and whether the reader fell behind.
#[derive(Debug)]
struct Unread {
    bytes: AtomicUsize,
    limit: usize,
    /// What released tokens add to the limit: never more than the bytes still unread, nor
    /// than [`MAX_ALLOWANCE`].
    allowance: AtomicUsize,
    fell_behind: AtomicBool,
}

impl Unread {
    /// Takes a read event's weight off; the allowance shrinks by as much (the reader is
    /// reading what was released, or what came before it), and never exceeds what is
    /// left unread.
    fn read(&self, weight: usize) {
        let left = self.bytes.fetch_sub(weight, Ordering::AcqRel).saturating_sub(weight);
        let _ = self
            .allowance
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| Some(a.saturating_sub(weight).min(left)));
    }
}

/// The sending end, held by the job.
#[derive(Debug)]
pub struct EventSender {
    tx: UnboundedSender<JobEvent>,
    unread: Arc<Unread>,
}

/// The receiving end, held by the request (or the server's own reader of a job).
#[derive(Debug)]
pub struct EventReceiver {
    rx: UnboundedReceiver<JobEvent>,
    unread: Arc<Unread>,
}

/// A channel whose reader may fall at most `limit` bytes of tokens behind.
pub fn channel(limit: usize) -> (EventSender, EventReceiver) {
    let (tx, rx) = unbounded_channel();
    let unread = Arc::new(Unread {
        bytes: AtomicUsize::new(0),
        limit,
        allowance: AtomicUsize::new(0),
        fell_behind: AtomicBool::new(false),
    });
    (EventSender { tx, unread: unread.clone() }, EventReceiver { rx, unread })
}

/// A channel for the server's own readers, which read as events come (a quality check's
/// re-run, a job forwarded here by another server): no limit.
pub fn unlimited() -> (EventSender, EventReceiver) {
    channel(usize::MAX)
}

/// The memory an event holds while it waits: its slot and what it points to.
fn weight(event: &JobEvent) -> usize {
    let heap = match event {
        JobEvent::Text(text) => text.len(),
        JobEvent::Logprobs(lp) => {
            let top: usize = lp.top.iter().map(|(token, bytes, _)| token.len() + bytes.len() + 56).sum();
            lp.token.len() + lp.bytes.len() + top
        }
        JobEvent::Reset | JobEvent::Done { .. } | JobEvent::Failed(_) => 0,
    };
    std::mem::size_of::<JobEvent>() + heap
}

/// Whether an event is a token's (counted against the limit) rather than a control event.
fn is_token(event: &JobEvent) -> bool {
    matches!(event, JobEvent::Text(_) | JobEvent::Logprobs(_))
}

impl EventSender {
    /// Sends `event`; `Err(Gone)` when the reader has gone or fell behind (then, or now:
    /// a token past the limit is refused, and so is everything after it, but for the
    /// failure that tells the reader why, sent in its place).
    pub fn send(&self, event: JobEvent) -> Result<(), Gone> {
        let limited = is_token(&event);
        self.send_within(event, limited)
    }

    /// Sends the text an answer held back until its end (a stop sequence's look-ahead, a
    /// character's last bytes): it passes at the limit, like the end itself, so that an
    /// answer that ended is never refused its last words.
    pub fn send_last_text(&self, text: String) -> Result<(), Gone> {
        self.send_within(JobEvent::Text(text), false)
    }

    /// Sends a token the server held where the game could not read it (events of a
    /// forwarded job released together once a lost one before them came): it passes while
    /// the channel is open, and the limit grows by its weight until the game has read as
    /// much, so that the tokens after it are not refused for a burst the game did not
    /// cause. The raise is [`MAX_ALLOWANCE`] at most, over every hole of the job.
    pub fn send_released(&self, event: JobEvent) -> Result<(), Gone> {
        if !is_token(&event) {
            return self.send(event);
        }
        if self.unread.fell_behind.load(Ordering::Acquire) {
            return Err(Gone);
        }
        let weight = weight(&event);
        // The bytes first: a read in between cannot clip the allowance below them.
        self.send_within(event, false)?;
        let _ = self
            .unread
            .allowance
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| Some(a.saturating_add(weight).min(MAX_ALLOWANCE)));
        Ok(())
    }

    fn send_within(&self, event: JobEvent, limited: bool) -> Result<(), Gone> {
        if self.unread.fell_behind.load(Ordering::Acquire) {
            return Err(Gone);
        }
        let weight = weight(&event);
        let before = self.unread.bytes.fetch_add(weight, Ordering::AcqRel);
        let limit = self.unread.limit.saturating_add(self.unread.allowance.load(Ordering::Acquire));
        if limited && before.saturating_add(weight) > limit {
            self.unread.bytes.fetch_sub(weight, Ordering::AcqRel);
            self.unread.fell_behind.store(true, Ordering::Release);
            let why = JobEvent::Failed(ServeError::NotRead { limit_kib: self.unread.limit / 1024 });
            // Counted like any event: the reader takes its weight off when it reads it.
            self.unread.bytes.fetch_add(self::weight(&why), Ordering::AcqRel);
            let _ = self.tx.send(why);
            return Err(Gone);
        }
        self.tx.send(event).map_err(|_| {
            self.unread.read(weight);
            Gone
        })
    }

    /// Whether nobody will read another event: the reader went away or fell behind.
    pub fn is_closed(&self) -> bool {
        self.unread.fell_behind.load(Ordering::Acquire) || self.tx.is_closed()
    }

    /// Completes once the reader has gone, or at once if it fell behind (which only a
    /// [`send`](Self::send) of the caller's decides).
    pub async fn closed(&self) {
        if self.unread.fell_behind.load(Ordering::Acquire) {
            return;
        }
        self.tx.closed().await;
    }
}

impl EventReceiver {
    /// The next event; `None` once the job has ended and every event was read.
    pub async fn recv(&mut self) -> Option<JobEvent> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<JobEvent>> {
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(event)) = &polled {
            self.unread.read(weight(event));
        }
        polled
    }

    /// The next event if one is there now.
    pub fn try_recv(&mut self) -> Option<JobEvent> {
        let event = self.rx.try_recv().ok()?;
        self.unread.read(weight(&event));
        Some(event)
    }

    /// The bytes the unread events hold now.
    pub fn unread_bytes(&self) -> usize {
        self.unread.bytes.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FinishReason, TaskId, TaskUsage};

    fn text(n: usize) -> JobEvent {
        JobEvent::Text("x".repeat(n))
    }

    fn done() -> JobEvent {
        JobEvent::Done { finish_reason: FinishReason::Stop, usage: TaskUsage::default(), task: TaskId(1) }
    }

    #[tokio::test]
    async fn a_reader_that_keeps_up_never_falls_behind_however_long_the_answer() {
        let (tx, mut rx) = channel(4 * weight(&text(100)));
        for _ in 0..10_000 {
            tx.send(text(100)).unwrap();
            assert_eq!(rx.recv().await, Some(text(100)));
        }
        tx.send(done()).unwrap();
        assert_eq!(rx.recv().await, Some(done()));
        assert_eq!(rx.unread_bytes(), 0, "what was read is no longer counted");
        drop(tx);
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_reader_past_its_limit_ends_the_job_and_keeps_what_came_before() {
        let (tx, mut rx) = channel(3 * weight(&text(100)) + 10);
        for _ in 0..3 {
            tx.send(text(100)).unwrap();
        }
        assert!(!tx.is_closed());
        assert_eq!(tx.send(text(100)), Err(Gone), "the token past the limit is refused");
        assert!(tx.is_closed(), "the sender reads the job as left by its game");
        tx.closed().await; // at once
                           // Nothing passes any more, not even the job's end: the job ends as a hang-up.
        assert_eq!(tx.send(text(1)), Err(Gone));
        assert_eq!(tx.send(done()), Err(Gone));
        assert_eq!(tx.send(JobEvent::Failed(ServeError::ShuttingDown)), Err(Gone));
        // The tokens sent before the limit are still there to read, then why it ended
        // (while the job, holding the sender, has not even ended yet).
        for _ in 0..3 {
            assert_eq!(rx.recv().await, Some(text(100)));
        }
        let limit_kib = (3 * weight(&text(100)) + 10) / 1024;
        assert_eq!(rx.recv().await, Some(JobEvent::Failed(ServeError::NotRead { limit_kib })));
        assert!(rx.try_recv().is_none());
        assert_eq!(rx.unread_bytes(), 0, "every event read, every weight taken off");
        drop(tx);
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn control_events_pass_at_the_limit() {
        let (tx, mut rx) = channel(2 * weight(&text(10)));
        tx.send(text(10)).unwrap();
        tx.send(text(10)).unwrap();
        tx.send(JobEvent::Reset).unwrap();
        tx.send_last_text("held back".into()).unwrap();
        tx.send(done()).unwrap();
        assert!(!tx.is_closed());
        for expected in [text(10), text(10), JobEvent::Reset, JobEvent::Text("held back".into()), done()] {
            assert_eq!(rx.recv().await, Some(expected));
        }
    }

    #[tokio::test]
    async fn tokens_released_together_pass_and_the_ones_after_them_while_the_game_reads() {
        let limit = 4 * weight(&text(100));
        let (tx, mut rx) = channel(limit);
        // Ten tokens held behind a lost one, released at once: 2.5 times the limit.
        for _ in 0..10 {
            tx.send_released(text(100)).unwrap();
        }
        // The next token passes: the game did not fall behind.
        tx.send(text(100)).unwrap();
        assert!(!tx.is_closed());
        // The game reads them; as it does, the limit comes back to its own.
        for _ in 0..11 {
            assert_eq!(rx.recv().await, Some(text(100)));
        }
        assert_eq!(rx.unread_bytes(), 0);
        assert_eq!(tx.unread.allowance.load(Ordering::Acquire), 0, "the allowance went with what was read");
        for _ in 0..4 {
            tx.send(text(100)).unwrap();
        }
        assert_eq!(tx.send(text(100)), Err(Gone), "a game that stops reading still falls behind");
        // A game that stops reading: holes one after another raise its limit by at most
        // MAX_ALLOWANCE in all.
        let (tx, _unread) = channel(limit);
        let big = text(MAX_ALLOWANCE / 8);
        for _ in 0..20 {
            tx.send_released(big.clone()).unwrap();
        }
        assert_eq!(tx.unread.allowance.load(Ordering::Acquire), MAX_ALLOWANCE);
        let passed = (0..1000).take_while(|_| tx.send(text(100_000)).is_ok()).count();
        assert!(passed <= 1, "{passed} tokens passed past the limit and the allowance");
        // A control event released is an ordinary one.
        let (tx, mut rx) = channel(limit);
        tx.send_released(done()).unwrap();
        assert_eq!(rx.recv().await, Some(done()));
        assert_eq!(tx.unread.allowance.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_reader_that_fell_behind_is_sent_nothing_released() {
        let (tx, _rx) = channel(weight(&text(100)));
        tx.send(text(100)).unwrap();
        assert_eq!(tx.send(text(100)), Err(Gone));
        assert_eq!(tx.send_released(text(1)), Err(Gone));
    }

    #[tokio::test]
    async fn log_probabilities_weigh_what_they_hold() {
        let lp = |top: usize| crate::actors::catalog::TokenLogprob {
            token: "tok".into(),
            bytes: b"tok".to_vec(),
            logprob: -1.0,
            top: vec![("alternative".into(), b"alternative".to_vec(), -2.0); top],
        };
        assert!(weight(&JobEvent::Logprobs(lp(20))) > weight(&JobEvent::Logprobs(lp(1))) + 19 * 22);
        let (tx, _rx) = channel(10 * weight(&JobEvent::Logprobs(lp(20))));
        let sent = (0..100).take_while(|_| tx.send(JobEvent::Logprobs(lp(20))).is_ok()).count();
        assert_eq!(sent, 10);
    }

    #[tokio::test]
    async fn a_reader_that_left_refuses_events_and_counts_nothing() {
        let (tx, rx) = channel(1 << 20);
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.send(text(5)), Err(Gone));
        assert_eq!(tx.unread.bytes.load(Ordering::Acquire), 0);
        tx.closed().await;
    }
}
