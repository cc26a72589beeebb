"""PyTorch baselines on the shapes our CUDA bench measured, and the side-by-side report.

Run by the device bundle's run.sh (see `cargo xtask device-bundle`):

    device_check.py --results DIR [--budget SECONDS] [--quick] [--report-only]

Reads what run.sh left in DIR (bench_*.json from `xtask bench --json`, train.jsonl from
`xtask train --log`, tests.txt, phases.txt, gpu.txt, train_memory.txt), measures PyTorch on the
same shapes within the budget:
  - torch.matmul per GEMM row of the bench (same dtype and operand transposes),
  - scaled_dot_product_attention per attention row (causal, GQA; forward and backward),
  - a Hugging Face LlamaForCausalLM training step at stories110m's shape (dim 768, 12 layers,
    12 heads, vocab 32000), B 8 x T 1024, bf16 autocast + fused AdamW, eager and torch.compile
    (compile skipped with --quick): tokens/s and peak memory,
and writes DIR/report.json and DIR/report.md. Anything missing (PyTorch, transformers, a GPU,
a phase's output, the time) is reported in the document, not fatal; `--report-only` skips
PyTorch. `--smoke` runs every PyTorch path on the CPU at toy sizes (each shape divided, a
2-layer model), to test this script on a machine without a GPU; its numbers mean nothing. FLOP counts match the bench: GEMM 2*M*N*K; attention forward 2*B*Hq*T^2*hd (causal),
backward 2.5x the forward.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time
import traceback

DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


class Budget:
    def __init__(self, seconds):
        self.end = time.time() + seconds

    def left(self):
        return self.end - time.time()


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def load_results(results):
    """What run.sh's phases left behind."""
    out = {"errors": []}
    out["gpu"] = (read_text(os.path.join(results, "gpu.txt")) or "unknown").strip()
    phases = {}
    for line in (read_text(os.path.join(results, "phases.txt")) or "").splitlines():
        parts = line.split()
        if len(parts) == 3:
            status = {"0": "ok", "124": "timeout"}.get(parts[1], f"exit {parts[1]}")
            phases[parts[0]] = {"status": status, "seconds": int(parts[2])}
            if status != "ok":
                # The phase's own error line (e.g. `error: backend cuda found no usable device`).
                log = (read_text(os.path.join(results, f"{parts[0]}.log")) or "").splitlines()
                errors = [l for l in log if l.startswith("error") or "panicked" in l] or log[-1:]
                if errors:
                    out["errors"].append(f"{parts[0]} ({status}): {errors[-1][:300]}")
    out["phases"] = phases
    tests = read_text(os.path.join(results, "tests.txt")) or ""
    passed = sum(int(m) for m in re.findall(r"(\d+) passed", tests))
    failed = sum(int(m) for m in re.findall(r"(\d+) failed", tests))
    failures = re.findall(r"^test (\S+) \.\.\. FAILED", tests, re.M)
    out["tests"] = {"passed": passed, "failed": failed, "failures": failures}
    # run.sh benches in parts (bench_matmul.json, bench_attention.json, bench_kernels.json);
    # a plain bench.json is read too.
    bench = None
    for name in sorted(os.listdir(results)) if os.path.isdir(results) else []:
        if not (name.startswith("bench") and name.endswith(".json")):
            continue
        text = read_text(os.path.join(results, name))
        if not text or not text.strip():
            out["errors"].append(f"{name} is empty (that bench part failed or ran out of time)")
            continue
        try:
            part = json.loads(text)
        except json.JSONDecodeError as e:
            out["errors"].append(f"{name} unreadable: {e}")
            continue
        if bench is None:
            bench = {k: v for k, v in part.items() if k not in ("matmul", "attention", "kernels")}
            bench.update(matmul=[], attention=[], kernels=[])
        for key in ("matmul", "attention", "kernels"):
            bench[key] += part.get(key) or []
    out["bench"] = bench
    steps = []
    for line in (read_text(os.path.join(results, "train.jsonl")) or "").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "tokens_per_s" in row:
            steps.append(row)
    memory = [int(x) for x in (read_text(os.path.join(results, "train_memory.txt")) or "").split() if x.isdigit()]
    if steps:
        # Steps read together share one time (--log-every); the first read interval includes
        # compiling the kernels. The steady state is the rest, weighted by time.
        first = 0
        while first < len(steps) and steps[first]["tokens_per_s"] == steps[0]["tokens_per_s"]:
            first += 1
        steady = steps[max(first, 2):] or steps[-1:]
        seconds = sum(s["tokens"] / s["tokens_per_s"] for s in steady if s.get("tokens_per_s"))
        out["train"] = {
            "steps": len(steps),
            "steady_steps": len(steady),
            "tokens_per_s": sum(s["tokens"] for s in steady) / seconds if seconds else None,
            "peak_memory_mib": max(memory) if memory else None,
            "memory_source": "nvidia-smi memory.used (whole device), sampled every 200 ms",
        }
    else:
        out["train"] = None
    return out


