//! The least an HTTP proxy on Pingora 0.9 does, for `make bench`: every request goes to one
//! upstream over Pingora's own pooled connector, with a path prefix removed and nothing else —
//! no policy, no body reading, no telemetry. Same allocator and thread count as Sluice, so the
//! distance between this path and Sluice's passthrough is what Sluice itself adds, and the
//! distance between this path and nginx is the framework's (Pingora and tokio).

use async_trait::async_trait;
use clap::Parser;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The same allocator options as Sluice's (src/main.rs).
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &u8 = &b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0"[0];

#[derive(Parser, Debug)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: String,
    /// `host:port` of the plain-HTTP upstream.
    #[arg(long)]
    upstream: String,
    /// Removed from the front of every request path before it goes upstream.
    #[arg(long, default_value = "")]
    strip_prefix: String,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

struct Floor {
    upstream: String,
    strip_prefix: String,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }

    async fn upstream_request_filter(
        &self,
        _: &mut Session,
        request: &mut RequestHeader,
        _: &mut (),
    ) -> Result<()> {
        let path = request.uri.path_and_query().map_or("/", |p| p.as_str());
        if let Some(rest) = path.strip_prefix(self.strip_prefix.as_str()) {
            let uri = rest
                .parse()
                .or_err(ErrorType::InvalidHTTPHeader, "path after the prefix")?;
            request.set_uri(uri);
        }
        Ok(())
    }
}

fn main() {
    let args = Args::parse();
    let conf = ServerConf {
        threads: args.threads,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        Floor {
            upstream: args.upstream,
            strip_prefix: args.strip_prefix,
        },
    );
    proxy.add_tcp(&args.listen);
    server.add_service(proxy);
    server.run_forever();
}
