//! Supervised fine-tuning data, Llama 2's way: each example is encoded as
//! `<s> prompt <sep> response </s>`, examples are concatenated (packed) into full sequences, and
//! only the response tokens and `</s>` are targets; prompt, `<s>` and separator targets are
//! `-100`, so the fused cross-entropy skips them and the loss is the mean over answer tokens.
//! The special ids come from this format only: text that spells a special token inside a prompt
//! or response (`</s>`, the separator) is encoded as that text, as in Llama 2, unless
//! [`SpecialIds::parse_special`] asks otherwise.
//!
//! Packing: in epoch `e` the examples are taken in an order shuffled by the seed and `e`, and
//! concatenated into rows of `T + 1` tokens (a row's inputs are its first `T`, its targets its
//! last `T`); an example that would not fit in the rest of a row starts the next one, and the
//! rest is padding whose targets are ignored. So no example is split across rows (a split one
//! would have answers without their prompt), every row starts with an example's `<s>` exactly
//! as generation does, and every example is seen once per epoch. Micro-batch `k` of an epoch is
//! rows `[k·B, k·B + B)` (the last padded with empty rows); an optimizer step takes `K`
//! consecutive micro-batches of one epoch (the epoch's last step may take fewer). The number of
//! rows depends on the order, so each epoch has its own step count, known in advance.

use crate::data::DataError;
use crate::tokenizer::TextTokenizer;
use kernels::cross_entropy::IGNORE_INDEX;
use model::init::SplitMix64;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The special token between prompt and response unless `--separator` says otherwise.
pub const DEFAULT_SEPARATOR: &str = "<|response|>";

/// One line of the JSON Lines input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub prompt: String,
    pub response: String,
}

/// What happens to an example longer than the sequence length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Overlong {
    /// Keep its first `seq_len` tokens (dropped anyway if no answer token is left).
    Truncate,
    Drop,
}

impl std::str::FromStr for Overlong {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "truncate" => Ok(Self::Truncate),
            "drop" => Ok(Self::Drop),
            other => Err(format!("`{other}`: expected truncate or drop")),
        }
    }
}

/// The SFT part of a run's record (saved with checkpoints so a resume rebuilds the same data).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SftOptions {
    pub epochs: u64,
    pub separator: String,
    pub overlong: Overlong,
    /// See [`SpecialIds::parse_special`] (absent in runs saved before it existed: off).
    #[serde(default)]
    pub parse_special_tokens: bool,
}

/// Reads `{"prompt": …, "response": …}` lines; blank lines are skipped.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>, DataError> {
    let text = crate::data::read_text(path)?;
    let error = |message: String| DataError::Format { path: path.to_path_buf(), message };
    let mut examples = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let example: Example = serde_json::from_str(line).map_err(|e| {
            error(format!(
                "line {}: {e} (each line must be {{\"prompt\": \"…\", \"response\": \"…\"}})",
                index + 1
            ))
        })?;
        examples.push(example);
    }
    if examples.is_empty() {
        return Err(error("holds no examples (expected JSON Lines of {\"prompt\", \"response\"})".into()));
    }
    Ok(examples)
}

/// An encoded example: `tokens[answer_from..]` are the response and `</s>`.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub tokens: Vec<u32>,
    pub answer_from: usize,
}

/// What encoding did to the examples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodeReport {
    pub kept: usize,
    pub truncated: usize,
    pub dropped: usize,
    pub tokens: usize,
    pub answer_tokens: usize,
}

/// The token ids SFT needs from a tokenizer, and how the text between them is read.
#[derive(Clone, Copy, Debug)]
pub struct SpecialIds {
    pub bos: u32,
    pub separator: u32,
    pub eos: u32,
    /// Special-token text inside prompts and responses (a typed `</s>` or separator) becomes
    /// those tokens. Off by default ([`SpecialIds::of`]): it is encoded as the text it is, and
    /// the special ids come only from the format, as in Llama 2
    /// ([`TextTokenizer::encode_text`]).
    pub parse_special: bool,
}

impl SpecialIds {
    /// `<s>`, `</s>` and the separator of `tokenizer`; the separator must already be in it
    /// ([`TextTokenizer::add_special`]).
    pub fn of(tokenizer: &TextTokenizer, separator: &str) -> Result<Self, crate::TrainError> {
        let missing = |what: &str| {
            crate::TrainError::Options(format!(
                "the tokenizer ({}) has no {what} token; SFT encodes <s> prompt {separator} response </s>",
                tokenizer.origin
            ))
        };
        Ok(Self {
            bos: tokenizer.bos().ok_or_else(|| missing("beginning-of-sequence"))?,
            eos: tokenizer.eos().ok_or_else(|| missing("end-of-sequence"))?,
            separator: tokenizer.token_to_id(separator).ok_or_else(|| missing(separator))?,
            parse_special: false,
        })
    }

