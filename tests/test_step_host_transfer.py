"""The step stays on the model's device: what one step moves to the host is O(tree), never O(tree x vocabulary).

Every way a tensor's values reach Python is wrapped (`Tensor.cpu`, `.tolist`, `.item`, `.numpy`, `.to` from a
non-CPU device to the CPU, and the int/float/bool/index conversions), and the elements each call returns are
counted. On a CPU run nothing really crosses a bus, so the count is an upper bound of what would cross from an
accelerator: it also counts host-side bookkeeping on tensors that are already on the host. A target with a
4096-token vocabulary keeps O(tree) and O(tree x vocabulary) far apart. The step timing that fills latency tables
is checked here too, as it is built on the same step.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from engine.draft import Drafter, PendingDraftInput
from engine.draft_head import DraftHead, DraftHeadConfig
from engine.generate import generate_speculative
from engine.step import StepTimer, run_step
from engine.target import TargetModel
from engine.types import SamplingParams, StaticController, TreeParams
from training import step_timing
from training.step_timing import measure_latency_table

VOCAB = 4096
TREE = TreeParams(16, 4, 4)
PROMPT = [5, 17, 300, 4095, 42, 8, 1000, 77]
SAMPLING = {"greedy": SamplingParams(), "sampling": SamplingParams(temperature=1.0, top_p=0.9)}


class HostTransfers:
    """Counts the elements that tensor-to-Python calls return while installed."""

    SCALAR_CALLS = ("item", "__int__", "__float__", "__bool__", "__index__")
    ARRAY_CALLS = ("cpu", "tolist", "numpy")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.elements = 0
        self.calls: Counter[str] = Counter()
        for name in (*self.SCALAR_CALLS, *self.ARRAY_CALLS):
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))
        original_to = torch.Tensor.to

        def to(tensor: torch.Tensor, *args, **kwargs):
            moved = original_to(tensor, *args, **kwargs)
            if tensor.device.type != "cpu" and moved.device.type == "cpu":
                self._record("to", tensor)
            return moved

        monkeypatch.setattr(torch.Tensor, "to", to)

    def _counting(self, name: str, original):
        def wrapper(tensor: torch.Tensor, *args, **kwargs):
            self._record(name, tensor)
            return original(tensor, *args, **kwargs)

        return wrapper

    def _record(self, name: str, tensor: torch.Tensor) -> None:
        self.calls[name] += 1
        self.elements += tensor.numel()

    def reset(self) -> None:
        self.elements = 0
        self.calls.clear()


@pytest.fixture(scope="module")
def wide_vocab(tiny_lm_factory) -> tuple[TargetModel, DraftHead]:
    model = tiny_lm_factory(
        "llama", seed=3, vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1
    )
    torch.manual_seed(0)
    head = DraftHead(DraftHeadConfig.for_target(model.config)).eval().requires_grad_(False)
    return TargetModel(model), head


def prefilled(target: TargetModel, head: DraftHead) -> tuple[Drafter, object, PendingDraftInput, int]:
    """A target cache holding PROMPT[:-1] and the pending pairs that make PROMPT[-1] the first tree's root."""
    ids = torch.tensor([PROMPT])
    cache = target.new_cache()
    prefill = target.prefill(ids[:, :-1], cache)
    pending = PendingDraftInput(features=prefill.features, token_ids=ids[:, 1:])
    return Drafter(head, target.lm_head), cache, pending, len(PROMPT) - 1


def test_the_counter_sees_a_full_logits_transfer(monkeypatch) -> None:
    """Positive control: the kind of transfer the step must not make is counted in full."""
    transfers = HostTransfers(monkeypatch)
    logits = torch.zeros(TREE.total_tokens + 1, VOCAB)
    logits.cpu()
    int(logits[0, 0])
    logits[0].tolist()
    assert transfers.elements == (TREE.total_tokens + 1) * VOCAB + 1 + VOCAB
    assert transfers.calls == {"cpu": 1, "__int__": 1, "tolist": 1}


