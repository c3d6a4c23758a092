//! pai-serve: the OpenAI-compatible HTTP server. One quantized base model serves the owner's adapters,
//! chosen per request by `model` (`state`), through the routes of `routes::app`; errors in OpenAI's
//! envelope (`error`), bodies in OpenAI's shapes (`openai`), Prometheus metrics at `/metrics`
//! (`metrics`). Generations run in the continuous-batching engine (`engine`): concurrent requests
//! decode together, whatever adapters they ask for. A promoted version is loaded, verified and swapped
//! in by a background loader as soon as the registry watch sees CURRENT move (`state`); adapters can
//! also be loaded by path (`by_path`).

pub mod by_path;
pub mod engine;
pub mod error;
pub mod generation;
pub mod metrics;
pub mod openai;
pub mod router;
pub mod routes;
pub mod state;

pub use error::ApiError;
pub use routes::app;
pub use state::{LoadedAdapter, ServeState};

use std::sync::Arc;

/// Serve `state` on `addr` until SIGINT or SIGTERM, then finish the requests in flight. Prints the
/// address it listens on (with the port the system chose, for port 0) to standard error.
pub fn run(addr: std::net::SocketAddr, state: Arc<ServeState>) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Err(e) = state.watch_registry() {
        tracing::warn!(error = %e, "cannot watch the registry: promoted versions load on first request");
    }
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        tracing::info!(%local, model = %state.base_id, "serving");
        eprintln!(
            "pai-serve: listening on http://{local} (model {})",
            state.base_id
        );
        serve(listener, state, shutdown_signal()).await
    })
}

/// Serve `state` on `listener` until `shutdown` resolves; then take no new connections and return
/// once every request in flight (streams, and requests still waiting for the engine) has been
/// answered in full.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ServeState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    eprintln!("pai-serve: shutting down after the requests in flight");
}
