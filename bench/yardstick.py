"""The machine's yardstick: the rate of a dense matrix multiply, measured in the session that trains.

Model FLOPs utilization (PaLM's MFU) is the model's work per second, `images/s * contract.training_flops_per_image()`,
over this rate; the time gate compares epoch times as multiples of the same rate, so a machine uniformly 2x slower
changes neither. On CPU it is numpy's float32 `a @ b` (the BLAS numpy ships, in this process: numpy is no framework).
On CUDA it is torch's, in a spawned process so that the benchmark process never imports a framework: float32 with TF32
tensor cores as `allow_tf32` says, or bfloat16 for `--precision bf16`. On a GPU the vendor's datasheet peak for the
detected model is recorded beside it, labelled nominal: a measured rate is what a kernel can reach, the nominal one what
the silicon is sold as.

The square size n doubles from 1024 until one product takes MIN_PRODUCT_S (a product too small for the machine measures
its overheads, not its arithmetic); the caller may fix n instead, to compare sessions at one size. The rate is that of
the fastest product of those a budget of BUDGET_S allows: other processes, clock ramps and page faults only ever slow a
product, so the fastest is the most repeatable estimate of what the machine can do. The median is recorded beside it:
their gap shows how busy the machine was.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import platform
import re
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_info

from bench.errors import BenchError
from bench.record import MatmulRate
from implementations import contract

MIN_PRODUCT_S = 0.01
BUDGET_S = 1.0
MIN_PRODUCTS, MAX_PRODUCTS = 3, 50
FIRST_SIZE = 1024
MAX_SIZE = {"cpu": 8192, "cuda": 16384}
TERA = 1e12

# Dense (not sparse) tensor-core peaks from NVIDIA's datasheets, FLOP/s, by precision: "fp32" is plain fp32 (CUDA
# cores), "tf32" fp32 on TF32 tensor cores, "bf16" bf16 with fp32 accumulation. The first pattern that matches the
# device name wins: more specific models first.
NOMINAL_PEAKS = (
    (r"H100 NVL", "H100 NVL", {"fp32": 60 * TERA, "tf32": 417.5 * TERA, "bf16": 835.5 * TERA}),
    (r"H100 PCIe", "H100 PCIe", {"fp32": 51 * TERA, "tf32": 378 * TERA, "bf16": 756.5 * TERA}),
    (r"H100", "H100 SXM", {"fp32": 67 * TERA, "tf32": 494.5 * TERA, "bf16": 989.5 * TERA}),
    (r"H200 NVL", "H200 NVL", {"fp32": 60 * TERA, "tf32": 417.5 * TERA, "bf16": 835.5 * TERA}),
    (r"H200", "H200 SXM", {"fp32": 67 * TERA, "tf32": 494.5 * TERA, "bf16": 989.5 * TERA}),
    (r"A100", "A100", {"fp32": 19.5 * TERA, "tf32": 156 * TERA, "bf16": 312 * TERA}),
    (r"A10", "A10", {"fp32": 31.2 * TERA, "tf32": 62.5 * TERA, "bf16": 125 * TERA}),
    (r"L4", "L4", {"fp32": 30.3 * TERA, "tf32": 60 * TERA, "bf16": 121 * TERA}),
    (r"RTX 4090", "GeForce RTX 4090", {"fp32": 82.6 * TERA, "tf32": 82.6 * TERA, "bf16": 165.2 * TERA}),
)


class YardstickError(BenchError):
    """The matrix-multiply rate could not be measured on the requested device."""


def measure_matmul_rate(device: str, precision: str, allow_tf32: bool = True, size: int | None = None) -> MatmulRate:
    """The dense matrix-multiply rate of `device` ("cpu" or "cuda", as resolved for the run) in `precision`."""
    if precision not in contract.PRECISIONS:
        raise YardstickError(f"matmul yardstick: precision must be one of {', '.join(contract.PRECISIONS)}, "
                             f"got {precision!r}")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise YardstickError(f"matmul yardstick: size must be a positive integer (None: sized for the device), "
                             f"got {size!r}")
    if device == "cpu":
        return cpu_matmul_rate(precision, size)
    if device == "cuda":
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: torch and CUDA stay out of this process
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            return pool.submit(cuda_matmul_rate, precision, allow_tf32, size).result()
    raise YardstickError(f"matmul yardstick: device must be 'cpu' or 'cuda' (as the run resolved it), got {device!r}")


def time_products(make_product, max_size: int, size: int | None) -> tuple[int, list[float]]:
    """(n, seconds of each timed product): `make_product(n)` returns a function that runs one product to completion."""
    n = size or FIRST_SIZE
    while True:
        product = make_product(n)
        started = time.perf_counter()
        product()  # warm-up: first-touch pages, BLAS threads, cuBLAS heuristics
        if size is not None or n >= max_size or time.perf_counter() - started >= MIN_PRODUCT_S:
            break
        n *= 2
    seconds, deadline = [], time.perf_counter() + BUDGET_S
    while len(seconds) < MIN_PRODUCTS or (len(seconds) < MAX_PRODUCTS and time.perf_counter() < deadline):
        started = time.perf_counter()
        product()
        seconds.append(time.perf_counter() - started)
    return n, seconds


def rates(n: int, seconds: list[float]) -> dict:
    flops = 2 * n**3
    return dict(size=n, flops_per_second=flops / min(seconds),
                median_flops_per_second=flops / statistics.median(seconds), products=len(seconds))


def cpu_matmul_rate(precision: str, size: int | None) -> MatmulRate:
    def make_product(n):
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((2, n, n), dtype=np.float32)
        out = np.empty_like(a)
        return lambda: np.matmul(a, b, out=out)

    n, seconds = time_products(make_product, MAX_SIZE["cpu"], size)
    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    library = ", ".join(f"{pool['internal_api']} {pool['version']} ({pool['num_threads']} threads)" for pool in blas)
    dtype = "float32" if precision == "fp32" else "float32 (numpy has no bfloat16: the fp32 rate stands for bf16)"
    return MatmulRate(
        device="cpu", hardware=cpu_model(), precision=precision, dtype=dtype, **rates(n, seconds),
        threads=blas[0]["num_threads"] if blas else None,
        method=f"numpy {np.__version__} matmul, {library or 'BLAS not identified'}",
        nominal_peak_flops=None, nominal_peak_source="none for CPUs: their peak depends on clocks under load")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cuda_matmul_rate(precision: str, allow_tf32: bool, size: int | None) -> MatmulRate:
    """Runs in the spawned process: torch's matmul on this process's CUDA device (the first; in a launched job, the one
    its rank trains on, LOCAL_RANK)."""
    try:
        import torch
    except ImportError as error:
        raise YardstickError(f"matmul yardstick on CUDA needs torch (pip install torch): {error}") from None
    if not torch.cuda.is_available():
        raise YardstickError("matmul yardstick: --device cuda, but torch sees no CUDA device")
    torch.cuda.set_device(contract.job_process().local_rank)
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32  # as the PyTorch page sets it
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def make_product(n):
        a, b = torch.randn(2, n, n, device="cuda", dtype=dtype, generator=torch.Generator("cuda").manual_seed(0))
        out = torch.empty_like(a)

        def product():
            torch.matmul(a, b, out=out)
            torch.cuda.synchronize()
        return product

    n, seconds = time_products(make_product, MAX_SIZE["cuda"], size)
    name = torch.cuda.get_device_name()
    kind = "bf16" if precision == "bf16" else "tf32" if allow_tf32 else "fp32"
    described = {"bf16": "bfloat16", "tf32": "float32 on TF32 tensor cores", "fp32": "float32 (TF32 off)"}[kind]
    peak, source = nominal_peak(name, kind)
    return MatmulRate(
        device="cuda", hardware=name, precision=precision, dtype=described, **rates(n, seconds), threads=None,
        method=f"torch {torch.__version__} matmul (CUDA {torch.version.cuda}), synchronized",
        nominal_peak_flops=peak, nominal_peak_source=source)


def nominal_peak(gpu_name: str, kind: str) -> tuple[float | None, str]:
    """(dense datasheet peak in FLOP/s, its label) for a GPU name as CUDA reports it; (None, why) if not listed."""
    for pattern, model, peaks in NOMINAL_PEAKS:
        if re.search(rf"\b{pattern}\b", gpu_name):
            return peaks[kind], f"nominal: NVIDIA {model} datasheet, dense {kind}"
    return None, f"no nominal peak listed for {gpu_name!r} (bench/yardstick.py NOMINAL_PEAKS)"
