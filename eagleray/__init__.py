"""eagleray's public API: lossless EAGLE speculative decoding for batch generation on Ray.

    from eagleray import ProcessorConfig, build_processor, default_model_paths

    config = ProcessorConfig(**default_model_paths(), max_new_tokens=64)
    processor = build_processor(config, preprocess=..., postprocess=...)
    dataset = processor(ray.data.read_json("prompts.jsonl"))  # lazy: write_parquet, take, iter_rows, ...

- `build_processor`, `Processor`: generation as a Ray Data stage (`pipeline.processor`).
- `ProcessorConfig`: the models, sampling defaults and actors; `GenerateConfig`: the Parquet job's, which adds its
  input, output and run (`common.config`).
- `EaModel`: a target and its EAGLE head in one process (`engine.ea_model`), with the official EAGLE signature.
- `SamplingParams`, `TreeParams`: the engine's sampling settings and draft tree shapes (`engine.types`).
- `default_model_paths()`: SmolLM2-135M-Instruct with its committed head and policy (`jobs.models`).

The command line is `eagleray <command>` (`eagleray.cli`). Names are imported on first use, so `import eagleray`
loads neither torch nor Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "EaModel": "engine.ea_model",
    "build_processor": "pipeline.processor",
    "Processor": "pipeline.processor",
    "ProcessorConfig": "common.config",
    "GenerateConfig": "common.config",
    "SamplingParams": "engine.types",
    "TreeParams": "engine.types",
}
__all__ = [
    "EaModel",
    "GenerateConfig",
    "Processor",
    "ProcessorConfig",
    "SamplingParams",
    "TreeParams",
    "__version__",
    "build_processor",
    "default_model_paths",
]

if TYPE_CHECKING:
    from common.config import GenerateConfig, ProcessorConfig
    from engine.ea_model import EaModel
    from engine.types import SamplingParams, TreeParams
    from pipeline.processor import Processor, build_processor


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eagleray' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def default_model_paths(root: str | None = None) -> dict[str, str]:
    """{"model", "draft", "policy"}: the default models' folders under `root` (default: the repo's
    models/smollm2), converting the target from its registry package on first use (about a minute) and copying
    the committed head and policy into another root. Pass them to ProcessorConfig(**...)."""
    from jobs.models import COMMITTED_ROOT, ensure_models

    paths = ensure_models(COMMITTED_ROOT if root is None else root)
    return {"model": paths["target"], "draft": paths["draft"], "policy": paths["policy"]}
