//! Schema migrations: every `migrations/NNNN_name.sql` compiled in, applied in order at
//! startup, each in its own transaction, recorded in `schema_migrations`. An advisory
//! lock serializes servers that start together on one database.

use super::error::LedgerError;
use super::pool::Conn;

/// (version, name, SQL), in order. Append only: an applied migration never changes.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "registry", include_str!("../../migrations/0001_registry.sql")),
    (2, "verifications", include_str!("../../migrations/0002_verifications.sql")),
    (3, "settlement", include_str!("../../migrations/0003_settlement.sql")),
    (4, "unverifiable", include_str!("../../migrations/0004_unverifiable.sql")),
    (5, "steering", include_str!("../../migrations/0005_steering.sql")),
    (6, "anchors", include_str!("../../migrations/0006_anchors.sql")),
    (7, "ingest", include_str!("../../migrations/0007_ingest.sql")),
    (8, "check_backlog", include_str!("../../migrations/0008_check_backlog.sql")),
    (9, "sampled", include_str!("../../migrations/0009_sampled.sql")),
    (10, "delivery_checks", include_str!("../../migrations/0010_delivery_checks.sql")),
    (11, "delivery_backlog", include_str!("../../migrations/0011_delivery_backlog.sql")),
    (12, "delivery_unverifiable", include_str!("../../migrations/0012_delivery_unverifiable.sql")),
    (13, "quarantine", include_str!("../../migrations/0013_quarantine.sql")),
    (14, "delivered_steering", include_str!("../../migrations/0014_delivered_steering.sql")),
    (15, "undelivered", include_str!("../../migrations/0015_undelivered.sql")),
];

/// Advisory lock key held while migrating ("ludusmig").
pub const MIGRATION_LOCK: i64 = 0x6c75_6475_736d_6967;

/// Applies the migrations this database lacks; returns how many it applied.
pub async fn migrate(conn: &mut Conn) -> Result<usize, LedgerError> {
    conn.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await
    .or_else(|e| {
        // Two servers creating the table at once: the loser sees a unique violation.
        if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    // Unbounded here: another server's migration is waited for, and one may rewrite a
    // large table. The connection's own bound comes back before it returns to the pool.
    conn.batch_execute("SET statement_timeout = 0").await?;
    let result = locked(conn).await;
    // Whatever happened, even a lock that could not be taken or given back.
    let reset = conn.batch_execute("RESET statement_timeout").await;
    let count = result?;
    reset?;
    Ok(count)
}

/// The migrations under the lock that makes servers starting together apply them once.
async fn locked(conn: &mut Conn) -> Result<usize, LedgerError> {
    conn.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
    let result = apply(conn).await;
    conn.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await?;
    result
}

async fn apply(conn: &mut Conn) -> Result<usize, LedgerError> {
    let applied: Vec<i32> =
        conn.query("SELECT version FROM schema_migrations", &[]).await?.iter().map(|r| r.get(0)).collect();
    if let Some(newer) = applied.iter().find(|v| !MIGRATIONS.iter().any(|(m, _, _)| m == *v)) {
        return Err(LedgerError::Corrupt(format!(
            "the database has migration {newer}, which this ludus does not know: upgrade ludus"
        )));
    }
    let mut count = 0;
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        let tx = conn.transaction().await?;
        tx.batch_execute(sql)
            .await
            .map_err(|e| LedgerError::Database(format!("migration {version} ({name}): {}", LedgerError::from(e))))?;
        tx.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", &[version, name]).await?;
        tx.commit().await?;
        tracing::info!(version, name, "applied migration");
        count += 1;
    }
    Ok(count)
}
