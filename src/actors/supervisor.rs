//! A supervisor that survives panics as well as stops. actix's `Supervisor` restarts an
//! actor that stops, but a panic in a handler unwinds out of the actor's task and the
//! actor is simply gone (every `Addr` to it dead). This one polls the actor inside
//! `catch_unwind`; on a panic it logs it and restarts the actor on the same mailbox, so
//! every address stays valid. The message being handled is lost (its sender sees a closed
//! mailbox and answers with a clean error); `Supervised::restarting` lets each actor
//! drop whatever state the panic may have left half-done.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};

use actix::dev::ContextFut;
use actix::prelude::*;

/// Panics caught in supervised actors since the start (for logs and metrics).
pub static PANICS: AtomicU64 = AtomicU64::new(0);

/// Asks an actor to panic: fault injection for resilience drills (`POST
/// /admin/chaos/panic/{actor}`, only with `server.chaos = true`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct InjectPanic;

struct Supervision<A>
where
    A: Supervised + Actor<Context = Context<A>>,
{
    name: &'static str,
    fut: ContextFut<A, Context<A>>,
}

/// Starts `A` under panic-catching supervision; `name` labels its logs.
pub fn start<A, F>(name: &'static str, f: F) -> Addr<A>
where
    A: Supervised + Actor<Context = Context<A>>,
    F: FnOnce(&mut Context<A>) -> A,
{
    let mut ctx = Context::new();
    let act = f(&mut ctx);
    let addr = ctx.address();
    actix::spawn(Supervision { name, fut: ctx.into_future(act) });
    addr
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

impl<A> Future for Supervision<A>
where
    A: Supervised + Actor<Context = Context<A>> + Unpin,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            match catch_unwind(AssertUnwindSafe(|| Pin::new(&mut this.fut).poll(cx))) {
                Ok(Poll::Pending) => return Poll::Pending,
                Ok(Poll::Ready(())) => {
                    if !this.fut.restart() {
                        return Poll::Ready(());
                    }
                }
                Err(payload) => {
                    PANICS.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(actor = this.name, panic = %panic_message(&*payload), "actor panicked; restarting it");
                    if !this.fut.restart() {
                        return Poll::Ready(());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counter {
        seen: u32,
        restarts: u32,
    }
    impl Actor for Counter {
        type Context = Context<Self>;
    }
    impl Supervised for Counter {
        fn restarting(&mut self, _: &mut Context<Self>) {
            self.restarts += 1;
        }
    }
    #[derive(Message)]
    #[rtype(result = "Vec<u32>")]
    struct Count;
    impl Handler<Count> for Counter {
        type Result = Vec<u32>;
        fn handle(&mut self, _: Count, _: &mut Context<Self>) -> Vec<u32> {
            self.seen += 1;
            vec![self.seen, self.restarts]
        }
    }
    impl Handler<InjectPanic> for Counter {
        type Result = ();
        fn handle(&mut self, _: InjectPanic, _: &mut Context<Self>) {
            panic!("injected");
        }
    }

    #[actix_rt::test]
    async fn a_panicking_actor_is_restarted_on_the_same_address() {
        let addr = start("counter", |_| Counter { seen: 0, restarts: 0 });
        assert_eq!(addr.send(Count).await.unwrap(), vec![1, 0]);
        // The panicking message's sender sees a closed mailbox, not a hang.
        assert!(addr.send(InjectPanic).await.is_err());
        assert_eq!(addr.send(Count).await.unwrap(), vec![2, 1], "same address, state kept, restarted once");
        assert!(PANICS.load(Ordering::Relaxed) >= 1);
    }
}
