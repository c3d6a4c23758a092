//! The HTTP API (DESIGN.md "HTTP API"): the router (`app`), `GET /health`, `GET /v1/models`,
//! `GET /metrics`, the report pages, and the middleware every route passes (API keys; counting by
//! route, status and adapter). The generation routes are in `generation`, load/unload in `by_path`.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::metrics::AdapterLabel;
use crate::state::{LoadedAdapter, ServeState};

/// The server's routes over `state` (tests drive it with `tower::ServiceExt::oneshot`).
pub fn app(state: Arc<ServeState>) -> Router {
    let limit = state.max_request_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route(
            "/v1/chat/completions",
            post(crate::generation::chat_completions),
        )
        .route("/v1/completions", post(crate::generation::completions))
        .route("/v1/route", post(crate::router::dispatch::route))
        .route("/reports/", get(report_index))
        .route("/reports/{page}", get(report_page))
        .route("/metrics", get(metrics))
        .route(
            "/v1/load_lora_adapter",
            post(crate::by_path::load_lora_adapter),
        )
        .route(
            "/v1/unload_lora_adapter",
            post(crate::by_path::unload_lora_adapter),
        )
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

/// Count every request (refused ones included) by route, status and the adapter that answered.
async fn count(
    State(s): State<Arc<ServeState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let resp = next.run(req).await;
    let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
    // A cloud tier's answer is labelled with the deployment that gave it.
    let adapter = match header("x-pai-tier").filter(|t| *t != "local") {
        Some(tier) => AdapterLabel {
            name: format!("tier:{tier}"),
            version: String::new(),
        },
        None => header("x-pai-adapter").map_or_else(AdapterLabel::base, AdapterLabel::from_header),
    };
    s.metrics.request(&route, resp.status().as_u16(), adapter);
    resp
}

async fn metrics(State(s): State<Arc<ServeState>>) -> Response {
    let mut text = s.metrics.render(s.loaded_count(), s.broken().len());
    crate::metrics::render_router_gauges(
        &mut text,
        &s.router.deployments_up(),
        s.router.spent_today(),
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// With API keys configured, every route (reports included) wants `Authorization: Bearer <key>`.
async fn authorize(
    State(s): State<Arc<ServeState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if s.api_keys.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(key) => match s.api_keys.iter().position(|k| k == key) {
            Some(index) => {
                let mut req = req;
                req.extensions_mut().insert(ApiKeyIndex(index));
                next.run(req).await
            }
            None => unauthorized(),
        },
        None => unauthorized(),
    }
}

/// Which of the configured API keys a request came with (the engine takes turns between clients).
#[derive(Debug, Clone, Copy)]
pub struct ApiKeyIndex(pub usize);

fn unauthorized() -> Response {
    ApiError {
        status: axum::http::StatusCode::UNAUTHORIZED,
        message: "Incorrect or missing API key: send Authorization: Bearer <key>".into(),
        kind: "invalid_request_error",
        param: None,
        code: "invalid_api_key",
    }
    .into_response()
}

/// The eval report viewer: the pages `pai-train report` wrote, by file name only (no paths, so
/// nothing outside the reports directory can be asked for).
async fn report_page(
    State(s): State<Arc<ServeState>>,
    axum::extract::Path(page): axum::extract::Path<String>,
) -> Response {
    let safe = page.ends_with(".html")
        && !page.starts_with('.')
        && page
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let Some(dir) = s.reports_dir.as_ref().filter(|_| safe) else {
        return not_found_page(&page);
    };
    match tokio::fs::read(dir.join(&page)).await {
        Ok(bytes) => (
            [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
            bytes,
        )
            .into_response(),
        Err(_) => not_found_page(&page),
    }
}

async fn report_index(state: State<Arc<ServeState>>) -> Response {
    report_page(state, axum::extract::Path("index.html".to_string())).await
}

fn not_found_page(page: &str) -> Response {
    ApiError {
        status: axum::http::StatusCode::NOT_FOUND,
        message: format!("no report {page:?} (pai-train report writes them)"),
        kind: "not_found_error",
        param: None,
        code: "report_not_found",
    }
    .into_response()
}

async fn health(State(s): State<Arc<ServeState>>) -> Json<Value> {
    let broken: serde_json::Map<String, Value> = s
        .broken()
        .into_iter()
        .map(|(name, error)| (name, json!(error)))
        .collect();
    let status = if broken.is_empty() { "ok" } else { "degraded" };
    Json(json!({
        "status": status, "model": s.base_id, "adapter_errors": broken,
        "router": s.router.status(),
    }))
}

async fn models(State(s): State<Arc<ServeState>>) -> Json<Value> {
    let mut data = vec![json!({
        "id": s.base_id, "object": "model", "created": 0, "owned_by": "pai",
        "root": s.base_id, "parent": null,
    })];
    if let Some(registry) = &s.registry {
        for a in registry.list().unwrap_or_default() {
            let Some(current) = a.current else { continue };
            let meta = registry.meta(&a.name, current).ok();
            data.push(json!({
                "id": a.name, "object": "model", "created": 0, "owned_by": "pai",
                "root": s.base_id, "parent": s.base_id, "version": current.to_string(),
                "dataset_hash": meta.as_ref().and_then(|m| m.dataset.as_ref()).map(|d| d.hash.clone()),
                "parent_adapter": meta.and_then(|m| m.parent),
            }));
        }
    }
    let by_path: Vec<Arc<LoadedAdapter>> = s
        .by_path
        .lock()
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    for a in by_path {
        data.push(json!({
            "id": a.name, "object": "model", "created": 0, "owned_by": "pai",
            "root": s.base_id, "parent": s.base_id, "generation": a.generation,
            "dataset_hash": a.meta.dataset.as_ref().map(|d| d.hash.clone()),
        }));
    }
    Json(json!({"object": "list", "data": data}))
}

/// A request body, with serde's refusal of a field turned into OpenAI's `unsupported_parameter`.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        match msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split_once('`'))
        {
            Some((field, _)) => ApiError::invalid(
                Some(field),
                "unsupported_parameter",
                format!("Unsupported parameter: '{field}' is not supported by this server."),
            ),
            None => ApiError::invalid(None, "invalid_json", format!("invalid request body: {msg}")),
        }
    })
}