    /// The same ids, with special-token text inside the examples parsed or not.
    pub fn parsing_special(self, parse_special: bool) -> Self {
        Self { parse_special, ..self }
    }

    /// `<s> prompt <sep>`: what generation continues to answer a prompt.
    pub fn prompt_tokens(
        &self,
        tokenizer: &TextTokenizer,
        prompt: &str,
    ) -> Result<Vec<u32>, crate::TrainError> {
        let mut tokens = vec![self.bos];
        tokens.extend(tokenizer.encode_text(prompt, false, self.parse_special)?);
        tokens.push(self.separator);
        Ok(tokens)
    }
}

/// Encodes every example as `<s> prompt <sep> response </s>`, applying `overlong` to those
/// longer than `max_tokens`. The special ids come from the format; text inside prompt and
/// response is read as `ids.parse_special` says.
pub fn encode(
    tokenizer: &TextTokenizer,
    ids: SpecialIds,
    examples: &[Example],
    max_tokens: usize,
    overlong: Overlong,
) -> Result<(Vec<Encoded>, EncodeReport), crate::TrainError> {
    let text = |field: fn(&Example) -> &str| {
        tokenizer.encode_all_text(examples.iter().map(field).collect(), false, ids.parse_special)
    };
    let prompts = text(|e| e.prompt.as_str())?;
    let responses = text(|e| e.response.as_str())?;
    let mut report = EncodeReport::default();
    let mut out = Vec::with_capacity(examples.len());
    for (prompt, response) in prompts.into_iter().zip(responses) {
        let mut tokens = Vec::with_capacity(prompt.len() + response.len() + 3);
        tokens.push(ids.bos);
        tokens.extend(prompt);
        tokens.push(ids.separator);
        let answer_from = tokens.len();
        tokens.extend(response);
        tokens.push(ids.eos);
        if tokens.len() > max_tokens {
            if overlong == Overlong::Drop || answer_from >= max_tokens {
                report.dropped += 1;
                continue;
            }
            tokens.truncate(max_tokens);
            report.truncated += 1;
        }
        report.kept += 1;
        report.tokens += tokens.len();
        report.answer_tokens += tokens.len() - answer_from;
        out.push(Encoded { tokens, answer_from });
    }
    Ok((out, report))
}

/// How examples are packed into micro-batches.
#[derive(Clone, Copy, Debug)]
pub struct Packing {
    /// Rows per micro-batch.
    pub batch: usize,
    /// Inputs per row (a row holds `seq + 1` tokens).
    pub seq: usize,
    /// Seeds the per-epoch order.
    pub seed: u64,
    /// Off keeps the file's order in every epoch (held-out sets).
    pub shuffle: bool,
    /// The id of padding (its targets are ignored).
    pub pad: u32,
}

/// Packed, masked micro-batches over a set of encoded examples (see the module's rule).
pub struct SftBatches {
    pub path: PathBuf,
    examples: Vec<Encoded>,
    packing: Packing,
    /// Micro-batches of each epoch counted so far.
    micro_batches: Vec<u64>,
    /// The current epoch's rows, `seq + 1` tokens each, and whether each token is an answer.
    cached: Option<(u64, Vec<u32>, Vec<bool>)>,
}

impl SftBatches {
    /// Every example must have at most `seq + 1` tokens ([`encode`] with `max_tokens ≤ seq + 1`
    /// ensures it).
    pub fn new(path: PathBuf, examples: Vec<Encoded>, packing: Packing) -> Self {
        assert!(examples.iter().all(|e| e.tokens.len() <= packing.seq + 1), "examples longer than a row");
        Self { path, examples, packing, micro_batches: Vec::new(), cached: None }
    }

    pub fn examples(&self) -> usize {
        self.examples.len()
    }

    /// The order of the examples in `epoch` (Fisher–Yates from a seeded generator).
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        if self.packing.shuffle {
            let mut rng =
                SplitMix64(self.packing.seed ^ 0x5F7_5EED ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for i in (1..order.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                order.swap(i, j);
            }
        }
        order
    }

