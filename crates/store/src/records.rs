//! Records and the operations on them.

use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::query::{self, FieldSql, Kind, Page, Query, SqlContext};
use crate::{ActionChange, Result, Store, StoreError};

/// An application that obtains tokens with the client-credentials grant.
#[derive(Debug, Clone, PartialEq)]
pub struct App {
    pub client_id: String,
    pub name: String,
    /// Encoded hash of the client secret (`sha256$…`, or the older
    /// `pbkdf2-sha512$…`).
    pub secret_hash: String,
    pub permissions: Vec<String>,
    pub created_at: i64,
}

/// An enroll token, known only by the hash of its value.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrollToken {
    pub id: String,
    pub token_hash: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub max_uses: Option<i64>,
}

/// An enroll token as listed: never its value nor its hash.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrollTokenInfo {
    pub id: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub max_uses: Option<i64>,
    pub uses: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Address {
    pub ip_address: String,
    pub mac_address: Option<String>,
    pub interface_type: Option<String>,
    pub operational_status: Option<String>,
}

/// What an agent tells about its host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    pub computer_dns_name: String,
    pub os_platform: Option<String>,
    pub os_version: Option<String>,
    pub os_processor: Option<String>,
    pub os_architecture: Option<String>,
    pub os_build: Option<i64>,
    pub agent_version: Option<String>,
    pub last_ip_address: Option<String>,
    pub last_external_ip_address: Option<String>,
    pub addresses: Vec<Address>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MachineRecord {
    pub seq: i64,
    pub id: String,
    pub public_key: Vec<u8>,
    pub revoked: bool,
    pub first_seen: i64,
    pub last_seen: i64,
    pub onboarding_status: String,
    pub rbac_group_id: i64,
    pub rbac_group_name: String,
    /// `NotIsolated`, `Isolating`, `Isolated` or `Releasing`.
    pub isolation_state: String,
    /// What the agent has in force: `Full`, `Selective` or none.
    pub isolation_scope: Option<String>,
    pub facts: Facts,
    pub tags: Vec<String>,
    /// How often the agent reported its table tampered with, and the last time.
    pub tamper_count: i64,
    pub last_tamper_at: Option<i64>,
    /// The exclusion rule-set version the agent reports applying, if any.
    pub exclusion_version: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ActionRecord {
    pub seq: i64,
    pub id: String,
    pub action_type: String,
    pub title: Option<String>,
    pub requestor: String,
    pub requestor_comment: String,
    pub status: String,
    pub machine_id: String,
    pub computer_dns_name: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub cancellation_requestor: Option<String>,
    pub cancellation_comment: Option<String>,
    pub cancellation_at: Option<i64>,
    pub error_hresult: i64,
    pub scope: Option<String>,
    pub external_id: Option<String>,
    pub request_source: String,
    pub troubleshoot_info: Option<String>,
}

/// A request for a new isolation-family action.
#[derive(Debug, Clone)]
pub struct NewAction {
    pub id: String,
    pub action_type: String,
    pub title: Option<String>,
    pub requestor: String,
    pub requestor_comment: String,
    pub machine_id: String,
    pub scope: Option<String>,
    pub external_id: Option<String>,
    pub request_source: String,
    pub now: i64,
}

/// How an action ended, as reported by the agent.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub succeeded: bool,
    pub error_hresult: i64,
    pub reason: Option<String>,
    /// What the agent has in force afterwards (`None`: not isolated).
    pub enforced_scope: Option<String>,
}

/// Filterable and sortable fields of machine actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionField {
    Id,
    Status,
    MachineId,
    Type,
    Requestor,
    CreationDateTimeUtc,
    LastUpdateDateTimeUtc,
    ComputerDnsName,
}

impl FieldSql for ActionField {
    fn expr(&self, _ctx: &SqlContext) -> String {
        match self {
            ActionField::Id => "t.id",
            ActionField::Status => "t.status",
            ActionField::MachineId => "t.machine_id",
            ActionField::Type => "t.action_type",
            ActionField::Requestor => "t.requestor",
            ActionField::CreationDateTimeUtc => "t.created_at",
            ActionField::LastUpdateDateTimeUtc => "t.updated_at",
            ActionField::ComputerDnsName => "t.computer_dns_name",
        }
        .to_owned()
    }
    fn kind(&self) -> Kind {
        match self {
            ActionField::CreationDateTimeUtc | ActionField::LastUpdateDateTimeUtc => Kind::Time,
            _ => Kind::Text,
        }
    }
}

/// Filterable and sortable fields of machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineField {
    Id,
    ComputerDnsName,
    HealthStatus,
    OsPlatform,
    LastSeen,
    FirstSeen,
    LastIpAddress,
    RbacGroupId,
    MachineTags,
    OnboardingStatus,
    IsolationState,
    IsolationScope,
}

impl FieldSql for MachineField {
    fn expr(&self, ctx: &SqlContext) -> String {
        match self {
            MachineField::Id => "t.id".to_owned(),
            MachineField::ComputerDnsName => "t.computer_dns_name".to_owned(),
            MachineField::HealthStatus => format!(
                "(CASE WHEN t.last_seen >= {} THEN 'Active' WHEN t.last_seen >= {} \
                 THEN 'ImpairedCommunication' ELSE 'Inactive' END)",
                ctx.active_since, ctx.inactive_before
            ),
            MachineField::OsPlatform => "t.os_platform".to_owned(),
            MachineField::LastSeen => "t.last_seen".to_owned(),
            MachineField::FirstSeen => "t.first_seen".to_owned(),
            MachineField::LastIpAddress => "t.last_ip_address".to_owned(),
            MachineField::RbacGroupId => "t.rbac_group_id".to_owned(),
            MachineField::MachineTags => "''".to_owned(),
            MachineField::OnboardingStatus => "t.onboarding_status".to_owned(),
            MachineField::IsolationState => "t.isolation_state".to_owned(),
            MachineField::IsolationScope => "t.isolation_scope".to_owned(),
        }
    }
    fn kind(&self) -> Kind {
        match self {
            MachineField::LastSeen | MachineField::FirstSeen => Kind::Time,
            MachineField::RbacGroupId => Kind::Int,
            MachineField::MachineTags => Kind::TextSet,
            _ => Kind::Text,
        }
    }
}

