//! How SQLite runs the key queries on actions and machines: each must be an
//! index lookup or a scan in list order that stops at the page's end, never
//! a pass over every action or a sort of them all (BENCHMARKS.md, "A big
//! store", measures the same queries on 5 million actions). Checked on a
//! store with thousands of rows, without statistics (as a store runs) and
//! after `ANALYZE`.

use rusqlite::Connection;

use crate::query::{CmpOp, Filter, Query, SqlContext, Value};
use crate::records::{self, ActionField, MachineField};
use crate::{NewAction, Store};

const MACHINES: usize = 3000;
const ACTIONS_PER_MACHINE: usize = 10;
/// Group 1: 30 machines (a small scope); group 2: 2,370; group 3: 600.
fn group_of(i: usize) -> i64 {
    if i % 100 == 99 {
        1
    } else if i % 100 < 79 {
        2
    } else {
        3
    }
}

fn machine_id(i: usize) -> String {
    format!("m{i:05}")
}

/// A store of `MACHINES` machines in three groups with
/// `ACTIONS_PER_MACHINE` actions each, interleaved in time; the last
/// action of every tenth machine is in flight.
fn fill(path: &std::path::Path) {
    drop(Store::open(path).unwrap());
    let mut conn = Connection::open(path).unwrap();
    let tx = conn.transaction().unwrap();
    for (id, name) in [(1, "lab"), (2, "ws"), (3, "fin")] {
        tx.execute(
            "INSERT INTO machine_groups (id, name, rank, user_groups, created_at) \
             VALUES (?1, ?2, ?1, '', 0)",
            rusqlite::params![id, name],
        )
        .unwrap();
    }
    for i in 0..MACHINES {
        tx.execute(
            "INSERT INTO machines (id, public_key, computer_dns_name, first_seen, last_seen, \
             rbac_group_id, revoked) VALUES (?1, x'00', ?2, 0, ?3, ?4, ?5)",
            rusqlite::params![
                machine_id(i),
                format!("Host-{i}"),
                i as i64,
                group_of(i),
                i % 500 == 3
            ],
        )
        .unwrap();
    }
    let mut insert = tx
        .prepare(
            "INSERT INTO actions (id, action_type, requestor, requestor_comment, status, \
             machine_id, created_at, updated_at, request_source) \
             VALUES (?1, ?2, 'soc', 'c', ?3, ?4, ?5, ?5, 'PublicApi')",
        )
        .unwrap();
    for round in 0..ACTIONS_PER_MACHINE {
        for i in 0..MACHINES {
            let n = round * MACHINES + i;
            let status = if round + 1 == ACTIONS_PER_MACHINE && i % 10 == 0 {
                "Pending"
            } else if n.is_multiple_of(7) {
                "Failed"
            } else {
                "Succeeded"
            };
            let kind = if round % 2 == 0 {
                "Isolate"
            } else {
                "Unisolate"
            };
            insert
                .execute(rusqlite::params![
                    format!("a{n:06}"),
                    kind,
                    status,
                    machine_id(i),
                    n as i64
                ])
                .unwrap();
        }
    }
    drop(insert);
    tx.commit().unwrap();
}

/// The plan's lines (`EXPLAIN QUERY PLAN`'s detail column).
fn plan(conn: &Connection, sql: &str, params: &[&dyn rusqlite::ToSql]) -> Vec<String> {
    let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
    stmt.query_map(params, |r| r.get::<_, String>(3))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

/// How a query may run.
#[derive(Clone, Copy)]
struct Expect {
    /// Text each of which some line of the plan contains (the indexes;
    /// `a|b`: either).
    uses: &'static [&'static str],
    /// A scan of the table in `seq` order is the plan: the list's order,
    /// so it stops at the page's end (no sort may follow it).
    ordered_scan: bool,
    /// A sort is allowed: of the rows of a small scope only.
    small_sort: bool,
    /// Text no line of the plan may contain.
    avoid: &'static [&'static str],
}

