"""Batched inference over files: the host reads and decodes in worker processes, on every core,
while the device turns the previous batch into tensors and runs the model.

Decoding is CPU work that holds the GIL in the Python parts of pydicom and its plugins, so
threads would share one core; processes do not (bench/preprocess.py). What comes back from a
process is the stored pixels (2 bytes a pixel) and their display table (:mod:`ai.decode`); the
rest of preprocessing runs on the model's device (:mod:`ai.preprocess`), in this process. With
the model on the CPU, the decoding processes make the tensors too, one core each.

A decoder can end the process it runs in (GDCM aborts on some malformed JPEG-LS streams). The
files that were in flight are then read again, each alone in a fresh process: the one that ends
its process again gets that as its error (``killed by SIGABRT``); the others go on. Each
decoding process may map ``memory_mb`` more than it starts with: a file whose decoding needs
more (a codestream that lies about its size, a deflated data set) fails with that reason, and
the host's memory is not the kernel's OOM killer's to share out.

The same engine serves ``xrayage infer``, ``xrayage evaluate`` and the node's inference worker,
so a number is computed the same way wherever it is shown. The node asks it for several models
on a file (a live model and its shadows, :class:`Request`): the file is decoded and made a tensor
once, and each model runs on the batch of the files that asked for it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType

import torch
from pydicom.dataset import Dataset

from ai.decode import Read, read, ready
from ai.device_decode import SYNTAXES, DeviceDecoder
from ai.errors import PreprocessError
from ai.limits import DECODE_MEMORY_MB
from ai.model import AgeModel
from ai.preprocess import cpu_decoding_process, read_tensor, tensors
from ai.processes import cause_of, decoding_process, limit_memory

log = logging.getLogger("xrayage.engine")
# Decoding processes are forked from a fork server that imported the decoders and torch once
# (a fresh process: no threads or locks of this one inherited), so that each starts at once
# rather than importing them again: 2-3 s a process on a busy 2-core machine.
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["ai.decoding_server"])
Submitted = tuple["Future[Read]", ProcessPoolExecutor]


@dataclass(frozen=True)
class Request:
    """A file and the models that are to age it (all on the engine's device, with the engine's
    model's input size: :func:`shared_input`)."""

    path: Path
    models: tuple[AgeModel, ...]


def shared_input(models: Iterable[AgeModel]) -> None:
    """Models that one engine runs share their device and input size: a file is decoded and
    made a tensor once for all of them."""
    first: AgeModel | None = None
    for model in models:
        if first is None:
            first = model
        elif (model.device, model.card.input_size) != (first.device, first.card.input_size):
            raise ValueError(
                f"{model.card.name} takes {model.card.input_size} px on {model.device}, "
                f"{first.card.name} {first.card.input_size} px on {first.device}: the node "
                "decodes each image once for all its models"
            )


@dataclass
class Outcome:
    path: Path
    xray_age: float | None = None  # the (first) requested model's
    ages: dict[str, float] = field(default_factory=dict)  # by each model's weights SHA-256
    error: str | None = None
    header: Dataset | None = None  # the DICOM header without Pixel Data; None for image files
    # Wall seconds of "decode" (a decoding process: file to stored values and table, and with
    # a CPU model on to the tensor), "preprocess" (its share of the batch's steps in the
    # model's process: tensor steps on the device) and "model" (the whole batch it ran in).
    seconds: dict[str, float] = field(default_factory=dict)


def _message(path: Path, e: BaseException, memory_mb: int | None) -> str:
    if isinstance(e, PreprocessError):
        return str(e)
    if isinstance(e, MemoryError) or "can't allocate memory" in str(e):  # torch's words
        return (
            f"{path.name}: decoding needs more memory than a decoding process may use "
            f"({memory_mb} MB)"
        )
    return f"{path.name}: {type(e).__name__}: {e}"


def _read_into(path: Path, conn: Connection, memory_mb: int | None) -> None:
    limit_memory(memory_mb)
    try:
        conn.send(read(path))
    except Exception as e:  # any way a file can be malformed: its outcome, not ours
        conn.send(PreprocessError(_message(path, e, memory_mb)))


def read_alone(path: Path, memory_mb: int | None = DECODE_MEMORY_MB) -> Read:
    """:func:`ai.decode.read` in a process of its own, allowed ``memory_mb``: a decoder that
    ends it is this file's error, with the signal or status it ended with."""
    receive, send = _CONTEXT.Pipe(duplex=False)
    proc = _CONTEXT.Process(
        target=_read_into, args=(path, send, memory_mb), name="xrayage-decode"
    )
    proc.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:  # it ended before sending anything
        proc.join()
        raise PreprocessError(
            f"pixel data cannot be decoded: the decoding process was {cause_of(proc.exitcode)}"
        ) from None
    finally:
        receive.close()
    proc.join()
    if isinstance(result, Exception):
        raise result
    return result  # type: ignore[no-any-return]


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1)))


