//! The cost of a `$filter`: many `or`-ed tag conditions stay cheap, a
//! filter over the complexity budget is refused, and a query whose client
//! went away stops.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Two base-36 characters for `n` (below 1,296).
fn code(n: usize) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let (high, low) = (n / 36, n % 36);
    format!("{}{}", DIGITS[high] as char, DIGITS[low] as char)
}

/// Writes `count` machines straight into the database, machine `i` tagged
/// `code(i)` and `all`.
fn add_machines(server: &TestServer, count: usize) {
    let mut db = rusqlite::Connection::open(server.dir.0.join("cordon.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let tx = db.transaction().unwrap();
    let now = server::now_nanos();
    for i in 0..count {
        let id = format!("{i:040x}");
        tx.execute(
            "INSERT INTO machines (id, public_key, computer_dns_name, first_seen, last_seen) \
             VALUES (?1, x'00', ?2, ?3, ?3)",
            rusqlite::params![id, format!("host-{i}"), now],
        )
        .unwrap();
        for tag in [code(i), "all".to_owned()] {
            tx.execute(
                "INSERT INTO machine_tags (machine_id, tag) VALUES (?1, ?2)",
                rusqlite::params![id, tag],
            )
            .unwrap();
        }
    }
    tx.commit().unwrap();
}

fn encode(filter: &str) -> String {
    form_urlencoded::byte_serialize(filter.as_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_hundred_ored_tags_on_a_thousand_machines_answer_quickly_and_correctly() {
    let server = TestServer::start().await;
    add_machines(&server, 1000);
    let mut api = server.api().await;
    let terms: Vec<String> = (0..600).map(|i| format!("t eq '{}'", code(i))).collect();
    let filter = format!("machineTags/any(t: {})", terms.join(" or "));
    assert!(filter.len() < 8 * 1024, "within the length limit");
    let started = Instant::now();
    let reply = api
        .get(&format!(
            "/api/machines?$count=true&$select=id&$filter={}",
            encode(&filter)
        ))
        .await;
    let took = started.elapsed();
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let body = reply.json().unwrap();
    assert_eq!(body["@odata.count"], 600);
    let mut ids: Vec<String> = body["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let expected: Vec<String> = (0..600).map(|i| format!("{i:040x}")).collect();
    assert_eq!(ids, expected);
    eprintln!("600 or-ed tags on 1,000 machines with $count: {took:?}");
    // Before: 6.4 s of CPU in a release build (15 s with $count).
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // The same conditions outside any(), and mixed with another field.
    let terms: Vec<String> = (0..300)
        .map(|i| format!("machineTags eq '{}'", code(i)))
        .collect();
    let filter = format!("({}) and computerDnsName ne 'host-0'", terms.join(" or "));
    let reply = api
        .get(&format!(
            "/api/machines?$count=true&$top=1&$filter={}",
            encode(&filter)
        ))
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.json().unwrap()["@odata.count"], 299);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_over_the_complexity_budget_is_refused() {
    let server = TestServer::start().await;
    let mut api = server.api().await;
    // 101 conditions that can't be combined.
    let terms: Vec<String> = (0..101)
        .map(|i| format!("startswith(computerDnsName,'{}')", code(i)))
        .collect();
    let reply = api
        .get(&format!(
            "/api/machines?$filter={}",
            encode(&terms.join(" or "))
        ))
        .await;
    let body = assert_error(&reply, 400, "ODataError");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("too complex"), "{message}");
    assert!(message.contains("101 conditions"), "{message}");
    // At the budget, it runs.
    let reply = api
        .get(&format!(
            "/api/machines?$filter={}",
            encode(&terms[..100].join(" or "))
        ))
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
}

/// CPU time this process (the server included) has used so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The fields after the command name, which is in parentheses; utime
    // and stime are the 14th and 15th, in 1/100 s (USER_HZ).
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_slow_query_stops_using_the_cpu() {
    let server = TestServer::start().await;
    {
        let mut db = rusqlite::Connection::open(server.dir.0.join("cordon.db")).unwrap();
        db.busy_timeout(Duration::from_secs(10)).unwrap();
        let tx = db.transaction().unwrap();
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO machines (id, public_key, computer_dns_name, first_seen, last_seen) \
                     VALUES (printf('%040x', ?1), x'00', 'host-' || ?1, 0, 0)",
                )
                .unwrap();
            for i in 0..100_000i64 {
                insert.execute([i]).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    // 100 conditions (the budget) that every row fails.
    let terms: Vec<String> = (0..100)
        .map(|i| format!("startswith(computerDnsName,'x{}')", code(i)))
        .collect();
    let path = format!(
        "/api/machines?$count=true&$filter={}",
        encode(&terms.join(" or "))
    );
    let mut api = server.api().await;
    let started = Instant::now();
    let reply = api.get(&path).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let one = started.elapsed();
    eprintln!("one query over 100,000 machines: {one:?}");

    // Four clients send it and give up after 200 ms (their connections close).
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut api = Api {
            http: server.https(),
            token: api.token.clone(),
        };
        let path = path.clone();
        clients.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(200), api.get(&path))
                .await
                .is_err()
        }));
    }
    for client in clients {
        assert!(client.await.unwrap(), "the client gave up");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Before: the four queries kept both cores busy for seconds after.
    let before = cpu_time();
    let started = Instant::now();
    let reply = api.get("/api/machines?$top=1").await;
    assert_eq!(reply.status, 200);
    let answered = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(answered)).await;
    let used = cpu_time() - before;
    let window = started.elapsed();
    eprintln!(
        "after abandoning: a request answered in {answered:?}; {used:?} of CPU in {window:?}"
    );
    assert!(
        used < window / 4,
        "{used:?} of CPU in {window:?} after the clients went away"
    );
}
