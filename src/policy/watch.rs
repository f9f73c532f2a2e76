//! Reload triggers: changes to the policy's files (the policy and its keys file — and their
//! folders, since a Kubernetes ConfigMap or Secret update is a symlink swap of `..data`),
//! debounced, and SIGHUP. Runs as a Pingora background service so it lives in the server's
//! runtime, after any daemon fork.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::{Policy, PolicyStore};

/// Editors and ConfigMap swaps write in several steps; wait for them to settle.
const DEBOUNCE: Duration = Duration::from_millis(150);

pub struct PolicyWatcher {
    store: Arc<PolicyStore>,
}

/// What to watch for one policy: the folders of its files, and the names that matter there.
#[derive(Debug, PartialEq, Eq)]
struct Targets {
    folders: Vec<PathBuf>,
    names: Vec<OsString>,
}

impl Targets {
    fn of(policy: &Policy) -> Self {
        let mut folders: Vec<PathBuf> = Vec::new();
        let mut names = Vec::new();
        for file in &policy.watched {
            let folder = match file.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if !folders.contains(&folder) {
                folders.push(folder);
            }
            names.extend(file.file_name().map(OsString::from));
        }
        Self { folders, names }
    }

    fn is_relevant(&self, event: &notify::Event) -> bool {
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return false;
        }
        event.paths.iter().any(|path| {
            path.file_name().is_some_and(|name| {
                self.names.iter().any(|n| n == name) || name.to_string_lossy().starts_with("..")
            })
        })
    }
}

impl PolicyWatcher {
    pub fn new(store: Arc<PolicyStore>) -> Self {
        Self { store }
    }

    fn watch(
        targets: Arc<Targets>,
        tx: mpsc::Sender<()>,
    ) -> notify::Result<notify::RecommendedWatcher> {
        let relevant = targets.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|event| relevant.is_relevant(&event)) {
                    // A full channel already has a reload pending.
                    let _ = tx.try_send(());
                }
            })?;
        for folder in &targets.folders {
            watcher.watch(folder, RecursiveMode::NonRecursive)?;
        }
        Ok(watcher)
    }

    fn reload(&self, trigger: &str) {
        // A rejection is logged by the store with every error.
        if let Ok(outcome) = self.store.reload() {
            tracing::debug!(?outcome, trigger, "reload");
        }
    }
}

#[async_trait]
impl BackgroundService for PolicyWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (tx, mut changes) = mpsc::channel(16);
        let mut targets = Arc::new(Targets::of(&self.store.current()));
        // Kept alive for as long as it should watch.
        let mut _watcher = Self::watch(targets.clone(), tx.clone())
            .map_err(|e| {
                tracing::error!(
                    "cannot watch the policy files, reload by SIGHUP or /admin/reload only: {e}"
                )
            })
            .ok();
        let mut hangups = signal(SignalKind::hangup())
            .map_err(|e| tracing::error!("cannot listen for SIGHUP: {e}"))
            .ok();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = changes.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while changes.try_recv().is_ok() {}
                    self.reload("file change");
                }
                Some(()) = async { match hangups.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    self.reload("SIGHUP");
                }
            }
            // A reload may have named another keys file: follow it.
            let now = Arc::new(Targets::of(&self.store.current()));
            if now != targets {
                targets = now;
                _watcher = Self::watch(targets.clone(), tx.clone())
                    .map_err(|e| tracing::error!("cannot watch the policy files: {e}"))
                    .ok();
            }
        }
    }
}
