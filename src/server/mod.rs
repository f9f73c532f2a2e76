//! Process wiring: one Pingora server with the proxy listener, the forward listener (when
//! `listen.forward` is set), the admin listener and the background services (policy watcher,
//! upstream pool sweep, SLA monitor, drain monitor).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::apps::HttpServerOptions;
use pingora::server::configuration::ServerConf;
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::admin::AdminApp;
use crate::exchange::{Inflight, SluiceProxy};
use crate::forward::ForwardApp;
use crate::policy::{
    self, MissingCa, PolicyError, PolicyErrors, PolicyStore, PolicyWatcher, SharedState,
};
use crate::telemetry::sla::SlaMonitor;
use crate::telemetry::traces::Tracer;
use crate::upstream::{PoolSweeper, UpstreamConnector};
pub use http_app::{Handler, HttpApp};
use worker_local::WorkerLocal;

mod http_app;
mod worker_local;

/// Starts the sidecar and serves until a signal ends it; never returns on success.
pub fn run(policy_path: &Path) -> Result<(), PolicyErrors> {
    let shared = SharedState::default();
    // The forward listener's CA is generated, when its files are missing, at first start only.
    shared.set_missing_ca(MissingCa::Generate);
    let policy = policy::load(policy_path, &shared)?;
    shared.set_missing_ca(MissingCa::Refuse);
    tracing::info!(summary = %policy.summary(), "policy loaded from {}", policy_path.display());
    let listen = policy.listen;
    let settings = policy.server;
    let store = Arc::new(PolicyStore::new(policy_path, policy, shared));
    let inflight = Arc::new(Inflight::default());
    let draining = Arc::new(AtomicBool::new(false));

    let conf = ServerConf {
        threads: settings.threads,
        // Pingora waits this long after SIGTERM before stopping its runtimes; the drain monitor
        // exits sooner, as soon as nothing is in flight.
        grace_period_seconds: Some(settings.drain_timeout.as_secs().max(1)),
        graceful_shutdown_timeout_seconds: Some(1),
        upstream_keepalive_pool_size: settings.upstream_pool_size,
        // One single-threaded runtime per worker thread, each connection served on one of
        // them from accept to close, its sockets (downstream and pooled upstream) watched by
        // that thread's reactor: see `worker_local` and `upstream::pool`.
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    // After bootstrap: the exporter runs on a thread of its own, which a fork would lose.
    let tracer = match &store.current().telemetry.otlp {
        Some(settings) => {
            let counters = store.metrics().spans.clone();
            match Tracer::start(settings, counters) {
                Ok(tracer) => tracer,
                Err(e) => {
                    tracing::error!("tracing off: {e}");
                    Tracer::default()
                }
            }
        }
        None => Tracer::default(),
    };
    let _ = store.shared().tracer.set(tracer.clone());

    // One pool of upstream connections for the proxy and forward listeners.
    let connector = Arc::new(UpstreamConnector::new(
        settings.upstream_pool_size,
        settings.upstream_idle_timeout,
    ));
    let proxy = SluiceProxy::new(store.clone(), inflight.clone(), connector.clone());
    let mut server_options = HttpServerOptions::default();
    server_options.h2c = true;
    let proxy_app = HttpApp::new(proxy, server_options);
    let mut proxy_service = Service::new("sluice proxy".to_owned(), WorkerLocal::http(proxy_app));
    proxy_service.add_tcp(&listen.proxy.to_string());

    let mut admin = Service::new(
        "sluice admin".to_owned(),
        HttpServer::new_app(AdminApp::new(store.clone(), draining.clone())),
    );
    admin.add_tcp(&listen.admin.to_string());
    admin.threads = Some(1);

    server.add_service(proxy_service);
    if let Some(forward_addr) = listen.forward {
        let proxy = SluiceProxy::new(store.clone(), inflight.clone(), connector.clone());
        let app = ForwardApp::new(store.clone(), proxy).map_err(|e| PolicyErrors {
            file: policy_path.display().to_string(),
            errors: vec![PolicyError::new("listen.forward", e.to_string())],
        })?;
        let mut forward = Service::new("sluice forward".to_owned(), WorkerLocal::raw(app));
        forward.add_tcp(&forward_addr.to_string());
        server.add_service(forward);
    }
    server.add_service(admin);
    server.add_service(background_service(
        "policy watcher",
        PolicyWatcher::new(store.clone()),
    ));
    server.add_service(background_service(
        "upstream pool sweep",
        PoolSweeper(connector),
    ));
    server.add_service(background_service(
        "sla monitor",
        SlaMonitor::new(store.clone()),
    ));
    server.add_service(background_service(
        "drain monitor",
        DrainMonitor {
            inflight,
            draining,
            tracer,
        },
    ));
    tracing::info!(proxy = %listen.proxy, forward = ?listen.forward, admin = %listen.admin, "sluice listening");
    server.run_forever();
}

/// After SIGTERM, exits as soon as no exchange is in flight (open streams included) instead of
/// always sleeping the whole drain period; Pingora's grace period is the upper bound.
struct DrainMonitor {
    inflight: Arc<Inflight>,
    draining: Arc<AtomicBool>,
    /// Spans still queued are sent before the process exits.
    tracer: Tracer,
}

#[async_trait]
impl BackgroundService for DrainMonitor {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        self.draining.store(true, Ordering::Release);
        tracing::info!(in_flight = self.inflight.count(), "SIGTERM: draining");
        // Let connections accepted just before the signal register their exchanges.
        tokio::time::sleep(Duration::from_millis(100)).await;
        loop {
            if self.inflight.count() == 0 {
                tracing::info!("drained; exiting");
                self.tracer.flush();
                // Give the log writer thread a moment to write the last access lines.
                tokio::time::sleep(Duration::from_millis(50)).await;
                std::process::exit(0);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
