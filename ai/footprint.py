"""What one more model costs the device it runs on, measured: a model that does not fit is
refused when it is added (``xrayage model add``), not found out by the OOM killer later.

On CUDA the peak that PyTorch's allocator reached while the model was loaded and ran one batch
at the node's batch size, against the free device memory before (what the node's own models
leave). On the CPU the growth of this process's peak resident size over the same steps, against
the kernel's MemAvailable.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from ai.model import AgeModel


@dataclass(frozen=True)
class Footprint:
    device: str
    weights_bytes: int  # parameters and buffers
    peak_bytes: int  # loading it and one batch through it
    available_bytes: int | None  # None: unknown

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.peak_bytes <= self.available_bytes

    def sentence(self) -> str:
        mb = 1 << 20
        free = (
            f"{self.available_bytes / mb:,.0f} MB available" if self.available_bytes is not None
            else "available memory unknown"
        )  # fmt: skip
        return (
            f"{self.weights_bytes / mb:,.1f} MB of weights, {self.peak_bytes / mb:,.0f} MB at "
            f"its peak with one batch on {self.device}; {free}"
        )


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KB on Linux


def measure(path: Path, device: str, batch_size: int) -> tuple[AgeModel, Footprint]:
    """Load ``path`` on ``device`` and run one batch of ``batch_size`` through it."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        free = torch.cuda.mem_get_info()[0]
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        free, before = _mem_available(), _peak_rss()
    model = AgeModel.load(path, device)
    size = model.card.input_size
    model.predict(torch.zeros(batch_size, 3, size, size))
    peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss()) - before
    weights = sum(
        t.numel() * t.element_size() for t in [*model.module.parameters(), *model.module.buffers()]
    )
    return model, Footprint(str(model.device), weights, max(peak, weights), free)
