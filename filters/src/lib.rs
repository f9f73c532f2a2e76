//! Sluice's filter library.
//!
//! A filter acts on an [`Exchange`] — a view of one request/response pair — never on a socket or a
//! Pingora session, so every filter is unit-tested without a network. The process (`sluice`) owns
//! the sockets and calls the phases of a route's [`Chain`] in order:
//!
//! 1. [`Filter::on_request`] — after the request body has been read; may reject or answer locally.
//! 2. [`Filter::on_upstream_request`] — on the request head about to be sent upstream (per attempt).
//! 3. [`Filter::on_response_head`] — on the response head about to be sent downstream.
//! 4. [`Filter::on_response_chunk`] — on every body chunk as it passes (synchronous, keep it short).
//! 5. [`Filter::on_done`] — once, when the exchange is over, whatever its outcome.

pub mod auth;
pub mod cache;
mod chain;
pub mod eventstream;
mod exchange;
mod facts;
pub mod glob;
pub mod json_edit;
pub mod limits;
pub mod metrics;
pub mod request_id;
mod spec;
pub mod units;
pub mod usage;

pub use chain::{Chain, ChunkVerdict, Filter, Verdict};
pub use exchange::{CacheStatus, ErrorKind, Exchange, LocalResponse, Outcome, Rejection, Timings};
pub use facts::{BedrockOperation, BodyFacts};
pub use spec::{BuildContext, FilterSpec, SpecError, Stage};

/// Re-exported so filters and the process name the same header types.
pub use pingora_http::{RequestHeader, ResponseHeader};
