//! Webhooks (migration 10): the receivers, and the durable outbox of their
//! deliveries.
//!
//! Deliveries are queued by the event log itself ([`crate::events`]), in
//! the transaction of the change: this module only reads them and records
//! each attempt. A delivery is `pending` until an attempt succeeds
//! (`delivered`) or the sender gives up (`failed`); every attempt keeps a
//! row of its own, so `cordon webhook deliveries` shows what happened.

use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::{Result, Store, StoreError};

/// The most webhooks a tenant has: each adds a delivery to every event of
/// its types, inside the transaction of the change.
pub const MAX_WEBHOOKS: usize = 50;

/// Rows removed or changed by one write of the housekeeping (deleting a
/// webhook's deliveries, expiring, pruning).
pub const DELETE_BATCH: usize = 1000;

/// A webhook as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookRecord {
    pub id: String,
    pub url: String,
    /// The event types it receives.
    pub events: Vec<String>,
    /// `whsec_<base64>`: the key its deliveries are signed with.
    pub secret: String,
    /// PEM certificates the receiver's chain must end in (`None`: the
    /// system's roots).
    pub ca_pem: Option<String>,
    pub description: Option<String>,
    pub created_by: String,
    /// Nanoseconds since the Unix epoch.
    pub created_at: i64,
}

/// One delivery of one event to one webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRecord {
    pub seq: i64,
    /// The `webhook-id` header of every attempt.
    pub id: String,
    pub webhook_id: String,
    /// The event's id in the log.
    pub event_seq: i64,
    pub event_type: String,
    pub body: String,
    pub created_at: i64,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at: Option<i64>,
    pub last_attempt_at: Option<i64>,
    /// The receiver's HTTP status at the last attempt (`None`: no answer).
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub delivered_at: Option<i64>,
}

/// One attempt of a delivery, as it went.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    /// When it started, nanoseconds since the Unix epoch.
    pub at: i64,
    /// The receiver's HTTP status (`None`: no answer).
    pub status: Option<i64>,
    /// What went wrong (`None`: delivered).
    pub error: Option<String>,
    pub duration_ms: i64,
}

/// What follows an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAttempt {
    /// The receiver took it.
    Delivered,
    /// Try again at this time (nanoseconds).
    RetryAt(i64),
    /// Give up: the retry window is over.
    GiveUp,
}

const WEBHOOK_COLUMNS: &str =
    "id, url, events, secret, ca_pem, description, created_by, created_at";

fn webhook_from_row(row: &Row<'_>) -> rusqlite::Result<WebhookRecord> {
    let events: String = row.get(2)?;
    Ok(WebhookRecord {
        id: row.get(0)?,
        url: row.get(1)?,
        events: events.split(' ').map(str::to_owned).collect(),
        secret: row.get(3)?,
        ca_pem: row.get(4)?,
        description: row.get(5)?,
        created_by: row.get(6)?,
        created_at: row.get(7)?,
    })
}

macro_rules! delivery_columns {
    () => {
        "seq, id, webhook_id, event_seq, event_type, body, created_at, state, attempts, \
         next_attempt_at, last_attempt_at, last_status, last_error, delivered_at"
    };
}

// The outbox's queries, each served by an index of migration 10
// (`plans.rs` checks them).

/// A webhook's pending deliveries due by ?2, oldest first (?3 at most).
pub(crate) const DUE_DELIVERIES: &str = concat!(
    "SELECT ",
    delivery_columns!(),
    " FROM webhook_deliveries WHERE webhook_id = ?1 AND state = 'pending' \
     AND next_attempt_at <= ?2 ORDER BY next_attempt_at, seq LIMIT ?3"
);
/// When a webhook's next pending delivery is due.
pub(crate) const NEXT_DUE: &str = "SELECT min(next_attempt_at) FROM webhook_deliveries \
     WHERE webhook_id = ?1 AND state = 'pending'";
/// One webhook's deliveries, newest first.
pub(crate) const WEBHOOK_DELIVERIES: &str = concat!(
    "SELECT ",
    delivery_columns!(),
    " FROM webhook_deliveries WHERE webhook_id = ?1 ORDER BY seq DESC LIMIT ?2"
);
/// Every webhook's deliveries, newest first.
pub(crate) const ALL_DELIVERIES: &str = concat!(
    "SELECT ",
    delivery_columns!(),
    " FROM webhook_deliveries ORDER BY seq DESC LIMIT ?1"
);
/// A batch of a webhook's deliveries removed (before the webhook).
pub(crate) const DELETE_WEBHOOK_DELIVERIES: &str = "DELETE FROM webhook_deliveries WHERE seq IN \
     (SELECT seq FROM webhook_deliveries WHERE webhook_id = ?1 ORDER BY seq LIMIT ?2)";
