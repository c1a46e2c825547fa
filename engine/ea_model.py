"""`EaModel`: the official EAGLE entry points (`from_pretrained`, `eagenerate`, `naivegenerate`,
`get_tokenizer`) over eagleray's engine, so EAGLE users can switch without changing code, plus
`eagenerate_batch` for many prompts at once.

Only the facade lives here; the loop is `generate.py`. Unlike the official class, the tree shape is a value
passed per call (`tree_params=` or `rl_policy=`), never mutated model state.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from engine.batch import GenerationRequest, generate_batch
from engine.generate import generate_plain, generate_speculative
from engine.heads import AnyDraftHead, load_draft_head
from engine.target import TargetModel
from engine.types import (
    BatchPlanner,
    Controller,
    GenerationOutput,
    SamplingParams,
    StaticController,
    TreeParams,
)


class GenerationFailed(Exception):
    """Stands in `EaModel.eagenerate_batch`'s result for a prompt that could not be generated."""


class EaModel(torch.nn.Module):
    """A target model plus its EAGLE draft head."""

    def __init__(
        self,
        base_model: PreTrainedModel,
        ea_layer: AnyDraftHead,
        tree_params: TreeParams,
        tokenizer=None,
        base_model_name_or_path: str | None = None,
    ) -> None:
        super().__init__()
        self.base_model = base_model
        self.ea_layer = ea_layer
        self.target = TargetModel(base_model, ea_layer.feature_layers)
        self.tree_params = tree_params
        self.tokenizer = tokenizer
        self.base_model_name_or_path = base_model_name_or_path
        self.last_output: GenerationOutput | None = None

    @classmethod
    def from_pretrained(
        cls,
        use_eagle3: bool | None = None,
        base_model_path: str | None = None,
        ea_model_path: str | None = None,
        total_token: int = 60,
        depth: int = 5,
        top_k: int = 10,
        threshold: float = 1.0,
        **hf_kwargs,
    ) -> EaModel:
        """Load a target with AutoModelForCausalLM and an EAGLE-1/2 or EAGLE-3 head from a folder in the official
        layout. use_eagle3: None reads the kind from the checkpoint; True or False must agree with it.
        threshold: accepted for the official signature; trees here are shaped by total_token/depth/top_k only."""
        del threshold
        if base_model_path is None or ea_model_path is None:
            raise ValueError("EaModel.from_pretrained needs base_model_path= and ea_model_path=")
        for name, path in (("base_model_path", base_model_path), ("ea_model_path", ea_model_path)):
            if not os.path.isdir(path):
                raise ValueError(f"{name} {path!r} is not a folder (models load from local folders here)")
        tree_params = TreeParams(total_token, depth, top_k)
        hf_kwargs.setdefault("attn_implementation", "sdpa")
        hf_kwargs.setdefault("trust_remote_code", False)
        base_model = AutoModelForCausalLM.from_pretrained(base_model_path, **hf_kwargs).eval()
        TargetModel(base_model)  # refuse unsupported targets with a clear error
        head = load_draft_head(ea_model_path, base_model, use_eagle3)
        tokenizer = None
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                base_model_path, trust_remote_code=hf_kwargs["trust_remote_code"]
            )
        except (OSError, ValueError):
            tokenizer = None  # a target without a tokenizer still generates from ids
        return cls(base_model, head, tree_params, tokenizer, base_model_path)

    def get_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"no tokenizer was found beside the base model {self.base_model_name_or_path!r}")
        return self.tokenizer

    def _sampling(self, temperature: float, top_p: float, top_k: float) -> SamplingParams:
        return SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k))

    def eagenerate(
        self,
        input_ids: torch.Tensor,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: float = 0.0,
        max_new_tokens: int = 512,
        max_length: int = 2048,
        log: bool = False,
        is_llama3: bool = False,
        rl_policy: Controller | None = None,
        tree_params: TreeParams | None = None,
        generator: torch.Generator | None = None,
    ):
        """Speculative generation. Returns ids [1, prompt + new]; with log=True, (ids, new_tokens, steps) as the
        official one does. `rl_policy` (a Controller) or `tree_params` override the tree shape for this call.
        A sampling `generator` must be on the model's device."""
        del is_llama3  # the official flag adds <|eot_id|> as a stop; here eos comes from the model config
        controller = rl_policy or StaticController(tree_params or self.tree_params)
        output = generate_speculative(
            self.target,
            self.ea_layer,
            input_ids,
            controller,
            sampling=self._sampling(temperature, top_p, top_k),
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            generator=generator,
        )
        self.last_output = output
        if log:
            return output.output_ids, output.num_new_tokens, len(output.steps)
        return output.output_ids

    def eagenerate_batch(
        self,
        prompts: list,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: float = 0.0,
        max_length: int = 2048,
        max_batch_size: int = 16,
        tree_params: TreeParams | None = None,
        planner: BatchPlanner | None = None,
        seeds: list[int] | None = None,
    ) -> list:
        """Batched speculative generation (`engine.batch.generate_batch`): up to `max_batch_size` prompts decode
        together, continuously batched. prompts: token id lists or 1-D tensors. Returns one 1-D tensor (prompt +
        new tokens) per prompt, in input order; a prompt that fails gets a `GenerationFailed` in its place, with
        its error, and the others are unaffected.

        Every step's tree: `planner`'s choice for the load (`policy.load_planner.LoadPlanner`), else
        `tree_params` or the model's tree. seeds: one per prompt for sampling (default: its index)."""
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts")
        sampling = self._sampling(temperature, top_p, top_k)
        controller = StaticController(tree_params or self.tree_params)
        requests = []
        for index, prompt in enumerate(prompts):
            ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
            seed = index if seeds is None else seeds[index]
            requests.append(GenerationRequest(ids, max_new_tokens, controller, sampling, seed=seed))
        results = generate_batch(
            self.target,
            self.ea_layer,
            requests,
            max_length=max_length,
            max_batch_size=max_batch_size,
            planner=planner,
        )
        self.last_results = results
        return [
            GenerationFailed(result.error) if result.error else result.output.output_ids[0]
            for result in results
        ]

    def naivegenerate(
        self,
        input_ids: torch.Tensor,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: float = 0.0,
        max_new_tokens: int = 512,
        max_length: int = 2048,
        log: bool = False,
        is_llama3: bool = False,
        generator: torch.Generator | None = None,
    ):
        """Plain decoding with the same signature, one target forward per token."""
        del is_llama3
        output = generate_plain(
            self.target,
            input_ids,
            sampling=self._sampling(temperature, top_p, top_k),
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            generator=generator,
        )
        self.last_output = output
        if log:
            return output.output_ids, output.num_new_tokens, output.num_new_tokens
        return output.output_ids
