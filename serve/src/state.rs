//! What the server holds: the base model, the registry, and the adapters loaded from it. A request
//! names what answers it (`model`: the base, an adapter, `base::adapter`, or `adapter@vN`; or the
//! `adapter` field); the current version of a name is served unless a version is named. Every
//! adapter is loaded through `Registry::verify` (each file's sha256) and the base's own check of its
//! fingerprint, and gets a generation id; loaded versions are kept by name and version (at most
//! `max_resident` of them and `max_resident_bytes` of weights; the least recently used is evicted and
//! reloads when asked for).
//!
//! Hot swap: each name has the version it serves. When CURRENT moves (seen by the registry watch, or
//! by a request that reads it), a background loader loads and verifies the new version while the old
//! one keeps answering, then swaps it in under a lock; requests in flight finish on the version they
//! started with (they hold its Arc). A version that fails to verify or load never replaces the one
//! being served: it is reported in `/health` and not retried until CURRENT moves again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use pai_adapters::{AdapterMeta, Registry, Version};
use pai_model::{Adapter, BaseModel};

use crate::error::ApiError;
use crate::openai::Lineage;

/// An adapter as served: its weights and where they came from.
pub struct LoadedAdapter {
    pub adapter: Adapter,
    /// Bytes its weights take.
    pub bytes: usize,
    pub name: String,
    /// The registry version (none for an adapter loaded by path).
    pub version: Option<Version>,
    /// This load's id, unique in the server's life: a reload of the same files is a new generation.
    pub generation: u64,
    pub meta: AdapterMeta,
}

impl LoadedAdapter {
    pub fn lineage(&self) -> Lineage {
        Lineage {
            adapter: Some(self.name.clone()),
            version: self.version.map(|v| v.to_string()),
            generation: Some(self.generation),
            dataset_hash: self.meta.dataset.as_ref().map(|d| d.hash.clone()),
            report: self
                .meta
                .gate
                .as_ref()
                .and_then(|g| g["report"].as_str())
                .map(String::from),
        }
    }
}

/// Resident adapter versions by (name, version), with the tick of each one's last use.
type Resident = HashMap<(String, Version), (Arc<LoadedAdapter>, u64)>;

pub struct ServeState {
    pub base: BaseModel,
    /// The id clients use for the bare base (the model file's name).
    pub base_id: String,
    pub registry: Option<Registry>,
    /// Resident adapter versions, with the tick of their last use (least recently used evicted past
    /// `max_resident`; an evicted one reloads, verified again, when next asked for).
    loaded: Mutex<Resident>,
    /// Most adapter versions kept resident, and most bytes of their weights (the newest loaded is
    /// always kept).
    pub max_resident: usize,
    pub max_resident_bytes: usize,
    uses: std::sync::atomic::AtomicU64,
    /// Times the background loader looked for a newer current version (`background_refreshes`).
    refreshes: std::sync::atomic::AtomicU64,
    /// The version each name was last served at (what answers while a newer current is broken).
    serving: Mutex<HashMap<String, Arc<LoadedAdapter>>>,
    /// Names whose current version fails, with the error.
    broken: Mutex<std::collections::BTreeMap<String, String>>,
    /// The continuous-batching engine, started with the first generation.
    engine: std::sync::OnceLock<Result<crate::engine::Engine, String>>,
    /// Most sequences decoded together in one step.
    pub max_batch: usize,
    /// Most requests waiting for a place in the batch; more are refused with 503.
    pub max_queue: usize,
    /// Prompt positions a prefill runs per step while other sequences decode (what bounds the pause
    /// a long prompt puts into the running streams).
    pub prefill_chunk: usize,
    /// Largest request body, in bytes.
    pub max_request_bytes: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// Where `pai-train report` writes the eval pages, served at `/reports/`.
    pub reports_dir: Option<std::path::PathBuf>,
    /// When any are set, every route wants `Authorization: Bearer <one of them>`.
    pub api_keys: Vec<String>,
    /// What `/metrics` reports.
    pub metrics: crate::metrics::Metrics,
    next_id: std::sync::atomic::AtomicU64,
    generations: std::sync::atomic::AtomicU64,
    /// The background loader's queue of names to bring to their current version.
    loader: std::sync::OnceLock<std::sync::mpsc::Sender<String>>,
    /// The registry watch (`watch_registry`), kept alive with the state.
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
    /// Adapters loaded by path (`/v1/load_lora_adapter`), by name.
    pub(crate) by_path: Mutex<HashMap<String, Arc<LoadedAdapter>>>,
    /// Where adapters may be loaded from by path (none: loading by path is off).
    pub adapter_root: Option<std::path::PathBuf>,
    /// What answers `"model": "auto"` (local only unless cloud tiers are configured).
    pub router: crate::router::Router,
}

