//! The `sandbox-agent` binary as a whole. (Building this test also makes cargo build the binary, which
//! the host's end-to-end tests start inside sandboxes.)

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixListener;

/// With `NIGHTSHIFT_EGRESS_SOCKET`, `run` reaches its session only through that socket: it asks the
/// proxy there for a `CONNECT` tunnel to the session's address, and keeps asking after a refusal.
#[tokio::test]
async fn run_dials_its_session_through_the_egress_socket() {
    let dir = tempfile::tempdir().unwrap();
    let workspace = dir.path().join("workspace");
    std::fs::create_dir(&workspace).unwrap();
    let socket = dir.path().join("egress.sock");
    let proxy = UnixListener::bind(&socket).unwrap();
    let mut agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandbox-agent"))
        .args(["run", "--state-dir"])
        .arg(dir.path().join("state"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir.path())
        .env("NIGHTSHIFT_CONNECT_URL", "ws://127.0.0.1:1/sandbox/s1/ws")
        .env("NIGHTSHIFT_SANDBOX_TOKEN", "sandbox-secret")
        .env("NIGHTSHIFT_SANDBOX_ID", "sb-1")
        .env("NIGHTSHIFT_WORKSPACE", &workspace)
        .env("NIGHTSHIFT_EGRESS_SOCKET", &socket)
        .env("ANTHROPIC_BASE_URL", "http://127.0.0.1:1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for attempt in 0..2 {
        let (mut client, _) = tokio::time::timeout(Duration::from_secs(30), proxy.accept())
            .await
            .expect("the agent dials through the socket")
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let byte = client.read_u8().await.unwrap();
            head.push(byte);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(
            head.starts_with("CONNECT 127.0.0.1:1 HTTP/1.1\r\n"),
            "attempt {attempt}: {head}"
        );
        assert!(
            !head.contains("sandbox-secret"),
            "the token travels inside the tunnel only"
        );
        client
            .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
    }
    agent.kill().await.unwrap();
}