/// `healthStatus` of a machine last seen at `last_seen`.
pub fn health_status(last_seen: i64, ctx: &SqlContext) -> &'static str {
    if last_seen >= ctx.active_since {
        "Active"
    } else if last_seen >= ctx.inactive_before {
        "ImpairedCommunication"
    } else {
        "Inactive"
    }
}

// The statements of the key queries on actions and machines, named so that
// the store's tests can check how SQLite runs them (`plans` tests).

/// The action in flight on machine `?1`, if any: `actions_one_in_flight`.
pub(crate) const IN_FLIGHT_ACTION: &str =
    "SELECT id FROM actions WHERE machine_id = ?1 AND status IN ('Pending', 'InProgress')";

/// Sets machine `?1`'s `isolation_state` from what is in force and what
/// is in flight.
pub(crate) const REFRESH_ISOLATION_STATE: &str = "UPDATE machines SET isolation_state = COALESCE( \
     (SELECT CASE a.action_type WHEN 'Isolate' THEN 'Isolating' ELSE 'Releasing' END \
      FROM actions a WHERE a.machine_id = machines.id AND a.status IN ('Pending', 'InProgress')), \
     CASE WHEN isolation_scope IS NULL THEN 'NotIsolated' ELSE 'Isolated' END) \
     WHERE id = ?1";

/// One machine of a liveness batch.
pub(crate) const TOUCH_MACHINE: &str =
    "UPDATE machines SET last_seen = MAX(last_seen, ?2) WHERE id = ?1";

/// Cancels action `?1`.
pub(crate) const CANCEL_ACTION: &str = "UPDATE actions SET status = 'Cancelled', updated_at = ?2, \
     cancellation_requestor = ?3, cancellation_comment = ?4, cancellation_at = ?2 WHERE id = ?1";

/// After `SELECT <columns>`: the machine named `?1` (without regard to
/// case) seen last, among the groups of `in_groups` (empty: all).
pub(crate) fn machine_by_name(in_groups: &str) -> String {
    format!(
        "FROM machines t WHERE t.computer_dns_name = ?1 COLLATE NOCASE{in_groups} \
         ORDER BY t.last_seen DESC, t.seq DESC LIMIT 1"
    )
}

/// The revoked machines: the partial index `machines_revoked` alone.
pub(crate) const REVOKED_MACHINES: &str = "SELECT id FROM machines WHERE revoked = 1";

/// Every action counted by type and status: one pass over a covering index.
pub(crate) const ACTION_COUNTS: &str =
    "SELECT action_type, status, count(*) FROM actions GROUP BY action_type, status";

/// The in-flight actions past a deadline (`?1`: created before, for
/// Pending; `?2`: updated before, for InProgress). The `status IN` term
/// lets SQLite read only the actions in flight (through `actions_status_seq`
/// or the partial index `actions_one_in_flight`), never the whole table as
/// the OR of the two deadlines alone did.
pub(crate) const EXPIRY_CANDIDATES: &str = "SELECT id FROM actions \
     WHERE status IN ('Pending', 'InProgress') \
     AND ((status = 'Pending' AND created_at < ?1) OR (status = 'InProgress' AND updated_at < ?2))";

/// After `SELECT <columns>`: the actions of machine `?1` still to deliver.
pub(crate) const UNDELIVERED_ACTIONS: &str = "FROM actions t WHERE t.machine_id = ?1 \
     AND t.status IN ('Pending', 'InProgress') ORDER BY t.seq";

pub(crate) const ACTION_COLUMNS: &str = "t.seq, t.id, t.action_type, t.title, t.requestor, t.requestor_comment, \
     t.status, t.machine_id, t.computer_dns_name, t.created_at, t.updated_at, \
     t.cancellation_requestor, t.cancellation_comment, t.cancellation_at, t.error_hresult, \
     t.scope, t.external_id, t.request_source, t.troubleshoot_info";
const ACTION_COLUMN_COUNT: usize = 19;

fn action_from_row(row: &Row<'_>) -> rusqlite::Result<ActionRecord> {
    Ok(ActionRecord {
        seq: row.get(0)?,
        id: row.get(1)?,
        action_type: row.get(2)?,
        title: row.get(3)?,
        requestor: row.get(4)?,
        requestor_comment: row.get(5)?,
        status: row.get(6)?,
        machine_id: row.get(7)?,
        computer_dns_name: row.get(8)?,
        created_at: row.get(9)?,
        updated_at: row.get(10)?,
        cancellation_requestor: row.get(11)?,
        cancellation_comment: row.get(12)?,
        cancellation_at: row.get(13)?,
        error_hresult: row.get(14)?,
        scope: row.get(15)?,
        external_id: row.get(16)?,
        request_source: row.get(17)?,
        troubleshoot_info: row.get(18)?,
    })
}

pub(crate) const MACHINE_COLUMNS: &str = "t.seq, t.id, t.public_key, t.revoked, t.computer_dns_name, \
     t.first_seen, t.last_seen, t.os_platform, t.os_version, t.os_processor, t.os_architecture, \
     t.os_build, t.agent_version, t.last_ip_address, t.last_external_ip_address, \
     t.onboarding_status, t.rbac_group_id, t.isolation_state, t.isolation_scope, \
     t.tamper_count, t.last_tamper_at, t.exclusion_version, \
     (SELECT g.name FROM machine_groups g WHERE g.id = t.rbac_group_id)";
const MACHINE_COLUMN_COUNT: usize = 23;

