//! pai-pipeline: what ties pai's stages into the nightly loop. `config`: `pai.toml` layered on the
//! defaults embedded from `configs/default.toml` and on `PAI_*` variables, with where each value came
//! from. `nightly`: the stages of a night in order, recorded in `runs/<id>/state.json` so that a killed
//! run resumes where it stopped, one run at a time (`lock`). `schedule`: the built-in scheduler and
//! the entries for the system's own.

pub mod config;
pub mod error;
mod layers;
pub mod lock;
pub mod nightly;
pub mod schedule;

pub use config::{Config, LoadedConfig, NightlySettings, Origin, ScheduleSettings, ServeSettings};
pub use error::{PipelineError, Result};
pub use nightly::{
    run_nightly, Evaluated, Ingested, NightlyOptions, Outcome, RunState, Stage, StageFailed,
    Stages, Trained,
};
