"""Proportional attention, four ways: which is fastest at merged token counts?

``prop_attn_impl`` choices, each compiled with ``torch.compile`` (FlexAttention needs it): ``mask``
(SDPA with a ``[B, 1, 1, N]`` float mask), ``extra_dim`` (log size as an extra head dimension, padded
to a multiple of 8, no mask: flash kernels apply), ``flex`` (FlexAttention ``score_mod``), ``manual``
(the explicit softmax chain), and plain SDPA without the bias as the floor. The winner on CUDA should
be ``prop_attn_impl="auto"``'s choice there (``tomec.config``).

    python bench/attention.py                 # GPU: fp16/bf16, DeiT-S/ViT-B/ViT-L heads
    python bench/attention.py --device cpu --quick

Writes ``bench/results/attention-<device>.csv`` / ``.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tomec.bench.timing import time_cpu, time_cuda
from tomec import ops

from tomec.machine import machine

HEADS = {"deit_s": (6, 64), "vit_b": (12, 64), "vit_l": (16, 64)}
IMPLS = {
    "sdpa_no_bias": lambda q, k, v, bias: F.scaled_dot_product_attention(q, k, v),
    "mask": lambda q, k, v, bias: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
    "extra_dim": lambda q, k, v, bias: ops.attention_extra_dim(q, k, v, bias),
    "flex": lambda q, k, v, bias: ops.attention_flex(q, k, v, bias),
    "manual": lambda q, k, v, bias: ops.attention(q, k, v, bias),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--batches", default="32,256")
    parser.add_argument("--tokens", default="197,150,100,60")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"of {', '.join(IMPLS)}")
    parser.add_argument("--models", default=",".join(HEADS), help=f"of {', '.join(HEADS)}")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.dtypes, args.tokens, args.models = "8", "float32", "60", "deit_s"
    timer = time_cuda if args.device == "cuda" else time_cpu
    cases = [
        (m, b, n, getattr(torch, dt))
        for m in args.models.split(",")
        for b in map(int, args.batches.split(","))
        for n in map(int, args.tokens.split(","))
        for dt in args.dtypes.split(",")
    ]
    rows = []
    for model, batch, n, dtype in tqdm(cases, desc="shapes"):
        heads, d = HEADS[model]
        q, k, v = (torch.randn(batch, heads, n, d, device=args.device, dtype=dtype) for _ in range(3))
        size = torch.randint(1, 5, (batch, n, 1), device=args.device).to(dtype)
        bias = ops.log_size_bias(size, dtype)
        expect = IMPLS["manual"](q.float(), k.float(), v.float(), bias.float())
        for name in args.impls.split(","):
            fn = IMPLS[name]
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=True)
            out = compiled(q, k, v, bias)
            err = None if name == "sdpa_no_bias" else (out.float() - expect).abs().max().item()
            med, lo, hi = timer(lambda: compiled(q, k, v, bias))
            rows.append(dict(model=model, batch=batch, tokens=n, dtype=str(dtype)[6:], impl=name,
                             ms=med, ms_p20=lo, ms_p80=hi, max_err=err))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    tag = (gpu or "cpu").replace(" ", "-")
    meta = machine(args.device)
    with open(out_dir / f"attention-{tag}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / f"attention-{tag}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    wins: dict[str, int] = {}
    for key in {(r["model"], r["batch"], r["tokens"], r["dtype"]) for r in rows}:
        same = [r for r in rows if (r["model"], r["batch"], r["tokens"], r["dtype"]) == key]
        biased = [r for r in same if r["impl"] != "sdpa_no_bias"]
        if biased:
            best = min(biased, key=lambda r: r["ms"])
            wins[best["impl"]] = wins.get(best["impl"], 0) + 1
    print("fastest implementation per shape:", wins)
    print(f"wrote {out_dir / f'attention-{tag}.csv'}")


if __name__ == "__main__":
    main()
