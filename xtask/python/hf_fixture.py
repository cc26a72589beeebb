"""Writes checkpoints the way Hugging Face transformers does, plus a token file, and the loss
transformers computes for them: the fixture behind tests/tests/hf_checkpoint.rs.

A tiny LlamaForCausalLM (vocab 512, hidden 128, 2 layers, 4 query heads sharing 2 key/value heads
of 32, context 256) with weights scaled so its logits are far from uniform (a random init at
transformers' default 0.02 scores ln(vocab) whatever the wiring). Saved with
`save_pretrained` in float32, sharded (max_shard_size 200KB), and in bfloat16 as one file. The
token file is an llm.c shard (uint16). The losses are transformers' for the saved files: each
checkpoint is reloaded with `from_pretrained(dtype=torch.float64)` (so a bf16 file's weights are
upcast exactly and nothing else is rounded to bf16) and scored in float64 with the eval rule of
`cargo xtask eval`: batch k of B×T reads tokens [k·B·T, k·B·T + B·T + 1), inputs the first B·T,
targets the last B·T.

Usage: python3 xtask/python/hf_fixture.py OUT_DIR          (write everything)
       python3 xtask/python/hf_fixture.py --losses OUT_DIR (recompute expected.json only)
"""

import json
import math
import struct
import sys
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

BATCH, SEQ, BATCHES = 2, 64, 3


def loss_f64(model, tokens):
    model = model.to(torch.float64).eval()
    total = 0.0
    with torch.no_grad():
        for k in range(BATCHES):
            window = tokens[k * BATCH * SEQ : k * BATCH * SEQ + BATCH * SEQ + 1]
            inputs = window[:-1].view(BATCH, SEQ)
            targets = window[1:].view(BATCH, SEQ)
            logits = model(input_ids=inputs).logits
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item()
    return total / BATCHES


def read_tokens(path):
    data = path.read_bytes()
    count = struct.unpack("<256i", data[:1024])[2]
    return torch.tensor(struct.unpack(f"<{count}H", data[1024:]), dtype=torch.int64)


def write_expected(out):
    tokens = read_tokens(out / "tokens.bin")
    losses = {}
    for name in ("f32_sharded", "bf16"):
        model = LlamaForCausalLM.from_pretrained(out / name, dtype=torch.float64)
        losses[f"{name}_loss"] = loss_f64(model, tokens)
    expected = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "batch": BATCH, "seq_len": SEQ, "batches": BATCHES,
        **losses,
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    print(json.dumps(expected))


def main():
    if sys.argv[1] == "--losses":
        write_expected(Path(sys.argv[2]))
        return
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(20261127)
    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    tokens = torch.randint(0, config.vocab_size, (BATCH * SEQ * BATCHES + 1 + 17,), dtype=torch.int64)
    header = [0] * 256
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    (out / "tokens.bin").write_bytes(struct.pack("<256i", *header) + struct.pack(f"<{len(tokens)}H", *tokens.tolist()))

    model.save_pretrained(out / "f32_sharded", max_shard_size="200KB", safe_serialization=True)
    bf16 = LlamaForCausalLM(config)
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    bf16.save_pretrained(out / "bf16", safe_serialization=True)
    write_expected(out)


if __name__ == "__main__":
    main()
