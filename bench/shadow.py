"""What a shadow model costs: throughput of the node's engine with the live model alone, with a
shadow model beside it on the same images (decoded once, :class:`ai.engine.Request`), and, as the
floor that sharing is measured against, the two models run one after the other, each decoding
for itself. All three in the same run, on the same files, best of ``--repeats``; the target of
issue 32 is ``shared / live_only >= 0.48`` (two models on one decode; 0.5 is what two models cost
when the model is all the work). Also the memory one more model takes on the device
(:func:`ai.footprint.measure`), printed as JSON.

    python bench/shadow.py --images 16 --arch seresnext50_32x4d --device cpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ai.engine import Engine, Request
from ai.footprint import measure
from ai.model import AgeModel
from ai.untrained import build_untrained_model, build_untrained_timm


def _images(source: Path, folder: Path, n: int) -> list[Path]:
    ds = pydicom.dcmread(source)
    paths = []
    for i in range(n):
        ds.SOPInstanceUID = generate_uid()
        paths.append(folder / f"img{i:03d}.dcm")
        ds.save_as(paths[-1])
    return paths


def _weights(arch: str, folder: Path, seed: int) -> Path:
    if arch == "untrained-seresnet":  # the tests' small network: decoding is all the work
        path = folder / f"{arch}-{seed}.pt"
        build_untrained_model(path, seed=seed)
    else:
        path = folder / f"{arch}-{seed}.safetensors"
        build_untrained_timm(path, arch, seed=seed)
    return path


def _rate(engine: Engine, requests: list[list[Request]], repeats: int) -> float:
    """Images per second through every list of requests in turn (one decode per list)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in requests:
            outcomes = list(engine.run(batch))
            assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
        best = min(best, time.perf_counter() - start)
    return len(requests[0]) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--arch", default="untrained-seresnet")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--source", type=Path, default=None, help="default: pydicom-data's CR")
    args = parser.parse_args()
    if args.source is None:
        from pydicom.data import get_testdata_file

        args.source = Path(str(get_testdata_file("RG1_UNCR.dcm")))
    work = Path(tempfile.mkdtemp(prefix="xrayage-shadow-"))
    try:
        files = _images(args.source, work, args.images)
        live = AgeModel.load(_weights(args.arch, work, 1), args.device, warm_up=True)
        shadow_path = _weights(args.arch, work, 2)
        _, footprint = measure(shadow_path, args.device, args.batch_size)
        shadow = AgeModel.load(shadow_path, args.device, warm_up=True)
        with Engine(live, args.batch_size, args.workers) as engine:
            engine.warm_up()
            alone = [[Request(p, (live,)) for p in files]]
            shared = [[Request(p, (live, shadow)) for p in files]]
            apart = [alone[0], [Request(p, (shadow,)) for p in files]]
            live_only = _rate(engine, alone, args.repeats)
            together = _rate(engine, shared, args.repeats)
            separately = _rate(engine, apart, args.repeats)
        print(json.dumps({
            "arch": args.arch, "device": str(live.device), "images": args.images,
            "image": args.source.name, "batch_size": args.batch_size,
            "images_per_s": {
                "live_only": round(live_only, 2),
                "live_and_shadow_shared_decode": round(together, 2),
                "live_and_shadow_decoded_twice": round(separately, 2),
            },
            "ratio_shared_to_live_only": round(together / live_only, 3),
            "ratio_twice_to_live_only": round(separately / live_only, 3),
            "target_ratio": 0.48,
            "second_model": {
                "weights_mb": round(footprint.weights_bytes / 2**20, 1),
                "peak_mb_with_one_batch": round(footprint.peak_bytes / 2**20, 1),
                "available_mb": round(footprint.available_bytes / 2**20)
                if footprint.available_bytes is not None else None,
            },
        }, indent=1))  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
