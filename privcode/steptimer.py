"""Step instrumentation of a training run: wall time and tokens per step, and an opt-in profile.

    timer, prof = StepTimer(device, world), StepProfiler(rank, start)
    prof.at(step); timer.start(); ...one optimizer step...; timer.stop(local_tokens)
    timer.summary()   # {"tokens_per_s": ..., "peak_mem_gib_max_rank": ..., "step_seconds": [...], ...}
    PRIVCODE_PROFILE=DIR privcode dp-finetune ...   # DIR/profile_rank<r>.txt: kernel and operator tables
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from privcode.io import atomic_file


class StepProfiler:
    """PRIVCODE_PROFILE=DIR: torch.profiler over steps 3-5 of this run (after warm-up), every rank;
    DIR/profile_rank<r>.txt gets the kernel and operator tables (by device and by CPU time)."""

    FIRST, STEPS = 2, 3

    def __init__(self, rank: int, start: int):
        self.dir = os.environ.get("PRIVCODE_PROFILE")
        self.rank, self.begin, self.prof = rank, start + self.FIRST, None

    def at(self, step: int) -> None:
        if not self.dir:
            return
        if step == self.begin and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
        elif self.prof is not None and step >= self.begin + self.STEPS:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            ka = self.prof.key_averages()
            tables = [f"rank {self.rank}, steps {self.begin}..{step - 1}"]
            for key in ("self_device_time_total", "self_cpu_time_total", "cpu_time_total"):
                try:
                    tables.append(f"\n== sorted by {key}\n" + ka.table(sort_by=key, row_limit=40, max_name_column_width=80))
                except Exception as e:  # noqa: BLE001 - column names differ across torch versions
                    tables.append(f"\n== {key}: {e}")
            Path(self.dir).mkdir(parents=True, exist_ok=True)
            with atomic_file(Path(self.dir) / f"profile_rank{self.rank}.txt") as fh:
                fh.write("\n".join(tables))
            self.prof, self.dir = None, None


class StepTimer:
    """Per-step wall time (synchronized on GPUs) and global token counts, for throughput figures."""

    def __init__(self, device, world: int):
        self.device, self.world, self.seconds, self.tokens = device, world, [], []
        self._t = None
        if str(device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)

    def _sync(self):
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def start(self):
        self._sync()
        self._t = time.perf_counter()

    def stop(self, local_tokens: int):
        self._sync()
        self.seconds.append(time.perf_counter() - self._t)
        t = torch.tensor([float(local_tokens)], device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        self.tokens.append(int(t.item()))

    def summary(self) -> dict:
        """Throughput over steps after the first (warm-up), and the peak GPU memory of any rank."""
        peak = 0.0
        if str(self.device).startswith("cuda"):
            m = torch.tensor([torch.cuda.max_memory_allocated(self.device) / 2 ** 30], device=self.device)
            if self.world > 1:
                torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX)
            peak = float(m)
        secs, toks = self.seconds[1:] or self.seconds, self.tokens[1:] or self.tokens
        return {"step_seconds": self.seconds, "step_tokens": self.tokens,
                "tokens_per_s": sum(toks) / max(sum(secs), 1e-9), "peak_mem_gib_max_rank": peak}