/// Bytes an adapter's weights take.
pub fn weight_bytes(adapter: &Adapter) -> usize {
    adapter
        .iter()
        .map(|(_, w)| (w.a.elem_count() + w.b.elem_count()) * w.a.dtype().size_in_bytes())
        .sum()
}

impl ServeState {
    pub fn new(base: BaseModel, registry: Option<Registry>) -> Self {
        let base_id = base.name().to_string();
        Self {
            base,
            base_id,
            registry,
            loaded: Mutex::new(HashMap::new()),
            serving: Mutex::new(HashMap::new()),
            broken: Mutex::new(std::collections::BTreeMap::new()),
            engine: std::sync::OnceLock::new(),
            max_batch: 8,
            max_queue: 64,
            prefill_chunk: 128,
            max_request_bytes: 4 << 20,
            max_tokens_limit: 4096,
            reports_dir: None,
            api_keys: Vec::new(),
            metrics: Default::default(),
            max_resident: 16,
            max_resident_bytes: 1 << 30,
            uses: std::sync::atomic::AtomicU64::new(0),
            refreshes: std::sync::atomic::AtomicU64::new(0),
            next_id: std::sync::atomic::AtomicU64::new(1),
            generations: std::sync::atomic::AtomicU64::new(1),
            by_path: Mutex::new(HashMap::new()),
            loader: std::sync::OnceLock::new(),
            watcher: Mutex::new(None),
            adapter_root: None,
            router: crate::router::Router::local_only(),
        }
    }

    /// The engine that runs generations (started on first use, for this state).
    pub fn engine(self: &Arc<Self>) -> Result<&crate::engine::Engine, ApiError> {
        self.engine
            .get_or_init(|| {
                crate::engine::Engine::start(Arc::downgrade(self), self.max_queue)
                    .map_err(|e| format!("cannot start the engine thread: {e}"))
            })
            .as_ref()
            .map_err(|e| ApiError::internal(e.clone()))
    }

