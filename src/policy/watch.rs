//! Reload triggers: file changes (the file and its folder, since a Kubernetes ConfigMap update is
//! a symlink swap of `..data`), debounced, and SIGHUP. Runs as a Pingora background service so it
//! lives in the server's runtime, after any daemon fork.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::PolicyStore;

/// Editors and ConfigMap swaps write in several steps; wait for them to settle.
const DEBOUNCE: Duration = Duration::from_millis(150);

pub struct PolicyWatcher {
    store: Arc<PolicyStore>,
}

impl PolicyWatcher {
    pub fn new(store: Arc<PolicyStore>) -> Self {
        Self { store }
    }

    fn is_relevant(event: &notify::Event, file_name: &OsStr) -> bool {
        use notify::EventKind;
        if matches!(event.kind, EventKind::Access(_)) {
            return false;
        }
        event.paths.iter().any(|path| {
            path.file_name()
                .is_some_and(|name| name == file_name || name.to_string_lossy().starts_with(".."))
        })
    }

    fn start_file_watch(&self) -> notify::Result<(notify::RecommendedWatcher, mpsc::Receiver<()>)> {
        let (tx, rx) = mpsc::channel(16);
        let path = self.store.path();
        let file_name = path.file_name().map(OsStr::to_owned).unwrap_or_default();
        let folder = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = event {
                    if Self::is_relevant(&event, &file_name) {
                        // A full channel already has a reload pending.
                        let _ = tx.try_send(());
                    }
                }
            })?;
        watcher.watch(&folder, RecursiveMode::NonRecursive)?;
        Ok((watcher, rx))
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
        let (_watcher, mut changes) = match self.start_file_watch() {
            Ok((watcher, rx)) => (Some(watcher), rx),
            Err(e) => {
                tracing::error!(
                    "cannot watch the policy file, reload by SIGHUP or /admin/reload only: {e}"
                );
                (None, mpsc::channel(1).1)
            }
        };
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(stream) => Some(stream),
            Err(e) => {
                tracing::error!("cannot listen for SIGHUP: {e}");
                None
            }
        };
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
        }
    }
}