SMOKE = False  # set by --smoke: CPU, toy sizes


def device():
    return "cpu" if SMOKE else "cuda"


def time_cuda(torch, fn, iters, warmup=2):
    """Median milliseconds of fn() over iters runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    if SMOKE:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_baselines(torch, rows, budget, iters):
    """torch.matmul for each bench GEMM: `MxK·KxN` with the bench's operand transposes."""
    out = []
    for row in rows:
        if budget.left() < 5:
            out.append({**row, "torch_error": "skipped: out of time"})
            continue
        try:
            m = re.match(r"(\d+)x(\d+)·(\d+)x(\d+)", row["shape"])
            if not m:
                raise ValueError(f"unreadable shape {row['shape']!r}")
            M, K, _, N = (int(g) for g in m.groups())
            if SMOKE:
                M, K, N = max(1, M // 64), max(1, K // 64), max(1, N // 64)
            dtype = getattr(torch, DTYPES[row["dtype"]])
            dev = device()
            # y = x·Wᵀ reads W [N, K] transposed; dW = dyᵀ·x reads dy [K, M] transposed.
            a = torch.randn(K, M, device=dev, dtype=dtype).t() if "ᵀ·" in row["pass"] and row["pass"].startswith("dW") else torch.randn(M, K, device=dev, dtype=dtype)
            b = torch.randn(N, K, device=dev, dtype=dtype).t() if row["pass"].endswith("Wᵀ") else torch.randn(K, N, device=dev, dtype=dtype)
            ms = time_cuda(torch, lambda: torch.matmul(a, b), iters)
            tflops = 2.0 * M * N * K / (ms * 1e-3) / 1e12
            out.append({**row, "torch_median_ms": ms, "torch_tflop_per_s": tflops, "ratio": row["tflop_per_s"] / tflops})
        except Exception as e:  # a missing piece is reported, not fatal
            out.append({**row, "torch_error": f"{type(e).__name__}: {e}"})
    return out


def attention_baselines(torch, rows, budget, iters):
    """F.scaled_dot_product_attention (causal, GQA) per bench attention shape and pass."""
    import torch.nn.functional as F

    cache = {}
    out = []
    for row in rows:
        key = (row["dtype"], row["batch"], row["seq"], row["q_heads"], row["kv_heads"], row["head_dim"])
        if key not in cache:
            if budget.left() < 5:
                cache[key] = {"error": "skipped: out of time"}
            else:
                try:
                    dtype = getattr(torch, DTYPES[row["dtype"]])
                    b, t, hq, hkv, hd = key[1:]
                    if SMOKE:
                        t = max(1, t // 16)
                    q = torch.randn(b, hq, t, hd, device=device(), dtype=dtype, requires_grad=True)
                    k = torch.randn(b, hkv, t, hd, device=device(), dtype=dtype, requires_grad=True)
                    v = torch.randn(b, hkv, t, hd, device=device(), dtype=dtype, requires_grad=True)

                    def fwd():
                        try:
                            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv)
                        except TypeError:  # torch < 2.5: no enable_gqa
                            rep = hq // hkv
                            return F.scaled_dot_product_attention(
                                q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True
                            )

                    with torch.no_grad():
                        fwd_ms = time_cuda(torch, fwd, iters)
                    o = fwd()
                    dout = torch.randn_like(o)
                    bwd_ms = time_cuda(torch, lambda: torch.autograd.grad(o, (q, k, v), dout, retain_graph=True), iters)
                    cache[key] = {"forward": fwd_ms, "backward": bwd_ms}
                except Exception as e:
                    cache[key] = {"error": f"{type(e).__name__}: {e}"}
        got = cache[key]
        if "error" in got:
            out.append({**row, "torch_error": got["error"]})
            continue
        ms = got[row["pass"]]
        tflops = row["flops"] / (ms * 1e-3) / 1e12
        out.append({**row, "torch_median_ms": ms, "torch_tflop_per_s": tflops, "ratio": row["tflop_per_s"] / tflops})
    return out


def hf_training(torch, budget, quick):
    """LlamaForCausalLM at stories110m's shape, B 8 x T 1024, bf16 autocast, fused AdamW."""
    results = {}
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception as e:
        return {"eager": {"error": f"transformers unavailable: {type(e).__name__}: {e}"}}
    batch, seq, steps = 8, 1024, (3 if quick else 10)
    layers, vocab = 12, 32000
    if SMOKE:
        batch, seq, steps, layers, vocab = 2, 64, 2, 2, 512
    modes = ["eager"] if quick else ["eager", "compile"]
    for mode in modes:
        if budget.left() < (20 if mode == "eager" else 60):
            results[mode] = {"error": "skipped: out of time"}
            continue
        try:
            torch.manual_seed(0)
            config = LlamaConfig(
                vocab_size=vocab, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                rms_norm_eps=1e-5, tie_word_embeddings=False,
            )
            model = LlamaForCausalLM(config).to(device())
            model.config._attn_implementation = "sdpa"
            opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
            run = torch.compile(model) if mode == "compile" else model
            ids = torch.randint(0, vocab, (batch, seq), device=device())

            def step():
                with torch.autocast(device(), dtype=torch.bfloat16):
                    loss = run(input_ids=ids, labels=ids).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            step()  # the first step compiles (torch.compile) and allocates
            step()
            if not SMOKE:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            done = 0
            while done < steps and budget.left() > 5:
                step()
                done += 1
            if not SMOKE:
                torch.cuda.synchronize()
            seconds = time.time() - t0
            results[mode] = {
                "steps": done,
                "tokens_per_s": batch * seq * done / seconds if done else None,
                "peak_memory_mib": None if SMOKE else torch.cuda.max_memory_allocated() / 2**20,
                "memory_source": "torch.cuda.max_memory_allocated",
            }
            del model, opt, run
            if not SMOKE:
                torch.cuda.empty_cache()
        except Exception as e:
            results[mode] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)}
    return results


