//! Print the top-5 next-token logits for a prompt (control tokens parsed): a debugging aid for
//! comparing pai's numerics with another runtime. `cargo run --release -p pai-model --example
//! top_logits -- MODEL PROMPT`
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use pai_model::{AdapterStack, BaseModel};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(model), Some(prompt)) = (args.next(), args.next()) else {
        return Err("usage: top_logits MODEL PROMPT".into());
    };
    let base = BaseModel::load(&PathBuf::from(model), &Device::Cpu)?;
    let ids = base.tokenizer.encode(&prompt, true)?;
    let mut cache = base.model.new_cache(ids.len());
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let logits = base
        .model
        .forward_last(&input, &mut cache, &AdapterStack::NONE)?
        .squeeze(0)?
        .to_vec1::<f32>()?;
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    for &i in idx.iter().take(5) {
        println!(
            "{i:6} {:10.4} {:?}",
            logits[i],
            base.tokenizer.token_piece(i as u32)
        );
    }
    Ok(())
}
