//! A small run of `cordon-bench fleet` as a correctness check: a thousand
//! simulated agents enroll, connect over TLS from many loopback addresses
//! and answer pushed actions while the API isolates and releases random
//! machines, then isolates 300 of them in one bulk call, with the server in
//! this process; a webhook receiver in the tool hears of every completion,
//! each signed. No timing is asserted.

use std::time::Duration;

use bench::fleet::{Options, Target, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_agents_answer_every_action() {
    let report = run(Options {
        agents: 1_000,
        rate: 40.0,
        duration: Duration::from_secs(3),
        restart_after: None,
        offline_probes: 3,
        bulk: 300,
        webhook: true,
        target: Target::InProcess,
        verbose: false,
    })
    .await
    .expect("the fleet runs");
    assert_eq!(report.agents_connected, 1_000, "{report:#?}");
    assert_eq!(report.agents_connected_at_end, 1_000, "{report:#?}");
    assert_eq!(report.errors, 0, "{report:#?}");
    assert_eq!(report.agents_gave_up, 0, "{report:#?}");
    // 120 calls, and the three offline probes.
    assert!(report.actions >= 100, "{report:#?}");
    assert_eq!(report.succeeded, report.actions, "{report:#?}");
    assert!(report.p50_ms > 0.0 && report.p50_ms <= report.p99_ms);
    assert!(report.p99_ms <= report.max_ms);
    let offline = report.offline.as_ref().expect("offline probes ran");
    assert_eq!((offline.probes, offline.received), (3, 3), "{report:#?}");
    // The bulk call: every machine's action created and succeeded.
    let bulk = report.bulk.as_ref().expect("the bulk call ran");
    assert_eq!(
        (bulk.machines, bulk.created, bulk.succeeded),
        (300, 300, 300),
        "{report:#?}"
    );
    let last = bulk.last_succeeded_ms.expect("every bulk action succeeded");
    assert!(bulk.median_succeeded_ms.unwrap() <= last);
    // Every completion reached the receiver, signed.
    let webhook = report.webhook.as_ref().expect("the receiver ran");
    assert_eq!(webhook.distinct as u64, report.actions, "{report:#?}");
    assert_eq!(webhook.bad_signatures, 0, "{report:#?}");
    assert!(webhook.p50_ms > 0.0 && webhook.p50_ms <= webhook.p99_ms);
    assert!(report.server_rss_bytes > 0 && report.server_cpu_seconds > 0.0);
    assert_eq!(report.server_pid, std::process::id());

    // What --json writes has every field the issue asks for.
    let json = serde_json::to_value(&report).expect("serializes");
    for field in [
        "agents_connected",
        "actions",
        "succeeded",
        "errors",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "server_pid",
        "server_rss_bytes",
        "server_cpu_seconds",
        "rss_per_session_bytes",
        "agents_gave_up",
        "offline",
        "bulk",
        "webhook",
    ] {
        assert!(json.get(field).is_some(), "{field} missing from {json}");
    }
}