def fmt(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


def write_report(results_dir, doc):
    with open(os.path.join(results_dir, "report.json"), "w") as f:
        json.dump(doc, f, indent=2)
    lines = [f"# Device check: {doc['gpu']}" + (" (SMOKE TEST on the CPU: numbers mean nothing)" if SMOKE else ""), ""]
    t = doc["tests"]
    lines.append(f"Tests: {t['passed']} passed, {t['failed']} failed" + (f" ({', '.join(t['failures'][:10])})" if t["failures"] else ""))
    lines.append("Phases: " + ", ".join(f"{k} {v['status']} ({v['seconds']} s)" for k, v in doc["phases"].items()))
    if doc["torch"].get("error"):
        lines.append(f"PyTorch: {doc['torch']['error']}")
    else:
        lines.append(f"PyTorch {doc['torch'].get('version')}, transformers {doc['torch'].get('transformers')}")
    lines.append("")
    if doc["matmul"]:
        lines += ["## Matmul (ours / torch.matmul)", "", "| weights | pass | dtype | shape | routine | ours TFLOP/s | torch TFLOP/s | ratio |", "|---|---|---|---|---|---|---|---|"]
        for r in doc["matmul"]:
            lines.append(f"| {r.get('what', '')} | {r['pass']} | {r['dtype']} | {r['shape']} | {r.get('routine', '')} | {fmt(r['tflop_per_s'], '.1f')} | "
                         f"{fmt(r.get('torch_tflop_per_s'), '.1f')} | {fmt(r.get('ratio'))}{' ' + r['torch_error'] if 'torch_error' in r else ''} |")
        lines.append("")
    if doc["attention"]:
        lines += ["## Attention (ours / scaled_dot_product_attention)", "", "| pass | kernel | dtype | B×T, Hq:Hkv, hd | ours TFLOP/s | torch TFLOP/s | ratio |", "|---|---|---|---|---|---|---|"]
        for r in doc["attention"]:
            shape = f"{r['batch']}×{r['seq']}, {r['q_heads']}:{r['kv_heads']}, {r['head_dim']}"
            lines.append(f"| {r['pass']} | {r['kernel']} | {r['dtype']} | {shape} | {fmt(r['tflop_per_s'], '.1f')} | "
                         f"{fmt(r.get('torch_tflop_per_s'), '.1f')} | {fmt(r.get('ratio'))}{' ' + r['torch_error'] if 'torch_error' in r else ''} |")
        lines.append("")
    lines += ["## stories110m training step (B 8 × T 1024, bf16)", "", "| | tokens/s | peak memory MiB | ours / this |", "|---|---|---|---|"]
    ours = doc["train"]
    lines.append(f"| ours (`xtask train`) | {fmt(ours and ours['tokens_per_s'], '.0f')} | {fmt(ours and ours['peak_memory_mib'], '.0f')} | |")
    for mode, r in doc["hf_training"].items():
        if "error" in r:
            lines.append(f"| HF {mode} | {r['error']} | | |")
        else:
            ratio = ours["tokens_per_s"] / r["tokens_per_s"] if ours and r.get("tokens_per_s") else None
            lines.append(f"| HF {mode} | {fmt(r['tokens_per_s'], '.0f')} | {fmt(r['peak_memory_mib'], '.0f')} | {fmt(ratio)} |")
    lines.append("")
    lines.append("Ours: peak memory = nvidia-smi's device-wide memory.used while training (CubeCL's pool included); "
                 "PyTorch: torch.cuda.max_memory_allocated.")
    if doc["errors"]:
        lines += ["", "## Problems", ""] + [f"- {e}" for e in doc["errors"]]
    with open(os.path.join(results_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True)
    p.add_argument("--budget", type=float, default=150)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes: tests this script without a GPU")
    args = p.parse_args(argv)
    global SMOKE
    SMOKE = args.smoke
    budget = Budget(args.budget)
    doc = load_results(args.results)
    bench = doc.pop("bench") or {}
    if not bench:
        doc["errors"].append("no bench results (bench phase failed or timed out)")
    if doc["train"] is None:
        doc["errors"].append("no training log (train phase failed or timed out)")
    doc["matmul"] = bench.get("matmul", [])
    doc["attention"] = bench.get("attention", [])
    doc["bench_kernels"] = bench.get("kernels", [])
    doc["hf_training"] = {}
    doc["torch"] = {}
    if args.report_only:
        doc["torch"]["error"] = "not run (--report-only)"
    else:
        try:
            import torch

            doc["torch"]["version"] = torch.__version__
            try:
                import transformers

                doc["torch"]["transformers"] = transformers.__version__
            except Exception as e:
                doc["torch"]["transformers"] = f"missing ({type(e).__name__})"
            if not SMOKE and not torch.cuda.is_available():
                raise RuntimeError("torch.cuda.is_available() is False (CPU-only PyTorch, or no driver)")
            iters = 5 if args.quick else 10
            doc["matmul"] = matmul_baselines(torch, doc["matmul"], budget, iters)
            doc["attention"] = attention_baselines(torch, doc["attention"], budget, iters)
            doc["hf_training"] = hf_training(torch, budget, args.quick)
        except Exception as e:
            doc["torch"]["error"] = f"{type(e).__name__}: {e}"
            doc["errors"].append(f"PyTorch baselines not measured: {doc['torch']['error']}")
    write_report(args.results, doc)
    print(os.path.join(args.results, "report.md"))


if __name__ == "__main__":
    main(sys.argv[1:])
