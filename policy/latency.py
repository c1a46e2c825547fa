"""Per-machine latency table: the cost of one draft/verify step as a function of TreeParams.

The table holds median draft and verify seconds per measured shape. It is measured once at start-up by timing
the engine's step for every action's shape (`training.step_timing.measure_latency_table`; measuring needs the
engine, which policy/ does not import) and cached on disk as JSON keyed by a signature of the machine and the
model, so a restart on the same machine does not measure again. It gives the bandit a low-noise, hardware-aware
reward denominator: the same policy code learns small trees on a CPU and wide ones on a GPU.

Shapes that were not measured are estimated from two small fits: draft seconds ~ a + b*(depth+1) + c*depth*top_k
(least squares) and verify seconds by linear interpolation in the verify width total_tokens + 1.

This module holds data and JSON only: no measuring, no pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.types import TreeParams

FORMAT_VERSION = 1
LATENCY_NAME = "latency.json"  # the table's file name in a policy folder


def latency_signature(model_config: dict, device: str, num_threads: int | None = None) -> dict:
    """What the latency depends on: the machine (processor, cores, torch, device, threads) and the model (a hash
    of its config dict). Two equal signatures may share a table."""
    import torch  # torch is an allowed policy dependency, kept out of the import path of observation/bandit

    config_text = json.dumps(model_config, sort_keys=True, default=str)
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": str(device),
        "num_threads": num_threads if num_threads is not None else torch.get_num_threads(),
        "model": hashlib.sha256(config_text.encode()).hexdigest()[:16],
    }


def _draft_design(params: TreeParams) -> list[float]:
    return [1.0, params.depth + 1.0, float(params.depth * params.top_k)]


@dataclass
class LatencyTable:
    """Median draft and verify seconds per measured shape ('total/depth/top_k' -> seconds)."""

    draft_seconds: dict[str, float]
    verify_seconds: dict[str, float]
    signature: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.draft_seconds or set(self.draft_seconds) != set(self.verify_seconds):
            raise ValueError(
                "a LatencyTable needs the same non-empty set of shapes in draft and verify seconds"
            )
        for name, table in (("draft", self.draft_seconds), ("verify", self.verify_seconds)):
            for key, value in table.items():
                TreeParams.parse(key)
                if not value > 0:
                    raise ValueError(f"{name} seconds for {key} must be > 0, got {value}")
        shapes = [TreeParams.parse(k) for k in self.draft_seconds]
        design = np.array([_draft_design(p) for p in shapes])
        targets = np.array([self.draft_seconds[p.compact] for p in shapes])
        self._draft_coefficients = np.linalg.lstsq(design, targets, rcond=None)[0]  # [a, b, c]
        widths = sorted({p.total_tokens + 1 for p in shapes})
        by_width = {
            w: [self.verify_seconds[p.compact] for p in shapes if p.total_tokens + 1 == w] for w in widths
        }
        self._verify_widths = np.array(widths, dtype=np.float64)
        self._verify_points = np.array([statistics.median(by_width[w]) for w in widths])
        self._cache: dict[TreeParams, float] = {}

    def draft(self, params: TreeParams) -> float:
        measured = self.draft_seconds.get(params.compact)
        if measured is not None:
            return measured
        return max(float(np.dot(self._draft_coefficients, _draft_design(params))), 1e-6)

    def verify(self, params: TreeParams) -> float:
        measured = self.verify_seconds.get(params.compact)
        if measured is not None:
            return measured
        widths, points = self._verify_widths, self._verify_points
        width = params.total_tokens + 1.0
        if len(widths) == 1 or width <= widths[-1]:
            return float(np.interp(width, widths, points))
        slope = (points[-1] - points[-2]) / (widths[-1] - widths[-2])  # extrapolate the last segment
        return float(points[-1] + slope * (width - widths[-1]))

    def step_seconds(self, params: TreeParams) -> float:
        """Expected seconds of one draft/verify step of shape `params` (cached per shape)."""
        cached = self._cache.get(params)
        if cached is None:
            cached = self._cache[params] = self.draft(params) + self.verify(params)
        return cached

    # ---- JSON persistence ------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "signature": self.signature,
            "draft_seconds": self.draft_seconds,
            "verify_seconds": self.verify_seconds,
        }

    @classmethod
    def from_json(cls, data: dict) -> LatencyTable:
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"latency table format {data.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        return cls(
            draft_seconds={k: float(v) for k, v in data["draft_seconds"].items()},
            verify_seconds={k: float(v) for k, v in data["verify_seconds"].items()},
            signature=dict(data.get("signature", {})),
        )

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str) -> LatencyTable:
        with open(path) as f:
            return cls.from_json(json.load(f))

    @classmethod
    def load_or_measure(
        cls, path: str, signature: dict, measure_fn: Callable[[], LatencyTable]
    ) -> LatencyTable:
        """The table cached at `path` if its signature equals `signature`; otherwise measure, save and return."""
        if os.path.isfile(path):
            try:
                table = cls.load(path)
            except (ValueError, KeyError, json.JSONDecodeError):
                table = None
            if table is not None and table.signature == signature:
                return table
        table = measure_fn()
        table.signature = dict(signature)
        table.save(path)
        return table
