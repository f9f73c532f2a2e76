//! Test harness: the real `sluice` binary on free ports, against the in-process mock provider.

#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use sluice_mock::{MockConfig, MockServer};

/// Open file descriptors of process `pid`.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// The anonymous part of `pid`'s resident memory in KiB (heap and stacks, no mapped files).
pub fn anon_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "RssAnon:")
}

/// A KiB figure of `/proc/<pid>/status`, by its field name; 0 once the process is gone.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Resident memory of process `pid` once it is quiet: the lowest of samples taken over `over`.
/// The allocator returns freed pages to the kernel on a background thread about a second after
/// they are freed, so a process that just finished work shrinks for a moment before it settles.
pub async fn quiet_rss_kib(pid: u32, over: Duration) -> u64 {
    let deadline = Instant::now() + over;
    let mut lowest = rss_kib(pid);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        lowest = lowest.min(rss_kib(pid));
    }
    lowest
}

/// Waits until process `pid` holds at most `baseline` descriptors, or `within` has passed
/// (connections close asynchronously: callers hanging up, idle upstream connections expiring);
/// returns the count it ended with.
pub async fn descriptors_settle(pid: u32, baseline: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let mut fds = open_fds(pid);
    while fds > baseline && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        fds = open_fds(pid);
    }
    fds
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether process `pid` holds a socket listening on 127.0.0.1:`port` (from `/proc/net/tcp`
/// and the process's descriptors): a port that accepts connections may be another process's.
pub fn listens_on(pid: u32, port: u16) -> bool {
    const LISTEN: &str = "0A";
    let local = format!("0100007F:{port:04X}");
    let tables = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let inodes: Vec<String> = tables
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&LISTEN))
                .then(|| fields.get(9).map(|inode| format!("socket:[{inode}]")))
                .flatten()
        })
        .collect();
    let Ok(descriptors) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    descriptors.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            inodes
                .iter()
                .any(|inode| target.as_os_str() == inode.as_str())
        })
    })
}

/// `N` distinct free ports: all held at once while they are chosen, so no two are the same
/// (separate `free_port` calls may return one port twice).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// A running sidecar with its own policy file in a temporary folder.
pub struct Sidecar {
    pub proxy: String,
    pub admin: String,
    /// The forward listener (HTTPS_PROXY mode), when started with [`Sidecar::start_forward`].
    pub forward: Option<String>,
    pub policy_path: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

/// The policy's `listen` block is added by the harness, and a `server` block unless `body` has
/// its own; `body` holds upstreams and routes.
pub fn policy(proxy_port: u16, admin_port: u16, body: &str) -> String {
    policy_with_forward(proxy_port, admin_port, None, body)
}

/// As [`policy`], with `listen.forward` on `forward_port` when given.
pub fn policy_with_forward(
    proxy_port: u16,
    admin_port: u16,
    forward_port: Option<u16>,
    body: &str,
) -> String {
    let forward = forward_port.map_or(String::new(), |port| format!(", forward: 127.0.0.1:{port}"));
    let server = if body.lines().any(|line| line.starts_with("server:")) {
        ""
    } else {
        "server: { drain_timeout: 10s }\n"
    };
    format!(
        "listen: {{ proxy: 127.0.0.1:{proxy_port}, admin: 127.0.0.1:{admin_port}{forward} }}\n{server}{body}"
    )
}

impl Sidecar {
    pub async fn start(body: &str) -> Sidecar {
        Self::start_with_env(body, &[]).await
    }

    pub async fn start_with_env(body: &str, env: &[(&str, &str)]) -> Sidecar {
        Self::launch(body, env, &[], false).await
    }

    /// With more files (e.g. a keys file) beside the policy.
    pub async fn start_with_files(body: &str, files: &[(&str, &str)]) -> Sidecar {
        Self::launch(body, &[], files, false).await
    }

