"""Preprocessing split between host and device, before and after, and ``xrayage infer`` against
the pydicom decode floor, printed as JSON.

Per transfer syntax (the files of bench/decode.py), the median over ``--iters`` runs of:

- ``floor_ms``: pydicom's ``dcmread`` + ``pixel_array``, the least any reader of the file pays;
- ``before_host_ms``: the node's path before this split (``--before``, a git revision; read from
  git, not copied into the tree): read, decode, modality LUT, window and rounding as float64 on
  every pixel, then crop, resize and normalisation, all on the host;
- ``host_ms``: what the host does now (``ai.decode.read``: read, decode, the 65,536-entry
  table) plus the hand-over to the device process (a pickle round trip, as the decoding
  processes send it);
- ``device_ms``: the tensor steps on the model's device (``ai.preprocess.tensors``), per image
  of a batch of 8; CUDA is synchronised before the clock stops. ``device`` says which.

On CUDA with the extra ``gpu``, JPEG 2000 rows add ``host_deferred_ms`` (the host leaves the
frame encoded) and ``device_decode_and_tensor_ms`` (nvImageCodec's batch decode and the tensor
steps); ``device_decode`` says why they are missing otherwise.

Then ``xrayage infer`` on 1, 17 and ``--images`` + 1 copies of the uncompressed chest CR (the
small untrained test network, CPU, batch 8), as this tree has it and as ``--before`` had it (a
git worktree), interleaved, the fastest of 3 runs each: the marginal wall time per image
between the two larger runs (every decoding process started in both) against ``floor_ms``, in
the same run, on this machine's cores; and the same less the network's own time per image
(``model_ms_per_image``, batch 8, nothing else running), which no preprocessing can take away.

    python bench/preprocess.py --iters 5 --images 64
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pydicom
import torch

ROOT = Path(__file__).resolve().parents[1]
BATCH = 8  # the node's default [model] batch_size
sys.path.insert(0, str(ROOT))
from ai.decode import read  # noqa: E402
from ai.device_decode import SYNTAXES, DeviceDecoder  # noqa: E402
from ai.model import AgeModel  # noqa: E402
from ai.preprocess import tensors  # noqa: E402
from ai.processes import keep_freed_memory  # noqa: E402
from ai.untrained import build_untrained_model  # noqa: E402
from bench.decode import encoded_files  # noqa: E402


def _median_ms(fn: Callable[[], object], iters: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 2)


def _module_at(revision: str, path: str) -> ModuleType:
    """A module as it was at ``revision`` (the path before a change, for a side-by-side run)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{path}"],
                            check=True, capture_output=True, text=True).stdout  # fmt: skip
    spec = importlib.util.spec_from_loader(f"before_{Path(path).stem}", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


def _infer_seconds(tree: Path, files: list[Path], weights: Path) -> float:
    """``xrayage infer`` as the source tree ``tree`` has it (this one, or the one before)."""
    command = [sys.executable, "-c", "from node.cli.main import app; app()", "infer",
               *map(str, files), "--weights", str(weights), "--device", "cpu", "--csv"]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=files[0].parent,
                   env=os.environ | {"PYTHONPATH": str(tree)})  # fmt: skip
    return time.perf_counter() - started


def _infer(before: Path, files: list[Path], weights: Path, runs: int) -> dict[str, object]:
    """Wall seconds of 1, 17 and all files, before and now, interleaved, the fastest of
    ``runs`` each (the least disturbed on a shared machine); the marginal time per image
    between the two larger runs, where every decoding process has started."""
    sizes = (1, 2 * BATCH + 1, len(files))
    trees = {"before": before, "now": ROOT}
    walls: dict[str, list[list[float]]] = {name: [[] for _ in sizes] for name in trees}
    for _ in range(runs):
        for name, tree in trees.items():
            for i, n in enumerate(sizes):
                walls[name][i].append(_infer_seconds(tree, files[:n], weights))
    fastest = {name: [min(w) for w in walls[name]] for name in trees}
    return {
        "images": sizes,
        **{f"wall_s_{name}": [round(w, 2) for w in fastest[name]] for name in trees},
        **{
            f"marginal_ms_per_image_{name}": round(
                (fastest[name][2] - fastest[name][1]) / (sizes[2] - sizes[1]) * 1000, 1
            )
            for name in trees
        },
    }


