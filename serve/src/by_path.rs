//! Adapters loaded by path while serving, with vLLM's routes and bodies: `POST /v1/load_lora_adapter`
//! (`lora_name`, `lora_path`) and `POST /v1/unload_lora_adapter` (`lora_name`). A path is confined to
//! the configured adapter root: the directory and every file in it must resolve inside the root (a
//! symlink that leads out is refused), and with no root configured loading by path is off. Each load
//! gets a fresh generation id, returned in the response and in the lineage of every answer the
//! adapter gives. A client that passes `expected_generation` replaces or unloads only the generation
//! it saw (compare-and-swap; 0 means "not loaded"), so two deployers never overwrite each other
//! unseen; without it, loading a name that is loaded is refused unless `load_inplace` is set.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::routes::parse;
use crate::state::{weight_bytes, LoadedAdapter, ServeState};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    pub lora_name: String,
    pub lora_path: PathBuf,
    /// Replace a loaded adapter of this name (vLLM's flag).
    #[serde(default)]
    pub load_inplace: bool,
    /// Only if the name's current generation is this one (0: only if it is not loaded).
    #[serde(default)]
    pub expected_generation: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnloadRequest {
    pub lora_name: String,
    /// vLLM's numeric id; accepted, not used (names are the ids here).
    #[serde(default)]
    pub lora_int_id: Option<u64>,
    #[serde(default)]
    pub expected_generation: Option<u64>,
}

fn error(status: StatusCode, code: &'static str, param: &str, message: String) -> ApiError {
    ApiError {
        status,
        message,
        kind: if status == StatusCode::NOT_FOUND {
            "not_found_error"
        } else {
            "invalid_request_error"
        },
        param: Some(param.into()),
        code,
    }
}

pub async fn load_lora_adapter(
    State(s): State<Arc<ServeState>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: LoadRequest = parse(&body)?;
    check_name(&s, &req.lora_name)?;
    let dir = confined(s.adapter_root.as_deref(), &req.lora_path)?;
    // Reading and checking the weights happens off the async threads, and before the swap: the
    // name keeps answering with what it had until the new generation is ready.
    let loaded = {
        let (s, name, dir) = (s.clone(), req.lora_name.clone(), dir.clone());
        tokio::task::spawn_blocking(move || load(&s, &name, &dir))
            .await
            .map_err(|e| ApiError::internal(format!("loading failed: {e}")))??
    };
    let generation = loaded.generation;
    let replaced = {
        let mut m = s
            .by_path
            .lock()
            .map_err(|_| ApiError::internal("the adapter table is poisoned"))?;
        let current = m.get(&req.lora_name).map_or(0, |a| a.generation);
        match req.expected_generation {
            Some(expected) if expected != current => {
                return Err(conflict(&req.lora_name, expected, current))
            }
            None if current != 0 && !req.load_inplace => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "adapter_exists",
                    "lora_name",
                    format!(
                        "adapter {:?} is already loaded (generation {current}); pass \
                         load_inplace or expected_generation to replace it",
                        req.lora_name
                    ),
                ));
            }
            _ => {}
        }
        m.insert(req.lora_name.clone(), loaded)
            .map(|old| old.generation)
    };
    tracing::info!(
        adapter = %req.lora_name,
        path = %dir.display(),
        generation,
        replaced = ?replaced,
        "adapter loaded by path"
    );
    Ok(Json(json!({
        "object": "lora_adapter",
        "lora_name": req.lora_name,
        "lora_path": dir,
        "generation": generation,
        "replaced_generation": replaced,
    })))
}

pub async fn unload_lora_adapter(
    State(s): State<Arc<ServeState>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: UnloadRequest = parse(&body)?;
    let mut m = s
        .by_path
        .lock()
        .map_err(|_| ApiError::internal("the adapter table is poisoned"))?;
    let current = m.get(&req.lora_name).map_or(0, |a| a.generation);
    if current == 0 {
        return Err(error(
            StatusCode::NOT_FOUND,
            "model_not_found",
            "lora_name",
            format!(
                "no adapter {:?} was loaded by path (registry adapters are retired with \
                 `pai-train rollback`)",
                req.lora_name
            ),
        ));
    }
    if let Some(expected) = req.expected_generation.filter(|&e| e != current) {
        return Err(conflict(&req.lora_name, expected, current));
    }
    m.remove(&req.lora_name);
    tracing::info!(adapter = %req.lora_name, generation = current, "adapter unloaded");
    Ok(Json(json!({
        "object": "lora_adapter",
        "lora_name": req.lora_name,
        "unloaded_generation": current,
    })))
}

fn conflict(name: &str, expected: u64, current: u64) -> ApiError {
    error(
        StatusCode::CONFLICT,
        "generation_mismatch",
        "expected_generation",
        format!("adapter {name:?} is at generation {current}, not {expected}; nothing was changed"),
    )
}

