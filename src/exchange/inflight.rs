use std::sync::atomic::{AtomicUsize, Ordering};

/// Exchanges in progress, so a graceful shutdown knows when it has drained.
#[derive(Debug, Default)]
pub struct Inflight {
    count: AtomicUsize,
}

pub struct InflightGuard<'a>(&'a Inflight);

impl Inflight {
    pub fn enter(&self) -> InflightGuard<'_> {
        self.count.fetch_add(1, Ordering::AcqRel);
        InflightGuard(self)
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}
