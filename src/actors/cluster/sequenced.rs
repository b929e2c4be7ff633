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

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::wire::RemoteEvent;

/// The NATS header that numbers a job's events.
pub const SEQ_HEADER: &str = "Ludus-Seq";

/// How often the same events are asked for again.
pub const ASK_EVERY: Duration = Duration::from_secs(1);

/// How long a job that fell silent is given to answer a last request for what it sent.
pub const LAST_ASK_GRACE: Duration = Duration::from_secs(2);

/// Events held while one before them is missing: past this, or a number this far ahead,
/// the job fails (a hole this long is not waited out, and a server cannot make this one
/// hold an unbounded map).
pub const MAX_HELD: u64 = 4096;

/// The number an event carries, if its server numbers them.
pub fn seq_of(message: &async_nats::Message) -> Option<u64> {
    message.headers.as_ref()?.get(SEQ_HEADER)?.as_str().parse().ok()
}

/// What the running server sent of one job, to send again when asked.
#[derive(Debug, Default)]
pub struct SentEvents {
    payloads: Vec<Bytes>,
}

impl SentEvents {
    /// Keeps `event`'s payload and gives it its number.
    pub fn push(&mut self, event: &RemoteEvent) -> (u64, Bytes) {
        let payload: Bytes = serde_json::to_vec(event).expect("events serialize").into();
        self.payloads.push(payload.clone());
        (self.payloads.len() as u64 - 1, payload)
    }

    /// How many events were sent.
    pub fn count(&self) -> u64 {
        self.payloads.len() as u64
    }

    /// The events from number `from` on, with their numbers (none past the end).
    pub fn from(&self, from: u64) -> impl Iterator<Item = (u64, Bytes)> + '_ {
        let start = usize::try_from(from).unwrap_or(usize::MAX).min(self.payloads.len());
        self.payloads[start..].iter().enumerate().map(move |(i, p)| ((start + i) as u64, p.clone()))
    }
}

/// A request for events again: `from`, in decimal (`None`: not a number).
pub fn parse_request(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload).ok()?.trim().parse().ok()
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
    /// Events that came before one they follow.
    held: BTreeMap<u64, RemoteEvent>,
    /// When events were last asked for again.
    asked: Option<Instant>,
}

impl Reorder {
    /// The events `event` (numbered `seq`) lets through, in order: itself and those held
    /// behind it when it is the next; none when it comes early (it is held) or again.
    pub fn accept(&mut self, seq: Option<u64>, event: RemoteEvent) -> Result<Vec<RemoteEvent>, OutOfReach> {
        let Some(seq) = seq else { return Ok(vec![event]) };
        if seq < self.next || self.held.contains_key(&seq) {
            return Ok(Vec::new());
        }
        if seq > self.next {
            if seq - self.next > MAX_HELD || self.held.len() as u64 >= MAX_HELD {
                return Err(OutOfReach { expected: self.next, got: seq });
            }
            self.held.insert(seq, event);
            return Ok(Vec::new());
        }
        let mut ready = vec![event];
        self.next += 1;
        while let Some(event) = self.held.remove(&self.next) {
            ready.push(event);
            self.next += 1;
        }
        Ok(ready)
    }

    /// Whether events are missing: one came early, or the running server says it sent
    /// `sent` (its keepalive) while fewer arrived.
    pub fn missing(&self, sent: Option<u64>) -> bool {
        !self.held.is_empty() || sent.is_some_and(|sent| sent > self.next)
    }

    /// The number to ask events again from, unless they were asked for within
    /// [`ASK_EVERY`].
    pub fn ask(&mut self, now: Instant) -> Option<u64> {
        if self.asked.is_some_and(|at| now.saturating_duration_since(at) < ASK_EVERY) {
            return None;
        }
        self.asked = Some(now);
        Some(self.next)
    }

    /// The number to ask from now, whenever it was last asked (a job gone silent).
    pub fn ask_now(&mut self, now: Instant) -> u64 {
        self.asked = Some(now);
        self.next
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
        assert_eq!(order.accept(Some(0), text("a")).unwrap(), [text("a")]);
        // 1 is lost: 2 and 3 wait for it.
        assert!(order.accept(Some(2), text("c")).unwrap().is_empty());
        assert!(order.accept(Some(3), text("d")).unwrap().is_empty());
        assert!(order.missing(None));
        // Sent again: 1 lets 2 and 3 through; 2 again is not relayed twice.
        assert_eq!(order.accept(Some(1), text("b")).unwrap(), [text("b"), text("c"), text("d")]);
        assert!(order.accept(Some(2), text("c")).unwrap().is_empty());
        assert!(!order.missing(None));
        // A keepalive counting five sent when four came: the fifth is missing.
        assert!(order.missing(Some(5)));
        assert!(!order.missing(Some(4)));
    }

    #[test]
    fn an_older_servers_events_are_relayed_as_they_come() {
        let mut order = Reorder::default();
        assert_eq!(order.accept(None, text("a")).unwrap(), [text("a")]);
        assert_eq!(order.accept(None, text("a")).unwrap(), [text("a")]);
        assert!(!order.missing(None));
    }

    #[test]
    fn a_number_far_ahead_or_too_many_held_fails_rather_than_grows() {
        let mut order = Reorder::default();
        assert_eq!(order.accept(Some(MAX_HELD + 1), text("x")), Err(OutOfReach { expected: 0, got: MAX_HELD + 1 }));
        assert!(order.accept(Some(MAX_HELD), text("x")).unwrap().is_empty());
        let mut order = Reorder::default();
        for seq in 1..=MAX_HELD {
            assert!(order.accept(Some(seq), text("x")).is_ok(), "{seq}");
        }
        assert!(order.accept(Some(MAX_HELD + 1), text("x")).is_err());
    }

    #[test]
    fn the_same_events_are_asked_for_at_most_once_a_second_unless_the_job_went_silent() {
        let (mut order, t0) = (Reorder::default(), Instant::now());
        assert!(order.accept(Some(2), text("c")).unwrap().is_empty());
        assert_eq!(order.ask(t0), Some(0));
        assert_eq!(order.ask(t0 + Duration::from_millis(500)), None);
        assert_eq!(order.ask_now(t0 + Duration::from_millis(600)), 0);
        assert_eq!(order.ask(t0 + Duration::from_millis(1700)), Some(0));
    }

    #[test]
    fn what_was_sent_is_sent_again_from_any_number() {
        let mut sent = SentEvents::default();
        let (seq, payload) = sent.push(&text("a"));
        assert_eq!(seq, 0);
        assert_eq!(serde_json::from_slice::<RemoteEvent>(&payload).unwrap(), text("a"));
        sent.push(&text("b"));
        sent.push(&text("c"));
        assert_eq!(sent.count(), 3);
        let again: Vec<u64> = sent.from(1).map(|(seq, _)| seq).collect();
        assert_eq!(again, [1, 2]);
        assert_eq!(sent.from(3).count(), 0);
        assert_eq!(sent.from(u64::MAX).count(), 0);
        assert_eq!(parse_request(b"17"), Some(17));
        assert_eq!(parse_request(b"-1"), None);
        assert_eq!(parse_request(b"x"), None);
    }
}