@pytest.mark.parametrize("mode", list(SAMPLING))
def test_one_step_moves_o_tree_elements_to_the_host(wide_vocab, monkeypatch, mode: str) -> None:
    target, head = wide_vocab
    drafter, cache, pending, prefix_length = prefilled(target, head)
    generator = torch.Generator().manual_seed(0)
    transfers = HostTransfers(monkeypatch)
    for _ in range(3):  # three steps, each from the previous one's pending input
        transfers.reset()
        step = run_step(
            target,
            drafter,
            cache,
            pending,
            TREE,
            prefix_length,
            SAMPLING[mode],
            generator,
            StepTimer(target.device),
        )
        assert transfers.elements < 50 * (TREE.total_tokens + 1), transfers.calls
        assert transfers.elements < (TREE.total_tokens + 1) * VOCAB / 50
        assert TargetModel.cache_length(cache) == prefix_length + len(step.verify.accepted_nodes)
        assert step.draft_seconds > 0 and step.verify_seconds > 0
        prefix_length += len(step.verify.accepted_nodes)
        pending = step.next_pending


@pytest.mark.parametrize("mode", list(SAMPLING))
def test_a_whole_generation_moves_o_tree_elements_per_step(wide_vocab, monkeypatch, mode: str) -> None:
    target, head = wide_vocab
    transfers = HostTransfers(monkeypatch)
    output = generate_speculative(
        target,
        head,
        PROMPT,
        StaticController(TREE),
        sampling=SAMPLING[mode],
        max_new_tokens=24,
        generator=torch.Generator().manual_seed(1),
    )
    num_steps = len(output.steps)
    assert output.num_new_tokens == 24 and num_steps >= 2
    # the prompt's ids and the prefill's token, then O(tree) per step
    assert transfers.elements < len(PROMPT) + 1 + num_steps * 50 * (TREE.total_tokens + 1), transfers.calls
    assert transfers.elements < num_steps * (TREE.total_tokens + 1) * VOCAB / 50


def test_untimed_steps_report_zero_seconds(wide_vocab) -> None:
    target, head = wide_vocab
    output = generate_speculative(
        target, head, PROMPT, StaticController(TREE), max_new_tokens=8, time_steps=False
    )
    assert output.steps and all(s.draft_seconds == s.verify_seconds == 0.0 for s in output.steps)
    timed = generate_speculative(target, head, PROMPT, StaticController(TREE), max_new_tokens=8)
    assert timed.new_token_ids == output.new_token_ids  # timing never changes the text
    assert all(
        s.draft_seconds > 0 and s.verify_seconds > 0 for s in timed.steps
    )  # on the CPU: timed by default


class CudaGenerator:
    """Stands in for a CUDA torch.Generator on a machine without one: only its device is read."""

    device = torch.device("cuda", 0)


def test_a_generator_on_another_device_is_refused(wide_vocab) -> None:
    target, head = wide_vocab
    with pytest.raises(ValueError, match="torch.Generator\\(device=target.device\\)"):
        generate_speculative(
            target,
            head,
            PROMPT,
            StaticController(TREE),
            sampling=SAMPLING["sampling"],
            generator=CudaGenerator(),
        )


# ---- step timing -------------------------------------------------------------------------------------------------


def test_latency_table_times_run_step_on_a_fixed_context(tiny_llama, monkeypatch) -> None:
    actions = [TreeParams(4, 2, 2), TreeParams(8, 3, 3)]
    calls: list[tuple[TreeParams, int, int]] = []
    original = step_timing.run_step

    def spy(target, drafter, cache, pending, params, prefix_length, **kwargs):
        calls.append((params, prefix_length, drafter.cache.length))
        return original(target, drafter, cache, pending, params, prefix_length, **kwargs)

    monkeypatch.setattr(step_timing, "run_step", spy)
    prompt = list(range(3, 23))
    table = measure_latency_table(tiny_llama.target, tiny_llama.head, prompt, actions, repeats=2)
    assert [params for params, _, _ in calls] == actions * 3  # one warm-up round, then two timed ones
    assert {(prefix, draft) for _, prefix, draft in calls} == {(len(prompt) - 1, len(prompt) - 2)}
    assert set(table.draft_seconds) == set(table.verify_seconds) == {p.compact for p in actions}
    assert all(value > 0 for value in [*table.draft_seconds.values(), *table.verify_seconds.values()])
    with pytest.raises(ValueError, match="repeats"):
        measure_latency_table(tiny_llama.target, tiny_llama.head, prompt, actions, repeats=0)