    /// A fresh generation id for a load.
    pub fn next_generation(&self) -> u64 {
        self.generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// A fresh response id suffix.
    pub fn next_id(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Every model id this server answers to: the base, each adapter with a current version, then
    /// those loaded by path.
    pub fn model_ids(&self) -> Vec<String> {
        let mut ids = vec![self.base_id.clone()];
        if let Ok(m) = self.by_path.lock() {
            let mut names: Vec<String> = m.keys().cloned().collect();
            names.sort();
            ids.extend(names);
        }
        if let Some(r) = &self.registry {
            if let Ok(list) = r.list() {
                ids.extend(
                    list.into_iter()
                        .filter(|a| a.current.is_some())
                        .map(|a| a.name),
                );
            }
        }
        ids
    }

    /// What answers a request: `None` for the bare base.
    pub fn resolve(
        self: &Arc<Self>,
        model: &str,
        adapter: Option<&str>,
    ) -> Result<Option<Arc<LoadedAdapter>>, ApiError> {
        let not_found = |what: &str| ApiError::model_not_found(what, &self.model_ids());
        let spec = match (adapter, model.split_once("::")) {
            (Some(a), _) => {
                if model != self.base_id && model != "base" {
                    return Err(not_found(model));
                }
                a
            }
            (None, Some((base, a))) => {
                if base != self.base_id && base != "base" {
                    return Err(not_found(model));
                }
                a
            }
            (None, None) if model == self.base_id || model == "base" => return Ok(None),
            (None, None) => model,
        };
        if let Some(loaded) = self.by_path.lock().ok().and_then(|m| m.get(spec).cloned()) {
            return Ok(Some(loaded));
        }
        let registry = self.registry.as_ref().ok_or_else(|| not_found(spec))?;
        let (name, version) = registry.resolve(spec).map_err(|_| not_found(spec))?;
        if spec.contains('@') {
            // A version asked for by number: that one or an error.
            return self.load(registry, &name, version).map(Some);
        }
        let serving = self.serving.lock().ok().and_then(|m| m.get(&name).cloned());
        match serving {
            Some(served) if served.version == Some(version) => {
                if let Ok(mut broken) = self.broken.lock() {
                    broken.remove(&name);
                }
                Ok(Some(served))
            }
            // A newer current version: the served one answers while the loader brings the new
            // one in (or finds it broken).
            Some(served) => {
                self.refresh_in_background(&name);
                Ok(Some(served))
            }
            // Nothing served yet: this request waits for the first load.
            None => {
                self.refresh(&name, &mut HashSet::new())?;
                self.serving
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&name).cloned())
                    .map(Some)
                    .ok_or_else(|| {
                        ApiError::internal(format!("adapter {name} could not be swapped in"))
                    })
            }
        }
    }

    /// Bring `name`'s served version to its current one: load and verify it, then swap it in (one
    /// pointer under a lock; requests in flight keep the Arc they hold). A version that fails stays
    /// out, is reported in /health (and returned), and is not retried (`failed`) while the served one
    /// answers.
    fn refresh(&self, name: &str, failed: &mut HashSet<(String, Version)>) -> Result<(), ApiError> {
        let Some(registry) = &self.registry else {
            return Ok(());
        };
        let Ok((_, version)) = registry.resolve(name) else {
            return Ok(());
        };
        let served = self
            .serving
            .lock()
            .ok()
            .and_then(|m| m.get(name).map(|a| a.version));
        if served == Some(Some(version)) || failed.contains(&(name.to_string(), version)) {
            return Ok(());
        }
        match self.load(registry, name, version) {
            Ok(loaded) => {
                let generation = loaded.generation;
                if let Ok(mut m) = self.serving.lock() {
                    m.insert(name.to_string(), loaded);
                }
                if let Ok(mut broken) = self.broken.lock() {
                    broken.remove(name);
                }
                tracing::info!(adapter = %name, %version, generation, "swapped in");
                Ok(())
            }
            Err(e) => {
                failed.insert((name.to_string(), version));
                tracing::error!(adapter = %name, %version, error = %e.message, "adapter not served");
                if let Ok(mut broken) = self.broken.lock() {
                    broken.insert(name.to_string(), e.message.clone());
                }
                Err(e)
            }
        }
    }