class Engine:
    """Files in, outcomes out. Holds its decoding processes until :meth:`close` (or the end of
    a ``with`` block), so that a node pays their start once, not once a batch."""

    def __init__(
        self,
        model: AgeModel,
        batch_size: int = 8,
        workers: int | None = None,
        decoder: DeviceDecoder | None = None,
        memory_mb: int | None = DECODE_MEMORY_MB,
    ) -> None:
        self.model = model
        self.memory_mb = memory_mb
        self.batch_size = batch_size
        self.workers = workers or default_workers()
        self._pool: ProcessPoolExecutor | None = None
        # With a device decoder the host leaves JPEG 2000 encoded (ai/device_decode.py). With
        # the model on the CPU, the tensor steps run in the decoding processes too: on every
        # core, rather than all in this process beside the model (bench/preprocess.py).
        self.decoder = decoder
        self._read: Callable[[Path], Read] = partial(
            read, defer=SYNTAXES if decoder is not None else frozenset()
        )
        self._initializer: Callable[[], None] = partial(decoding_process, memory_mb)
        if model.device.type == "cpu" and decoder is None:
            self._read = partial(read_tensor, input_size=model.card.input_size)
            self._initializer = partial(cpu_decoding_process, memory_mb)

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def warm_up(self) -> None:
        """Start the decoding processes and import the decoders in them now."""
        pool = self._decoders()
        for future in [pool.submit(ready) for _ in range(self.workers)]:
            future.result()

    def _decoders(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=_CONTEXT, initializer=self._initializer
            )
        return self._pool

    def run(self, paths: Iterable[Path | Request]) -> Iterator[Outcome]:
        """One outcome per path (by the engine's model) or request, in order; a file that
        cannot be read is an outcome with an error, never an exception."""
        todo = (p if isinstance(p, Request) else Request(p, (self.model,)) for p in paths)
        pending: deque[tuple[Request, Submitted]] = deque()

        def fill() -> None:
            while len(pending) < 2 * self.batch_size and (req := next(todo, None)):
                pending.append((req, self._submit(req.path)))

        fill()
        while pending:
            batch = [pending.popleft() for _ in range(min(self.batch_size, len(pending)))]
            fill()  # the processes read the next batch while this one runs
            yield from self._predict(
                [(req, self._result(req.path, *sub)) for req, sub in batch]
            )

    def _submit(self, path: Path) -> Submitted:
        pool = self._decoders()
        try:
            return pool.submit(self._read, path), pool
        except BrokenProcessPool:
            self._forget(pool)
            pool = self._decoders()
            return pool.submit(self._read, path), pool

    def _forget(self, pool: ProcessPoolExecutor) -> None:
        """Drop a broken pool (the next submit starts fresh processes), once."""
        if pool is self._pool:
            self.close()

    def _result(self, path: Path, future: Future[Read], pool: ProcessPoolExecutor) -> Read | str:
        """What the host made of ``path``, or why it could not."""
        try:
            return future.result()
        except BrokenProcessPool:  # a decoder ended its process: which file's, nobody knows
            self._forget(pool)
        except Exception as e:
            return _message(path, e, self.memory_mb)
        try:
            return read_alone(path, self.memory_mb)
        except PreprocessError as e:
            return str(e)

    def _decode_on_device(
        self, batch: list[tuple[Path, Read | str]]
    ) -> tuple[list[tuple[Path, Read | str]], list[torch.Tensor | None]]:
        """Decode the frames the host left encoded; a frame the device decoder cannot make is
        read again with the CPU decoders (in a process of its own, as any decode)."""
        decoded: list[torch.Tensor | None] = [None] * len(batch)
        todo = [
            i for i, (_, r) in enumerate(batch)
            if not isinstance(r, str) and r.stored is not None and r.stored.encoded is not None
        ]  # fmt: skip
        if self.decoder is None or not todo:
            return batch, decoded
        try:
            images = self.decoder.decode([batch[i][1].stored for i in todo])  # type: ignore[union-attr]
        except Exception as e:  # the whole batch: each file goes the CPU way
            log.warning("device decoder failed on a batch (%s): decoding it on the CPU", e)
            images = [None] * len(todo)
        batch = list(batch)
        for i, image in zip(todo, images, strict=True):
            decoded[i] = image
            if image is None:
                path = batch[i][0]
                try:
                    batch[i] = (path, read_alone(path))
                except PreprocessError as e:
                    batch[i] = (path, str(e))
        return batch, decoded

    def _predict(self, requests: list[tuple[Request, Read | str]]) -> Iterator[Outcome]:
        started = time.perf_counter()
        batch, decoded = self._decode_on_device([(q.path, r) for q, r in requests])
        outcomes = [
            Outcome(path, error=r)
            if isinstance(r, str)
            else Outcome(path, header=r.header, seconds={"decode": r.seconds})
            for path, r in batch
        ]
        wanted = [q.models for (q, _), (_, r) in zip(requests, batch, strict=True)
                  if not isinstance(r, str)]  # fmt: skip
        # Each file read, with its pixels if the device decoded them.
        reads = [(r, d) for (_, r), d in zip(batch, decoded, strict=True) if not isinstance(r, str)]
        if reads:
            made = [r.tensor for r, _ in reads]  # by a decoding process (a CPU model), or here:
            todo = [k for k, (r, _) in enumerate(reads) if r.tensor is None]
            if todo:
                x = tensors(
                    [reads[k][0].stored for k in todo],  # type: ignore[misc]
                    self.model.card.input_size, self.model.device, [reads[k][1] for k in todo],
                )  # fmt: skip
                for k, tensor in zip(todo, x, strict=True):
                    made[k] = tensor
            x = torch.stack(made)  # type: ignore[arg-type]
            prepared = time.perf_counter()
            ages: list[dict[str, float]] = [{} for _ in reads]
            for sha, model in {m.card.sha256: m for ms in wanted for m in ms}.items():
                rows = [k for k, ms in enumerate(wanted) if any(m.card.sha256 == sha for m in ms)]
                some = x if len(rows) == len(reads) else x[rows]  # the files that asked for it
                for k, age in zip(rows, model.predict(some), strict=True):
                    ages[k][sha] = age
            model_seconds = time.perf_counter() - prepared
            share = (prepared - started) / len(reads)
            found = iter(zip(wanted, ages, strict=True))
            for outcome in outcomes:
                if outcome.error is None:
                    models, outcome.ages = next(found)
                    outcome.xray_age = outcome.ages[models[0].card.sha256]
                    outcome.seconds.update(preprocess=share, model=model_seconds)
        yield from outcomes
