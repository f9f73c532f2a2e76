//! HTTPS upstreams: certificates are verified (chain and host name) and SNI is sent, with a
//! private CA trusted through `tls.ca_file`. The upstream is `openssl s_server`.

mod common;

use std::path::Path;
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

/// `openssl s_server` on a free port with `dir`'s `leaf.pem`, answering every request with a page.
fn start_s_server(dir: &Path) -> (KillOnDrop, u16) {
    let port = free_port();
    let server = KillOnDrop(
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
            .current_dir(dir)
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
    (server, port)
}

#[tokio::test]
async fn https_upstreams_are_verified() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path(), &["localhost"]);
    let (_server, port) = start_s_server(dir.path());
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

/// With no `tls.ca_file` the system's roots decide, read from the hashed directory one root at a
/// time (`SSL_CERT_DIR`) rather than from the bundle: a CA linked there under its subject hash is
/// trusted, a directory without it refuses. An operator's own bundle (`SSL_CERT_FILE`) is kept.
#[tokio::test]
async fn system_roots_come_from_the_hashed_directory_unless_a_bundle_is_named() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path(), &["localhost"]);
    let (_server, port) = start_s_server(dir.path());
    let ca = dir.path().join("ca.pem");
    let hash = Command::new("openssl")
        .args(["x509", "-hash", "-noout", "-in"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(hash.status.success());
    let hash = String::from_utf8(hash.stdout).unwrap();
    let with_ca = dir.path().join("roots-with-ca");
    std::fs::create_dir(&with_ca).unwrap();
    std::fs::copy(&ca, with_ca.join(format!("{}.0", hash.trim()))).unwrap();
    // Hashed entries, but not this CA: another test CA made in a directory of its own.
    let other = tempfile::tempdir().unwrap();
    make_certificates(other.path(), &["localhost"]);
    let without_ca = dir.path().join("roots-without-ca");
    std::fs::create_dir(&without_ca).unwrap();
    std::fs::copy(other.path().join("ca.pem"), without_ca.join("00000000.0")).unwrap();

    let policy = format!(
        r#"
upstreams:
  system-store: {{ provider: openai_compatible, base_url: "https://localhost:{port}" }}
routes:
  - {{ name: system-store, match: {{ path_prefix: /system-store }}, upstream: system-store }}
"#
    );
    let (with_ca, without_ca, ca) = (
        with_ca.display().to_string(),
        without_ca.display().to_string(),
        ca.display().to_string(),
    );
    let on_demand = |dir: &str| format!("OnDemand(\"{dir}\")");
    for (env, status, roots) in [
        (
            vec![("SSL_CERT_DIR", with_ca.as_str())],
            200,
            on_demand(&with_ca),
        ),
        (
            vec![("SSL_CERT_DIR", without_ca.as_str())],
            502,
            on_demand(&without_ca),
        ),
        // The operator's bundle, loaded whole, beside a directory that lacks the CA.
        (
            vec![
                ("SSL_CERT_DIR", without_ca.as_str()),
                ("SSL_CERT_FILE", ca.as_str()),
            ],
            200,
            format!("OperatorBundle(\"{ca}\")"),
        ),
    ] {
        let env = [env, vec![("SLUICE_LOG", "info")]].concat();
        let sidecar = Sidecar::start_with_env(&policy, &env).await;
        let answer = reqwest::get(format!("{}/system-store/", sidecar.proxy))
            .await
            .unwrap();
        assert_eq!(answer.status(), status, "{env:?}");
        let logs = sidecar.logs();
        assert!(logs.contains(&roots), "{env:?}: no {roots} in\n{logs}");
    }
}

/// What reading roots on demand is for: the system bundle is not parsed into each of the
/// sidecar's TLS contexts (Pingora's two connectors, for HTTP/1 and HTTP/2 each), which held
/// about 1.2 MiB of heap apiece. The same sidecar started with the bundle named
/// (`SSL_CERT_FILE`) is the reference; the margin is a third of the difference measured (4.2 MiB).
#[tokio::test]
async fn the_system_bundle_is_not_parsed_into_every_tls_context() {
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    assert!(
        Path::new(bundle).exists(),
        "{bundle}: the ca-certificates package (make deps)"
    );
    let policy = r#"
upstreams:
  u: { provider: openai_compatible, base_url: "https://localhost:9" }
routes:
  - { name: r, match: { path_prefix: /r }, upstream: u }
"#;
    let mut idle_anon_kib = Vec::new();
    for env in [vec![], vec![("SSL_CERT_FILE", bundle)]] {
        let sidecar = Sidecar::start_with_env(policy, &env).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        idle_anon_kib.push(anon_rss_kib(sidecar.pid()));
    }
    let (on_demand, whole_bundle) = (idle_anon_kib[0], idle_anon_kib[1]);
    eprintln!(
        "idle anonymous memory: {on_demand} KiB on demand, {whole_bundle} KiB with the bundle"
    );
    assert!(
        on_demand > 0 && on_demand + 1536 < whole_bundle,
        "idle anonymous memory: {on_demand} KiB reading roots on demand, {whole_bundle} KiB with the bundle"
    );
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
