"""nvidia-smi sampled in the background while a benchmark runs: each GPU's utilization and memory in use (all
processes), with the time of every sample, so a benchmark can take the peak or the busy share of any window."""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import threading
import time


class GpuSampler:
    """`with GpuSampler(0.5) as gpus: ...`, then gpus.peak_mib(), gpus.busy_share(since, until)."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.stop = interval, threading.Event()
        self.samples: list[tuple[float, str, int, int]] = []  # (time, GPU index, utilization %, memory MiB)
        self.ok = shutil.which("nvidia-smi") is not None
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")  # only the GPUs this run may use (others may be busy)
        self.gpus = {g.strip() for g in visible.split(",")} if visible and visible.replace(",", "").isdigit() else None

    def __enter__(self):
        if self.ok:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()

    def _run(self):
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            now = time.time()
            for line in out.strip().splitlines():
                index, util, used = (x.strip() for x in line.split(","))
                if self.gpus is None or index in self.gpus:
                    self.samples.append((now, index, int(util), int(used)))
            self.stop.wait(self.interval)

    def _window(self, since, until):
        return [s for s in self.samples if (since is None or s[0] >= since) and (until is None or s[0] <= until)]

    def peak_mib(self, since: float | None = None, until: float | None = None) -> int:
        """The most memory in use on any one GPU in the window."""
        return max((s[3] for s in self._window(since, until)), default=0)

    def busy_share(self, since: float | None = None, until: float | None = None) -> dict[str, float]:
        """Each GPU's mean utilization in the window (the share of time a kernel ran), 0-1."""
        by_gpu: dict[str, list[int]] = {}
        for _, index, util, _ in self._window(since, until):
            by_gpu.setdefault(index, []).append(util)
        return {gpu: round(statistics.mean(u) / 100, 3) for gpu, u in sorted(by_gpu.items())}
