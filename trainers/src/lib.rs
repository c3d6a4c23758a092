//! pai-trainers: LoRA training on pai-model's frozen (quantized) base.
//!
//! Examples from the dataset become documents ([`data`]), packed into rows with no attention across
//! document boundaries; the loss ([`loss`]) covers completions only where an example has a prompt;
//! AdamW ([`optim`]) updates only the LoRA pairs ([`params`]); [`trainer`] runs the loop with
//! checkpoints ([`checkpoint`]) that resume to the same result.

mod attention_grad;
mod block_grad;
pub mod checkpoint;
pub mod config;
pub mod data;
mod elementwise_grad;
pub mod error;
pub mod loss;
pub mod optim;
pub mod params;
mod rng;
pub mod step;
pub mod trainer;

pub use config::{Strategy, TrainConfig};
pub use data::{fit_to_rows, Cursor, DocEncoder, Packer, Row, TrainDoc};
pub use error::{BoxError, Result, TrainError};
pub use loss::weighted_cross_entropy;
pub use params::LoraParams;
pub use trainer::{
    eval_rows, holdout_loss, train, RetentionGuard, RetentionLosses, RetentionScore, StepMetrics,
    StopReason, TrainJob, TrainOutcome,
};