/// A batch of pending deliveries never tried within their window given up.
pub(crate) const EXPIRE_DELIVERIES: &str = "UPDATE webhook_deliveries SET state = 'failed', \
     next_attempt_at = NULL, last_error = coalesce(last_error, 'not sent: the receiver failed \
     throughout the retry window') WHERE seq IN (SELECT seq FROM webhook_deliveries \
     WHERE state = 'pending' AND created_at < ?1 AND next_attempt_at <= ?2 \
     ORDER BY created_at LIMIT ?3)";
/// A batch of finished deliveries past their history removed.
pub(crate) const PRUNE_DELIVERIES: &str = "DELETE FROM webhook_deliveries WHERE seq IN \
     (SELECT seq FROM webhook_deliveries WHERE created_at < ?1 AND state != 'pending' \
     ORDER BY created_at LIMIT ?2)";

fn delivery_from_row(row: &Row<'_>) -> rusqlite::Result<DeliveryRecord> {
    Ok(DeliveryRecord {
        seq: row.get(0)?,
        id: row.get(1)?,
        webhook_id: row.get(2)?,
        event_seq: row.get(3)?,
        event_type: row.get(4)?,
        body: row.get(5)?,
        created_at: row.get(6)?,
        state: row.get(7)?,
        attempts: row.get(8)?,
        next_attempt_at: row.get(9)?,
        last_attempt_at: row.get(10)?,
        last_status: row.get(11)?,
        last_error: row.get(12)?,
        delivered_at: row.get(13)?,
    })
}

fn get_webhook(conn: &Connection, id: &str) -> Result<Option<WebhookRecord>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = ?1"
        ))?
        .query_row([id], webhook_from_row)
        .optional()?)
}

fn record_attempt(
    conn: &Connection,
    seq: i64,
    attempt: &AttemptRecord,
    after: AfterAttempt,
) -> Result<bool> {
    let (state, next, delivered_at) = match after {
        AfterAttempt::Delivered => ("delivered", None, Some(attempt.at)),
        AfterAttempt::RetryAt(at) => ("pending", Some(at), None),
        AfterAttempt::GiveUp => ("failed", None, None),
    };
    let n: Option<i64> = conn
        .prepare_cached(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, state = ?2, \
             next_attempt_at = ?3, last_attempt_at = ?4, last_status = ?5, \
             last_error = ?6, delivered_at = ?7 \
             WHERE seq = ?1 AND (state = 'pending' OR (state = 'failed' AND ?2 = 'delivered')) \
             RETURNING attempts",
        )?
        .query_row(
            params![
                seq,
                state,
                next,
                attempt.at,
                attempt.status,
                attempt.error,
                delivered_at
            ],
            |r| r.get(0),
        )
        .optional()?;
    let Some(n) = n else { return Ok(false) };
    conn.prepare_cached(
        "INSERT INTO webhook_attempts (delivery_seq, n, at, status, error, duration_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        seq,
        n,
        attempt.at,
        attempt.status,
        attempt.error,
        attempt.duration_ms
    ])?;
    Ok(true)
}

fn limit(n: usize) -> i64 {
    n.min(i64::MAX as usize) as i64
}

impl Store {
    /// Adds a webhook; its deliveries start with the next event of its
    /// types. [`StoreError::TooMany`] past [`MAX_WEBHOOKS`].
    pub async fn create_webhook(&self, webhook: WebhookRecord) -> Result<WebhookRecord> {
        self.write(move |conn| {
            let count: i64 = conn.query_row("SELECT count(*) FROM webhooks", [], |r| r.get(0))?;
            if count as usize >= MAX_WEBHOOKS {
                return Err(StoreError::TooMany(MAX_WEBHOOKS));
            }
            conn.prepare_cached(&format!(
                "INSERT INTO webhooks ({WEBHOOK_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            ))?
            .execute(params![
                webhook.id,
                webhook.url,
                webhook.events.join(" "),
                webhook.secret,
                webhook.ca_pem,
                webhook.description,
                webhook.created_by,
                webhook.created_at
            ])?;
            Ok(webhook)
        })
        .await
    }

    /// Every webhook, oldest first.
    pub async fn list_webhooks(&self) -> Result<Vec<WebhookRecord>> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached(&format!(
                    "SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY created_at, id"
                ))?
                .query_map([], webhook_from_row)?
                .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    pub async fn get_webhook(&self, id: &str) -> Result<Option<WebhookRecord>> {
        let id = id.to_owned();
        self.read(move |conn| get_webhook(conn, &id)).await
    }

    /// Removes a webhook and its deliveries, sent or not: the deliveries
    /// first, [`DELETE_BATCH`] per write (a webhook whose receiver was down
    /// for a day may have many; one transaction would hold the writer that
    /// long), then the webhook.
    pub async fn delete_webhook(&self, id: &str) -> Result<()> {
        if self.get_webhook(id).await?.is_none() {
            return Err(StoreError::NotFound);
        }
        loop {
            let webhook_id = id.to_owned();
            let removed = self
                .write(move |conn| {
                    Ok(conn
                        .prepare_cached(DELETE_WEBHOOK_DELIVERIES)?
                        .execute(params![webhook_id, limit(DELETE_BATCH)])?)
                })
                .await?;
            if removed < DELETE_BATCH {
                break;
            }
        }
        let id = id.to_owned();
        self.write(move |conn| {
            match conn
                .prepare_cached("DELETE FROM webhooks WHERE id = ?1")?
                .execute([id])?
            {
                0 => Err(StoreError::NotFound),
                _ => Ok(()),
            }
        })
        .await
    }

    /// The webhook's pending deliveries due at `now`, oldest first, `limit`
    /// at most.
    pub async fn due_deliveries(
        &self,
        webhook_id: &str,
        now: i64,
        limit_to: usize,
    ) -> Result<Vec<DeliveryRecord>> {
        let webhook_id = webhook_id.to_owned();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(DUE_DELIVERIES)?
                .query_map(params![webhook_id, now, limit(limit_to)], delivery_from_row)?
                .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// When the webhook's next pending delivery is due (`None`: none is).
    pub async fn next_delivery_due(&self, webhook_id: &str) -> Result<Option<i64>> {
        let webhook_id = webhook_id.to_owned();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(NEXT_DUE)?
                .query_row([webhook_id], |r| r.get(0))?)
        })
        .await
    }

