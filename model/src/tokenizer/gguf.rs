//! Building a [`Tokenizer`] from the `tokenizer.ggml.*` metadata of a GGUF file, the way llama.cpp
//! reads it: byte-level BPE (`gpt2`) with the pre-tokenizer `tokenizer.ggml.pre` names, or SentencePiece
//! (`llama`) as a byte-fallback BPE whose merges follow the piece scores.

use std::collections::HashSet;
use std::path::Path;

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use super::{Tokenizer, END_OF_GENERATION};
use crate::config::GgufMeta;
use crate::error::{ModelError, Result};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;
const TOKEN_TYPE_BYTE: i64 = 6;

/// Llama 3's pre-tokenizer regex (numbers in groups of up to three digits).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer regex (single digits).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Tokenizer {
    /// Build the tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata.
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let meta = GgufMeta { content, path };
        let origin = path.display().to_string();
        let fail = |reason: String| ModelError::Tokenizer {
            origin: origin.clone(),
            reason,
        };
        let kind = meta.string("tokenizer.ggml.model")?;
        let tokens = meta
            .string_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| fail("missing tokenizer.ggml.tokens".into()))?;
        let types = int_array(&meta, "tokenizer.ggml.token_type")?;
        let token_type = |i: usize| types.as_ref().and_then(|t| t.get(i).copied()).unwrap_or(1);

        let (base, add_bos_default) = match kind.as_str() {
            "gpt2" => {
                let merges = meta
                    .string_array("tokenizer.ggml.merges")?
                    .ok_or_else(|| fail("missing tokenizer.ggml.merges".into()))?;
                let pre = match meta.get("tokenizer.ggml.pre") {
                    Some(_) => meta.string("tokenizer.ggml.pre")?,
                    None => {
                        tracing::warn!(file = %origin, "GGUF has no tokenizer.ggml.pre; using GPT-2 pre-tokenization");
                        "gpt-2".into()
                    }
                };
                (bpe_tokenizer(&tokens, &merges, &pre, &origin)?, false)
            }
            "llama" => {
                let scores = float_array(&meta, "tokenizer.ggml.scores")?
                    .ok_or_else(|| fail("missing tokenizer.ggml.scores".into()))?;
                let add_space_prefix = meta
                    .opt_bool("tokenizer.ggml.add_space_prefix")?
                    .unwrap_or(true);
                let unk = meta.opt_u32("tokenizer.ggml.unknown_token_id")?;
                let types: Vec<i64> = (0..tokens.len()).map(token_type).collect();
                (
                    spm_tokenizer(&tokens, &scores, &types, unk, add_space_prefix, &origin)?,
                    true,
                )
            }
            other => {
                return Err(fail(format!(
                    "tokenizer.ggml.model `{other}` is not supported (gpt2 and llama are)"
                )))
            }
        };

        let bos = meta.opt_u32("tokenizer.ggml.bos_token_id")?;
        let eos = meta.opt_u32("tokenizer.ggml.eos_token_id")?;
        let add_bos = meta
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(add_bos_default);

        let mut control = Vec::new();
        let mut user_defined = Vec::new();
        let mut special_ids: HashSet<u32> = [bos, eos].into_iter().flatten().collect();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            special_ids.extend(meta.opt_u32(key)?);
        }
        for (i, text) in tokens.iter().enumerate() {
            let t = token_type(i);
            if t == TOKEN_TYPE_CONTROL || special_ids.contains(&(i as u32)) {
                control.push(text.clone());
            } else if t == TOKEN_TYPE_USER_DEFINED {
                user_defined.push(text.clone());
            }
        }
        let mut end_of_generation: Vec<u32> = eos.into_iter().collect();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            end_of_generation.extend(meta.opt_u32(key)?);
        }
        for (i, text) in tokens.iter().enumerate() {
            if token_type(i) == TOKEN_TYPE_CONTROL && END_OF_GENERATION.contains(&text.as_str()) {
                end_of_generation.push(i as u32);
            }
        }
        // Control tokens are matched in text only by the `with_control` encoder; user-defined ones by
        // both, as llama.cpp does.
        let lib_err = |source| ModelError::TokenizerLib {
            origin: origin.clone(),
            source,
        };
        let added = |text: &String, special: bool| {
            AddedToken::from(text.clone(), special)
                .normalized(false)
                .single_word(false)
                .lstrip(false)
                .rstrip(false)
        };
        let mut plain = base;
        plain
            .add_tokens(user_defined.iter().map(|t| added(t, false)))
            .map_err(lib_err)?;
        let mut with_control = plain.clone();
        with_control
            .add_special_tokens(control.iter().map(|t| added(t, true)))
            .map_err(lib_err)?;
        Ok(Self::from_parts(
            with_control,
            plain,
            bos,
            eos,
            add_bos,
            end_of_generation,
            origin,
        ))
    }
}

