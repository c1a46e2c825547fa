"""eagleray's engine: lossless EAGLE-2 speculative decoding on stock Hugging Face causal LMs.

Token ids in, token ids out. Never imports ray.
"""

from engine.types import EAGLE_DEFAULT_TREE, GenerationOutput, SamplingParams, StepStats, TreeParams

__all__ = ["EAGLE_DEFAULT_TREE", "GenerationOutput", "SamplingParams", "StepStats", "TreeParams"]
