//! The events of a forwarded job arrive whole and in order, or not at all.
//!
//! NATS core delivers at most once: an event published while a link reconnects, or dropped
//! from a slow subscriber's buffer, is gone. Without numbers, the server holding the game's
//! connection relayed what came, so a lost token left a hole in the text a game read, and
//! a lost `Done` turned an answer billed on the running server into a 502.
//!
//! - **The running server** numbers every event of a job it relays (the [`SEQ_HEADER`]
//!   header: 0, 1, 2, …), keeps what it sent ([`SentEvents`]), and sends it again from any
//!   number asked on [`super::wire::resend_subject`], for as long as the job runs and a
//!   while after its last event. Its keepalives say how many events it has sent.
//! - **The server holding the game's connection** relays events in their order only
//!   ([`Reorder`]): one that comes early waits for those before it, which it asks for
//!   again; a keepalive counting more than it received, or a job falling silent, asks too.
//!   A hole that stays open ends the job with an error, never with the text around it.
//! - An older server sends no numbers: its events are relayed as they come, as before.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::wire::RemoteEvent;

/// The NATS header that numbers a job's events.
pub const SEQ_HEADER: &str = "Ludus-Seq";

/// How often the same events are asked for again (and, at half of it, answered again).
pub const ASK_EVERY: Duration = Duration::from_secs(1);

/// How long a job that fell silent is given to answer a last request for what it sent.
pub const LAST_ASK_GRACE: Duration = Duration::from_secs(2);

/// Events held while one before them is missing: past this, or a number this far ahead,
/// the job fails (a hole this long is not waited out, and a server cannot make this one
/// hold an unbounded map).
pub const MAX_HELD: u64 = 4096;

/// Bytes of events held behind a hole, at most.
pub const MAX_HELD_BYTES: usize = 16 << 20;

/// Requests for the same hole answered without it closing: then the job fails (a
/// running server that cannot send them, or an older NATS user without the subject).
pub const MAX_ASKS: u32 = 5;

/// Bytes of a job's latest events the running server keeps to send again: a lost event
/// older than that cannot be sent again, and its job fails at its origin.
pub const MAX_KEPT_BYTES: usize = 4 << 20;

/// The number an event carries, if its server numbers them.
pub fn seq_of(message: &async_nats::Message) -> Option<u64> {
    message.headers.as_ref()?.get(SEQ_HEADER)?.as_str().parse().ok()
}

/// What the running server sent of one job (its latest [`MAX_KEPT_BYTES`]), to send
/// again when asked.
#[derive(Debug, Default)]
pub struct SentEvents {
    /// Whether events are kept at all (not for an origin that never asks).
    keep: bool,
    kept: VecDeque<Bytes>,
    /// The number of the oldest event kept.
    first: u64,
    bytes: usize,
    /// The last request answered: when, and from which number.
    answered: Option<(Instant, u64)>,
}

impl SentEvents {
    /// Events to number, and to keep when `keep`.
    pub fn new(keep: bool) -> Self {
        Self { keep, ..Self::default() }
    }

    /// Whether events are kept to send again.
    pub fn keeps(&self) -> bool {
        self.keep
    }

    /// Keeps `event`'s payload (when this keeps any) and gives it its number.
    pub fn push(&mut self, event: &RemoteEvent) -> (u64, Bytes) {
        let payload: Bytes = serde_json::to_vec(event).expect("events serialize").into();
        let seq = self.count();
        if !self.keep {
            self.first += 1;
            return (seq, payload);
        }
        self.bytes += payload.len();
        self.kept.push_back(payload.clone());
        while self.bytes > MAX_KEPT_BYTES && self.kept.len() > 1 {
            let oldest = self.kept.pop_front().expect("more than one kept");
            self.bytes -= oldest.len();
            self.first += 1;
        }
        (seq, payload)
    }

    /// How many events were sent.
    pub fn count(&self) -> u64 {
        self.first + self.kept.len() as u64
    }

