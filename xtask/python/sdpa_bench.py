"""PyTorch's scaled_dot_product_attention on the shapes `cargo xtask bench` times (CUDA only).

Prints one JSON line per (dtype, head_dim, seq, pass) with the same FLOP count as the bench:
forward 2·B·Hq·T²·hd (causal: half of 4·B·Hq·T²·hd), backward 2.5× the forward.
Usage: python3 xtask/python/sdpa_bench.py [--dtypes bf16,f16,f32] [--iters 20]
"""

import argparse
import json

import torch
import torch.nn.functional as F


def median_ms(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", default="bf16,f16,f32")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    dtypes = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
    batch, q_heads, kv_heads = 1, 32, 8
    for name in args.dtypes.split(","):
        dtype = dtypes[name]
        for head_dim in (64, 128):
            for seq in (512, 1024, 2048, 4096):
                # SDPA takes [B, H, T, hd]; the project's layout is [B, T, H, hd]: time the kernel
                # on its preferred layout, as a user of PyTorch would.
                q = torch.randn(batch, q_heads, seq, head_dim, device="cuda", dtype=dtype, requires_grad=True)
                k = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", dtype=dtype, requires_grad=True)
                v = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", dtype=dtype, requires_grad=True)
                dout = torch.randn_like(q)

                def forward():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

                out = forward()

                def backward():
                    torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

                fwd_ms = median_ms(forward, args.iters)
                bwd_ms = median_ms(backward, args.iters)
                flops = 2.0 * batch * q_heads * seq * seq * head_dim
                for pass_name, pass_flops, ms in (("forward", flops, fwd_ms), ("backward", 2.5 * flops, bwd_ms)):
                    print(json.dumps({
                        "impl": "torch_sdpa", "torch": torch.__version__, "dtype": name, "pass": pass_name,
                        "batch": batch, "seq": seq, "q_heads": q_heads, "kv_heads": kv_heads,
                        "head_dim": head_dim, "median_ms": round(ms, 4),
                        "tflop_per_s": round(pass_flops / (ms * 1e-3) / 1e12, 2),
                    }), flush=True)


if __name__ == "__main__":
    main()