fn machine_from_row(row: &Row<'_>) -> rusqlite::Result<MachineRecord> {
    Ok(MachineRecord {
        seq: row.get(0)?,
        id: row.get(1)?,
        public_key: row.get(2)?,
        revoked: row.get(3)?,
        first_seen: row.get(5)?,
        last_seen: row.get(6)?,
        onboarding_status: row.get(15)?,
        rbac_group_id: row.get(16)?,
        rbac_group_name: row
            .get::<_, Option<String>>(22)?
            .unwrap_or_else(|| crate::DEFAULT_GROUP_NAME.to_owned()),
        isolation_state: row.get(17)?,
        isolation_scope: row.get(18)?,
        facts: Facts {
            computer_dns_name: row.get(4)?,
            os_platform: row.get(7)?,
            os_version: row.get(8)?,
            os_processor: row.get(9)?,
            os_architecture: row.get(10)?,
            os_build: row.get(11)?,
            agent_version: row.get(12)?,
            last_ip_address: row.get(13)?,
            last_external_ip_address: row.get(14)?,
            addresses: Vec::new(),
        },
        tags: Vec::new(),
        tamper_count: row.get(19)?,
        last_tamper_at: row.get(20)?,
        exclusion_version: row.get(21)?,
    })
}

/// Fills in the addresses and tags of machines read from `machines`.
fn load_machine_children(conn: &Connection, machine: &mut MachineRecord) -> Result<()> {
    let mut stmt = conn.prepare_cached(
        "SELECT ip_address, mac_address, interface_type, operational_status \
         FROM machine_addresses WHERE machine_id = ?1 ORDER BY position",
    )?;
    machine.facts.addresses = stmt
        .query_map([&machine.id], |r| {
            Ok(Address {
                ip_address: r.get(0)?,
                mac_address: r.get(1)?,
                interface_type: r.get(2)?,
                operational_status: r.get(3)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut stmt =
        conn.prepare_cached("SELECT tag FROM machine_tags WHERE machine_id = ?1 ORDER BY tag")?;
    machine.tags = stmt
        .query_map([&machine.id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(())
}

pub(crate) fn get_action(conn: &Connection, id: &str) -> Result<Option<ActionRecord>> {
    let sql = format!("SELECT {ACTION_COLUMNS} FROM actions t WHERE t.id = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id], action_from_row)
        .optional()?)
}

fn in_flight_action(conn: &Connection, machine_id: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached(IN_FLIGHT_ACTION)?
        .query_row([machine_id], |r| r.get(0))
        .optional()?)
}

/// Sets the machine's `isolation_state` from what is in force and what is in flight.
fn refresh_isolation_state(conn: &Connection, machine_id: &str) -> Result<()> {
    conn.prepare_cached(REFRESH_ISOLATION_STATE)?
        .execute([machine_id])?;
    Ok(())
}

fn write_facts(conn: &Connection, machine_id: &str, facts: &Facts) -> Result<()> {
    conn.prepare_cached(
        "UPDATE machines SET computer_dns_name = ?2, os_platform = ?3, os_version = ?4, \
         os_processor = ?5, os_architecture = ?6, os_build = ?7, agent_version = ?8, \
         last_ip_address = ?9, last_external_ip_address = ?10 WHERE id = ?1",
    )?
    .execute(params![
        machine_id,
        facts.computer_dns_name,
        facts.os_platform,
        facts.os_version,
        facts.os_processor,
        facts.os_architecture,
        facts.os_build,
        facts.agent_version,
        facts.last_ip_address,
        facts.last_external_ip_address,
    ])?;
    conn.prepare_cached("DELETE FROM machine_addresses WHERE machine_id = ?1")?
        .execute([machine_id])?;
    let mut insert = conn.prepare_cached(
        "INSERT INTO machine_addresses (machine_id, position, ip_address, mac_address, \
         interface_type, operational_status) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for (position, address) in facts.addresses.iter().enumerate() {
        insert.execute(params![
            machine_id,
            position as i64,
            address.ip_address,
            address.mac_address,
            address.interface_type,
            address.operational_status,
        ])?;
    }
    crate::people::assign_groups(conn, Some(machine_id))
}

/// How to read one entity's table.
pub(crate) struct Table<T> {
    pub(crate) name: &'static str,
    pub(crate) columns: &'static str,
    pub(crate) column_count: usize,
    pub(crate) from_row: fn(&Row<'_>) -> rusqlite::Result<T>,
    pub(crate) seq_of: fn(&T) -> i64,
    /// The condition "the row's machine is in the groups `{ids}`", for
    /// [`Query::groups`]: its form read through the index (a small
    /// scope), and its form checked on each row of a scan in `seq` order
    /// or of an index lookup on another condition.
    pub(crate) in_groups: fn(ids: &str, by_index: bool) -> String,
    /// How many machines a scope holds at most to be read through the
    /// index (its rows gathered, then sorted); a larger scope is a scan in
    /// list order that stops at the page's end, which reaches a page
    /// after about `take × machines / scope` rows.
    pub(crate) small_scope: i64,
    /// About how many bytes a row takes, for tables whose rows can be
    /// large: a page then ends early once it holds [`MAX_PAGE_BYTES`].
    pub(crate) size_of: Option<fn(&T) -> usize>,
}

/// How large a page of a table with [`Table::size_of`] grows at most
/// (plus one row): it ends early, with a cursor to the rest.
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;

pub(crate) const ACTIONS: Table<ActionRecord> = Table {
    name: "actions",
    columns: ACTION_COLUMNS,
    column_count: ACTION_COLUMN_COUNT,
    from_row: action_from_row,
    seq_of: |a| a.seq,
    in_groups: |ids, by_index| {
        if by_index {
            // The scope's few machines, then their actions by machine.
            format!(
                "t.machine_id IN (SELECT m.id FROM machines m WHERE m.rbac_group_id IN ({ids}))"
            )
        } else {
            // Each row read looks up its own machine's group: a list of
            // the whole scope would be built first, for every query.
            format!("(SELECT m.rbac_group_id FROM machines m WHERE m.id = t.machine_id) IN ({ids})")
        }
    },
    // About 50 actions a machine: up to 10,000 rows to sort; a scope of
    // more than 200 in 100,000 machines reaches 100 rows within 50,000.
    small_scope: 200,
    size_of: None,
};

pub(crate) const MACHINES: Table<MachineRecord> = Table {
    name: "machines",
    columns: MACHINE_COLUMNS,
    column_count: MACHINE_COLUMN_COUNT,
    from_row: machine_from_row,
    seq_of: |m| m.seq,
    in_groups: |ids, by_index| {
        let plus = if by_index { "" } else { "+" };
        format!("{plus}t.rbac_group_id IN ({ids})")
    },
    // Up to 2,000 rows to sort; a scope of more than 2,000 in 100,000
    // machines reaches 100 rows within 5,000.
    small_scope: 2000,
    size_of: None,
};

/// How many machines the groups `ids` hold, counted up to `limit + 1`
/// (from `machines_group_id` alone).
fn scope_size(conn: &Connection, ids: &str, limit: i64) -> Result<i64> {
    let sql = format!(
        "SELECT count(*) FROM (SELECT 1 FROM machines WHERE rbac_group_id IN ({ids}) LIMIT ?1)"
    );
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([limit + 1], |r| r.get(0))?)
}

/// The SELECT a list runs: its WHERE clause and parameters, then the
/// whole statement and its parameters.
pub(crate) struct ListSql {
    built: query::Built,
    pub(crate) sql: String,
}

impl ListSql {
    pub(crate) fn params(&self) -> Vec<&dyn rusqlite::ToSql> {
        self.built
            .where_params
            .iter()
            .chain(self.built.page_params.iter())
            .map(|v| v as &dyn rusqlite::ToSql)
            .collect()
    }
}

/// The statement [`list`] runs for `query`.
pub(crate) fn list_sql<T, F: FieldSql>(
    conn: &Connection,
    table: &Table<T>,
    query: &Query<F>,
    ctx: &SqlContext,
) -> Result<ListSql> {
    let mut built = query::build(query, ctx, "machine_tags");
    if let Some(groups) = &query.groups {
        // Group ids are integers from the store, never client text.
        let ids: Vec<String> = groups.iter().map(i64::to_string).collect();
        let ids = ids.join(", ");
        let small = table.small_scope;
        let by_index = small > 0 && scope_size(conn, &ids, small)? <= small;
        built.where_clause = format!(
            "({}) AND {}",
            built.where_clause,
            (table.in_groups)(&ids, by_index)
        );
    }
    let sql = format!(
        "SELECT {}{} FROM {} t WHERE {}{}",
        table.columns, built.sort_columns, table.name, built.where_clause, built.order_limit
    );
    Ok(ListSql { built, sql })
}

pub(crate) fn list<T, F: FieldSql>(
    conn: &Connection,
    table: &Table<T>,
    query: &Query<F>,
    ctx: &SqlContext,
) -> Result<Page<T>> {
    let (column_count, from_row, seq_of) = (table.column_count, table.from_row, table.seq_of);
    let size_of = table.size_of;
    let list_sql = list_sql(conn, table, query, ctx)?;
    let built = &list_sql.built;
    let table = table.name;
    let sql = &list_sql.sql;
    let mut stmt = conn.prepare(sql)?;
    let all_params = list_sql.params();
    let mut rows = stmt.query(all_params.as_slice())?;
    let mut items: Vec<(T, query::Cursor)> = Vec::new();
    let mut more = false;
    let mut bytes = 0usize;
    while let Some(row) = rows.next()? {
        if items.len() as u64 == query.take || bytes >= MAX_PAGE_BYTES {
            more = true;
            break;
        }
        let item = from_row(row)?;
        if let Some(size_of) = size_of {
            bytes += size_of(&item);
        }
        let cursor = query::cursor_of(query, row, column_count, seq_of(&item))?;
        items.push((item, cursor));
    }
    let next = if more {
        items.last().map(|(_, cursor)| cursor.clone())
    } else {
        None
    };
    let count = if query.count {
        let sql = format!(
            "SELECT COUNT(*) FROM {table} t WHERE {}",
            built.where_clause
        );
        // Without a condition, SQLite counts the rows of the smallest index.
        let sql = match sql.strip_suffix(" WHERE 1") {
            Some(all) => all.to_owned(),
            None => sql,
        };
        let params: Vec<&dyn rusqlite::ToSql> = built
            .where_params
            .iter()
            .map(|v| v as &dyn rusqlite::ToSql)
            .collect();
        Some(conn.query_row(&sql, params.as_slice(), |r| r.get::<_, i64>(0))? as u64)
    } else {
        None
    };
    Ok(Page {
        items: items.into_iter().map(|(item, _)| item).collect(),
        next,
        count,
    })
}

impl Store {
    // ---- apps -----------------------------------------------------------

    pub async fn create_app(&self, app: App) -> Result<()> {
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO apps (client_id, name, secret_hash, permissions, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    app.client_id,
                    app.name,
                    app.secret_hash,
                    app.permissions.join(" "),
                    app.created_at
                ],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn get_app(&self, client_id: &str) -> Result<Option<App>> {
        let client_id = client_id.to_owned();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT client_id, name, secret_hash, permissions, created_at FROM apps \
                     WHERE client_id = ?1",
                )?
                .query_row([client_id], app_from_row)
                .optional()?)
        })
        .await
    }

    /// Replaces an app's secret hash, only if it is still `old` (an
    /// upgrade of the hash's scheme must not undo a concurrent change);
    /// returns whether it was replaced.
    pub async fn replace_app_secret_hash(
        &self,
        client_id: &str,
        old: &str,
        new: String,
    ) -> Result<bool> {
        let (client_id, old) = (client_id.to_owned(), old.to_owned());
        self.write(move |conn| {
            Ok(conn.execute(
                "UPDATE apps SET secret_hash = ?3 WHERE client_id = ?1 AND secret_hash = ?2",
                params![client_id, old, new],
            )? == 1)
        })
        .await
    }

    pub async fn list_apps(&self) -> Result<Vec<App>> {
        self.read(|conn| {
            Ok(conn
                .prepare(
                    "SELECT client_id, name, secret_hash, permissions, created_at FROM apps \
                     ORDER BY created_at, client_id",
                )?
                .query_map([], app_from_row)?
                .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// Deletes an app; `NotFound` when there was none.
    pub async fn delete_app(&self, client_id: &str) -> Result<()> {
        let client_id = client_id.to_owned();
        self.write(move |conn| {
            match conn.execute("DELETE FROM apps WHERE client_id = ?1", [client_id])? {
                0 => Err(StoreError::NotFound),
                _ => Ok(()),
            }
        })
        .await
    }

    // ---- enrollment -----------------------------------------------------

    pub async fn create_enroll_token(&self, token: EnrollToken) -> Result<()> {
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO enroll_tokens (id, token_hash, created_at, expires_at, max_uses) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    token.id,
                    token.token_hash,
                    token.created_at,
                    token.expires_at,
                    token.max_uses
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Every enroll token, oldest first.
    pub async fn list_enroll_tokens(&self) -> Result<Vec<EnrollTokenInfo>> {
        self.read(|conn| {
            Ok(conn
                .prepare(
                    "SELECT id, created_at, expires_at, max_uses, uses, revoked_at \
                     FROM enroll_tokens ORDER BY created_at, id",
                )?
                .query_map([], |r| {
                    Ok(EnrollTokenInfo {
                        id: r.get(0)?,
                        created_at: r.get(1)?,
                        expires_at: r.get(2)?,
                        max_uses: r.get(3)?,
                        uses: r.get(4)?,
                        revoked_at: r.get(5)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// Revokes an enroll token: no enrollment uses it any more. Revoking
    /// one already revoked keeps the first time. `NotFound` for an unknown id.
    pub async fn revoke_enroll_token(&self, id: &str, now: i64) -> Result<EnrollTokenInfo> {
        let id = id.to_owned();
        self.write(move |conn| {
            let changed = conn.execute(
                "UPDATE enroll_tokens SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
                params![id, now],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(conn.query_row(
                "SELECT id, created_at, expires_at, max_uses, uses, revoked_at \
                 FROM enroll_tokens WHERE id = ?1",
                [&id],
                |r| {
                    Ok(EnrollTokenInfo {
                        id: r.get(0)?,
                        created_at: r.get(1)?,
                        expires_at: r.get(2)?,
                        max_uses: r.get(3)?,
                        uses: r.get(4)?,
                        revoked_at: r.get(5)?,
                    })
                },
            )?)
        })
        .await
    }

    /// Uses one enroll token and records a new machine, atomically: a token
    /// that is unknown, expired, used up or revoked, or a public key that is
    /// enrolled already ([`StoreError::KeyEnrolled`]), changes nothing.
    pub async fn enroll_machine(
        &self,
        token_hash: String,
        machine_id: String,
        public_key: Vec<u8>,
        facts: Facts,
        now: i64,
    ) -> Result<MachineRecord> {
        self.write(move |conn| {
            // expires_at, max_uses, uses, revoked_at
            type TokenRow = (Option<i64>, Option<i64>, i64, Option<i64>);
            let token: Option<TokenRow> = conn
                .query_row(
                    "SELECT expires_at, max_uses, uses, revoked_at FROM enroll_tokens \
                     WHERE token_hash = ?1",
                    [&token_hash],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()?;
            let Some((expires_at, max_uses, uses, revoked_at)) = token else {
                return Err(StoreError::TokenRejected("unknown enroll token"));
            };
            if revoked_at.is_some() {
                return Err(StoreError::TokenRejected("the enroll token was revoked"));
            }
            if expires_at.is_some_and(|e| e <= now) {
                return Err(StoreError::TokenRejected("the enroll token has expired"));
            }
            if max_uses.is_some_and(|m| uses >= m) {
                return Err(StoreError::TokenRejected("the enroll token is used up"));
            }
            let enrolled: Option<String> = conn
                .query_row(
                    "SELECT id FROM machines WHERE public_key = ?1 LIMIT 1",
                    [&public_key],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(machine_id) = enrolled {
                return Err(StoreError::KeyEnrolled(machine_id));
            }
            conn.execute(
                "UPDATE enroll_tokens SET uses = uses + 1 WHERE token_hash = ?1",
                [&token_hash],
            )?;
            conn.execute(
                "INSERT INTO machines (id, public_key, computer_dns_name, first_seen, last_seen) \
                 VALUES (?1, ?2, ?3, ?4, ?4)",
                params![machine_id, public_key, facts.computer_dns_name, now],
            )?;
            write_facts(conn, &machine_id, &facts)?;
            get_machine_by_id(conn, &machine_id)?.ok_or(StoreError::NotFound)
        })
        .await
    }

    // ---- machines -------------------------------------------------------

    /// A machine by id, or else by `computerDnsName` (the most recently seen
    /// one of that name).
    pub async fn get_machine(&self, id_or_name: &str) -> Result<Option<MachineRecord>> {
        self.get_machine_in(id_or_name, None).await
    }

    /// Like [`Store::get_machine`], among the machines of `groups` only
    /// (`None`: all machines).
    pub async fn get_machine_in(
        &self,
        id_or_name: &str,
        groups: Option<Vec<i64>>,
    ) -> Result<Option<MachineRecord>> {
        let key = id_or_name.to_owned();
        self.read(move |conn| {
            let reachable =
                |m: &MachineRecord| groups.as_ref().is_none_or(|g| g.contains(&m.rbac_group_id));
            if let Some(m) = get_machine_by_id(conn, &key)? {
                return Ok(reachable(&m).then_some(m));
            }
            let in_groups = match &groups {
                None => String::new(),
                Some(g) => format!(
                    " AND t.rbac_group_id IN ({})",
                    g.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
                ),
            };
            let sql = format!("SELECT {MACHINE_COLUMNS} {}", machine_by_name(&in_groups));
            let machine = conn
                .prepare(&sql)?
                .query_row([&key], machine_from_row)
                .optional()?;
            match machine {
                Some(mut m) => {
                    load_machine_children(conn, &mut m)?;
                    Ok(Some(m))
                }
                None => Ok(None),
            }
        })
        .await
    }

    /// How many machines have ever enrolled (revoked ones included).
    pub async fn machine_count(&self) -> Result<u64> {
        self.read(|conn| {
            let count: i64 = conn
                .prepare_cached("SELECT COUNT(*) FROM machines")?
                .query_row([], |r| r.get(0))?;
            Ok(u64::try_from(count).unwrap_or(0))
        })
        .await
    }

    /// The machine group of the machine with this id, if it exists.
    pub async fn machine_group(&self, machine_id: &str) -> Result<Option<i64>> {
        let machine_id = machine_id.to_owned();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT rbac_group_id FROM machines WHERE id = ?1")?
                .query_row([machine_id], |r| r.get(0))
                .optional()?)
        })
        .await
    }

    pub async fn list_machines(
        &self,
        query: Query<MachineField>,
        ctx: SqlContext,
    ) -> Result<Page<MachineRecord>> {
        self.read(move |conn| {
            let mut page = list(conn, &MACHINES, &query, &ctx)?;
            for machine in &mut page.items {
                load_machine_children(conn, machine)?;
            }
            Ok(page)
        })
        .await
    }

    pub async fn update_facts(&self, machine_id: &str, facts: Facts) -> Result<()> {
        let machine_id = machine_id.to_owned();
        self.write(move |conn| write_facts(conn, &machine_id, &facts))
            .await
    }

    /// Records when machines were last seen, all in one commit.
    pub async fn touch_machines(&self, seen: Vec<(String, i64)>) -> Result<()> {
        if seen.is_empty() {
            return Ok(());
        }
        self.write(move |conn| {
            let mut stmt = conn.prepare_cached(TOUCH_MACHINE)?;
            for (id, at) in &seen {
                stmt.execute(params![id, at])?;
            }
            Ok(())
        })
        .await
    }

    /// Records what the agent reports in force, outside of any action.
    /// Adds or removes one tag of a machine; `NotFound` for an unknown
    /// machine. Returns the machine as it is afterwards.
    pub async fn change_tag(
        &self,
        machine_id: &str,
        tag: String,
        add: bool,
    ) -> Result<MachineRecord> {
        let machine_id = machine_id.to_owned();
        self.write(move |conn| {
            if get_machine_by_id(conn, &machine_id)?.is_none() {
                return Err(StoreError::NotFound);
            }
            // Tags are compared without regard to (ASCII) case, as machine
            // groups match them: adding `finance` to a machine tagged
            // `FINANCE` changes nothing, and removing it removes `FINANCE`.
            let sql = if add {
                "INSERT INTO machine_tags (machine_id, tag) SELECT ?1, ?2 WHERE NOT EXISTS \
                 (SELECT 1 FROM machine_tags WHERE machine_id = ?1 AND tag = ?2 COLLATE NOCASE)"
            } else {
                "DELETE FROM machine_tags WHERE machine_id = ?1 AND tag = ?2 COLLATE NOCASE"
            };
            conn.prepare_cached(sql)?
                .execute(params![machine_id, tag])?;
            crate::people::assign_groups(conn, Some(&machine_id))?;
            get_machine_by_id(conn, &machine_id)?.ok_or(StoreError::NotFound)
        })
        .await
    }

    pub async fn set_enforced(&self, machine_id: &str, scope: Option<String>) -> Result<()> {
        let machine_id = machine_id.to_owned();
        self.write(move |conn| {
            conn.prepare_cached("UPDATE machines SET isolation_scope = ?2 WHERE id = ?1")?
                .execute(params![machine_id, scope])?;
            refresh_isolation_state(conn, &machine_id)
        })
        .await
    }

    /// Records that the machine's agent found its table tampered with
    /// (`count` reports folded into one record).
    pub async fn record_tamper(
        &self,
        machine_id: &str,
        detail: String,
        count: i64,
        now: i64,
    ) -> Result<()> {
        let machine_id = machine_id.to_owned();
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE machines SET tamper_count = tamper_count + ?4, last_tamper_at = ?2, \
                 last_tamper_detail = ?3 WHERE id = ?1",
            )?
            .execute(params![machine_id, now, detail, count.max(1)])?;
            Ok(())
        })
        .await
    }

    /// Marks a machine revoked: its agent can no longer open a session.
    pub async fn revoke_machine(&self, machine_id: &str) -> Result<()> {
        let machine_id = machine_id.to_owned();
        self.write(move |conn| {
            match conn.execute(
                "UPDATE machines SET revoked = 1 WHERE id = ?1",
                [machine_id],
            )? {
                0 => Err(StoreError::NotFound),
                _ => Ok(()),
            }
        })
        .await
    }

    /// The ids of every revoked machine (machines are never deleted), read
    /// from the partial index `machines_revoked`: as many as are revoked,
    /// however many machines there are.
    pub async fn revoked_machines(&self) -> Result<Vec<String>> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached(REVOKED_MACHINES)?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    // ---- actions --------------------------------------------------------

    /// Records a new action durably. Fails with `NotFound` for an unknown
    /// machine and `ActiveExists` when one is already in flight.
    pub async fn create_action(&self, new: NewAction) -> Result<ActionRecord> {
        self.write_actions(move |conn| {
            let action = insert_action(conn, &new, None)?;
            Ok(changed(action, None))
        })
        .await
    }

    /// Creates the actions of a bulk call in one write transaction (one
    /// group commit): each as [`Store::create_action`] would, checked in
    /// the transaction, so that the one-in-flight rule holds against
    /// concurrent single and bulk calls. A machine that does not exist or
    /// is outside `groups` (`Some`) is `NotFound`; one with an action in
    /// flight is `ActiveExists`; neither changes anything. Each created
    /// action's audit record (`audit`, its second element) is appended in
    /// the same transaction. The outcomes come in the order given; the
    /// observer is told of every created action and audit record once they
    /// are durable. A database error fails the whole call, with nothing
    /// written.
    pub async fn create_actions(
        &self,
        batch: Vec<(NewAction, crate::NewAuditEvent)>,
        groups: Option<Vec<i64>>,
    ) -> Result<Vec<Result<ActionRecord>>> {
        let observer = self.inner.observer.clone();
        self.write_then(
            move |conn| {
                let mut outcomes = Vec::with_capacity(batch.len());
                let mut changes = Vec::new();
                let mut records = Vec::new();
                for (new, audit) in batch {
                    match insert_action(conn, &new, groups.as_deref()) {
                        Ok(action) => {
                            records.push(crate::audit::append_capped(conn, audit)?);
                            changes.push(ActionChange {
                                action: action.clone(),
                                from: None,
                            });
                            outcomes.push(Ok(action));
                        }
                        Err(e @ (StoreError::NotFound | StoreError::ActiveExists(_))) => {
                            outcomes.push(Err(e));
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok((outcomes, changes, records))
            },
            move |(outcomes, changes, records)| {
                if let Some(observer) = observer.get() {
                    for change in &changes {
                        observer.action_changed(change);
                    }
                    for record in &records {
                        observer.audit_appended(record);
                    }
                }
                outcomes
            },
        )
        .await
    }

    pub async fn get_action(&self, id: &str) -> Result<Option<ActionRecord>> {
        let id = id.to_owned();
        self.read(move |conn| get_action(conn, &id)).await
    }

    pub async fn list_actions(
        &self,
        query: Query<ActionField>,
        ctx: SqlContext,
    ) -> Result<Page<ActionRecord>> {
        self.read(move |conn| list(conn, &ACTIONS, &query, &ctx))
            .await
    }

    /// Cancels a `Pending` action; `WrongStatus` names the status otherwise.
    pub async fn cancel_action(
        &self,
        id: &str,
        requestor: String,
        comment: Option<String>,
        now: i64,
    ) -> Result<ActionRecord> {
        let id = id.to_owned();
        self.write_actions(move |conn| {
            let action = get_action(conn, &id)?.ok_or(StoreError::NotFound)?;
            if action.status != "Pending" {
                return Err(StoreError::WrongStatus(action.status));
            }
            conn.prepare_cached(CANCEL_ACTION)?
                .execute(params![id, now, requestor, comment])?;
            refresh_isolation_state(conn, &action.machine_id)?;
            let after = get_action(conn, &id)?.ok_or(StoreError::NotFound)?;
            Ok(changed(after, Some(action.status)))
        })
        .await
    }

    /// Actions of a machine still to deliver (`Pending` or `InProgress`), in
    /// creation order.
    pub async fn undelivered_actions(&self, machine_id: &str) -> Result<Vec<ActionRecord>> {
        let machine_id = machine_id.to_owned();
        self.read(move |conn| {
            let sql = format!("SELECT {ACTION_COLUMNS} {UNDELIVERED_ACTIONS}");
            Ok(conn
                .prepare_cached(&sql)?
                .query_map([machine_id], action_from_row)?
                .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// The agent of `machine_id` starts `action_id`: `Pending -> InProgress`.
    /// Returns the action as it is afterwards; an action of another machine
    /// is `NotFound`.
    pub async fn start_action(
        &self,
        machine_id: &str,
        action_id: &str,
        now: i64,
    ) -> Result<ActionRecord> {
        let (machine_id, action_id) = (machine_id.to_owned(), action_id.to_owned());
        self.write_actions(move |conn| {
            let action = get_action(conn, &action_id)?
                .filter(|a| a.machine_id == machine_id)
                .ok_or(StoreError::NotFound)?;
            if action.status == "Pending" {
                conn.prepare_cached(
                    "UPDATE actions SET status = 'InProgress', updated_at = ?2 WHERE id = ?1",
                )?
                .execute(params![action_id, now])?;
                let after = get_action(conn, &action_id)?.ok_or(StoreError::NotFound)?;
                return Ok(changed(after, Some(action.status)));
            }
            Ok((action, Vec::new()))
        })
        .await
    }

    /// Records the outcome of an action reported by the agent of
    /// `machine_id`. The action's status changes only if it is InProgress;
    /// what is in force on the machine is recorded too. An action the agent
    /// was never told to proceed with (Pending, Cancelled) is
    /// [`StoreError::WrongStatus`] and changes nothing; a report for one
    /// already finished (a repeat, or one that timed out meanwhile) records
    /// only what is in force.
    pub async fn finish_action(
        &self,
        machine_id: &str,
        action_id: &str,
        outcome: Outcome,
        now: i64,
    ) -> Result<ActionRecord> {
        let (machine_id, action_id) = (machine_id.to_owned(), action_id.to_owned());
        self.write_actions(move |conn| {
            let action = get_action(conn, &action_id)?
                .filter(|a| a.machine_id == machine_id)
                .ok_or(StoreError::NotFound)?;
            if matches!(action.status.as_str(), "Pending" | "Cancelled") {
                return Err(StoreError::WrongStatus(action.status));
            }
            if action.status == "InProgress" {
                let (status, hresult, info) = if outcome.succeeded {
                    ("Succeeded", 0, None)
                } else {
                    let hresult = if outcome.error_hresult == 0 { -2147467259 } else { outcome.error_hresult };
                    ("Failed", hresult, Some(outcome.reason.clone().unwrap_or_else(|| "The agent could not apply the action.".to_owned())))
                };
                conn.prepare_cached(
                    "UPDATE actions SET status = ?2, updated_at = ?3, error_hresult = ?4, \
                     troubleshoot_info = ?5 WHERE id = ?1",
                )?
                .execute(params![action_id, status, now, hresult, info])?;
            }
            conn.prepare_cached("UPDATE machines SET isolation_scope = ?2, last_seen = MAX(last_seen, ?3) WHERE id = ?1")?
                .execute(params![machine_id, outcome.enforced_scope, now])?;
            refresh_isolation_state(conn, &machine_id)?;
            let after = get_action(conn, &action_id)?.ok_or(StoreError::NotFound)?;
            if after.status == action.status {
                return Ok((after, Vec::new()));
            }
            Ok(changed(after, Some(action.status)))
        })
        .await
    }

    /// How many actions there are of each type and status, in one grouped
    /// read (a scan of the actions: for a process that then keeps the
    /// counts up to date from [`crate::StoreObserver::action_changed`]).
    pub async fn action_counts(&self) -> Result<ActionCounts> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached(ACTION_COUNTS)?
                .query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
                })?
                .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// Times out actions not received before `pending_before` or not
    /// finished before `in_progress_before`; returns the ones it changed.
    pub async fn expire_actions(
        &self,
        pending_before: i64,
        in_progress_before: i64,
        now: i64,
    ) -> Result<Vec<ActionRecord>> {
        let candidates: Vec<String> = self
            .read(move |conn| {
                Ok(conn
                    .prepare_cached(EXPIRY_CANDIDATES)?
                    .query_map(params![pending_before, in_progress_before], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?)
            })
            .await?;
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        self.write_actions(move |conn| {
            let mut changed = Vec::new();
            let mut changes = Vec::new();
            for id in candidates {
                let Some(action) = get_action(conn, &id)? else { continue };
                let info = match action.status.as_str() {
                    "Pending" if action.created_at < pending_before => {
                        "The machine did not receive the action within the delivery window."
                    }
                    "InProgress" if action.updated_at < in_progress_before => {
                        "The machine did not report completion within the apply deadline."
                    }
                    _ => continue,
                };
                conn.prepare_cached(
                    "UPDATE actions SET status = 'TimeOut', updated_at = ?2, troubleshoot_info = ?3 \
                     WHERE id = ?1",
                )?
                .execute(params![id, now, info])?;
                refresh_isolation_state(conn, &action.machine_id)?;
                if let Some(after) = get_action(conn, &id)? {
                    changed.push(after.clone());
                    changes.push(ActionChange {
                        action: after,
                        from: Some(action.status),
                    });
                }
            }
            Ok((changed, changes))
        })
        .await
    }
}

/// An action as it is after a change, with that change for the observer.
/// Records a new `Pending` action unless its machine is unknown (or
/// outside `groups`, when given: `NotFound`) or has an isolation-family
/// action in flight (`ActiveExists`); then nothing is written.
fn insert_action(
    conn: &Connection,
    new: &NewAction,
    groups: Option<&[i64]>,
) -> Result<ActionRecord> {
    let machine: Option<(String, i64)> = conn
        .prepare_cached("SELECT computer_dns_name, rbac_group_id FROM machines WHERE id = ?1")?
        .query_row([&new.machine_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((name, group)) = machine else {
        return Err(StoreError::NotFound);
    };
    if groups.is_some_and(|groups| !groups.contains(&group)) {
        return Err(StoreError::NotFound);
    }
    if let Some(active) = in_flight_action(conn, &new.machine_id)? {
        return Err(StoreError::ActiveExists(active));
    }
    conn.prepare_cached(
        "INSERT INTO actions (id, action_type, title, requestor, requestor_comment, \
         status, machine_id, computer_dns_name, created_at, updated_at, scope, \
         external_id, request_source) \
         VALUES (?1, ?2, ?3, ?4, ?5, 'Pending', ?6, ?7, ?8, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        new.id,
        new.action_type,
        new.title,
        new.requestor,
        new.requestor_comment,
        new.machine_id,
        name,
        new.now,
        new.scope,
        new.external_id,
        new.request_source,
    ])?;
    refresh_isolation_state(conn, &new.machine_id)?;
    get_action(conn, &new.id)?.ok_or(StoreError::NotFound)
}

fn changed(action: ActionRecord, from: Option<String>) -> (ActionRecord, Vec<ActionChange>) {
    let change = ActionChange {
        action: action.clone(),
        from,
    };
    (action, vec![change])
}

/// How many actions there are of each type and status:
/// `(type, status, count)`.
pub type ActionCounts = Vec<(String, String, u64)>;

fn app_from_row(row: &Row<'_>) -> rusqlite::Result<App> {
    let permissions: String = row.get(3)?;
    Ok(App {
        client_id: row.get(0)?,
        name: row.get(1)?,
        secret_hash: row.get(2)?,
        permissions: permissions.split_whitespace().map(str::to_owned).collect(),
        created_at: row.get(4)?,
    })
}

pub(crate) fn get_machine_by_id(conn: &Connection, id: &str) -> Result<Option<MachineRecord>> {
    let sql = format!("SELECT {MACHINE_COLUMNS} FROM machines t WHERE t.id = ?1");
    let machine = conn
        .prepare_cached(&sql)?
        .query_row([id], machine_from_row)
        .optional()?;
    match machine {
        Some(mut m) => {
            load_machine_children(conn, &mut m)?;
            Ok(Some(m))
        }
        None => Ok(None),
    }
}
