//! Fairness between games in a model's queue. A game's limits bound what it asks of the
//! network, not what it holds of one model's queue: a game sending more than the nodes
//! serve filled the queue (`queue_capacity`, 1,024 by default), and every other game's
//! request for that model was refused (429) or waited behind all of its jobs. Here:
//!
//! - **Turns** ([`take_turns`]): queued jobs go to nodes game by game, each game's first
//!   waiting job, then each one's second, and so on; a game's own jobs keep their order
//!   (a retry, put first, stays first).
//! - **Room** ([`make_room`]): a full queue takes a job of a game holding at least two
//!   fewer of its places than the game holding the most, whose newest job gives up its
//!   place (refused 429, as it would have been had it come last). Two games at the limit
//!   do not take each other's places in turn, and a game alone keeps the whole queue.
//!
//! Both are generic over the queued item, with the game (and which jobs may give up their
//! place) read by the caller, so that they are tested without a network.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// `queue` in turns: each game's first job in queue order, then each game's second, ….
pub fn take_turns<T, G: Hash + Eq>(queue: VecDeque<T>, game: impl Fn(&T) -> G) -> VecDeque<T> {
    // Runs on every drain: a queue of one game (the usual case) is returned as it is,
    // without a map or a copy.
    let first = queue.front().map(&game);
    if queue.iter().all(|job| Some(game(job)) == first) {
        return queue;
    }
    let mut taken: HashMap<G, usize> = HashMap::new();
    let mut ranked: Vec<(usize, T)> = queue
        .into_iter()
        .map(|job| {
            let turn = taken.entry(game(&job)).or_default();
            *turn += 1;
            (*turn, job)
        })
        .collect();
    // Stable: within a turn, queue order.
    ranked.sort_by_key(|&(turn, _)| turn);
    ranked.into_iter().map(|(_, job)| job).collect()
}

/// Takes out of a full `queue` the job that gives its place to a newcomer of `game`: the
/// newest one that `may_leave` of the game holding the most places, when that game holds
/// at least two more than `game` (of several such games, the one holding the most; a tie
/// goes to the one whose job is newest). `None`: nobody gives up a place.
pub fn make_room<T, G: Hash + Eq + Clone>(
    queue: &mut VecDeque<T>,
    game: &G,
    game_of: impl Fn(&T) -> G,
    may_leave: impl Fn(&T) -> bool,
) -> Option<T> {
    let mut held: HashMap<G, usize> = HashMap::new();
    for job in queue.iter() {
        *held.entry(game_of(job)).or_default() += 1;
    }
    let mine = held.get(game).copied().unwrap_or(0);
    let most = held.values().copied().max()?;
    if most < mine + 2 {
        return None;
    }
    let at = queue.iter().rposition(|job| {
        let g = game_of(job);
        &g != game && held.get(&g).copied().unwrap_or(0) == most && may_leave(job)
    });
    // The most-holding games' jobs may all be held (retries, re-runs): then one holding
    // less, still two more than the newcomer's, gives its place.
    let at = at.or_else(|| {
        queue.iter().rposition(|job| {
            let g = game_of(job);
            &g != game && held.get(&g).copied().unwrap_or(0) >= mine + 2 && may_leave(job)
        })
    })?;
    queue.remove(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (game, job number) pairs.
    fn queue(jobs: &[(char, u32)]) -> VecDeque<(char, u32)> {
        jobs.iter().copied().collect()
    }

    fn game(job: &(char, u32)) -> char {
        job.0
    }

    #[test]
    fn games_take_turns_and_each_keeps_its_own_order() {
        let q = queue(&[('a', 1), ('a', 2), ('a', 3), ('b', 1), ('a', 4), ('c', 1), ('b', 2)]);
        let turns: Vec<_> = take_turns(q, game).into_iter().collect();
        assert_eq!(turns, [('a', 1), ('b', 1), ('c', 1), ('a', 2), ('b', 2), ('a', 3), ('a', 4)]);
        // One game: the queue as it was.
        let alone = queue(&[('a', 3), ('a', 1), ('a', 2)]);
        assert_eq!(take_turns(alone.clone(), game), alone);
    }

    #[test]
    fn a_full_queue_takes_a_lighter_games_job_in_the_place_of_the_heaviest_ones_newest() {
        let mut q = queue(&[('a', 1), ('b', 1), ('a', 2), ('a', 3), ('b', 2), ('a', 4)]);
        assert_eq!(make_room(&mut q, &'c', game, |_| true), Some(('a', 4)));
        // b holds 2 against a's 3 now: a's newest again for c, not for b.
        assert_eq!(make_room(&mut q.clone(), &'b', game, |_| true), None);
        assert_eq!(make_room(&mut q, &'c', game, |_| true), Some(('a', 3)));
        assert_eq!(q, queue(&[('a', 1), ('b', 1), ('a', 2), ('b', 2)]));
        // A game alone keeps the whole queue; a newcomer one short of the most gets nothing,
        // so that two games at the limit do not take each other's places in turn.
        let mut alone = queue(&[('a', 1), ('a', 2)]);
        assert_eq!(make_room(&mut alone, &'a', game, |_| true), None);
        let mut close = queue(&[('a', 1), ('a', 2), ('b', 1)]);
        assert_eq!(make_room(&mut close, &'b', game, |_| true), None);
        assert_eq!(close.len(), 3);
    }

    #[test]
    fn jobs_that_may_not_leave_keep_their_place() {
        // a's jobs are all held (retries): b, holding two more than c, gives its newest.
        let mut q = queue(&[('a', 1), ('a', 2), ('a', 3), ('a', 4), ('b', 1), ('b', 2)]);
        assert_eq!(make_room(&mut q, &'c', game, |j| j.0 != 'a'), Some(('b', 2)));
        // Nobody may leave: the newcomer is refused, and the queue is untouched.
        let mut held = queue(&[('a', 1), ('a', 2), ('a', 3)]);
        assert_eq!(make_room(&mut held, &'c', game, |_| false), None);
        assert_eq!(held.len(), 3);
    }
}
