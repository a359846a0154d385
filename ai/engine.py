"""Batched inference over files: decoding and preprocessing on a thread pool, feeding the model
batch after batch while the next batch is being prepared.

The same engine serves ``xrayage infer``, ``xrayage evaluate`` and the node's inference worker,
so a number is computed the same way wherever it is shown.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydicom.dataset import Dataset

from ai.model import AgeModel
from ai.preprocess import (
    IMAGE_SUFFIXES,
    PreprocessError,
    display_values,
    load_dataset,
    load_image_file,
    to_tensor,
)


@dataclass
class Outcome:
    path: Path
    xray_age: float | None = None
    error: str | None = None
    header: Dataset | None = None  # the DICOM header without Pixel Data; None for image files
    # Wall seconds of "decode" (file to display values), "preprocess" (to the tensor) and
    # "model" (the whole batch this file ran in): where a result's latency went.
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Prepared:
    tensor: torch.Tensor
    header: Dataset | None
    seconds: dict[str, float]


def prepare(path: Path, input_size: int) -> Prepared:
    """The model input for one file, and its DICOM header when it is DICOM."""
    started = time.perf_counter()
    header: Dataset | None = None
    if path.suffix.lower() in IMAGE_SUFFIXES:
        display = load_image_file(path)
    else:
        header = load_dataset(path)
        display = display_values(header)
        del header.PixelData
    decoded = time.perf_counter()
    tensor = to_tensor(display, input_size)
    seconds = {"decode": decoded - started, "preprocess": time.perf_counter() - decoded}
    return Prepared(tensor, header, seconds)


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1)))


class Engine:
    def __init__(self, model: AgeModel, batch_size: int = 8, workers: int | None = None) -> None:
        self.model = model
        self.batch_size = batch_size
        self.workers = workers or default_workers()

    def run(self, paths: Iterable[Path]) -> Iterator[Outcome]:
        """One outcome per path, in order; a file that cannot be read is an outcome with an
        error, never an exception."""
        todo = iter(paths)
        size = self.model.card.input_size
        pending: deque[tuple[Path, Future[Prepared]]] = deque()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="xrayage-prep") as pool:

            def fill() -> None:
                while len(pending) < 2 * self.batch_size and (path := next(todo, None)):
                    pending.append((path, pool.submit(prepare, path, size)))

            fill()
            while pending:
                batch = [pending.popleft() for _ in range(min(self.batch_size, len(pending)))]
                fill()  # the pool prepares the next batch while this one runs
                yield from self._predict(batch)

    def _predict(self, batch: list[tuple[Path, Future[Prepared]]]) -> Iterator[Outcome]:
        outcomes: list[Outcome] = []
        tensors: list[torch.Tensor] = []
        for path, future in batch:
            try:
                prepared = future.result()
            except Exception as e:  # any way a file can be malformed: its outcome, not ours
                known = isinstance(e, PreprocessError)
                error = str(e) if known else f"{path.name}: {type(e).__name__}: {e}"
                outcomes.append(Outcome(path, error=error))
                continue
            outcomes.append(Outcome(path, header=prepared.header, seconds=prepared.seconds))
            tensors.append(prepared.tensor)
        if tensors:
            started = time.perf_counter()
            ages = iter(self.model.predict(torch.stack(tensors)))
            model_seconds = time.perf_counter() - started
            for outcome in outcomes:
                if outcome.error is None:
                    outcome.xray_age = next(ages)
                    outcome.seconds["model"] = model_seconds
        yield from outcomes