const LOOKUP: fn(&'static [&'static str]) -> Expect = |uses| Expect {
    uses,
    ordered_scan: false,
    small_sort: false,
    avoid: &[],
};

/// A large scope is checked row by row (the machine's group by its id),
/// never made into a list of all its machines first.
const LARGE_SCOPE: &[&str] = &[
    "CORRELATED SCALAR SUBQUERY",
    "SEARCH m USING INDEX sqlite_autoindex_machines_1 (id=?)",
];

fn check(label: &str, lines: &[String], expect: &Expect) {
    let text = lines.join("\n");
    for used in expect.uses {
        assert!(
            lines
                .iter()
                .any(|l| used.split('|').any(|one| l.contains(one))),
            "{label}: the plan does not use {used}:\n{text}"
        );
    }
    for avoided in expect.avoid {
        assert!(
            !lines.iter().any(|l| l.contains(avoided)),
            "{label}: the plan has {avoided}:\n{text}"
        );
    }
    for line in lines {
        // A table scan reads "SCAN t" (or "SCAN t USING INDEX …" for a
        // scan of a whole index); partial indexes hold only a few rows.
        let scan = line.starts_with("SCAN ")
            && !line.contains("actions_one_in_flight")
            && !line.contains("machines_revoked")
            // The count of every action by type and status reads all of
            // them, once at start: from the index alone, never the table.
            && !line.contains("USING COVERING INDEX actions_type_status");
        assert!(
            !scan || (expect.ordered_scan && line == "SCAN t"),
            "{label}: a full scan:\n{text}"
        );
        assert!(
            !line.contains("TEMP B-TREE") || expect.small_sort,
            "{label}: a sort:\n{text}"
        );
    }
}

fn by_machine(id: &str) -> Option<Filter<ActionField>> {
    Some(Filter::Compare(
        ActionField::MachineId,
        CmpOp::Eq,
        Value::Text(id.to_owned()),
    ))
}

