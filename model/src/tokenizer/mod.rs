//! The tokenizer: built from GGUF metadata (`tokenizer.ggml.*`, byte-level BPE or SentencePiece) or
//! read from a Hugging Face `tokenizer.json`, with a `tokenizers::Tokenizer` underneath.
//!
//! Two encoders are kept: one that turns control-token text (`<|im_start|>`) into the control token, for
//! prompts pai renders itself, and one that leaves such text as text, for anything a user wrote, so a
//! note containing chat markup can never forge a turn.
//!
//! `gguf.rs` builds the tokenizer from GGUF metadata; this file holds the tokenizer itself, reading a
//! `tokenizer.json`, and streaming decode.

mod count;
mod gguf;
mod gpt2_split;

use std::path::Path;
use std::sync::Arc;

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
    /// Word → token count cache behind `count`, when counting by words is exact (see count.rs).
    word_counts: Option<Arc<count::WordCounts>>,
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
    /// The tokenizer of a model, without its weights: from a GGUF file's metadata, or from a Hugging
    /// Face directory's `tokenizer.json`.
    pub fn from_model_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Self::from_hf_dir(path);
        }
        let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        let content =
            candle_core::quantized::gguf_file::Content::read(&mut file).map_err(|source| {
                ModelError::Gguf {
                    path: path.to_path_buf(),
                    source: Box::new(source),
                }
            })?;
        Self::from_gguf(&content, path)
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
        let word_counts = count::WordCounts::for_tokenizer(&plain).map(Arc::new);
        Self {
            word_counts,
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

    /// How many tokens `encode(text, false)` gives, without building them: by cached word counts where
    /// that is exact for this tokenizer (byte-level BPE with the GPT-2 split), else by encoding.
    pub fn count(&self, text: &str) -> Result<usize> {
        if let Some(words) = &self.word_counts {
            let count_word = |w: &str| {
                words
                    .count_word(&self.plain, w)
                    .or_else(|| self.encode(w, false).ok().map(|ids| ids.len()))
            };
            if let Some(n) = words.count(text, count_word) {
                return Ok(n);
            }
        }
        self.encode(text, false).map(|ids| ids.len())
    }

    /// How many tokens `a + sep + b` has, given the counts of `a` and `b` (as `count` gives them): by
    /// counting only the words around the seam where the word counts make that exact, else by
    /// counting the joined text. Ingest builds examples by joining pieces it has already counted.
    pub fn count_join(
        &self,
        a: &str,
        a_tokens: usize,
        sep: &str,
        b: &str,
        b_tokens: usize,
    ) -> Result<usize> {
        if self.word_counts.is_none() {
            return self.count(&[a, sep, b].concat());
        }
        let (tail, head) = count::seams(a, b);
        let (tail, head) = (&a[tail..], &b[..head]);
        let inner = self.count(&[tail, sep, head].concat())?;
        let outer = (a_tokens + b_tokens).saturating_sub(self.count(tail)? + self.count(head)?);
        Ok(outer + inner)
    }

    /// Whether `count` sums cached word counts (rather than encoding every text).
    pub fn counts_by_words(&self) -> bool {
        self.word_counts.is_some()
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

    /// The bytes one token stands for, even when they are only part of a character (what OpenAI's
    /// logprobs report as `bytes`): a byte-level vocabulary's piece mapped back through GPT-2's
    /// alphabet, a byte-fallback piece `<0xAB>` as its byte, otherwise the token's decoded text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let decoded = || self.decode(&[id], false).unwrap_or_default().into_bytes();
        let Some(piece) = self.token_piece(id) else {
            return decoded();
        };
        let fallback_byte = piece
            .strip_prefix("<0x")
            .and_then(|h| h.strip_suffix('>'))
            .filter(|h| h.len() == 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        if let Some(b) = fallback_byte {
            return vec![b];
        }
        let byte_level = matches!(
            self.with_control.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        if byte_level {
            let bytes: Option<Vec<u8>> = piece
                .chars()
                .map(|c| (0..=255u8).find(|&b| gpt2_split::byte_level_char(b) == c))
                .collect();
            if let Some(bytes) = bytes {
                return bytes;
            }
        }
        decoded()
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