/// A name clients can ask for: not the base's, not a registry adapter's, and free of the separators
/// `model` uses (`::` between base and adapter, `@` before a version).
fn check_name(s: &ServeState, name: &str) -> Result<(), ApiError> {
    let bad = |why: String| error(StatusCode::BAD_REQUEST, "invalid_value", "lora_name", why);
    if name.is_empty() || name.contains("::") || name.contains('@') || name.contains('/') {
        return Err(bad(format!(
            "{name:?} is not a usable name: not empty, no `::`, `@` or `/`"
        )));
    }
    if name == s.base_id || name == "base" {
        return Err(bad(format!("{name:?} is the base model's name")));
    }
    let in_registry = s
        .registry
        .as_ref()
        .and_then(|r| r.list().ok())
        .is_some_and(|list| list.iter().any(|a| a.name == name));
    if in_registry {
        return Err(bad(format!(
            "{name:?} is an adapter of the registry; its versions are served through \
             `pai-train promote`, not loaded by path"
        )));
    }
    Ok(())
}

/// The adapter directory `path` names (relative paths from the root), when it and every file in it
/// resolve inside `root`.
pub fn confined(root: Option<&Path>, path: &Path) -> Result<PathBuf, ApiError> {
    let forbidden = |message: String| ApiError {
        status: StatusCode::FORBIDDEN,
        message,
        kind: "permission_error",
        param: Some("lora_path".into()),
        code: "path_not_allowed",
    };
    let root = root.ok_or_else(|| {
        forbidden("loading adapters by path is off: start pai-serve with --adapter-root DIR".into())
    })?;
    let root = root.canonicalize().map_err(|e| {
        ApiError::internal(format!(
            "the adapter root {} is unusable: {e}",
            root.display()
        ))
    })?;
    let asked = if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    };
    let dir = asked.canonicalize().map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_value",
            "lora_path",
            format!("{}: {e}", path.display()),
        )
    })?;
    let outside = |p: &Path| {
        forbidden(format!(
            "{} resolves to {}, outside the adapter root {}",
            path.display(),
            p.display(),
            root.display()
        ))
    };
    if !dir.starts_with(&root) {
        return Err(outside(&dir));
    }
    let entries = std::fs::read_dir(&dir).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_value",
            "lora_path",
            format!("{} is not a readable directory: {e}", path.display()),
        )
    })?;
    for entry in entries.flatten() {
        let resolved = entry
            .path()
            .canonicalize()
            .map_err(|_| outside(&entry.path()))?;
        if !resolved.starts_with(&root) {
            return Err(outside(&resolved));
        }
    }
    Ok(dir)
}

/// The adapter in `dir`, onto this base (shapes and the base fingerprint checked), as a new
/// generation.
fn load(s: &ServeState, name: &str, dir: &Path) -> Result<Arc<LoadedAdapter>, ApiError> {
    let adapter = s.base.load_adapter(dir).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "adapter_unusable",
            "lora_path",
            format!("{} does not load onto this base: {e}", dir.display()),
        )
    })?;
    let meta = match std::fs::read(dir.join("pai.json")) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                "adapter_unusable",
                "lora_path",
                format!("{}: {e}", dir.join("pai.json").display()),
            )
        })?,
        Err(_) => Default::default(),
    };
    Ok(Arc::new(LoadedAdapter {
        bytes: weight_bytes(&adapter),
        adapter,
        name: name.to_string(),
        version: None,
        generation: s.next_generation(),
        meta,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let inside = root.path().join("a");
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::write(inside.join("adapter_config.json"), "{}").unwrap();
        std::fs::write(outside.path().join("adapter_model.safetensors"), "x").unwrap();
        // Inside, by absolute or relative path.
        assert!(confined(Some(root.path()), &inside).is_ok());
        assert!(confined(Some(root.path()), Path::new("a")).is_ok());
        // No root: off.
        assert_eq!(
            confined(None, &inside).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        // Out by `..`, by an absolute path, and by a symlinked file or directory.
        for p in [root.path().join("../"), outside.path().to_path_buf()] {
            assert_eq!(
                confined(Some(root.path()), &p).unwrap_err().status,
                StatusCode::FORBIDDEN,
                "{}",
                p.display()
            );
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(
                outside.path().join("adapter_model.safetensors"),
                inside.join("adapter_model.safetensors"),
            )
            .unwrap();
            let err = confined(Some(root.path()), &inside).unwrap_err();
            assert_eq!(err.status, StatusCode::FORBIDDEN, "{}", err.message);
            std::os::unix::fs::symlink(outside.path(), root.path().join("b")).unwrap();
            let err = confined(Some(root.path()), Path::new("b")).unwrap_err();
            assert_eq!(err.status, StatusCode::FORBIDDEN, "{}", err.message);
        }
    }
}
