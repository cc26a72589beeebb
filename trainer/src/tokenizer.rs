//! Text ↔ token ids through Hugging Face's `tokenizers` crate: a `tokenizer.json` from
//! anywhere (Llama 2's included), a byte-level BPE trained on the run's own text, or the
//! byte tokenizer of the built-in corpus (ids 0–255 are the bytes).
//!
//! Special tokens are found by name: `<s>` / `</s>` (Llama 2, and what this module writes),
//! `<|begin_of_text|>` / `<|end_of_text|>` (Llama 3), `<|endoftext|>` (GPT-2, end only).

use std::path::{Path, PathBuf};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecodeStream, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, Tokenizer,
};

/// The file name a tokenizer is saved under, beside a checkpoint.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";
const BOS_NAMES: [&str; 2] = [BOS, "<|begin_of_text|>"];
const EOS_NAMES: [&str; 3] = [EOS, "<|end_of_text|>", "<|endoftext|>"];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("tokenizer ({origin}): {message}")]
    Tokenizer { origin: String, message: String },
}

type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// A tokenizer and where it came from (for error messages).
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pub origin: String,
}

/// GPT-2's reversible byte ↔ printable-character map: bytes that are printable and not a space
/// stand for themselves, the others for the characters from U+0100 on, in byte order.
fn byte_char(byte: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(byte) {
        char::from(byte)
    } else {
        let rank = (0..byte).filter(|&b| !printable(b)).count() as u32;
        char::from_u32(256 + rank).expect("U+0100..U+0143 are characters")
    }
}