def _device_decode(device: torch.device) -> DeviceDecoder | str:
    """nvImageCodec on ``device`` (the extra ``gpu``), or why its path is not measured here."""
    if device.type != "cuda":
        return "not measured: no CUDA device (the CPU decoders run in the decoding processes)"
    try:
        return DeviceDecoder(device)
    except ImportError:
        return "not measured: the extra `gpu` (nvImageCodec) is not installed"


def _row(
    name: str,
    path: Path,
    before: ModuleType,
    device: torch.device,
    batch: int,
    iters: int,
    decoder: DeviceDecoder | str,
) -> dict[str, object]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    stored = [read(path).stored] * batch
    tensors(stored, 320, device)  # warm-up: kernels, allocator
    extra: dict[str, object] = {}
    if syntax in SYNTAXES and isinstance(decoder, DeviceDecoder):
        # The host leaves the frame encoded; the device decodes the batch, then the same steps.
        deferred = [read(path, SYNTAXES)] * batch
        encoded = [r.stored for r in deferred]
        extra["host_deferred_ms"] = _median_ms(
            lambda: pickle.loads(pickle.dumps(read(path, SYNTAXES), 5)), iters, sync
        )
        extra["device_decode_and_tensor_ms"] = _median_ms(
            lambda: tensors(encoded, 320, device, decoder.decode(encoded)), iters, sync
        ) / batch
    return extra | {
        "encoding": name,
        "transfer_syntax": syntax,
        "floor_ms": _median_ms(lambda: pydicom.dcmread(path).pixel_array, iters, sync),
        "before_host_ms": _median_ms(lambda: before.preprocess(pydicom.dcmread(path)), iters, sync),
        "host_ms": _median_ms(lambda: pickle.loads(pickle.dumps(read(path), 5)), iters, sync),
        "device_ms": _median_ms(lambda: tensors(stored, 320, device), iters, sync) / batch,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--images", type=int, default=64, help="extra images for xrayage infer")
    p.add_argument("--before", default="1152923", help="git revision of the path before")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    keep_freed_memory()  # as the node's processes run (ai/processes.py)
    before = _module_at(args.before, "ai/preprocess.py")
    decoder = _device_decode(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = encoded_files(Path(tmp))
        for name, path in files.items():
            rows.append(_row(name, path, before, device, BATCH, args.iters, decoder))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

        weights = Path(tmp) / "model" / "seresnet.pt"
        build_untrained_model(weights, seed=1234)
        copies = []
        for i in range(args.images + 1):
            copies.append(Path(tmp) / "infer" / f"chest{i}.dcm")
            copies[-1].parent.mkdir(exist_ok=True)
            shutil.copy(files["explicit-le"], copies[-1])
        before_tree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q",
                        str(before_tree), args.before], check=True)  # fmt: skip
        try:
            infer = _infer(before_tree, copies, weights, runs=3)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(before_tree)], check=True)  # fmt: skip
        model = AgeModel.load(weights, "cpu")
        batch = torch.zeros(BATCH, 3, 320, 320)
        model_ms = _median_ms(lambda: model.predict(batch), args.iters, lambda: None) / BATCH
    floor: float = rows[0]["floor_ms"]  # type: ignore[assignment]
    marginal: float = infer["marginal_ms_per_image_now"]  # type: ignore[assignment]
    infer |= {
        "floor_ms": floor,
        "marginal_over_floor": round(marginal / floor, 2),
        "target_over_floor": 3.0,
        # The network alone, same batch, nothing else running: what no preprocessing can take
        # away (in the node's processes, with keep_freed_memory).
        "model_ms_per_image": round(model_ms, 1),
        "marginal_without_model_over_floor": round((marginal - model_ms) / floor, 2),
    }
    print(json.dumps({
        "benchmark": "preprocess",
        "cpus": os.cpu_count(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "device_decode": "nvImageCodec" if isinstance(decoder, DeviceDecoder) else decoder,
        "torch_threads": torch.get_num_threads(),
        "before": args.before,
        "batch": BATCH,
        "results": rows,
        "infer": infer,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
