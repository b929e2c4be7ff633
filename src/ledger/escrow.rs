//! Escrow checks: what each game owes the network (settled nowhere yet) against the
//! escrow it holds on chain. A game that owes more than it holds is suspended with a
//! reason naming the shortfall; settlement lifts its own suspensions once the escrow
//! covers the debt with room to spare. Operator suspensions are never touched.

use super::error::LedgerError;
use super::games::{GameStatus, SuspendedBy};
use super::store::Store;
use super::undelivered::NOT_UNDELIVERED;
use crate::books::Units;

/// A game as settlement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GameBalance {
    pub game_id: i64,
    pub name: String,
    pub wallet: Option<String>,
    /// Charges of its tasks not settled yet (failed and disputed tasks are never charged):
    /// those in no epoch, and an open epoch's charges while its post is not on chain (the
    /// chain's escrow still holds them).
    pub owed: Units,
    pub status: GameStatus,
    pub suspended_by: Option<SuspendedBy>,
    pub internal: bool,
}

/// What an escrow check does to a game.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EscrowAction {
    Keep,
    Suspend(String),
    Resume,
}

/// The rule: suspend an active game that owes more than its available escrow; resume a
/// game settlement suspended once its escrow exceeds what it owes. Internal games (the
/// operator's own quality checks) are never suspended.
pub fn escrow_action(game: &GameBalance, available: Units) -> EscrowAction {
    if game.internal {
        return EscrowAction::Keep;
    }
    match (game.status, game.suspended_by) {
        (GameStatus::Active, _) if game.owed > available => {
            let short = Units(game.owed.0 - available.0);
            EscrowAction::Suspend(match &game.wallet {
                Some(wallet) => format!(
                    "escrow shortfall of {short} base units: the game owes {} and its escrow at {wallet} holds {available}; \
                     deposit at least {short} into the settlement contract (depositFor {wallet}) to resume",
                    game.owed
                ),
                None => format!(
                    "escrow shortfall of {short} base units: the game owes {} and has no wallet registered; \
                     run `ludus games set-wallet {} 0x…` and deposit into the settlement contract to resume",
                    game.owed, game.name
                ),
            })
        }
        (GameStatus::Suspended, Some(SuspendedBy::Escrow)) if available > game.owed => EscrowAction::Resume,
        _ => EscrowAction::Keep,
    }
}

impl Store {
    /// Gives internal games the operator's wallet when they have none, so the operator's
    /// own tasks are charged to the operator's escrow.
    pub async fn assign_internal_wallets(&self, operator: &str) -> Result<(), LedgerError> {
        let wallet = super::games::normalize_wallet(operator)?;
        let conn = self.conn().await?;
        conn.execute(
            "UPDATE games SET wallet = $1 WHERE internal AND wallet IS NULL
               AND NOT EXISTS (SELECT 1 FROM games WHERE wallet = $1)",
            &[&wallet],
        )
        .await?;
        Ok(())
    }