impl TextTokenizer {
    /// Reads a `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let file_error = |message: String| TokenizerError::File { path: path.to_path_buf(), message };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(format!("cannot read: {e}")))?;
        let inner: Tokenizer =
            text.parse().map_err(|e| file_error(format!("not a Hugging Face tokenizer.json: {e}")))?;
        Ok(Self { inner, origin: path.display().to_string() })
    }

    /// The tokenizer of the built-in corpus: one token per byte (id = byte value), `<s>` and
    /// `</s>` after them (ids 256 and 257), `<s>` prepended by `encode(…, true)`.
    pub fn bytes() -> Self {
        let vocab: Vocab = (0..=255u8).map(|b| (byte_char(b).to_string(), u32::from(b))).collect();
        let model =
            BPE::builder().vocab_and_merges(vocab, vec![]).build().expect("a vocabulary without merges");
        let mut inner = Tokenizer::new(model);
        // No regex: with no merges there is nothing to split words for.
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let mut tokenizer = Self { inner, origin: "byte-level".into() };
        tokenizer.add_special(BOS);
        tokenizer.add_special(EOS);
        tokenizer.prepend_bos();
        tokenizer
    }

    /// A byte-level BPE of `vocab_size` tokens (the 256 bytes, `<s>`, `</s>` and learned merges)
    /// trained on `documents`.
    pub fn train_bpe<'a>(documents: impl Iterator<Item = &'a str> + Send, vocab_size: usize) -> Result<Self> {
        let origin = format!("byte-level BPE trained on the data, {vocab_size} tokens");
        let error = |message: String| TokenizerError::Tokenizer { origin: origin.clone(), message };
        if vocab_size < 258 {
            return Err(error("needs a vocabulary of at least 258 (256 bytes, <s>, </s>)".into()));
        }
        let mut trainer: TrainerWrapper = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(BOS, true), AddedToken::from(EOS, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let mut inner = Tokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        inner.train(&mut trainer, documents).map_err(|e| error(format!("training failed: {e}")))?;
        // Round-trip through JSON: `train` leaves the model typed as the trainer's.
        let json = inner.to_string(false).map_err(|e| error(e.to_string()))?;
        let inner: Tokenizer = json.parse().map_err(|e| error(format!("{e}")))?;
        let mut tokenizer = Self { inner, origin };
        tokenizer.prepend_bos();
        Ok(tokenizer)
    }

    /// Makes `encode(…, true)` start with `<s>`, as Llama's tokenizers do.
    fn prepend_bos(&mut self) {
        let bos = self.inner.token_to_id(BOS).expect("<s> was added");
        let template = TemplateProcessing::builder()
            .try_single(format!("{BOS} $A"))
            .and_then(|b| b.special_tokens(vec![(BOS.to_string(), bos)]).build().map_err(|e| e.to_string()))
            .expect("a valid template");
        self.inner.with_post_processor(Some(template));
    }

    /// Tokens in the vocabulary, added tokens included: the smallest model vocabulary that can
    /// read every id this tokenizer produces.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn bos(&self) -> Option<u32> {
        BOS_NAMES.iter().find_map(|name| self.inner.token_to_id(name))
    }

    pub fn eos(&self) -> Option<u32> {
        EOS_NAMES.iter().find_map(|name| self.inner.token_to_id(name))
    }

    /// Token ids of `text`; `with_special` adds what the tokenizer's post-processor adds (`<s>`
    /// for Llama's). Special-token text inside `text` (a literal `</s>`) becomes that special
    /// token: for corpora that mark documents that way. User text (prompts, SFT examples) goes
    /// through [`Self::encode_text`] instead.
    pub fn encode(&self, text: &str, with_special: bool) -> Result<Vec<u32>> {
        let encoding =
            self.inner.encode(text, with_special).map_err(|e| self.error(format!("encoding failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Several texts at once (in parallel), as [`Self::encode`].
    pub fn encode_all(&self, texts: Vec<&str>, with_special: bool) -> Result<Vec<Vec<u32>>> {
        let encodings = self
            .inner
            .encode_batch(texts, with_special)
            .map_err(|e| self.error(format!("encoding failed: {e}")))?;
        Ok(encodings.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Token ids of user text. Unless `parse_special`, special-token text inside it (`</s>`,
    /// `<s>`, an SFT separator) is encoded as the ordinary text it is, as Llama 2's reference
    /// encoding does (SentencePiece on the user's text; the special ids come only from the
    /// format); with `parse_special`, as [`Self::encode`]. `with_special` as in
    /// [`Self::encode`].
    pub fn encode_text(&self, text: &str, with_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        if parse_special {
            return self.encode(text, with_special);
        }
        let encoding = self
            .literal()
            .encode(text, with_special)
            .map_err(|e| self.error(format!("encoding failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Several texts at once (in parallel), as [`Self::encode_text`].
    pub fn encode_all_text(
        &self,
        texts: Vec<&str>,
        with_special: bool,
        parse_special: bool,
    ) -> Result<Vec<Vec<u32>>> {
        if parse_special {
            return self.encode_all(texts, with_special);
        }
        let encodings = self
            .literal()
            .encode_batch(texts, with_special)
            .map_err(|e| self.error(format!("encoding failed: {e}")))?;
        Ok(encodings.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// A copy that reads special-token text as ordinary text (`tokenizers`'
    /// `encode_special_tokens`: special added tokens are not split out; the setting is not
    /// saved in `tokenizer.json`, so the copy is made here rather than stored).
    fn literal(&self) -> Tokenizer {
        let mut literal = self.inner.clone();
        literal.set_encode_special_tokens(true);
        literal
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| self.error(format!("decoding failed: {e}")))
    }

    /// A decoder fed one id at a time that returns text once it is whole (a character's bytes
    /// may come in several tokens).
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder { inner: self.inner.decode_stream(true), origin: &self.origin }
    }

    /// Adds `token` as a special token (never split, never merged) unless present; its id.
    pub fn add_special(&mut self, token: &str) -> u32 {
        if let Some(id) = self.inner.token_to_id(token) {
            return id;
        }
        self.inner.add_special_tokens(&[AddedToken::from(token, true)]);
        self.inner.token_to_id(token).expect("just added")
    }

    /// The `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| self.error(format!("cannot serialise: {e}")))
    }

    /// Refuses a tokenizer whose ids reach past the model's vocabulary.
    pub fn check_fits(&self, vocab_size: usize, model: &str) -> Result<()> {
        if self.vocab_size() > vocab_size {
            return Err(self.error(format!(
                "has {} tokens, more than the vocabulary of {vocab_size} of {model}",
                self.vocab_size()
            )));
        }
        Ok(())
    }

    fn error(&self, message: String) -> TokenizerError {
        TokenizerError::Tokenizer { origin: self.origin.clone(), message }
    }
}

/// See [`TextTokenizer::stream_decoder`].
pub struct StreamDecoder<'a> {
    inner: DecodeStream<
        'a,
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >,
    origin: &'a str,
}

impl StreamDecoder<'_> {
    /// The text `id` completes (empty while a character is still partial).
    pub fn push(&mut self, id: u32) -> Result<String> {
        let text = self.inner.step(id).map_err(|e| TokenizerError::Tokenizer {
            origin: self.origin.to_string(),
            message: format!("decoding token {id} failed: {e}"),
        })?;
        Ok(text.unwrap_or_default())
    }
}
