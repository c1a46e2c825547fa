"""Shared fixtures for the engine tests: tiny random Llama and Qwen2 targets with cheaply trained draft heads.

Random draft heads accept almost nothing, which would leave multi-token acceptance and KV compaction untested. So
the targets are made peaky (embeddings and lm_head scaled up, so greedy output is confident and repetitive) and a
head is fitted for a fixed number of epochs (about a second on two cores) with the engine's own trainer.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
# Latency tables the actors measure go to a folder of the test run's own, not the user's ~/.cache/eagleray.
os.environ.setdefault("EAGLERAY_CACHE_DIR", tempfile.mkdtemp(prefix="eagleray-test-cache-"))

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from engine.draft_head import DraftHead
from engine.target import TargetModel
from training.train_draft import DraftTrainConfig, collect_features, train_head

# With TEST_WORKERS=N (pytest-xdist) each worker runs its own local Ray. Ray finds "the cluster on
# this machine" through <RAY_TMPDIR>/ray_current_cluster, written by `ray start` and by `cluster_utils.Cluster`:
# with one shared temp folder, a worker's `ray.init()` (and every job or server it starts) would join the other
# worker's cluster while that one runs. So each worker gets a folder of its own (children inherit it), and an
# address a killed earlier run left there is dropped, since `ray.init(num_cpus=...)` would try to join it.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
RAY_TEMP_DIR = os.path.join(tempfile.gettempdir(), f"eagleray-test-ray-{WORKER}")
os.environ["RAY_TMPDIR"] = RAY_TEMP_DIR
os.makedirs(RAY_TEMP_DIR, exist_ok=True)
with contextlib.suppress(FileNotFoundError):
    os.remove(os.path.join(RAY_TEMP_DIR, "ray_current_cluster"))

# One intra-op thread: these models are tiny, and on the shared two-core machine two OpenMP threads that spin
# against other work made the same tests 10-80x slower (measured: 1.1 s vs 93 s for 20 speculative generations).
torch.set_num_threads(1)

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
TINY_VOCAB = 96
WEIGHT_SCALE = 3.0  # makes the random target's greedy output peaky and repetitive, so a head can learn it
DRAFT_TRAIN_CONFIG = DraftTrainConfig(
    max_new_tokens=48,
    generation_batch_size=32,
    epochs=20,
    batch_size=8,
    warmup_steps=5,
    time_budget_s=30.0,  # only a safety net on a loaded machine; normally the 20 epochs finish in ~1-5 s
    seed=0,
)


def build_tiny_lm(
    architecture: str,
    seed: int,
    vocab_size: int = TINY_VOCAB,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    weight_scale: float = WEIGHT_SCALE,
    **config_overrides,
) -> PreTrainedModel:
    """A tiny random causal LM (fp32, sdpa, no eos unless given) with embeddings and lm_head scaled up."""
    config_class, model_class = ARCHITECTURES[architecture]
    settings = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        **config_overrides,
    }
    torch.manual_seed(seed)
    model = model_class(config_class(**settings, attn_implementation="sdpa")).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(weight_scale)
        model.get_output_embeddings().weight.mul_(weight_scale)
    return model


def random_prompts(
    num_prompts: int, vocab_size: int, min_length: int, max_length: int, seed: int
) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, max_length + 1, (num_prompts,), generator=generator).tolist()
    return [torch.randint(0, vocab_size, (length,), generator=generator).tolist() for length in lengths]


@dataclass(frozen=True)
class TinyTarget:
    """A tiny target, the engine's wrapper around it, and a draft head trained on its greedy continuations."""

    name: str
    model: PreTrainedModel
    target: TargetModel
    head: DraftHead
    train_prompts: list[list[int]]


def _build_tiny_target(architecture: str, seed: int) -> TinyTarget:
    model = build_tiny_lm(architecture, seed)
    prompts = random_prompts(32, TINY_VOCAB, 4, 24, seed=seed + 1)
    examples = collect_features(model, prompts, DRAFT_TRAIN_CONFIG, progress=False)
    head, losses, _ = train_head(model, examples, DRAFT_TRAIN_CONFIG, progress=False)
    assert losses[-1] < losses[0], "draft head training did not reduce the loss"
    return TinyTarget(architecture, model, TargetModel(model), head.requires_grad_(False), prompts)


@pytest.fixture(scope="session")
def tiny_llama() -> TinyTarget:
    return _build_tiny_target("llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2() -> TinyTarget:
    return _build_tiny_target("qwen2", seed=10)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_target(request) -> TinyTarget:
    """Both tiny targets, one after the other."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def tiny_lm_factory() -> Callable[..., PreTrainedModel]:
    """`build_tiny_lm` for tests that need their own small model."""
    return build_tiny_lm


@pytest.fixture(scope="session")
def prompt_factory() -> Callable[..., list[list[int]]]:
    return random_prompts


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> str:
    """The tiny demo build (tokenizer, target, draft head, policy, prompts) in a temporary folder: ~30-70 s. Under
    pytest-xdist the first worker that needs it builds it, in the run's folder, and the others wait and share it."""
    from filelock import FileLock

    from jobs.demo import build_all

    if "PYTEST_XDIST_WORKER" not in os.environ:
        root = str(tmp_path_factory.mktemp("demo"))
        build_all("tiny", root, progress=False)
        return root
    shared = tmp_path_factory.getbasetemp().parent / "tiny-demo"
    built = shared / ".built"
    with FileLock(str(shared) + ".lock"):
        if not built.exists():
            build_all("tiny", str(shared), progress=False)
            built.touch()
    return str(shared)


# The tiny demo tokenizer's special tokens are <s> (0), </s> (1, its eos) and <pad> (2): the template marks turns
# with them, so skip_special_tokens keeps them out of generated_text.
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def templated_copy(tiny_demo) -> Callable[..., str]:
    """copy(folder, extra_eos=None) -> folder: the tiny demo target with a chat template (and, given extra_eos, a
    generation config that lists them)."""
    import json
    import shutil

    from demo.build import demo_paths

    def copy(folder, extra_eos: list[int] | None = None) -> str:
        shutil.copytree(demo_paths(tiny_demo)["target"], folder)
        (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        if extra_eos is not None:
            generation = json.loads((folder / "generation_config.json").read_text())
            generation["eos_token_id"] = [generation["eos_token_id"], *extra_eos]
            (folder / "generation_config.json").write_text(json.dumps(generation))
        return str(folder)

    return copy


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for the pipeline tests, started once and shared. A module that needs a different cluster
    (tests/test_pipeline_cluster.py) shuts it down; the next module that asks for it starts it again."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray


@functools.cache
def _starts_ray(path: str) -> bool:
    """Whether the test file at `path` is marked `starts_ray` at module level (the scheduler sees node ids only)."""
    try:
        with open(path) as f:
            return "pytestmark = pytest.mark.starts_ray" in f.read()
    except OSError:
        return False


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown when it is not loaded
def pytest_xdist_make_scheduler(config, log):
    """How `make test`'s pytest-xdist workers share the files: every file marked `starts_ray` (its module's
    `pytestmark`) runs in one worker, in file order, as in a single process (one local Ray at a time; the tests
    that kill Ray processes or time a job never beside another job); every other file goes whole to whichever
    worker is free, so its fixtures are built once."""
    from xdist.scheduler import LoadScopeScheduling

    class RayTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "ray" if _starts_ray(os.path.join(str(config.rootpath), path)) else path

    return RayTestsTogether(config, log)
