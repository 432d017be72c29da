"""fp32 vs bf16 on this CPU: the GEMM rate and a LoRA-like linear step (forward + backward to the input),
at the default model's shapes, in one invocation, alternating the dtypes each repeat.

DESIGN.md records bf16 matmuls near 1 GFLOP/s on these machines, which is why CPU runs compute in fp32.
Whether that still holds decides whether a CPU run could train its frozen weights in bf16 (half the weight
and activation memory). Usage: ``python benchmarks/matmul_dtypes.py [--repeats 5]``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {  # tokens x in -> out, as in one pass of the default model (hidden 576, MLP 1536, vocab 49,152)
    "attention projection (1024 x 576 -> 576)": (1024, 576, 576),
    "MLP up (1024 x 576 -> 1536)": (1024, 576, 1536),
    "MLP down (1024 x 1536 -> 576)": (1024, 1536, 576),
}


def rate(fn, flops: float, reps: int) -> float:
    for _ in range(2):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return flops * reps / (time.perf_counter() - start) / 1e9


def measure(tokens: int, fan_in: int, fan_out: int, dtype: torch.dtype, reps: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, fan_in, generator=gen).to(dtype)
    w = torch.randn(fan_out, fan_in, generator=gen).to(dtype) / fan_in ** 0.5
    gemm = rate(lambda: x @ w.T, 2 * tokens * fan_in * fan_out, reps)
    xg = x.clone().requires_grad_()

    def step():
        F.linear(xg, w).float().sum().backward()

    train = rate(step, 4 * tokens * fan_in * fan_out, reps)  # forward + the input's gradient (frozen weight)
    return gemm, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reps", type=int, default=10, help="calls per timing")
    args = parser.parse_args()
    rows = []
    for name, (t, i, o) in SHAPES.items():
        got: dict = {torch.float32: ([], []), torch.bfloat16: ([], [])}
        for r in range(args.repeats):
            order = (torch.float32, torch.bfloat16) if r % 2 == 0 else (torch.bfloat16, torch.float32)
            for dtype in order:
                g, s = measure(t, i, o, dtype, args.reps)
                got[dtype][0].append(g)
                got[dtype][1].append(s)
        med = {d: (statistics.median(v[0]), statistics.median(v[1])) for d, v in got.items()}
        rows.append((name, med[torch.float32], med[torch.bfloat16]))
    print(f"`python benchmarks/matmul_dtypes.py --repeats {args.repeats}`, {time.strftime('%Y-%m-%d')}, "
          f"{platform.machine()} with {torch.get_num_threads()} threads, torch {torch.__version__}; medians, GFLOP/s.\n")
    print("| shape | fp32 GEMM | bf16 GEMM | bf16/fp32 | fp32 fwd+bwd | bf16 fwd+bwd | bf16/fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name, (fg, fs), (bg, bs) in rows:
        print(f"| {name} | {fg:.0f} | {bg:.0f} | {bg / fg:.2f}x | {fs:.0f} | {bs:.0f} | {bs / fs:.2f}x |")


if __name__ == "__main__":
    main()
