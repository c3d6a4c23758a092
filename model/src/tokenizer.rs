//! The tokenizer: built from GGUF metadata (`tokenizer.ggml.*`, byte-level BPE or SentencePiece) or
//! read from a Hugging Face `tokenizer.json`, with a `tokenizers::Tokenizer` underneath.
//!
//! Two encoders are kept: one that turns control-token text (`<|im_start|>`) into the control token, for
//! prompts pai renders itself, and one that leaves such text as text, for anything a user wrote, so a
//! note containing chat markup can never forge a turn.

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

use crate::config::GgufMeta;
use crate::error::{ModelError, Result};

/// Texts of control tokens that end a turn or a document in the common chat formats.
const END_OF_GENERATION: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "</s>",
    "<|return|>",
    "<EOT>",
];

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;
const TOKEN_TYPE_BYTE: i64 = 6;

/// Llama 3's pre-tokenizer regex (numbers in groups of up to three digits).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer regex (single digits).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A model's tokenizer and its special ids.
#[derive(Clone)]
pub struct Tokenizer {
    with_control: tokenizers::Tokenizer,
    plain: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    end_of_generation: Vec<u32>,
    origin: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("origin", &self.origin)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

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

    /// Read a Hugging Face `tokenizer.json` (and `tokenizer_config.json` beside it, if present, for
    /// the BOS/EOS tokens and whether to add BOS).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let mut json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: path.clone(),
                what: "tokenizer.json",
                source,
            })?;
        let lib_err = |source| ModelError::TokenizerLib {
            origin: origin.clone(),
            source,
        };
        let with_control: tokenizers::Tokenizer = text.parse().map_err(lib_err)?;
        // The plain encoder is the same tokenizer with the special added tokens taken out.
        if let Some(added) = json.get_mut("added_tokens").and_then(|v| v.as_array_mut()) {
            added.retain(|t| !t.get("special").and_then(|s| s.as_bool()).unwrap_or(false));
        }
        let plain: tokenizers::Tokenizer = json.to_string().parse().map_err(lib_err)?;

        let config = read_tokenizer_config(dir)?;
        let token_id = |field: &str| -> Option<u32> {
            let v = config.get(field)?;
            let text = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            with_control.token_to_id(text)
        };
        let bos = token_id("bos_token");
        let eos = token_id("eos_token");
        let add_bos = config
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let mut end_of_generation: Vec<u32> = eos.into_iter().collect();
        for text in END_OF_GENERATION {
            if let Some(id) = with_control
                .get_added_vocabulary()
                .token_to_id(text, with_control.get_model())
            {
                end_of_generation.push(id);
            }
        }
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

    fn from_parts(
        with_control: tokenizers::Tokenizer,
        plain: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
        mut end_of_generation: Vec<u32>,
        origin: String,
    ) -> Self {
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        Self {
            with_control,
            plain,
            bos,
            eos,
            add_bos,
            end_of_generation,
            origin,
        }
    }

    /// Token ids of `text`, no BOS. With `parse_control`, control-token text becomes control tokens
    /// (for templates pai renders); without, it is tokenized as ordinary text (for user content).
    pub fn encode(&self, text: &str, parse_control: bool) -> Result<Vec<u32>> {
        let tok = if parse_control {
            &self.with_control
        } else {
            &self.plain
        };
        let enc = tok
            .encode_fast(text, false)
            .map_err(|source| ModelError::TokenizerLib {
                origin: self.origin.clone(),
                source,
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids for a prompt the model reads from the start: BOS first when the model wants it.
    pub fn encode_prompt(&self, text: &str, parse_control: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.push(bos);
        }
        ids.extend(self.encode(text, parse_control)?);
        Ok(ids)
    }

    /// Text of `ids`; control tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.with_control
            .decode(ids, skip_special)
            .map_err(|source| ModelError::TokenizerLib {
                origin: self.origin.clone(),
                source,
            })
    }

    /// The vocabulary entry of one token, as stored (byte-level form for GPT-2 vocabularies).
    pub fn token_piece(&self, id: u32) -> Option<String> {
        self.with_control.id_to_token(id)
    }

    pub fn token_id(&self, piece: &str) -> Option<u32> {
        self.with_control.token_to_id(piece)
    }

    pub fn vocab_size(&self) -> usize {
        self.with_control.get_vocab_size(true)
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Tokens after which generation stops (EOS, end of turn).
    pub fn end_of_generation(&self) -> &[u32] {
        &self.end_of_generation
    }

    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }

    /// Text of the BOS/EOS tokens, for chat templates that print them.
    pub fn bos_text(&self) -> Option<String> {
        self.bos.and_then(|id| self.token_piece(id))
    }

    pub fn eos_text(&self) -> Option<String> {
        self.eos.and_then(|id| self.token_piece(id))
    }

    /// The underlying `tokenizers` object (control tokens recognised), e.g. to save as tokenizer.json.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.with_control
    }

    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }
}

/// Turns a stream of token ids into text pieces, holding back a piece while it ends inside a UTF-8
/// character that the next token completes.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder<'_> {
    /// Add a token; returns the new text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Whatever text is still held back (an incomplete character at the very end of the stream).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            Ok(Some(full[prefix.len()..].to_string()))
        } else {
            Ok(None)
        }
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

fn read_tokenizer_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(serde_json::Value::Null);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path,
        what: "tokenizer_config.json",
        source,
    })
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