    /// Ask the background loader to bring `name` to its current version.
    fn refresh_in_background(self: &Arc<Self>, name: &str) {
        let loader = self.loader.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<String>();
            let state = Arc::downgrade(self);
            let started = std::thread::Builder::new()
                .name("pai-loader".into())
                .spawn(move || {
                    let mut failed = HashSet::new();
                    while let Ok(name) = rx.recv() {
                        let Some(s) = state.upgrade() else {
                            return;
                        };
                        // Failures are logged and reported in /health by `refresh`.
                        s.refreshes
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let _ = s.refresh(&name, &mut failed);
                    }
                });
            if let Err(e) = started {
                tracing::error!(error = %e, "cannot start the adapter loader");
            }
            tx
        });
        let _ = loader.send(name.to_string());
    }

    /// Times the background loader has looked for a newer current version of a name (an idle server
    /// looks no more).
    pub fn background_refreshes(&self) -> u64 {
        self.refreshes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Watch the registry's CURRENT pointers and swap each newly promoted version in as soon as it
    /// is promoted, before any request asks for it. The watch lasts as long as the state.
    pub fn watch_registry(self: &Arc<Self>) -> Result<(), notify::Error> {
        use notify::Watcher;
        let Some(registry) = &self.registry else {
            return Ok(());
        };
        let root = registry.root().to_path_buf();
        std::fs::create_dir_all(&root).map_err(notify::Error::io)?;
        let state = Arc::downgrade(self);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let (Ok(event), Some(s)) = (event, state.upgrade()) else {
                    return;
                };
                // A pointer moves by rename (create, modify, remove). Reading one — which the
                // loader itself does — is an access event, and reacting to it would loop forever.
                if matches!(event.kind, notify::EventKind::Access(_)) {
                    return;
                }
                for path in &event.paths {
                    if path.file_name().is_some_and(|n| n == "CURRENT") {
                        if let Some(name) = path.parent().and_then(|p| p.file_name()) {
                            s.refresh_in_background(&name.to_string_lossy());
                        }
                    }
                }
            })?;
        watcher.watch(&root, notify::RecursiveMode::Recursive)?;
        if let Ok(mut w) = self.watcher.lock() {
            *w = Some(watcher);
        }
        // What was promoted while the server was down or starting.
        if let Ok(list) = registry.list() {
            for a in list.into_iter().filter(|a| a.current.is_some()) {
                self.refresh_in_background(&a.name);
            }
        }
        Ok(())
    }

    /// `name@version`, loaded once: verified against the registry's digests, then onto the base
    /// (which checks the adapter's base fingerprint).
    fn load(
        &self,
        registry: &Registry,
        name: &str,
        version: Version,
    ) -> Result<Arc<LoadedAdapter>, ApiError> {
        let key = (name.to_string(), version);
        let tick = self.uses.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if let Ok(mut m) = self.loaded.lock() {
            if let Some((a, used)) = m.get_mut(&key) {
                *used = tick;
                return Ok(a.clone());
            }
        }
        let unavailable = |message: String| ApiError {
            status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
            message,
            kind: "server_error",
            param: Some("model".into()),
            code: "adapter_unavailable",
        };
        let verified = registry
            .verify(name, version)
            .map_err(|e| unavailable(format!("adapter {name}@{version} cannot be served: {e}")))?;
        let adapter = self.base.load_adapter(&verified.dir).map_err(|e| {
            unavailable(format!(
                "adapter {name}@{version} does not load onto this base: {e}"
            ))
        })?;
        let bytes = weight_bytes(&adapter);
        let loaded = Arc::new(LoadedAdapter {
            bytes,
            adapter,
            name: name.to_string(),
            version: Some(version),
            generation: self.next_generation(),
            meta: verified.meta,
        });
        if let Ok(mut m) = self.loaded.lock() {
            m.insert(key, (loaded.clone(), tick));
            // Past the bound, the least recently used go (requests holding one keep their Arc).
            let resident = |m: &Resident| -> usize { m.values().map(|(a, _)| a.bytes).sum() };
            while m.len() > 1
                && (m.len() > self.max_resident || resident(&m) > self.max_resident_bytes)
            {
                let Some(oldest) = m
                    .iter()
                    .min_by_key(|(_, (_, used))| *used)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                m.remove(&oldest);
                tracing::info!(adapter = %oldest.0, version = %oldest.1, "adapter evicted");
            }
        }
        tracing::info!(adapter = %loaded.name, %version, generation = loaded.generation, "adapter loaded");
        Ok(loaded)
    }

    /// Adapter versions resident now.
    pub fn loaded_count(&self) -> usize {
        self.loaded.lock().map_or(0, |m| m.len())
    }

    /// Adapters whose current version cannot be served, with why (for /health).
    pub fn broken(&self) -> Vec<(String, String)> {
        self.broken
            .lock()
            .map(|b| b.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }
}