fn check_all(conn: &Connection, when: &str) {
    let ctx = SqlContext::default();
    let actions = |filter: Option<Filter<ActionField>>, groups: Option<Vec<i64>>, skip| Query {
        filter,
        groups,
        skip,
        take: 100,
        ..Default::default()
    };
    let machines = |groups: Option<Vec<i64>>| Query::<MachineField> {
        groups,
        take: 100,
        ..Default::default()
    };
    let ordered = Expect {
        uses: &[],
        ordered_scan: true,
        small_sort: false,
        avoid: &[],
    };
    let small_scope = |uses| Expect {
        uses,
        ordered_scan: false,
        small_sort: true,
        avoid: &[],
    };
    let one = machine_id(1500);
    let action_lists: Vec<(&str, Query<ActionField>, Expect)> = vec![
        ("actions $top=100", actions(None, None, 0), ordered),
        ("actions $skip=500", actions(None, None, 500), ordered),
        (
            "actions of one machine",
            actions(by_machine(&one), None, 0),
            LOOKUP(&["SEARCH t USING INDEX actions_machine (machine_id=?)"]),
        ),
        (
            "actions of one machine, wide scope",
            actions(by_machine(&one), Some(vec![0, 2, 3]), 0),
            Expect {
                uses: &[
                    "SEARCH t USING INDEX actions_machine (machine_id=?)",
                    "CORRELATED SCALAR SUBQUERY",
                ],
                avoid: &["LIST SUBQUERY", "machines_group_id"],
                ..LOOKUP(&[])
            },
        ),
        (
            "actions of one machine, small scope",
            actions(by_machine(&one), Some(vec![0, 1]), 0),
            LOOKUP(&["SEARCH t USING INDEX actions_machine (machine_id=?)"]),
        ),
        (
            "actions, wide scope",
            actions(None, Some(vec![0, 2, 3]), 0),
            Expect {
                uses: LARGE_SCOPE,
                avoid: &["LIST SUBQUERY", "machines_group_id"],
                ..ordered
            },
        ),
        (
            "actions, small scope",
            actions(None, Some(vec![0, 1]), 0),
            small_scope(&[
                "SEARCH t USING INDEX actions_machine (machine_id=?)",
                "USING COVERING INDEX machines_group_id (rbac_group_id=?)",
            ]),
        ),
        (
            "actions of one status",
            actions(
                Some(Filter::Compare(
                    ActionField::Status,
                    CmpOp::Eq,
                    Value::Text("Pending".into()),
                )),
                None,
                0,
            ),
            LOOKUP(&["SEARCH t USING INDEX actions_status_seq (status=?)"]),
        ),
    ];
    for (label, query, expect) in action_lists {
        let sql = records::list_sql(conn, &records::ACTIONS, &query, &ctx).unwrap();
        check(
            &format!("{label} ({when})"),
            &plan(conn, &sql.sql, &sql.params()),
            &expect,
        );
    }
    let machine_lists: Vec<(&str, Query<MachineField>, Expect)> = vec![
        ("machines $top=100", machines(None), ordered),
        (
            "machines, wide scope",
            machines(Some(vec![0, 2, 3])),
            ordered,
        ),
        (
            "machines, small scope",
            machines(Some(vec![0, 1])),
            small_scope(&["SEARCH t USING INDEX machines_group_id (rbac_group_id=?)"]),
        ),
    ];
    for (label, query, expect) in machine_lists {
        let sql = records::list_sql(conn, &records::MACHINES, &query, &ctx).unwrap();
        check(
            &format!("{label} ({when})"),
            &plan(conn, &sql.sql, &sql.params()),
            &expect,
        );
    }

    let get_action = format!(
        "SELECT {} FROM actions t WHERE t.id = ?1",
        records::ACTION_COLUMNS
    );
    let undelivered = format!(
        "SELECT {} {}",
        records::ACTION_COLUMNS,
        records::UNDELIVERED_ACTIONS
    );
    let by_name = format!(
        "SELECT {} {}",
        records::MACHINE_COLUMNS,
        records::machine_by_name("")
    );
    let by_name_in = format!(
        "SELECT {} {}",
        records::MACHINE_COLUMNS,
        records::machine_by_name(" AND t.rbac_group_id IN (0, 1)")
    );
    let group_facts = format!("{} WHERE id = ?1", crate::people::GROUP_FACTS);
    let (id, name, now) = (one.as_str(), "host-1500", 1i64);
    let singles: Vec<(&str, &str, Vec<&dyn rusqlite::ToSql>, Expect)> = vec![
        (
            "get one action",
            &get_action,
            vec![&"a000001"],
            LOOKUP(&["SEARCH t USING INDEX sqlite_autoindex_actions_1 (id=?)"]),
        ),
        (
            "in-flight check",
            records::IN_FLIGHT_ACTION,
            vec![&id],
            LOOKUP(&["USING INDEX actions_one_in_flight (machine_id=?)"]),
        ),
        (
            "actions to deliver at session open",
            &undelivered,
            vec![&id],
            // One in flight at most: a sort of one row.
            small_scope(&["USING INDEX actions_one_in_flight (machine_id=?)"]),
        ),
        (
            "isolation state",
            records::REFRESH_ISOLATION_STATE,
            vec![&id],
            LOOKUP(&[
                "SEARCH machines USING INDEX sqlite_autoindex_machines_1 (id=?)",
                "USING INDEX actions_one_in_flight (machine_id=?)",
            ]),
        ),
        (
            "expiry sweep",
            records::EXPIRY_CANDIDATES,
            vec![&now, &now],
            // Only the rows of those two statuses, whichever index.
            LOOKUP(&["actions_one_in_flight|USING INDEX actions_status_seq (status=?)"]),
        ),
        (
            "cancel",
            records::CANCEL_ACTION,
            vec![&"a000001", &now, &"soc", &"c"],
            LOOKUP(&["USING INDEX sqlite_autoindex_actions_1 (id=?)"]),
        ),
        (
            "liveness batch",
            records::TOUCH_MACHINE,
            vec![&id, &now],
            LOOKUP(&["USING INDEX sqlite_autoindex_machines_1 (id=?)"]),
        ),
        (
            "one machine's group (its facts, a tag)",
            &group_facts,
            vec![&id],
            LOOKUP(&["USING INDEX sqlite_autoindex_machines_1 (id=?)"]),
        ),
        (
            "actions counted by type and status",
            records::ACTION_COUNTS,
            vec![],
            LOOKUP(&["SCAN actions USING COVERING INDEX actions_type_status"]),
        ),
        (
            "revoked machines",
            records::REVOKED_MACHINES,
            vec![],
            LOOKUP(&["USING COVERING INDEX machines_revoked"]),
        ),
        (
            "machine by name",
            &by_name,
            vec![&name],
            LOOKUP(&["USING INDEX machines_name_nocase (computer_dns_name=?)"]),
        ),
        (
            "machine by name, scoped",
            &by_name_in,
            vec![&name],
            LOOKUP(&["USING INDEX machines_name_nocase (computer_dns_name=?)"]),
        ),
    ];
    for (label, sql, params, expect) in singles {
        check(
            &format!("{label} ({when})"),
            &plan(conn, sql, &params),
            &expect,
        );
    }
}

