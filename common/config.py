"""The configurations, validated (pydantic) before any work starts.

`ProcessorConfig` is what generating rows needs, wherever the rows come from: the models, the row columns, the
sampling defaults, the actors and their resources. `pipeline.processor.build_processor` takes it, and each
generation actor receives it (as a dict) to load its models and controller. `GenerateConfig` is the job's: a
ProcessorConfig plus where the rows come from and go (input, output, resume, Ray address, progress).
Paths to models are resolved by the entry points (the default models when none are given); this module checks
values, not files. Nothing here imports ray or torch (`engine.types` is plain data): Ray Data's row-validation workers
import this module.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from pathlib import PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.types import TreeParams

POLICY_KEYWORDS = ("static", "heuristic", "plain")
MAX_TEMPERATURE = 100.0


class ProcessorConfig(BaseModel):
    """Everything generating rows needs. Field descriptions double as the `--help` text of `jobs.generate`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_column: str = Field("prompt", min_length=1, description="input column holding the prompt text")
    messages_column: str = Field(
        "messages",
        min_length=1,
        description="input column holding chat messages (a list of {role, content}, roles system, user and "
        "assistant); when the input has this column, every row is generated from it and the prompt column "
        "is not read",
    )
    chat_template: bool = Field(
        True,
        description="render each row through the tokenizer's chat template, a prompt as one user message (off, "
        "or a tokenizer without one: prompts go in as raw text, and messages rows are error rows)",
    )
    id_column: str = Field("id", min_length=1, description="input column holding a row id")
    model: str = Field(
        description="target model: a folder (any HF Llama/Qwen2/Qwen3/Mistral causal LM), or a Hugging Face "
        "model id already in the local HF cache"
    )
    draft: str = Field(description="EAGLE-1/2 draft head folder for that target")
    policy: str = Field(
        description="tree policy: a trained policy folder, 'static' (always --tree), 'heuristic', or 'plain' (no "
        "draft: plain decoding, the speculation-off baseline)"
    )
    tree: str = Field("8/4/2", description="total_tokens/depth/top_k for 'static', and the fallback tree")
    max_new_tokens: int = Field(128, gt=0, description="new tokens per row unless the row says otherwise")
    max_new_tokens_cap: int = Field(
        4096, gt=0, description="largest max_new_tokens a row may ask for; above it the row is an error"
    )
    max_prompt_tokens: int | None = Field(
        None,
        gt=0,
        description="longest prompt, in tokens, a row may have; longer is a row error (default: whatever fits "
        "the model's context with the row's new tokens)",
    )
    row_timeout_s: float | None = Field(
        600.0,
        gt=0.0,
        description="seconds one row may generate for; a row that runs longer stops and becomes an error row "
        "(none: no limit)",
    )
    temperature: float = Field(
        0.0,
        ge=0.0,
        le=MAX_TEMPERATURE,
        description="0 is greedy; a row may set its own (its temperature column or sampling_params)",
    )
    top_p: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 or 0: "
        "off); a row may set its own in sampling_params",
    )
    top_k: int = Field(
        0, ge=0, description="sample among the top_k most likely tokens (0: off); a row may set its own"
    )
    num_actors: int = Field(1, ge=1, description="generation actors (one per GPU on a GPU cluster)")
    batch_size: int = Field(16, ge=1, description="rows per batch handed to a generation actor")
    max_batch_size: int = Field(
        16,
        ge=1,
        description="rows an actor decodes together (continuous batching: finished rows leave, queued rows "
        "join at every step); above 1 each step's tree is chosen for the load (plain decoding included), or is "
        "--tree with the 'static' policy; 1: one row at a time, each step's tree from --policy",
    )
    max_concurrent_batches: int = Field(
        2,
        ge=1,
        description="batches an actor works on at once, so one batch's last rows decode beside the next "
        "batch's first",
    )
    shared_cache: bool = Field(
        False,
        description="share prompt-level tree decisions across actors through the FAISS cache actor (off by "
        "default: on CPUs the prompt embeddings cost more than the decisions they save, see README)",
    )
    cross_request_drafts: bool = Field(
        False,
        description="draft from what similar earlier prompts generated, across actors (shared through the "
        "cache actor), from each row's prompt and from the actor's own outputs; verification keeps every token "
        "exact. Off by default: it pays on templated jobs and costs on chat on this project's CPU (see README)",
    )
    similarity_threshold: float = Field(
        0.85, gt=0.0, le=1.0, description="cosine at which a similar prompt reuses a decision"
    )
    namespace: str | None = Field(
        None,
        min_length=1,
        description="Ray namespace of the shared cache actor; jobs given the same one share its entries "
        "(default: one of the job's own, so no other job reads them)",
    )
    cache_memory_mb: float = Field(
        256.0,
        gt=0.0,
        description="memory bound of the shared cache's entries; beyond it the least recently used are evicted",
    )
    cache_name: str = Field("context-cache", min_length=1, description="name of the shared cache actor")
    num_gpus_per_actor: float | None = Field(
        None, ge=0.0, description="GPUs per actor; default 1 when the cluster has GPUs, else 0"
    )
    cpus_per_actor: float | None = Field(
        None, gt=0.0, description="CPUs per actor; default: the cluster's CPUs split between the actors"
    )
    trust_remote_code: bool = Field(
        False, description="let Hugging Face run Python code shipped with the model folder (off: never)"
    )
    job_name: str = Field("eagleray", min_length=1, description="tag on the dashboard metrics")
    seed: int = Field(0, ge=0, description="seeds sampling (temperature > 0); each row gets its own stream")

    @field_validator("temperature")
    @classmethod
    def _finite_temperature(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"temperature must be finite, got {value}")
        return value

    @field_validator("tree")
    @classmethod
    def _valid_tree(cls, value: str) -> str:
        TreeParams.parse(value)  # raises a ValueError that names the expected form
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ProcessorConfig:
        if self.max_new_tokens > self.max_new_tokens_cap:
            raise ValueError(
                f"max_new_tokens {self.max_new_tokens} is above max_new_tokens_cap {self.max_new_tokens_cap}"
            )
        columns = {
            "prompt_column": self.prompt_column,
            "id_column": self.id_column,
            "messages_column": self.messages_column,
        }
        for first, second in itertools.combinations(columns, 2):
            if columns[first] == columns[second]:
                raise ValueError(f"{first} and {second} are both {columns[first]!r}")
        return self

    @property
    def static_tree(self) -> TreeParams:
        return TreeParams.parse(self.tree)

    @property
    def batches_rows(self) -> bool:
        """Whether actors decode rows together. Not with max_batch_size 1, nor with prompt decisions shared
        through the cache (a learned policy with shared_cache), which choose a tree per row."""
        return self.max_batch_size > 1 and not (self.policy_kind == "learned" and self.shared_cache)

    @property
    def uses_cache_actor(self) -> bool:
        """Whether the job needs the shared cache actor: for prompt decisions or for cross-request drafts."""
        return self.shared_cache or self.cross_request_drafts

    @property
    def tree_choice(self) -> str:
        """How each step's tree is chosen, in words (the job's start line)."""
        if self.policy_kind == "static":
            chosen = f"trees: {self.tree} on every step"
        elif self.policy_kind == "plain":
            chosen = "no draft (plain decoding)"
        else:
            chosen = (
                "trees: chosen for the load" if self.batches_rows else f"trees: the {self.policy_kind} policy"
            )
        rows = f"up to {self.max_batch_size} rows together" if self.batches_rows else "one row at a time"
        return f"{chosen}, {rows}"

    @property
    def policy_kind(self) -> str:
        """'static', 'heuristic', 'plain' or 'learned' (a policy folder)."""
        return self.policy if self.policy in POLICY_KEYWORDS else "learned"

    @classmethod
    def of(cls, config: dict | BaseModel) -> ProcessorConfig:
        """The processor's part of a config: itself, or the ProcessorConfig fields of a GenerateConfig (or of
        either's dict)."""
        values = config.model_dump() if isinstance(config, BaseModel) else config
        return cls(**{name: values[name] for name in cls.model_fields if name in values})