    /// With the forward listener (HTTPS_PROXY mode) too, and files beside the policy (the CA's
    /// files, a test certificate). Without CA files, the sidecar makes its CA at startup.
    pub async fn start_forward(body: &str, files: &[(&str, &[u8])]) -> Sidecar {
        Self::start_forward_with_env(body, files, &[]).await
    }

    pub async fn start_forward_with_env(
        body: &str,
        files: &[(&str, &[u8])],
        env: &[(&str, &str)],
    ) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in files {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        Self::launch_in(dir, body, env, true).await
    }

    async fn launch(
        body: &str,
        env: &[(&str, &str)],
        files: &[(&str, &str)],
        forward: bool,
    ) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        Self::launch_in(dir, body, env, forward).await
    }

    /// Starts the sidecar on freshly chosen ports. A port chosen free can be taken by another
    /// test's server before the sidecar binds it (Pingora then retries the bind while requests
    /// reach the other server): such a start is stopped and made again on other ports.
    async fn launch_in(
        dir: tempfile::TempDir,
        body: &str,
        env: &[(&str, &str)],
        forward: bool,
    ) -> Sidecar {
        let policy_path = dir.path().join("sluice.yaml");
        let (child, proxy, admin, forward_url) = Self::spawn(&policy_path, body, env, forward);
        let mut sidecar = Sidecar {
            proxy,
            admin,
            forward: forward_url,
            policy_path,
            child,
            _dir: dir,
        };
        for _ in 0..4 {
            if sidecar.wait_ready().await {
                return sidecar;
            }
            let _ = sidecar.child.kill();
            let _ = sidecar.child.wait();
            (sidecar.child, sidecar.proxy, sidecar.admin, sidecar.forward) =
                Self::spawn(&sidecar.policy_path, body, env, forward);
        }
        assert!(
            sidecar.wait_ready().await,
            "every port chosen for sluice was taken"
        );
        sidecar
    }