#[test]
fn the_key_queries_use_their_indexes() {
    let dir = std::env::temp_dir().join(format!("cordon-store-plans-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cordon.db");
    fill(&path);
    let conn = Connection::open(&path).unwrap();
    check_all(&conn, "no statistics");
    conn.execute_batch("ANALYZE").unwrap();
    check_all(&conn, "after ANALYZE");
    drop(conn);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A group-scoped list reads its machines' rows through the index (a small
/// scope) or in list order (a large one): either way the same rows, in
/// `seq` order, as every row filtered by group.
#[test]
fn scoped_lists_hold_the_scopes_rows_in_order() {
    let dir = std::env::temp_dir().join(format!("cordon-store-scoped-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cordon.db");
    fill(&path);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = Store::open(&path).unwrap();
    runtime.block_on(async {
        for groups in [vec![0, 1], vec![0, 3], vec![2, 3], vec![0]] {
            let in_scope: Vec<usize> = (0..MACHINES)
                .filter(|i| groups.contains(&group_of(*i)))
                .collect();
            // Actions: every machine's, round by round (their seq order).
            let expected: Vec<String> = (0..ACTIONS_PER_MACHINE * MACHINES)
                .filter(|n| groups.contains(&group_of(n % MACHINES)))
                .map(|n| format!("a{n:06}"))
                .collect();
            let mut seen = Vec::new();
            let mut after = None;
            for _ in 0..3 {
                let page = store
                    .list_actions(
                        Query {
                            groups: Some(groups.clone()),
                            take: 100,
                            after: after.clone(),
                            ..Default::default()
                        },
                        SqlContext::default(),
                    )
                    .await
                    .unwrap();
                seen.extend(page.items.into_iter().map(|a| a.id));
                after = page.next;
            }
            let want = expected.len().min(300);
            assert_eq!(seen, expected[..want], "actions of groups {groups:?}");
            let skipped = store
                .list_actions(
                    Query {
                        groups: Some(groups.clone()),
                        take: 5,
                        skip: 120,
                        ..Default::default()
                    },
                    SqlContext::default(),
                )
                .await
                .unwrap();
            let ids: Vec<String> = skipped.items.into_iter().map(|a| a.id).collect();
            let want: Vec<String> = expected.iter().skip(120).take(5).cloned().collect();
            assert_eq!(ids, want, "actions of groups {groups:?}, $skip=120");

            let page = store
                .list_machines(
                    Query {
                        groups: Some(groups.clone()),
                        take: 100,
                        skip: 10,
                        ..Default::default()
                    },
                    SqlContext::default(),
                )
                .await
                .unwrap();
            let ids: Vec<String> = page.items.into_iter().map(|m| m.id).collect();
            let want: Vec<String> = in_scope
                .iter()
                .skip(10)
                .take(100)
                .map(|i| machine_id(*i))
                .collect();
            assert_eq!(ids, want, "machines of groups {groups:?}");
        }
        // The expiry sweep times out the actions in flight, and only them.
        let expired = store.expire_actions(i64::MAX, i64::MAX, 1).await.unwrap();
        assert_eq!(expired.len(), MACHINES / 10);
        assert!(expired.iter().all(|a| a.status == "TimeOut"));
        // A new action on a machine whose action timed out is accepted.
        store
            .create_action(NewAction {
                id: "new".into(),
                action_type: "Isolate".into(),
                title: None,
                requestor: "soc".into(),
                requestor_comment: "c".into(),
                machine_id: machine_id(0),
                scope: Some("Full".into()),
                external_id: None,
                request_source: "PublicApi".into(),
                now: 2,
            })
            .await
            .unwrap();
        // The revoked machines, all of them and only them.
        let mut revoked = store.revoked_machines().await.unwrap();
        revoked.sort();
        let want: Vec<String> = (0..MACHINES)
            .filter(|i| i % 500 == 3)
            .map(machine_id)
            .collect();
        assert_eq!(revoked, want);
        // A machine by name, whatever its case.
        let found = store.get_machine("HOST-42").await.unwrap().unwrap();
        assert_eq!(found.id, machine_id(42));
    });
    drop(store);
    runtime.shutdown_background();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A data directory of the schema before migration 8, with rows, migrates:
/// the rows are kept, the new indexes exist and the replaced ones are gone.
#[test]
fn a_store_of_migration_7_migrates_with_its_rows() {
    let dir = std::env::temp_dir().join(format!("cordon-store-m8-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cordon.db");
    drop(Store::open_migrated_to(&path, 7).unwrap());
    let indexes = |conn: &Connection| -> Vec<String> {
        conn.prepare("SELECT name FROM sqlite_master WHERE type = 'index' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    };
    {
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 7);
        assert!(indexes(&conn).contains(&"actions_status_created".to_owned()));
        conn.execute_batch(
            "INSERT INTO machines (id, public_key, computer_dns_name, first_seen, last_seen, \
             revoked) VALUES ('m1', x'01', 'One', 0, 0, 0), ('m2', x'02', 'Two', 0, 0, 1); \
             INSERT INTO actions (id, action_type, requestor, requestor_comment, status, \
             machine_id, created_at, updated_at, request_source) VALUES \
             ('a1', 'Isolate', 'soc', 'c', 'Succeeded', 'm1', 1, 1, 'PublicApi'), \
             ('a2', 'Unisolate', 'soc', 'c', 'Pending', 'm1', 2, 2, 'PublicApi');",
        )
        .unwrap();
    }
    let store = Store::open(&path).unwrap();
    let conn = Connection::open(&path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version as usize, Store::schema_version());
    let now = indexes(&conn);
    for index in [
        "actions_status_seq",
        "machines_group_id",
        "machines_name_nocase",
        "machines_revoked",
    ] {
        assert!(now.contains(&index.to_owned()), "{index} in {now:?}");
    }
    for gone in ["actions_status_created", "machines_group"] {
        assert!(!now.contains(&gone.to_owned()), "{gone} in {now:?}");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let page = store
            .list_actions(
                Query {
                    filter: by_machine("m1"),
                    ..Default::default()
                },
                SqlContext::default(),
            )
            .await
            .unwrap();
        let ids: Vec<&str> = page.items.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["a1", "a2"]);
        assert_eq!(store.revoked_machines().await.unwrap(), ["m2"]);
    });
    drop(conn);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The webhook outbox's queries use their indexes: the sender's question
/// (due deliveries, the next due time) and the listings never pass over a
/// backlog, and the housekeeping's batches (deleting a webhook's
/// deliveries, expiring, pruning) find their rows through an index.
#[test]
fn the_outbox_queries_use_their_indexes() {
    use crate::webhooks as w;
    let dir = std::env::temp_dir().join(format!("cordon-store-outbox-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cordon.db");
    drop(Store::open(&path).unwrap());
    let mut conn = Connection::open(&path).unwrap();
    let tx = conn.transaction().unwrap();
    for hook in ["a", "b", "c"] {
        tx.execute(
            "INSERT INTO webhooks (id, url, events, secret, created_by, created_at) \
             VALUES (?1, 'https://x/', 'machineAction.completed', 'whsec_', 'p', 0)",
            [hook],
        )
        .unwrap();
    }
    // 30,000 deliveries: most delivered, some failed, a backlog pending.
    for n in 0..30_000i64 {
        let state = match n % 10 {
            0 => "pending",
            1 => "failed",
            _ => "delivered",
        };
        tx.execute(
            "INSERT INTO webhook_deliveries (id, webhook_id, event_seq, event_type, body, \
             created_at, state, next_attempt_at) VALUES (?1, ?2, ?3, 't', '{}', ?3, ?4, ?5)",
            rusqlite::params![
                format!("msg_{n}"),
                ["a", "b", "c"][(n % 3) as usize],
                n,
                state,
                (state == "pending").then_some(n)
            ],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    let id: &dyn rusqlite::ToSql = &"a";
    let at: &dyn rusqlite::ToSql = &15_000i64;
    let n: &dyn rusqlite::ToSql = &100i64;
    /// A label, the SQL, its parameters, the indexes its plan names.
    type Checked<'a> = (
        &'a str,
        &'a str,
        Vec<&'a dyn rusqlite::ToSql>,
        &'a [&'a str],
    );
    let queries: [Checked<'_>; 7] = [
        (
            "due",
            w::DUE_DELIVERIES,
            vec![id, at, n],
            &["webhook_deliveries_due"],
        ),
        (
            "next due",
            w::NEXT_DUE,
            vec![id],
            &["webhook_deliveries_due"],
        ),
        (
            "one webhook's",
            w::WEBHOOK_DELIVERIES,
            vec![id, n],
            &["webhook_deliveries_webhook"],
        ),
        ("all", w::ALL_DELIVERIES, vec![n], &[]),
        (
            "delete",
            w::DELETE_WEBHOOK_DELIVERIES,
            vec![id, n],
            &["webhook_deliveries_webhook"],
        ),
        (
            "expire",
            w::EXPIRE_DELIVERIES,
            vec![at, at, n],
            &["webhook_deliveries_pending_created"],
        ),
        (
            "prune",
            w::PRUNE_DELIVERIES,
            vec![at, n],
            &["webhook_deliveries_created"],
        ),
    ];
    for when in ["no statistics", "after ANALYZE"] {
        for (label, sql, params, uses) in &queries {
            let lines = plan(&conn, sql, params);
            let text = lines.join("\n");
            for used in *uses {
                assert!(
                    lines.iter().any(|l| l.contains(used)),
                    "{label} ({when}) does not use {used}:\n{text}"
                );
            }
            for line in &lines {
                // The only scan: every delivery in `seq` order, newest
                // first, which stops at the page's end.
                let scan = line.starts_with("SCAN webhook_deliveries")
                    && !(*label == "all" && line == "SCAN webhook_deliveries");
                assert!(!scan, "{label} ({when}): a full scan:\n{text}");
                assert!(
                    !line.contains("TEMP B-TREE"),
                    "{label} ({when}): a sort:\n{text}"
                );
            }
        }
        conn.execute_batch("ANALYZE").unwrap();
    }
    drop(conn);
    let _ = std::fs::remove_dir_all(&dir);
}
