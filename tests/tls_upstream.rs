//! HTTPS upstreams: certificates are verified (chain and host name) and SNI is sent, with a
//! private CA trusted through `tls.ca_file`. The upstream is `openssl s_server`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn https_upstreams_are_verified() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path(), &["localhost"]);
    let port = free_port();
    let _server = KillOnDrop(
        Command::new("openssl")
            .args([
                "s_server",
                "-accept",
                &format!("127.0.0.1:{port}"),
                "-cert",
                "leaf.pem",
                "-key",
                "leaf.key",
                "-www",
                "-quiet",
            ])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "s_server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ca = dir.path().join("ca.pem");
    let policy = format!(
        r#"
upstreams:
  trusted: {{ provider: openai_compatible, base_url: "https://localhost:{port}", tls: {{ ca_file: "{ca}" }} }}
  wrong-name: {{ provider: openai_compatible, base_url: "https://127.0.0.1:{port}", tls: {{ ca_file: "{ca}" }} }}
  system-store: {{ provider: openai_compatible, base_url: "https://localhost:{port}" }}
routes:
  - {{ name: trusted, match: {{ path_prefix: /trusted }}, upstream: trusted }}
  - {{ name: wrong-name, match: {{ path_prefix: /wrong-name }}, upstream: wrong-name }}
  - {{ name: system-store, match: {{ path_prefix: /system-store }}, upstream: system-store }}
"#,
        ca = ca.display()
    );
    let sidecar = Sidecar::start(&policy).await;
    let client = reqwest::Client::new();

    let trusted = client
        .get(format!("{}/trusted/", sidecar.proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(trusted.status(), 200);
    let page = trusted.text().await.unwrap();
    assert!(page.contains("<HTML>"), "{page}");

    for (route, why) in [
        ("wrong-name", "certificate not issued for 127.0.0.1"),
        ("system-store", "CA not trusted by the system"),
    ] {
        let refused = client
            .get(format!("{}/{route}/", sidecar.proxy))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 502, "{route}: {why}");
        let error: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(error["error"]["code"], "upstream_unavailable");
    }
}

#[test]
fn a_ca_file_on_a_plain_http_upstream_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.yaml");
    std::fs::write(
        &path,
        "upstreams:\n  u: { provider: openai, base_url: \"http://x\", tls: { ca_file: /nope.pem } }\nroutes:\n  - { name: r, match: { path_prefix: /r }, upstream: u }\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("upstreams.u.tls.ca_file: applies to https:// upstreams only"),
        "{stderr}"
    );
}