    /// Every game that has a wallet or owes something, the chain having posted epochs up
    /// to `posted`: an open epoch past it still owes its charges (the chain's escrow holds
    /// them until its post is mined).
    pub async fn game_balances(&self, posted: u64) -> Result<Vec<GameBalance>, LedgerError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                &format!("SELECT g.id, g.name, g.wallet, (coalesce(o.owed, 0) + coalesce(p.pending, 0))::text, g.status,
                        g.suspended_by, g.internal
                 FROM games g LEFT JOIN (
                     SELECT game_id, sum(price_units) AS owed FROM receipts r
                     WHERE epoch IS NULL AND verification NOT IN ('failed', 'unverifiable') AND confirmation <> 'disputed'
                       AND {NOT_UNDELIVERED}
                     GROUP BY game_id
                 ) o ON o.game_id = g.id
                 LEFT JOIN (
                     SELECT c.game_id, sum(c.amount) AS pending FROM charges c
                     JOIN epochs e ON e.number = c.epoch WHERE e.number > $1
                     GROUP BY c.game_id
                 ) p ON p.game_id = g.id
                 WHERE g.status <> 'removed' AND (g.wallet IS NOT NULL OR o.owed > 0 OR p.pending > 0)
                 ORDER BY g.id"),
                &[&(posted.min(i64::MAX as u64) as i64)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let owed: String = r.get(3);
                Ok(GameBalance {
                    game_id: r.get(0),
                    name: r.get(1),
                    wallet: r.get(2),
                    owed: owed.parse().map_err(|e| LedgerError::Corrupt(format!("owed: {e}")))?,
                    status: GameStatus::parse(r.get(4))?,
                    suspended_by: SuspendedBy::parse(r.get(5))?,
                    internal: r.get(6),
                })
            })
            .collect()
    }

    /// Stores the escrow seen on chain and applies `action`.
    pub async fn apply_escrow(&self, game_id: i64, available: Units, action: &EscrowAction) -> Result<(), LedgerError> {
        let conn = self.conn().await?;
        let escrow = available.to_string();
        match action {
            EscrowAction::Keep => {
                conn.execute(
                    "UPDATE games SET escrow_units = $2::text::numeric, escrow_checked_at = now() WHERE id = $1",
                    &[&game_id, &escrow],
                )
                .await?
            }
            EscrowAction::Suspend(reason) => {
                conn.execute(
                    "UPDATE games SET escrow_units = $2::text::numeric, escrow_checked_at = now(),
                         status = 'suspended', status_reason = $3, suspended_by = 'escrow'
                     WHERE id = $1 AND status = 'active'",
                    &[&game_id, &escrow, reason],
                )
                .await?
            }
            EscrowAction::Resume => {
                conn.execute(
                    "UPDATE games SET escrow_units = $2::text::numeric, escrow_checked_at = now(),
                         status = 'active', status_reason = NULL, suspended_by = NULL
                     WHERE id = $1 AND status = 'suspended' AND suspended_by = 'escrow'",
                    &[&game_id, &escrow],
                )
                .await?
            }
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn game(owed: u128, status: GameStatus, by: Option<SuspendedBy>) -> GameBalance {
        GameBalance {
            game_id: 1,
            name: "g".into(),
            wallet: Some("0x00000000000000000000000000000000000000aa".into()),
            owed: Units(owed),
            status,
            suspended_by: by,
            internal: false,
        }
    }

    #[test]
    fn suspends_on_shortfall_naming_it_and_resumes_with_headroom() {
        let EscrowAction::Suspend(reason) = escrow_action(&game(150, GameStatus::Active, None), Units(100)) else {
            panic!("expected a suspension")
        };
        assert!(reason.contains("shortfall of 50"), "{reason}");
        assert!(reason.contains("0x00000000000000000000000000000000000000aa"), "{reason}");
        assert_eq!(escrow_action(&game(100, GameStatus::Active, None), Units(100)), EscrowAction::Keep);
        assert_eq!(
            escrow_action(&game(150, GameStatus::Suspended, Some(SuspendedBy::Escrow)), Units(150)),
            EscrowAction::Keep
        );
        assert_eq!(
            escrow_action(&game(150, GameStatus::Suspended, Some(SuspendedBy::Escrow)), Units(151)),
            EscrowAction::Resume
        );
        // The operator's suspensions are the operator's to lift.
        assert_eq!(
            escrow_action(&game(0, GameStatus::Suspended, Some(SuspendedBy::Operator)), Units(1000)),
            EscrowAction::Keep
        );
        let mut internal = game(10, GameStatus::Active, None);
        internal.internal = true;
        assert_eq!(escrow_action(&internal, Units(0)), EscrowAction::Keep);
        let mut no_wallet = game(10, GameStatus::Active, None);
        no_wallet.wallet = None;
        let EscrowAction::Suspend(reason) = escrow_action(&no_wallet, Units(0)) else { panic!() };
        assert!(reason.contains("set-wallet"), "{reason}");
    }
}