fn int_array(meta: &GgufMeta, key: &str) -> Result<Option<Vec<i64>>> {
    use gguf_file::Value as V;
    let Some(v) = meta.get(key) else {
        return Ok(None);
    };
    let items = v.to_vec().map_err(|e| meta.bad(key, e.to_string()))?;
    items
        .iter()
        .map(|x| match x {
            V::I32(n) => Ok(i64::from(*n)),
            V::U32(n) => Ok(i64::from(*n)),
            V::I64(n) => Ok(*n),
            V::U8(n) => Ok(i64::from(*n)),
            V::I8(n) => Ok(i64::from(*n)),
            other => Err(meta.bad(key, format!("expected integers, found {other:?}"))),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn float_array(meta: &GgufMeta, key: &str) -> Result<Option<Vec<f32>>> {
    let Some(v) = meta.get(key) else {
        return Ok(None);
    };
    let items = v.to_vec().map_err(|e| meta.bad(key, e.to_string()))?;
    items
        .iter()
        .map(|x| x.to_f32().map_err(|e| meta.bad(key, e.to_string())))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// The pre-tokenizer llama.cpp uses for a `tokenizer.ggml.pre` value; unknown values are refused
/// rather than guessed.
fn bpe_pre_tokenizer(pre: &str, origin: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(pattern.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|source| ModelError::TokenizerLib {
            origin: origin.into(),
            source,
        })?;
        Ok(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, false, false).into(),
        ])
        .into())
    };
    Ok(match pre {
        "gpt-2" | "gpt2" | "default" => (ByteLevel::new(false, false, true).into(), false),
        "smollm" | "starcoder" | "refact" => (
            Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, false, true).into(),
            ])
            .into(),
            false,
        ),
        "llama3" | "llama-bpe" | "llama-v3" => (split(LLAMA3_PATTERN)?, true),
        "qwen2" => (split(QWEN2_PATTERN)?, false),
        other => {
            return Err(ModelError::Tokenizer {
                origin: origin.into(),
                reason: format!(
                    "tokenizer.ggml.pre `{other}` is not supported \
                     (gpt-2, smollm, starcoder, refact, llama-bpe, qwen2 are)"
                ),
            })
        }
    })
}

fn bpe_tokenizer(
    tokens: &[String],
    merges: &[String],
    pre: &str,
    origin: &str,
) -> Result<tokenizers::Tokenizer> {
    let fail = |reason: String| ModelError::Tokenizer {
        origin: origin.into(),
        reason,
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| fail(format!("merge `{m}` has no space")))
        })
        .collect::<Result<Vec<_>>>()?;
    let (pre_tokenizer, ignore_merges) = bpe_pre_tokenizer(pre, origin)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|source| ModelError::TokenizerLib {
            origin: origin.into(),
            source,
        })?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(DecoderWrapper::from(ByteLevelDecoder::default())));
    Ok(tok)
}

/// A SentencePiece (llama) vocabulary as a byte-fallback BPE: a pair merges when the merged piece is in
/// the vocabulary, higher-scoring merged pieces first, which is the order llama.cpp's SPM tokenizer
/// merges in.
fn spm_tokenizer(
    tokens: &[String],
    scores: &[f32],
    types: &[i64],
    unk: Option<u32>,
    add_space_prefix: bool,
    origin: &str,
) -> Result<tokenizers::Tokenizer> {
    let lib_err = |source| ModelError::TokenizerLib {
        origin: origin.into(),
        source,
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let score = |i: usize| scores.get(i).copied().unwrap_or(0.0);
    let mergeable = |i: usize| !matches!(types.get(i), Some(&t) if t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_BYTE || t == TOKEN_TYPE_UNKNOWN);
    let mut merges: Vec<(f32, u32, u32, String, String)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        if !mergeable(i) || piece.chars().count() < 2 {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                if mergeable(l as usize) && mergeable(r as usize) {
                    merges.push((score(i), l, r, left.to_string(), right.to_string()));
                }
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges = merges.into_iter().map(|(_, _, _, l, r)| (l, r)).collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk.and_then(|u| tokens.get(u as usize)) {
        builder = builder.unk_token(unk.clone());
    }
    let bpe = builder.build().map_err(lib_err)?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new("▁".into()).into());
    }
    normalizers.push(Replace::new(" ", "▁").map_err(lib_err)?.into());
    tok.with_normalizer(Some(tokenizers::normalizers::Sequence::new(normalizers)))
        .map_err(lib_err)?;
    let mut decoders: Vec<DecoderWrapper> = Vec::new();
    decoders.push(Replace::new("▁", " ").map_err(lib_err)?.into());
    decoders.push(ByteFallback::default().into());
    decoders.push(Fuse::default().into());
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tok)
}
