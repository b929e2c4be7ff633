//! Tasks a node finished lately, kept for a while for the server's `Cancel` that crossed
//! their `Done` on the wire: the game left just before the end of its answer reached it.
//! The server then pays only the tokens the game received, with their proof, so the node
//! must still answer with a receipt and a proof for exactly those; without this memory it
//! had forgotten the task and was not paid for it at all.
//!
//! Bounded in time and count: a crossing cancel comes one round trip after the `Done`,
//! and the server waits for its answer at most a minute.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::protocol::TaskId;

/// How long a finished task is kept for a crossing cancel.
pub const FINISHED_WAIT: Duration = Duration::from_secs(30);

/// Finished tasks kept at most (each holds a proof builder's last rows, about 100 KB).
pub const MAX_FINISHED: usize = 32;

/// The latest finished tasks of a session, oldest first.
pub struct Finished<T> {
    tasks: VecDeque<(TaskId, Instant, T)>,
}

impl<T> Default for Finished<T> {
    fn default() -> Self {
        Self { tasks: VecDeque::new() }
    }
}

impl<T> Finished<T> {
    /// Keeps `task`, forgetting the expired ones and the oldest beyond [`MAX_FINISHED`].
    pub fn keep(&mut self, id: TaskId, task: T) {
        self.keep_at(id, task, Instant::now());
    }

    fn keep_at(&mut self, id: TaskId, task: T, now: Instant) {
        self.tasks.retain(|(_, at, _)| now.saturating_duration_since(*at) < FINISHED_WAIT);
        while self.tasks.len() >= MAX_FINISHED {
            self.tasks.pop_front();
        }
        self.tasks.push_back((id, now, task));
    }

    /// Takes task `id` out, if it finished within [`FINISHED_WAIT`]: a cancel is answered
    /// once.
    pub fn take(&mut self, id: TaskId) -> Option<T> {
        self.take_at(id, Instant::now())
    }

    fn take_at(&mut self, id: TaskId, now: Instant) -> Option<T> {
        let i = self.tasks.iter().position(|(t, _, _)| *t == id)?;
        let (_, at, task) = self.tasks.remove(i)?;
        (now.saturating_duration_since(at) < FINISHED_WAIT).then_some(task)
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_task_is_taken_once_within_its_wait() {
        let mut f = Finished::default();
        let t0 = Instant::now();
        f.keep_at(TaskId(1), "a", t0);
        f.keep_at(TaskId(2), "b", t0);
        assert_eq!(f.take_at(TaskId(1), t0 + Duration::from_secs(1)), Some("a"));
        assert_eq!(f.take_at(TaskId(1), t0 + Duration::from_secs(1)), None, "answered once");
        assert_eq!(f.take_at(TaskId(3), t0), None, "never kept");
        assert_eq!(f.take_at(TaskId(2), t0 + FINISHED_WAIT), None, "expired");
        assert!(f.is_empty());
    }

    #[test]
    fn the_oldest_and_the_expired_go_first() {
        let mut f = Finished::default();
        let t0 = Instant::now();
        for i in 0..MAX_FINISHED as u64 + 5 {
            f.keep_at(TaskId(i), i, t0);
        }
        assert_eq!(f.len(), MAX_FINISHED);
        assert_eq!(f.take_at(TaskId(4), t0), None, "pushed out by newer ones");
        assert_eq!(f.take_at(TaskId(5), t0), Some(5));
        // A task kept later drops every expired one.
        f.keep_at(TaskId(100), 100, t0 + FINISHED_WAIT);
        assert_eq!(f.len(), 1);
        assert_eq!(f.take_at(TaskId(100), t0 + FINISHED_WAIT), Some(100));
    }
}
