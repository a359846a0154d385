"""Inference throughput and latency, printed as JSON.

For each architecture (timm, one-output regression head, untrained: speed does not depend on the
weights), each batch size and each way of running it:

- ``node``: the node's own path, a TorchScript file (as the published weights are) loaded by
  ``ai.AgeModel`` and called with a batch on the host (includes the host-to-device copy; bf16
  autocast and channels_last on CUDA, float32 on CPU);
- ``node-safetensors``: the same, with the weights as a timm state dict in safetensors (what our
  training writes), so the module runs eagerly rather than as TorchScript;
- ``eager`` and ``compile`` (``torch.compile``), input already on the device, in fp32 and bf16.

Reports images/s and p50/p95 latency per batch; ``compile`` and ``node`` rows carry their ratio to
``eager`` in the same run and dtype. A missing GPU is said in the output, not hidden.

    python bench/infer.py --device cuda --archs senet154,seresnext50_32x4d --batch-sizes 1,16,64
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ai.architectures import create_network
from ai.card import ModelCard, write_card
from ai.model import AgeModel


def _time(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def _forward(module: torch.nn.Module, x: torch.Tensor, bf16: bool) -> object:
    with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        return module(x)


def _row(
    arch: str, device: torch.device, mode: str, dtype: str, batch: int, times: list[float]
) -> dict[str, object]:
    q = statistics.quantiles(times, n=20, method="inclusive") if len(times) > 1 else times * 19
    return {
        "arch": arch,
        "device": device.type,
        "mode": mode,
        "dtype": dtype,
        "batch": batch,
        "images_per_s": round(batch / statistics.mean(times), 1),
        "p50_ms": round(statistics.median(times) * 1000, 2),
        "p95_ms": round(q[18] * 1000, 2),
        "iters": len(times),
    }


def bench_arch(
    arch: str, device: torch.device, args: argparse.Namespace
) -> list[dict[str, object]]:
    size = args.input_size
    net = create_network(arch).eval()
    node_models: dict[str, AgeModel] = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if "node" in args.modes:
            path = Path(tmp) / f"{arch}.pt"
            torch.jit.trace(net, torch.zeros(1, 3, size, size)).save(str(path))
            node_models["node"] = AgeModel.load(path, device.type)
        if "node-safetensors" in args.modes:
            path = Path(tmp) / f"{arch}.safetensors"
            safetensors.torch.save_file(net.state_dict(), str(path))
            write_card(path, ModelCard(name=arch, architecture=arch, input_size=size))
            node_models["node-safetensors"] = AgeModel.load(path, device.type)
    net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    modules = {"eager": net}
    if "compile" in args.modes:
        modules["compile"] = torch.compile(net, mode=args.compile_mode)
    rows: list[dict[str, object]] = []
    for batch in args.batch_sizes:
        host = torch.randn(batch, 3, size, size)
        x = host.to(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        eager: dict[str, float] = {}

        def record(
            mode: str,
            dtype: str,
            fn: Callable[[], object],
            batch: int = batch,
            eager: dict[str, float] = eager,
        ) -> None:
            row = _row(arch, device, mode, dtype, batch, _time(fn, device, args.warmup, args.iters))
            if mode == "eager":
                eager[dtype] = float(row["images_per_s"])  # type: ignore[arg-type]
            elif dtype in eager:
                row["vs_eager"] = round(float(row["images_per_s"]) / eager[dtype], 2)  # type: ignore[arg-type]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

        for dtype in args.dtypes:
            if dtype == "bf16" and device.type != "cuda":
                continue
            for mode, module in modules.items():
                if mode in args.modes:
                    record(mode, dtype, functools.partial(_forward, module, x, dtype == "bf16"))
        for mode, model in node_models.items():
            record(
                mode,
                "bf16" if device.type == "cuda" else "fp32",
                functools.partial(model.predict, host),
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--archs", default="senet154,seresnext50_32x4d")
    p.add_argument("--batch-sizes", default=None, help="default: 1,16,64 on CUDA, 1,4 on CPU")
    p.add_argument("--modes", default="node,node-safetensors,eager,compile")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    p.add_argument("--input-size", type=int, default=320)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print(json.dumps({"error": "no CUDA device"}))
        raise SystemExit(2)
    device = torch.device(
        "cuda"
        if args.device == "auto" and cuda
        else args.device
        if args.device != "auto"
        else "cpu"
    )
    on_gpu = device.type == "cuda"
    args.batch_sizes = [
        int(b) for b in (args.batch_sizes or ("1,16,64" if on_gpu else "1,4")).split(",")
    ]
    args.modes = args.modes.split(",")
    args.dtypes = args.dtypes.split(",")
    args.warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    args.iters = args.iters if args.iters is not None else (50 if on_gpu else 3)
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    rows = [r for arch in args.archs.split(",") for r in bench_arch(arch, device, args)]
    print(
        json.dumps(
            {
                "benchmark": "infer",
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name()
                if on_gpu
                else f"cpu ({torch.get_num_threads()} threads)",
                "gpu": on_gpu or "none: no CUDA device on this machine, CPU figures only",
                "input_size": args.input_size,
                "results": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