    /// Writes the policy with fresh ports and starts the process (its log truncated): the
    /// child and the proxy, admin and forward URLs.
    fn spawn(
        policy_path: &Path,
        body: &str,
        env: &[(&str, &str)],
        forward: bool,
    ) -> (Child, String, String, Option<String>) {
        let [proxy_port, admin_port, spare_port] = free_ports();
        let forward_port = forward.then_some(spare_port);
        let text = policy_with_forward(proxy_port, admin_port, forward_port, body);
        std::fs::write(policy_path, text).unwrap();
        let log = policy_path.parent().unwrap().join("sluice.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
        command
            .args(["run", "-c"])
            .arg(policy_path)
            .env(
                "SLUICE_LOG",
                std::env::var("SLUICE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        // OpenSSL's trust as in the container image, where neither is set (a developer's shell
        // may name a bundle); a test that wants them passes them in `env`.
        command
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR");
        for (name, value) in env {
            command.env(name, value);
        }
        let url = |port: u16| format!("http://127.0.0.1:{port}");
        (
            command.spawn().expect("start sluice"),
            url(proxy_port),
            url(admin_port),
            forward_port.map(url),
        )
    }

    /// Ready on `/readyz`, with this process holding every one of its listening sockets;
    /// `false` when a port turned out to be another process's.
    async fn wait_ready(&self) -> bool {
        let port = |url: &str| url.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.logs().contains("is in use") {
                return false;
            }
            let ready = client.get(format!("{}/readyz", self.admin)).send().await;
            let owned = [Some(&self.proxy), Some(&self.admin), self.forward.as_ref()]
                .into_iter()
                .flatten()
                .all(|url| listens_on(self.pid(), port(url)));
            if ready.is_ok_and(|r| r.status().is_success()) && owned {
                return true;
            }
            assert!(Instant::now() < deadline, "sluice did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the sidecar has logged so far (stderr, at `SLUICE_LOG`, `warn` by default).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.policy_path.parent().unwrap().join("sluice.log"))
            .unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Rewrites the policy file in place (same inode, as an editor's save would).
    pub fn write_policy(&self, body: &str) {
        let text = std::fs::read_to_string(&self.policy_path).unwrap();
        let listen_and_server: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
        let mut file = std::fs::File::create(&self.policy_path).unwrap();
        file.write_all(format!("{listen_and_server}{body}").as_bytes())
            .unwrap();
        file.sync_all().unwrap();
    }

    /// A file beside the policy (e.g. the CA certificate the sidecar generated).
    pub fn read_file(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.policy_path.parent().unwrap().join(name)).unwrap()
    }

    /// Rewrites a file beside the policy in place.
    pub fn write_file(&self, name: &str, text: &str) {
        let path = self.policy_path.parent().unwrap().join(name);
        let mut file = std::fs::File::create(path).unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file.sync_all().unwrap();
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, returning how long that took and its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<(Duration, std::process::ExitStatus)> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some((started.elapsed(), status));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// `GET /metrics`, read by a Prometheus text parser.
    pub async fn metrics(&self) -> Metrics {
        let text = reqwest::get(format!("{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let lines = text.lines().map(|line| Ok(line.to_owned()));
        Metrics(prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text"))
    }

    /// Waits until the active policy's hash is no longer `before` (a reload was applied).
    pub async fn wait_for_reload(&self, before: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.policy_hash().await == before {
            assert!(Instant::now() < deadline, "reload not applied");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `POST /admin/reload`.
    pub async fn admin_reload(&self) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/admin/reload", self.admin))
            .send()
            .await
            .unwrap()
    }

    pub async fn policy_hash(&self) -> String {
        let policy: serde_json::Value = reqwest::get(format!("{}/admin/policy", self.admin))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        policy["hash"].as_str().unwrap().to_owned()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what the sidecar said.
        if std::thread::panicking() {
            eprintln!("--- sluice log ---\n{}", self.logs());
        }
    }
}

/// A scrape of `/metrics`.
pub struct Metrics(pub prometheus_parse::Scrape);

impl Metrics {
    /// The value of the sample with this name and these labels (others may be present);
    /// `None` when there is none.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .samples
            .iter()
            .find(|sample| {
                sample.metric == name
                    && labels
                        .iter()
                        .all(|(label, value)| sample.labels.get(label) == Some(*value))
            })
            .map(|sample| match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    }
}

/// A mock with default settings on a free port.
pub async fn mock() -> MockServer {
    MockServer::start(MockConfig::default()).await.unwrap()
}

/// Upstreams `openai` and `anthropic` (no keys) on the mock, routes `/openai` and `/anthropic`.
pub fn passthrough_policy(mock_url: &str) -> String {
    format!(
        r#"
upstreams:
  openai: {{ provider: openai, base_url: "{mock_url}" }}
  anthropic: {{ provider: anthropic, base_url: "{mock_url}" }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai }}
  - {{ name: anthropic, match: {{ path_prefix: /anthropic }}, upstream: anthropic }}
"#
    )
}

/// The `x-ratelimit-remaining-tokens` a response carries.
pub async fn remaining_tokens(response: &reqwest::Response) -> u64 {
    response.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Waits (up to 3 s) until the mock has seen a stream's reader go away: the upstream
/// generation was dropped.
pub async fn wait_for_a_cancelled_stream(mock: &MockServer) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while mock.cancelled_streams() == 0 {
        assert!(Instant::now() < deadline, "upstream stream not cancelled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn chat_body(content: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "gpt-4o-mini",
        "stream": stream,
        "messages": [{"role": "user", "content": content}],
    })
}

/// Sends raw bytes on a fresh connection and returns everything read until the server closes
/// or `limit` passes.
pub async fn raw_exchange(addr: &str, request: &[u8], limit: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr.trim_start_matches("http://"))
        .await
        .unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A real `redis-server` on a free port, for the tests of shared state; killed when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts it again on the same port (after `stop`).
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (make deps)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            use std::io::{Read, Write as _};
            if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let mut answer = [0u8; 7];
                if stream.write_all(b"PING\r\n").is_ok()
                    && stream.read_exact(&mut answer).is_ok()
                    && &answer == b"+PONG\r\n"
                {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed (make deps)");
    assert!(status.success(), "openssl {args:?}");
}

/// A test CA (`ca.pem`, `ca.key`) and a leaf certificate signed by it for the DNS names
/// `names` (`leaf.pem`, `leaf.key`), made in `dir` with the openssl CLI.
pub fn make_certificates(dir: &Path, names: &[&str]) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=Sluice Test CA",
            ],
        ]
        .concat(),
    );
    let subject = format!("/CN={}", names[0]);
    openssl(
        dir,
        &[
            &["req"],
            &ec[..],
            &["-keyout", "leaf.key", "-out", "leaf.csr", "-subj", &subject],
        ]
        .concat(),
    );
    let san: Vec<String> = names.iter().map(|name| format!("DNS:{name}")).collect();
    std::fs::write(
        dir.join("ext"),
        format!("subjectAltName={}\n", san.join(",")),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ],
    );
}

/// The mock provider serving HTTPS too, as a provider reached by name would: a test certificate
/// for `names`, signed by a test CA (`ca.pem` in `certificates`). Its plain listener stays for
/// the test's own look at what the mock received.
pub struct TlsMock {
    pub mock: MockServer,
    pub certificates: tempfile::TempDir,
}

impl TlsMock {
    pub async fn start(names: &[&str]) -> TlsMock {
        let certificates = tempfile::tempdir().unwrap();
        make_certificates(certificates.path(), names);
        let mut mock = mock().await;
        let tls = sluice_mock::MockTls {
            certificate_file: certificates.path().join("leaf.pem"),
            key_file: certificates.path().join("leaf.key"),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        mock.serve_tls(listener, &tls).unwrap();
        TlsMock { mock, certificates }
    }

    /// The HTTPS listener's port.
    pub fn port(&self) -> u16 {
        self.mock.tls_addr.unwrap().port()
    }

    /// The test CA that signed the mock's certificate (PEM file).
    pub fn ca_file(&self) -> PathBuf {
        self.certificates.path().join("ca.pem")
    }
}

/// Runs `sluice run` on `body` (with the forward listener) and `files` beside it, expecting it
/// to refuse to start: its stderr, once it exited with a failure (within 20 s).
pub fn run_expecting_failure(body: &str, files: &[(&str, &[u8])]) -> String {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let path = dir.path().join("sluice.yaml");
    let [proxy_port, admin_port, forward_port] = free_ports();
    let text = policy_with_forward(proxy_port, admin_port, Some(forward_port), body);
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "-c"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sluice");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("sluice kept running with {body}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "sluice exited 0: {stderr}");
    stderr
}

/// A TCP listener that accepts connections, counts them and never answers: a collector or
/// upstream that hangs, or a target that must see no connection at all.
pub struct Sinkhole {
    pub addr: std::net::SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Sinkhole {
    pub async fn start() -> Sinkhole {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(stream);
            }
        });
        Sinkhole { addr, accepted }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Waits up to `within` for `done`, looking every 20 ms and failing with `what`. For state a
/// sidecar reaches just after its caller has the answer (a settlement, a cache entry, a
/// metric), where one look straight after the response could still see the state before.
pub async fn eventually(within: Duration, what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for the 95% budget alert in `logs` (log lines reach the file through a writer
/// thread), then asserts that each threshold — 50, 75, 90 and 95% — was logged exactly once.
pub async fn each_budget_alert_logged_once(logs: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !logs().contains("threshold_percent=95 ") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = logs();
    for percent in [50, 75, 90, 95] {
        let fired = logs
            .matches(&format!("threshold_percent={percent} "))
            .count();
        assert_eq!(fired, 1, "alert {percent}% fired {fired} times:\n{logs}");
    }
}
