//! `cordon backup` and `cordon restore`, run as a user types them: a backup
//! taken while the API writes holds every action acknowledged before it
//! began, and restores into a server that starts on it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(output: &Output) -> Value {
    assert!(output.status.success(), "{}", stderr(output));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_write_load_holds_every_acknowledged_action_and_restores() {
    let server = TestServer::start().await;
    let data = server.dir.0.clone();
    let machines = enroll_many(&server, "backup-", 400).await;

    // Isolate the machines one call at a time, noting when each 201 came.
    let acked: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let load = {
        let acked = acked.clone();
        let mut api = server.api().await;
        tokio::spawn(async move {
            for machine in machines {
                let reply = api.isolate(&machine).await;
                assert_eq!(reply.status, 201, "{:?}", reply.json());
                let id = reply.json().unwrap()["id"].as_str().unwrap().to_owned();
                acked.lock().unwrap().push((id, Instant::now()));
            }
        })
    };
    while acked.lock().unwrap().len() < 50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let file = server.dir.0.with_extension("backup");
    let _ = std::fs::remove_file(&file);
    let started = Instant::now();
    let backed_up =
        json(&cordon_cli(&["backup", "--to", file.to_str().unwrap(), "--json"], &data).await);
    let during = acked.lock().unwrap().len();
    load.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        during < acked.len(),
        "the calls went on during and after the backup ({during} of {})",
        acked.len()
    );
    assert_eq!(backed_up["tenantId"], server.tenant());
    assert_eq!(backed_up["machines"], 400);
    assert_eq!(
        backed_up["files"],
        serde_json::json!(["ca-key.pem", "ca.pem", "server-key.pem", "server.pem"])
    );
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the backup holds keys");

    // Never over an existing file.
    let again = cordon_cli(&["backup", "--to", file.to_str().unwrap()], &data).await;
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("exists already"),
        "{}",
        stderr(&again)
    );
    // Not while the server serves the directory.
    let busy = cordon_cli(&["restore", "--from", file.to_str().unwrap()], &data).await;
    assert!(!busy.status.success());
    assert!(
        stderr(&busy).contains("already serving"),
        "{}",
        stderr(&busy)
    );

    // Restored into a new directory: every action acknowledged before the
    // backup began is there.
    let restored_dir = TempDir::new("restored");
    let target = restored_dir.0.join("data");
    let restored = json(
        &cordon_cli(
            &["restore", "--from", file.to_str().unwrap(), "--json"],
            &target,
        )
        .await,
    );
    assert_eq!(restored["tenantId"], server.tenant());
    assert_eq!(restored["movedAside"], serde_json::json!([]));
    let store = server::open_store(&target).unwrap();
    let mut before = 0;
    for (id, at) in &acked {
        if *at < started {
            before += 1;
            assert!(
                store.get_action(id).await.unwrap().is_some(),
                "action {id}, acknowledged before the backup began, is missing"
            );
        }
    }
    assert!(before >= 50, "{before}");
    drop(store);
    for file in ["ca.pem", "ca-key.pem", "cordon.db"] {
        let mode = std::fs::metadata(target.join(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }
    assert_eq!(
        std::fs::read(target.join("ca.pem")).unwrap(),
        std::fs::read(data.join("ca.pem")).unwrap()
    );

    // Restoring over a directory moves what it replaces aside.
    let over = json(
        &cordon_cli(
            &["restore", "--from", file.to_str().unwrap(), "--json"],
            &target,
        )
        .await,
    );
    let moved: Vec<&str> = over["movedAside"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["file"].as_str().unwrap())
        .collect();
    assert!(moved.contains(&"cordon.db"), "{over}");
    let aside = over["movedAside"][0]["movedTo"].as_str().unwrap();
    assert!(target.join(aside).exists(), "{over}");

    // A server starts on it: same tenant, the machines and the trail.
    let text = cordon_cli(&["audit", "verify"], &target).await;
    assert!(text.status.success(), "{}", stderr(&text));
    server.server.stop();
    let revived = TestServer::start_in(restored_dir_with(target), |_| {}).await;
    assert_eq!(revived.tenant(), server.tenant());
    let mut api = revived.api().await;
    let listed = api.get("/api/machines?$top=1&$count=true").await;
    assert_eq!(listed.json().unwrap()["@odata.count"], 400);

    // Not a backup: refused, nothing changed.
    let garbage = restored_dir.0.join("garbage");
    std::fs::write(&garbage, b"not a database at all").unwrap();
    let refused = cordon_cli(
        &["restore", "--from", garbage.to_str().unwrap()],
        &restored_dir.0.join("other"),
    )
    .await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("not a backup"),
        "{}",
        stderr(&refused)
    );
    assert!(!restored_dir.0.join("other").join("cordon.db").exists());
    let _ = std::fs::remove_file(&file);
}

/// The data directory `dir` as a test server's (not removed at the end: the
/// outer temporary directory is).
fn restored_dir_with(dir: std::path::PathBuf) -> TempDir {
    let copy = TempDir::new("revived");
    std::fs::remove_dir_all(&copy.0).unwrap();
    let status = std::process::Command::new("cp")
        .args(["-a"])
        .arg(&dir)
        .arg(&copy.0)
        .status()
        .unwrap();
    assert!(status.success());
    copy
}