class GenerateConfig(ProcessorConfig):
    """Everything `python -m jobs.generate` needs: a ProcessorConfig, plus the job's input, output and run."""

    input: str = Field(description="Parquet file, folder or glob; local, or any pyarrow filesystem URI")
    output: str = Field(description="output folder for the Parquet results and _stats.json")
    address: str | None = Field(
        None, description="Ray address; default: the cluster in RAY_ADDRESS or a new local one"
    )
    overwrite: bool = Field(
        False,
        description="start afresh: delete the results already in the output folder (without it, a rerun of "
        "the same job resumes where it stopped)",
    )
    progress: bool = Field(
        True, description="show Ray Data's progress: bars in a terminal, log lines every 10 s elsewhere"
    )


class ServeConfig(ProcessorConfig):
    """Everything `python -m jobs.serve` needs: a ProcessorConfig (the models, the default sampling, the rows one
    engine decodes together) plus the endpoint's address, replicas and limits. The row-column and job fields of
    ProcessorConfig have no use here."""

    host: str = Field("127.0.0.1", min_length=1, description="address the HTTP server listens on")
    port: int = Field(8000, ge=1, le=65535, description="port of the HTTP server")
    address: str | None = Field(
        None, description="Ray address; default: the cluster in RAY_ADDRESS or a new local one"
    )
    num_replicas: int = Field(1, ge=1, description="replicas of the model (one per GPU on a GPU cluster)")
    served_model_name: str | None = Field(
        None,
        min_length=1,
        description="the model's name in the API (/v1/models, a request's model field); default: the model "
        "folder's name (its parent's for a folder named target)",
    )
    max_queued_requests: int = Field(
        64,
        ge=0,
        description="requests a replica holds waiting beyond the max_batch_size it decodes; one more is "
        "answered 429 at once",
    )
    cpus_per_replica: float | None = Field(
        None, gt=0.0, description="CPUs per replica; default: the cluster's CPUs split between the replicas"
    )
    num_gpus_per_replica: float | None = Field(
        None, ge=0.0, description="GPUs per replica; default 1 when the cluster has GPUs, else 0"
    )

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        path = PurePosixPath(self.model.replace("\\", "/").rstrip("/"))
        return path.parent.name if path.name == "target" and path.parent.name else path.name

    @property
    def max_requests(self) -> int:
        """Requests one replica holds at once (decoding and waiting); beyond it, 429."""
        return self.max_batch_size + self.max_queued_requests


def describe_validation_error(error: ValidationError, option_name: Callable[[str], str] = str) -> str:
    """One line per problem, naming the option: 'max_new_tokens: Input should be greater than 0 (got -3)'.

    option_name maps a field name to how the caller's user spells it (on the command line: '--max-new-tokens').
    A problem of the whole config has its field names mapped too, outside quoted values:
    'config: max_new_tokens 200 is above max_new_tokens_cap 100'."""
    lines = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if item["loc"]:
            location = ".".join(option_name(str(part)) for part in item["loc"])
            lines.append(f"{location}: {message} (got {item.get('input')!r})")
        else:
            parts = re.split(r"('[^']*')", message)  # odd parts are quoted values, left as they are
            parts[::2] = [_rename_fields(part, option_name) for part in parts[::2]]
            lines.append(f"config: {''.join(parts)}")
    return "\n".join(lines)


def _rename_fields(text: str, option_name: Callable[[str], str]) -> str:
    def rename(match: re.Match) -> str:
        return option_name(match[0]) if match[0] in GenerateConfig.model_fields else match[0]

    return re.sub(r"\b[a-z_]+\b", rename, text)
