"""Why cnf.py's frozen decoder writes its leaky ReLU as max(x, slope x) under torch.compile.

    python tests/benchmarks/inductor_mask.py [--threads 1] [--device cpu]

Times forward plus backward of a leaky ReLU between frozen 256 x 256 layers (batch 512, gradients to the input
only, as in cnf.py's phase-2 decoder), four ways: eager and compiled, each as `F.leaky_relu` and as the max form.
Between frozen weights the compiled backward needs only the activation's mask; for `F.leaky_relu` Inductor keeps it
as a bool tensor, and on a CPU its generated code stores that mask slowly (the `*_leaky_relu_*` kernel of the
profile, printed per element); the max form's compiled backward keeps floats. One line per figure:
`<variant> ms_per_step <value>` and `compiled_leaky_relu ns_per_element_of_its_forward_kernel <value>`.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from throughput import rate  # this folder's timing: warm-up, then the median of timed rounds

SLOPE, BATCH, WIDTH, LAYERS = 0.25, 512, 256, 4


def leaky_relu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, SLOPE)


def max_form(x: torch.Tensor) -> torch.Tensor:
    return torch.maximum(x, SLOPE * x)


def frozen_mlp(weights, activation):
    def step(x: torch.Tensor) -> torch.Tensor:
        for w in weights:
            x = activation(x @ w)
        return x.sum()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # generated CPU kernels appear in the profiler by name
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(WIDTH, WIDTH, generator=g) / WIDTH ** 0.5).to(args.device) for _ in range(LAYERS)]
    x = torch.randn(BATCH, WIDTH, generator=g).to(args.device).requires_grad_(True)
    print(f"# device {args.device}, {args.threads} thread(s), torch {torch.__version__}", flush=True)
    for name, activation in (("leaky_relu", leaky_relu), ("max_form", max_form)):
        for compiled in (False, True):
            step = frozen_mlp(weights, activation)
            step = torch.compile(step) if compiled else step
            variant = ("compiled_" if compiled else "eager_") + name
            steps_per_s = rate(lambda: step(x).backward(), seconds=2.0, repeats=3)
            print(f"{variant} ms_per_step {1e3 / steps_per_s:.2f}", flush=True)
            if compiled and name == "leaky_relu" and args.device == "cpu":
                with torch.profiler.profile() as profile:
                    step(x).backward()
                kernels = [e for e in profile.key_averages() if "leaky_relu" in e.key and "backward" not in e.key
                           and e.key.startswith("graph_")]
                us = sum(e.self_cpu_time_total for e in kernels)
                calls = sum(e.count for e in kernels)
                print(f"{variant} ns_per_element_of_its_forward_kernel {us * 1e3 / (calls * BATCH * WIDTH):.2f}")


if __name__ == "__main__":
    main()