    /// The events kept of those numbered `from` up to `to` (excluded; `None`: the last).
    pub fn range(&self, from: u64, to: Option<u64>) -> impl Iterator<Item = (u64, Bytes)> + '_ {
        // Both ends within what is kept: a request for events no longer kept (or ending
        // before its start) gets none.
        let to = to.unwrap_or(u64::MAX).min(self.count()).max(self.first);
        let from = from.max(self.first).min(to);
        let index = |seq: u64| usize::try_from(seq - self.first).unwrap_or(usize::MAX);
        self.kept.range(index(from)..index(to)).enumerate().map(move |(i, p)| (from + i as u64, p.clone()))
    }

    /// Whether a request from `from` is answered now: not when one from no lower number
    /// was answered within half of [`ASK_EVERY`] (an origin asks at most that often; a
    /// flood of requests must not make this server send a job's events over and over).
    pub fn answer(&mut self, from: u64, now: Instant) -> bool {
        let recent =
            self.answered.is_some_and(|(at, last)| from >= last && now.saturating_duration_since(at) < ASK_EVERY / 2);
        if !recent {
            self.answered = Some((now, from));
        }
        !recent
    }
}

/// A request for events again: `from`, or `from-to` (to excluded), in decimal (`None`:
/// not that).
pub fn parse_request(payload: &[u8]) -> Option<(u64, Option<u64>)> {
    let text = std::str::from_utf8(payload).ok()?.trim();
    match text.split_once('-') {
        Some((from, to)) => Some((from.parse().ok()?, Some(to.parse().ok()?))),
        None => Some((text.parse().ok()?, None)),
    }
}

/// A request for events again from `from` up to `to` (excluded; `None`: the last).
pub fn request(from: u64, to: Option<u64>) -> String {
    match to {
        Some(to) => format!("{from}-{to}"),
        None => from.to_string(),
    }
}

/// Why numbered events could not be put in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfReach {
    pub expected: u64,
    pub got: u64,
}

/// Puts a job's numbered events back in order on the server holding the game's connection.
#[derive(Debug, Default)]
pub struct Reorder {
    /// The number of the next event to relay.
    next: u64,
    /// Events that came before one they follow, with their sizes.
    held: BTreeMap<u64, (RemoteEvent, usize)>,
    held_bytes: usize,
    /// When events were last asked for again, and how often since the last one relayed.
    asked: Option<Instant>,
    asks: u32,
}

impl Reorder {
    /// The events `event` (numbered `seq`, `size` bytes on the wire) lets through, in
    /// order: itself and those held behind it when it is the next; none when it comes
    /// early (it is held) or again.
    pub fn accept(
        &mut self,
        seq: Option<u64>,
        event: RemoteEvent,
        size: usize,
    ) -> Result<Vec<RemoteEvent>, OutOfReach> {
        let Some(seq) = seq else { return Ok(vec![event]) };
        if seq < self.next || self.held.contains_key(&seq) {
            return Ok(Vec::new());
        }
        if seq > self.next {
            if seq - self.next > MAX_HELD || self.held_bytes + size > MAX_HELD_BYTES {
                return Err(OutOfReach { expected: self.next, got: seq });
            }
            self.held_bytes += size;
            self.held.insert(seq, (event, size));
            return Ok(Vec::new());
        }
        let mut ready = vec![event];
        self.next += 1;
        while let Some((event, size)) = self.held.remove(&self.next) {
            self.held_bytes -= size;
            ready.push(event);
            self.next += 1;
        }
        self.asks = 0;
        Ok(ready)
    }

    /// Whether events are missing: one came early, or the running server says it sent
    /// `sent` (its keepalive) while fewer arrived.
    pub fn missing(&self, sent: Option<u64>) -> bool {
        !self.held.is_empty() || sent.is_some_and(|sent| sent > self.next)
    }

    /// The request for what is missing (the hole, or everything from the next when
    /// nothing came after it), unless events were asked for within [`ASK_EVERY`].
    pub fn ask(&mut self, now: Instant) -> Option<String> {
        if self.asked.is_some_and(|at| now.saturating_duration_since(at) < ASK_EVERY) {
            return None;
        }
        Some(self.ask_now(now))
    }

    /// The request for what is missing now, whenever it was last asked (a job gone silent).
    pub fn ask_now(&mut self, now: Instant) -> String {
        self.asked = Some(now);
        self.asks += 1;
        request(self.next, self.held.keys().next().copied())
    }