    /// Where each example of `order` starts: (row, offset in the row).
    fn placements(&self, order: &[usize]) -> (Vec<(usize, usize)>, usize) {
        let row_len = self.packing.seq + 1;
        let (mut row, mut fill) = (0, 0);
        let mut places = Vec::with_capacity(order.len());
        for &i in order {
            let len = self.examples[i].tokens.len();
            if fill + len > row_len {
                row += 1;
                fill = 0;
            }
            places.push((row, fill));
            fill += len;
        }
        (places, if order.is_empty() { 0 } else { row + 1 })
    }

    /// Micro-batches of `epoch`.
    pub fn micro_batches(&mut self, epoch: u64) -> u64 {
        while self.micro_batches.len() as u64 <= epoch {
            let e = self.micro_batches.len() as u64;
            let (_, rows) = self.placements(&self.order(e));
            self.micro_batches.push(rows.div_ceil(self.packing.batch).max(1) as u64);
        }
        self.micro_batches[epoch as usize]
    }

    /// Optimizer steps of `epoch` at `grad_accum` micro-batches per step.
    pub fn steps_in_epoch(&mut self, epoch: u64, grad_accum: usize) -> u64 {
        self.micro_batches(epoch).div_ceil(grad_accum as u64)
    }

    /// Optimizer steps of the first `epochs` epochs.
    pub fn steps_for_epochs(&mut self, epochs: u64, grad_accum: usize) -> u64 {
        (0..epochs).map(|e| self.steps_in_epoch(e, grad_accum)).sum()
    }

    /// The epoch of optimizer step `step` and the first micro-batch of that step within it.
    pub fn locate(&mut self, mut step: u64, grad_accum: usize) -> (u64, u64) {
        let mut epoch = 0;
        loop {
            let steps = self.steps_in_epoch(epoch, grad_accum);
            if step < steps {
                return (epoch, step * grad_accum as u64);
            }
            step -= steps;
            epoch += 1;
        }
    }

    fn rows(&mut self, epoch: u64) -> (&[u32], &[bool]) {
        if self.cached.as_ref().is_none_or(|c| c.0 != epoch) {
            let order = self.order(epoch);
            let (places, rows) = self.placements(&order);
            let row_len = self.packing.seq + 1;
            let mut tokens = vec![self.packing.pad; rows * row_len];
            let mut answer = vec![false; rows * row_len];
            for (&i, &(row, offset)) in order.iter().zip(&places) {
                let e = &self.examples[i];
                let at = row * row_len + offset;
                tokens[at..at + e.tokens.len()].copy_from_slice(&e.tokens);
                answer[at + e.answer_from..at + e.tokens.len()].fill(true);
            }
            self.cached = Some((epoch, tokens, answer));
        }
        let (_, tokens, answer) = self.cached.as_ref().expect("filled above");
        (tokens, answer)
    }

    /// Inputs and targets of micro-batch `k` of `epoch` (`B` rows of `T`); targets that are not
    /// answer tokens, and padding, are `-100`.
    pub fn batch(&mut self, epoch: u64, k: u64) -> (Vec<u32>, Vec<i32>) {
        let Packing { batch, seq, pad, .. } = self.packing;
        let (tokens, answer) = self.rows(epoch);
        let rows = tokens.len() / (seq + 1);
        let mut inputs = Vec::with_capacity(batch * seq);
        let mut targets = Vec::with_capacity(batch * seq);
        for r in k as usize * batch..(k as usize + 1) * batch {
            if r >= rows {
                inputs.extend(std::iter::repeat_n(pad, seq));
                targets.extend(std::iter::repeat_n(IGNORE_INDEX, seq));
                continue;
            }
            let row = r * (seq + 1)..(r + 1) * (seq + 1);
            inputs.extend_from_slice(&tokens[row.start..row.end - 1]);
            targets.extend(
                (row.start + 1..row.end).map(|i| if answer[i] { tokens[i] as i32 } else { IGNORE_INDEX }),
            );
        }
        (inputs, targets)
    }
}

/// The built-in instruction task of the tests and the README: the prompt is a short lowercase
/// word, the response is the word reversed. Words are random letter strings of 2–`max_len`
/// letters, so held-out prompts are new words, and answering them needs the rule, not memory.
pub fn reversal_task(count: usize, max_len: usize, seed: u64) -> Vec<Example> {
    let mut rng = SplitMix64(seed ^ 0x4E7E_45E0);
    (0..count)
        .map(|_| {
            let len = 2 + (rng.next_u64() % (max_len.max(2) as u64 - 1)) as usize;
            let word: String = (0..len).map(|_| char::from(b'a' + (rng.next_u64() % 26) as u8)).collect();
            Example { response: word.chars().rev().collect(), prompt: word }
        })
        .collect()
}