    /// Records attempts of pending deliveries (by `seq`) and what follows
    /// each, in one transaction. A delivery no longer pending (its webhook
    /// deleted, or another sender finished it) is left as it is, except that
    /// a delivery given up while its last attempt was in flight takes that
    /// attempt's success. The number recorded.
    pub async fn record_attempts(
        &self,
        attempts: Vec<(i64, AttemptRecord, AfterAttempt)>,
    ) -> Result<usize> {
        self.write(move |conn| {
            let mut recorded = 0;
            for (seq, attempt, after) in attempts {
                if record_attempt(conn, seq, &attempt, after)? {
                    recorded += 1;
                }
            }
            Ok(recorded)
        })
        .await
    }

    /// Deliveries, newest first, `limit` at most: of one webhook, or of all.
    pub async fn list_deliveries(
        &self,
        webhook_id: Option<&str>,
        limit_to: usize,
    ) -> Result<Vec<DeliveryRecord>> {
        let webhook_id = webhook_id.map(str::to_owned);
        self.read(move |conn| {
            // Two statements, each with its index: one webhook's
            // (`webhook_deliveries_webhook`), or all in `seq` order.
            Ok(match webhook_id {
                Some(id) => conn
                    .prepare_cached(WEBHOOK_DELIVERIES)?
                    .query_map(params![id, limit(limit_to)], delivery_from_row)?
                    .collect::<rusqlite::Result<_>>()?,
                None => conn
                    .prepare_cached(ALL_DELIVERIES)?
                    .query_map(params![limit(limit_to)], delivery_from_row)?
                    .collect::<rusqlite::Result<_>>()?,
            })
        })
        .await
    }

    /// The attempts of a delivery, first first.
    pub async fn delivery_attempts(&self, seq: i64) -> Result<Vec<AttemptRecord>> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT at, status, error, duration_ms FROM webhook_attempts \
                     WHERE delivery_seq = ?1 ORDER BY n",
                )?
                .query_map([seq], |r| {
                    Ok(AttemptRecord {
                        at: r.get(0)?,
                        status: r.get(1)?,
                        error: r.get(2)?,
                        duration_ms: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// How many deliveries are pending, over every webhook.
    pub async fn pending_deliveries(&self) -> Result<u64> {
        self.read(|conn| {
            Ok(conn.query_row(
                "SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'",
                [],
                |r| r.get::<_, i64>(0),
            )? as u64)
        })
        .await
    }

    /// Gives up the pending deliveries of events older than `before`
    /// (nanoseconds) that no attempt gave up yet: those held back while
    /// their receiver failed (only one delivery at a time probes a failing
    /// receiver). The number given up.
    /// At most [`DELETE_BATCH`] a call: a caller expiring more calls again.
    pub async fn expire_deliveries(&self, before: i64, now: i64) -> Result<u64> {
        self.write(move |conn| {
            Ok(conn.prepare_cached(EXPIRE_DELIVERIES)?.execute(params![
                before,
                now,
                limit(DELETE_BATCH)
            ])? as u64)
        })
        .await
    }

    /// Removes up to `batch` finished deliveries (delivered or failed)
    /// created before `before`, with their attempts; the number removed.
    pub async fn prune_deliveries(&self, before: i64, batch: usize) -> Result<u64> {
        self.write(move |conn| {
            Ok(conn
                .prepare_cached(PRUNE_DELIVERIES)?
                .execute(params![before, limit(batch)])? as u64)
        })
        .await
    }
}
