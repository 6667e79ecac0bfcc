//! The agent's trust in its server: it talks only to a server whose
//! certificate chains to the CA it enrolled with. No root needed.

use std::time::Duration;

use proto::agent::Enforced;

struct Dir(std::path::PathBuf);

impl Dir {
    fn new(label: &str) -> Dir {
        let path =
            std::env::temp_dir().join(format!("cordon-agent-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Dir(path)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn serve(dir: &Dir) -> (server::RunningServer, String, String) {
    let mut config = server::Config::new(dir.0.join("server"));
    config.listen = "127.0.0.1:0".parse().unwrap();
    let running = server::start(config).await.unwrap();
    let (_, token) = server::create_enroll_token(&running.state.store, None, None)
        .await
        .unwrap();
    let url = format!("https://localhost:{}", running.local_addr.port());
    (running, url, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_trusts_only_the_ca_it_enrolled_with() {
    let (ours, theirs, state) = (Dir::new("ours"), Dir::new("theirs"), Dir::new("state"));
    let (server, url, token) = serve(&ours).await;
    let (_other, _, _) = serve(&theirs).await;
    let other_ca = theirs.0.join("server").join("ca.pem");

    // Enrolling against a server whose certificate doesn't chain to the given CA fails.
    let refused = agent::enroll(&url, &token, &other_ca, &state.0, Some("m1")).await;
    assert!(refused.is_err());
    assert!(!state.0.join("identity.json").exists(), "nothing saved");

    let identity = agent::enroll(
        &url,
        &token,
        server.ca_path.as_ref().unwrap(),
        &state.0,
        Some("m1"),
    )
    .await
    .unwrap();
    let session = agent::Session::open(
        &identity,
        agent::host_facts(Some("m1")),
        Enforced::NotIsolated,
    )
    .await;
    assert!(session.is_ok());

    // Swap the enrolled CA for another one: the session is refused by the agent itself.
    std::fs::copy(&other_ca, state.0.join("ca.pem")).unwrap();
    let swapped = agent::Identity::load(&state.0).unwrap();
    let error = tokio::time::timeout(
        Duration::from_secs(5),
        agent::Session::open(
            &swapped,
            agent::host_facts(Some("m1")),
            Enforced::NotIsolated,
        ),
    )
    .await
    .unwrap()
    .err()
    .expect("refused");
    assert!(format!("{error:#}").contains("TLS handshake"), "{error:#}");
}

/// The state directory holds the agent's private key: `cordon-agent enroll`
/// (the real binary) makes it and its files private, and tightens a
/// directory it finds open to other users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_directory_and_its_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let (ours, parent) = (Dir::new("modes-server"), Dir::new("modes-state"));
    let (_server, url, token) = serve(&ours).await;
    let ca = ours.0.join("server").join("ca.pem");
    let enroll = |state: std::path::PathBuf, name: &'static str| {
        let (url, token, ca) = (url.clone(), token.clone(), ca.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_cordon-agent"))
                .args([
                    "enroll", "--server", &url, "--token", &token, "--name", name,
                ])
                .arg("--ca-file")
                .arg(&ca)
                .arg("--state-dir")
                .arg(&state)
                .output()
                .unwrap()
        })
    };

    let fresh = parent.0.join("fresh");
    let output = enroll(fresh.clone(), "m1").await.unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(mode(&fresh), 0o700);
    for file in ["agent.key", "ca.pem", "identity.json"] {
        assert_eq!(mode(&fresh.join(file)), 0o600, "{file}");
    }

    let loose = parent.0.join("loose");
    std::fs::create_dir(&loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(loose.join("state.json"), b"{}").unwrap();
    std::fs::set_permissions(
        loose.join("state.json"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let output = enroll(loose.clone(), "m2").await.unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(mode(&loose), 0o700);
    assert_eq!(mode(&loose.join("state.json")), 0o600);
}