    /// Whether the same hole was asked for [`MAX_ASKS`] times in vain.
    pub fn stalled(&self) -> bool {
        self.asks >= MAX_ASKS
    }

    /// The usage of a `Done` held behind a hole (it was billed where the job ran).
    pub fn held_done(&self) -> Option<crate::protocol::TaskUsage> {
        self.held.values().find_map(|(event, _)| match event {
            RemoteEvent::Done { usage, .. } => Some(*usage),
            _ => None,
        })
    }

    /// The task a `Done` held behind a hole names, when it names one (an answer produced
    /// again under a new id).
    pub fn held_done_task(&self) -> Option<crate::protocol::TaskId> {
        self.held.values().find_map(|(event, _)| match event {
            RemoteEvent::Done { task, .. } => *task,
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(t: &str) -> RemoteEvent {
        RemoteEvent::Text(t.into())
    }

    #[test]
    fn events_go_through_in_their_order_whatever_order_they_come_in() {
        let mut order = Reorder::default();
        assert_eq!(order.accept(Some(0), text("a"), 1).unwrap(), [text("a")]);
        // 1 is lost: 2 and 3 wait for it.
        assert!(order.accept(Some(2), text("c"), 1).unwrap().is_empty());
        assert!(order.accept(Some(3), text("d"), 1).unwrap().is_empty());
        assert!(order.missing(None));
        // Asked for: the hole alone.
        assert_eq!(order.ask_now(Instant::now()), "1-2");
        // Sent again: 1 lets 2 and 3 through; 2 again is not relayed twice.
        assert_eq!(order.accept(Some(1), text("b"), 1).unwrap(), [text("b"), text("c"), text("d")]);
        assert!(order.accept(Some(2), text("c"), 1).unwrap().is_empty());
        assert!(!order.missing(None));
        // A keepalive counting five sent when four came: the fifth is missing, and
        // everything from it is asked for.
        assert!(order.missing(Some(5)));
        assert!(!order.missing(Some(4)));
        assert_eq!(order.ask_now(Instant::now()), "4");
    }

    #[test]
    fn an_older_servers_events_are_relayed_as_they_come() {
        let mut order = Reorder::default();
        assert_eq!(order.accept(None, text("a"), 1).unwrap(), [text("a")]);
        assert_eq!(order.accept(None, text("a"), 1).unwrap(), [text("a")]);
        assert!(!order.missing(None));
    }

    #[test]
    fn a_number_far_ahead_or_too_much_held_fails_rather_than_grows() {
        let mut order = Reorder::default();
        assert_eq!(order.accept(Some(MAX_HELD + 1), text("x"), 1), Err(OutOfReach { expected: 0, got: MAX_HELD + 1 }));
        assert!(order.accept(Some(MAX_HELD), text("x"), 1).unwrap().is_empty());
        let mut order = Reorder::default();
        assert!(order.accept(Some(1), text("x"), MAX_HELD_BYTES / 2).is_ok());
        assert!(order.accept(Some(2), text("x"), MAX_HELD_BYTES / 2).is_ok());
        assert!(order.accept(Some(3), text("x"), 1).is_err());
        // Filled, the hole frees what it held.
        assert_eq!(order.accept(Some(0), text("x"), 1).unwrap().len(), 3);
        assert!(order.accept(Some(5), text("x"), MAX_HELD_BYTES).is_ok());
    }

    #[test]
    fn a_hole_is_asked_for_at_most_once_a_second_and_a_few_times_in_vain() {
        let (mut order, t0) = (Reorder::default(), Instant::now());
        assert!(order.accept(Some(2), text("c"), 1).unwrap().is_empty());
        assert_eq!(order.ask(t0).as_deref(), Some("0-2"));
        assert_eq!(order.ask(t0 + Duration::from_millis(500)), None);
        assert_eq!(order.ask_now(t0 + Duration::from_millis(600)), "0-2");
        assert_eq!(order.ask(t0 + Duration::from_millis(1700)).as_deref(), Some("0-2"));
        assert!(!order.stalled());
        for i in 0..(MAX_ASKS - 3) {
            order.ask_now(t0 + Duration::from_secs(3 + u64::from(i)));
        }
        assert!(order.stalled());
        // Progress starts the count again.
        assert_eq!(order.accept(Some(0), text("a"), 1).unwrap().len(), 1);
        assert!(!order.stalled());
    }

    #[test]
    fn a_done_held_behind_a_hole_is_found() {
        let mut order = Reorder::default();
        let usage = crate::protocol::TaskUsage { prompt_tokens: 3, completion_tokens: 2 };
        let done = RemoteEvent::Done { finish_reason: crate::protocol::FinishReason::Stop, usage, task: None };
        assert_eq!(order.held_done(), None);
        assert!(order.accept(Some(1), done, 1).unwrap().is_empty());
        assert_eq!(order.held_done(), Some(usage));
        assert_eq!(order.held_done_task(), None, "an older server names no task");
        let mut order = Reorder::default();
        let task = Some(crate::protocol::TaskId(7));
        let done = RemoteEvent::Done { finish_reason: crate::protocol::FinishReason::Stop, usage, task };
        assert!(order.accept(Some(2), done, 1).unwrap().is_empty());
        assert_eq!(order.held_done_task(), task);
    }

    #[test]
    fn what_was_sent_is_sent_again_from_any_number_within_what_is_kept() {
        let mut sent = SentEvents::new(true);
        let (seq, payload) = sent.push(&text("a"));
        assert_eq!(seq, 0);
        assert_eq!(serde_json::from_slice::<RemoteEvent>(&payload).unwrap(), text("a"));
        sent.push(&text("b"));
        sent.push(&text("c"));
        assert_eq!(sent.count(), 3);
        let numbers = |sent: &SentEvents, from, to| sent.range(from, to).map(|(seq, _)| seq).collect::<Vec<_>>();
        assert_eq!(numbers(&sent, 1, None), [1, 2]);
        assert_eq!(numbers(&sent, 0, Some(2)), [0, 1]);
        assert_eq!(numbers(&sent, 2, Some(1)), Vec::<u64>::new());
        assert_eq!(numbers(&sent, 3, None), Vec::<u64>::new());
        assert_eq!(numbers(&sent, u64::MAX, None), Vec::<u64>::new());
        // Past its byte budget, the oldest events go.
        let big = "x".repeat(MAX_KEPT_BYTES / 3);
        for _ in 0..4 {
            sent.push(&text(&big));
        }
        assert_eq!(sent.count(), 7);
        let kept = numbers(&sent, 0, None);
        assert!(kept.len() < 7 && kept.last() == Some(&6), "{kept:?}");
        assert!(sent.range(0, None).map(|(_, p)| p.len()).sum::<usize>() <= MAX_KEPT_BYTES);
        // Asked for events no longer kept, or a range upside down: none, whatever the numbers.
        assert_eq!(numbers(&sent, 0, Some(1)), Vec::<u64>::new());
        assert_eq!(numbers(&sent, 6, Some(2)), Vec::<u64>::new());
        assert_eq!(numbers(&sent, 0, Some(u64::MAX)), kept);
        // For an origin that never asks: numbered, nothing kept.
        let mut numbered = SentEvents::new(false);
        assert_eq!(numbered.push(&text("a")).0, 0);
        assert_eq!(numbered.push(&text("b")).0, 1);
        assert_eq!((numbered.count(), numbered.range(0, None).count()), (2, 0));
    }

    #[test]
    fn requests_are_answered_at_most_twice_a_second_unless_they_go_further_back() {
        let (mut sent, t0) = (SentEvents::default(), Instant::now());
        assert!(sent.answer(5, t0));
        assert!(!sent.answer(5, t0 + Duration::from_millis(100)));
        assert!(!sent.answer(7, t0 + Duration::from_millis(200)));
        assert!(sent.answer(3, t0 + Duration::from_millis(300)));
        assert!(sent.answer(3, t0 + Duration::from_millis(900)));
        assert_eq!(parse_request(b"17"), Some((17, None)));
        assert_eq!(parse_request(b"17-20"), Some((17, Some(20))));
        assert_eq!(parse_request(b"-1"), None);
        assert_eq!(parse_request(b"1-x"), None);
        assert_eq!(parse_request(b"x"), None);
        assert_eq!(request(4, Some(9)), "4-9");
    }
}
