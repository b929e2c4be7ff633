//! The Settlement actor: drives the [`Settler`] state machine. Epoch ticks (and
//! `POST /admin/settle`) make an epoch due; every anchor interval it runs to anchor the
//! blocks committed since; a due epoch is planned and posted, a pending
//! post is polled until confirmed, failures are retried after `retry`, and every few
//! block ticks it re-reads the games' escrow to suspend or resume them. Runs are never
//! concurrent: a trigger during a run makes one more run after it.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::clock::{BlockTick, EpochTick};
use super::settler::{Progress, Settler};

/// Settle now, whatever the clock says (the admin endpoint).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SettleNow;

pub struct Settlement {
    settler: Arc<Settler>,
    retry: Duration,
    poll: Duration,
    escrow_every_blocks: u64,
    /// Runs at least this often, to anchor new blocks.
    anchor_every: Option<Duration>,
    blocks: u64,
    due: bool,
    check_escrow: bool,
    running: bool,
    again: bool,
}

impl Settlement {
    pub fn new(settler: Arc<Settler>, retry: Duration, poll: Duration, escrow_every_blocks: u64) -> Self {
        Self {
            settler,
            retry,
            poll,
            escrow_every_blocks: escrow_every_blocks.max(1),
            anchor_every: None,
            blocks: 0,
            due: false,
            check_escrow: false,
            running: false,
            again: false,
        }
    }

    /// Also runs every `every`, so that new blocks are anchored between other triggers.
    pub fn anchoring(mut self, every: Duration) -> Self {
        self.anchor_every = Some(every);
        self
    }

    fn drive(&mut self, ctx: &mut Context<Self>) {
        if self.running {
            self.again = true;
            return;
        }
        self.running = true;
        let (settler, due, check) = (self.settler.clone(), self.due, std::mem::take(&mut self.check_escrow));
        async move {
            let due = due || settler.is_due(std::time::SystemTime::now()).await.unwrap_or(false);
            let outcome = settler.run(due).await;
            if check && outcome.is_ok() {
                if let Err(e) = settler.check_escrows().await {
                    let error = settler.scrub(&e);
                    tracing::warn!(%error, "escrow check failed; trying again on a later block");
                }
            }
            outcome
        }
        .into_actor(self)
        .map(|outcome, this, ctx| {
            this.running = false;
            match outcome {
                Ok(o) => {
                    if o.planned {
                        this.due = false;
                    }
                    match o.progress {
                        Progress::Waiting => {
                            ctx.run_later(this.poll, |this, ctx| this.drive(ctx));
                        }
                        Progress::Standby => {
                            ctx.run_later(this.retry, |this, ctx| this.drive(ctx));
                        }
                        Progress::Idle => {}
                    }
                }
                Err(e) => {
                    let error = this.settler.scrub(&e);
                    tracing::warn!(%error, retry_s = this.retry.as_secs_f32(), "settlement step failed; retrying");
                    ctx.run_later(this.retry, |this, ctx| this.drive(ctx));
                }
            }
            if std::mem::take(&mut this.again) {
                this.drive(ctx);
            }
        })
        .spawn(ctx);
    }
}

impl Actor for Settlement {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Resume whatever a previous run left open, and catch up on a missed boundary.
        self.drive(ctx);
        if let Some(every) = self.anchor_every {
            ctx.run_interval(every, |this, ctx| this.drive(ctx));
        }
    }
}

impl Supervised for Settlement {
    fn restarting(&mut self, _: &mut Self::Context) {
        tracing::warn!("settlement restarting; its state is in Postgres");
        self.running = false;
    }
}

impl Handler<EpochTick> for Settlement {
    type Result = ();

    fn handle(&mut self, tick: EpochTick, ctx: &mut Self::Context) {
        tracing::info!(tick = tick.number, "epoch boundary: settling");
        self.due = true;
        self.drive(ctx);
    }
}

impl Handler<BlockTick> for Settlement {
    type Result = ();

    fn handle(&mut self, _: BlockTick, ctx: &mut Self::Context) {
        self.blocks += 1;
        if self.blocks.is_multiple_of(self.escrow_every_blocks) {
            self.check_escrow = true;
            self.drive(ctx);
        }
    }
}

impl Handler<SettleNow> for Settlement {
    type Result = ();

    fn handle(&mut self, _: SettleNow, ctx: &mut Self::Context) {
        self.due = true;
        self.drive(ctx);
    }
}
