//! pai-serve's routes on a tiny random model and a registry in a temporary home, driven with
//! `tower::ServiceExt::oneshot` (no sockets).

mod adapters;
mod api;
mod batching;
mod router;
mod shutdown;

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use pai_adapters::{AdapterMeta, BaseFingerprint, DatasetInfo, Registry};
use pai_model::testing::{TinyModel, TinySpec};
use pai_model::{Adapter, BaseModel, LoraConfig, LoraSite, LoraWeights, Proj};
use pai_serve::ServeState;

/// A server over a tiny model whose registry holds `personal` v1 (promoted), with random weights
/// large enough to change what the model says.
pub fn server(dir: &Path) -> (Arc<ServeState>, Registry) {
    let path = TinyModel::new(TinySpec::default())
        .expect("tiny model")
        .write_gguf(&dir.join("tiny.gguf"), GgmlDType::Q8_0)
        .expect("write gguf");
    let base = BaseModel::load(&path, &Device::Cpu).expect("load");
    let home = dir.join("home");
    let registry = Registry::new(&home);
    add_random_adapter(&registry, &base, dir, "personal");
    (
        Arc::new(ServeState::new(base, Some(Registry::new(&home)))),
        registry,
    )
}

/// Add and promote a new version of `name` with random q/v weights.
pub fn add_random_adapter(registry: &Registry, base: &BaseModel, dir: &Path, name: &str) {
    let peft = write_random_peft(base, &dir.join(format!("peft-{name}")), name);
    let meta = AdapterMeta {
        base: BaseFingerprint {
            sha256: base.sha256().expect("sha").to_string(),
            name: Some(base.name().into()),
            path: None,
        },
        dataset: Some(DatasetInfo {
            day: "2026-12-01".into(),
            hash: "d5e7".into(),
            ..Default::default()
        }),
        created: "2026-12-02T00:00:00Z".into(),
        ..Default::default()
    };
    let v = registry.add(name, &peft, meta).expect("add");
    registry.promote(name, v, "test").expect("promote");
}

/// A PEFT directory at `peft` with random q/v weights for `base`.
pub fn write_random_peft(base: &BaseModel, peft: &Path, name: &str) -> std::path::PathBuf {
    let cfg = base.model.config().clone();
    let r = 4;
    let weights = (0..cfg.num_layers).flat_map(|layer| {
        [Proj::Q, Proj::V].map(|proj| {
            let heads = if proj == Proj::Q {
                cfg.num_heads
            } else {
                cfg.num_kv_heads
            };
            let (out, inp) = (heads * cfg.head_dim, cfg.hidden_size);
            let a = Tensor::randn(0f32, 0.5, (r, inp), &Device::Cpu).expect("a");
            let b = Tensor::randn(0f32, 0.5, (out, r), &Device::Cpu).expect("b");
            (
                LoraSite { layer, proj },
                LoraWeights {
                    a,
                    b,
                    scale: 2.0,
                    dropout: None,
                },
            )
        })
    });
    let config = LoraConfig {
        r,
        alpha: 8.0,
        use_rslora: false,
        dropout: 0.0,
        target_modules: vec![Proj::Q, Proj::V],
        layers: None,
        base_model_name_or_path: Some(base.name().to_string()),
    };
    let adapter = Adapter::new(name, config, cfg.num_layers, weights);
    std::fs::create_dir_all(peft).expect("mkdir");
    adapter.save_peft(peft).expect("save");
    peft.to_path_buf()
}

/// One request through the app: status, `x-pai-adapter`, body.
pub async fn call(
    app: axum::Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Option<String>, String) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body.map_or(Body::empty(), |b| Body::from(b.to_string())))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let adapter = resp
        .headers()
        .get("x-pai-adapter")
        .map(|v| v.to_str().unwrap().to_string());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        adapter,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

pub fn json_of(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}
