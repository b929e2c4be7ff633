//! The Clock: the network's heartbeat. It fires a `BlockTick` every block time (2 s by
//! default) and an `EpochTick` at every epoch boundary (24 h by default) to whoever
//! subscribed. Epoch boundaries are multiples of the epoch length since the Unix epoch
//! (00:00 UTC for daily epochs), so a restart does not move them. The Distributor logs
//! per-block traffic on block ticks, the Registry commits blocks on them, and Settlement
//! settles an epoch on each epoch tick.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;

/// A new block began.
#[derive(Message, Debug, Clone, Copy, PartialEq, Eq)]
#[rtype(result = "()")]
pub struct BlockTick {
    pub number: u64,
}

/// A new epoch began.
#[derive(Message, Debug, Clone, Copy, PartialEq, Eq)]
#[rtype(result = "()")]
pub struct EpochTick {
    pub number: u64,
}

/// Subscribe a recipient to block ticks.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SubscribeBlocks(pub Recipient<BlockTick>);

/// Subscribe a recipient to epoch ticks.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SubscribeEpochs(pub Recipient<EpochTick>);

/// The current block number.
#[derive(Message)]
#[rtype(result = "u64")]
pub struct CurrentBlock;

/// The latest epoch boundary at or before `now`.
pub fn last_boundary(now: SystemTime, epoch: Duration) -> SystemTime {
    let len = epoch.as_millis().max(1);
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    UNIX_EPOCH + Duration::from_millis((since - since % len) as u64)
}

/// How long from `now` until the next epoch boundary.
pub fn until_next_boundary(now: SystemTime, epoch: Duration) -> Duration {
    (last_boundary(now, epoch) + epoch).duration_since(now).unwrap_or(epoch)
}

pub struct Clock {
    block_time: Duration,
    epoch_time: Duration,
    /// Delay of the first epoch tick (then one every `epoch_time`).
    first_epoch_in: Duration,
    block: u64,
    epoch: u64,
    block_subscribers: Vec<Recipient<BlockTick>>,
    epoch_subscribers: Vec<Recipient<EpochTick>>,
}

impl Clock {
    pub fn new(block_time: Duration, epoch_time: Duration) -> Self {
        Self {
            block_time,
            epoch_time,
            first_epoch_in: until_next_boundary(SystemTime::now(), epoch_time),
            block: 0,
            epoch: 0,
            block_subscribers: Vec::new(),
            epoch_subscribers: Vec::new(),
        }
    }

    /// Fires the first epoch tick after `delay` instead of at the next boundary.
    pub fn first_epoch_after(mut self, delay: Duration) -> Self {
        self.first_epoch_in = delay;
        self
    }

    fn fire_epoch(&mut self) {
        self.epoch += 1;
        let tick = EpochTick { number: self.epoch };
        self.epoch_subscribers.retain(|r| r.try_send(tick).is_ok() || r.connected());
    }
}

impl Actor for Clock {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.block_time, |this, _| {
            this.block += 1;
            let tick = BlockTick { number: this.block };
            this.block_subscribers.retain(|r| r.try_send(tick).is_ok() || r.connected());
        });
        let every = self.epoch_time;
        ctx.run_later(self.first_epoch_in, move |this, ctx| {
            this.fire_epoch();
            ctx.run_interval(every, |this, _| this.fire_epoch());
        });
    }
}

impl Supervised for Clock {
    fn restarting(&mut self, _: &mut Self::Context) {
        tracing::warn!(block = self.block, "clock restarting; numbering continues");
        self.first_epoch_in = until_next_boundary(SystemTime::now(), self.epoch_time);
    }
}

impl Handler<SubscribeBlocks> for Clock {
    type Result = ();

    fn handle(&mut self, msg: SubscribeBlocks, _: &mut Self::Context) {
        self.block_subscribers.push(msg.0);
    }
}

impl Handler<SubscribeEpochs> for Clock {
    type Result = ();

    fn handle(&mut self, msg: SubscribeEpochs, _: &mut Self::Context) {
        self.epoch_subscribers.push(msg.0);
    }
}

impl Handler<CurrentBlock> for Clock {
    type Result = u64;

    fn handle(&mut self, _: CurrentBlock, _: &mut Self::Context) -> u64 {
        self.block
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<u64>>>);
    impl Actor for Recorder {
        type Context = Context<Self>;
    }
    impl Handler<BlockTick> for Recorder {
        type Result = ();
        fn handle(&mut self, tick: BlockTick, _: &mut Self::Context) {
            self.0.lock().unwrap().push(tick.number);
        }
    }
    impl Handler<EpochTick> for Recorder {
        type Result = ();
        fn handle(&mut self, tick: EpochTick, _: &mut Self::Context) {
            self.0.lock().unwrap().push(1000 + tick.number);
        }
    }

    #[actix_rt::test]
    async fn ticks_follow_virtual_time() {
        tokio::time::pause();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorder = Recorder(seen.clone()).start();
        let clock = Clock::new(Duration::from_secs(2), Duration::from_secs(7))
            .first_epoch_after(Duration::from_secs(7))
            .start();
        clock.send(SubscribeBlocks(recorder.clone().recipient())).await.unwrap();
        clock.send(SubscribeEpochs(recorder.recipient())).await.unwrap();
        // 8.5 s of virtual time, in small steps so every timer fires and is handled.
        for _ in 0..85 {
            tokio::time::advance(Duration::from_millis(100)).await;
            tokio::task::yield_now().await;
        }
        assert_eq!(clock.send(CurrentBlock).await.unwrap(), 4);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.iter().filter(|&&n| n < 1000).copied().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(seen.iter().filter(|&&n| n > 1000).count(), 1, "one epoch in 8.5 s of 7-s epochs: {seen:?}");
    }

    #[test]
    fn epoch_boundaries_are_multiples_of_the_epoch_length() {
        let day = Duration::from_secs(86_400);
        let now = UNIX_EPOCH + Duration::from_secs(3 * 86_400 + 3_600);
        assert_eq!(last_boundary(now, day), UNIX_EPOCH + Duration::from_secs(3 * 86_400));
        assert_eq!(until_next_boundary(now, day), Duration::from_secs(86_400 - 3_600));
        let exactly = UNIX_EPOCH + Duration::from_secs(5 * 86_400);
        assert_eq!(last_boundary(exactly, day), exactly);
        assert_eq!(until_next_boundary(exactly, day), day);
    }
}
