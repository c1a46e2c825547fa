"""Greedy speculative decoding is token-identical to plain decoding and to HF generate, whatever the tree shape or
controller; KV compaction equals a linear forward; the stop rules cut exactly where plain decoding does."""

from __future__ import annotations

import pytest
import torch

from engine.draft import Drafter
from engine.generate import DecodingState, generate_plain, generate_speculative
from engine.target import TargetModel
from engine.tree import ScoredCandidates, additive_mask, select_tree
from engine.types import GenerationOutput, SamplingParams, StaticController, StepStats, TreeParams

MAX_NEW_TOKENS = 32
TREES = [TreeParams(4, 2, 2), TreeParams(8, 3, 3), TreeParams(16, 4, 4), TreeParams(60, 5, 10)]


def identity_prompts(prompt_factory) -> list[list[int]]:
    prompts = prompt_factory(20, 96, 1, 40, seed=123)
    return [[5], *prompts, prompt_factory(1, 96, 40, 40, seed=7)[0]]  # lengths 1 and 40 for sure


@pytest.fixture(scope="module")
def hf_greedy(tiny_target, prompt_factory) -> dict[str, list[tuple[list[int], list[int]]]]:
    """(prompt, HF generate output) pairs per tiny target, computed once."""
    cases = []
    for prompt in identity_prompts(prompt_factory):
        output = tiny_target.model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_NEW_TOKENS
        )
        cases.append((prompt, output[0].tolist()))
    return cases


def check_step_records(output: GenerationOutput, params: TreeParams | None = None) -> None:
    """The step records account for every new token: one from prefill, then each step's accepted + bonus."""
    steps = output.steps
    assert sum(step.num_emitted for step in steps) + 1 == output.num_new_tokens
    context = output.num_prompt_tokens + 1
    for index, step in enumerate(steps):
        assert step.step_index == index
        assert step.context_length == context
        if params is not None:
            assert step.tree_params == params
            assert 0 <= step.accepted_length <= step.tree_params.depth + 1
        if index < len(steps) - 1:
            assert step.num_emitted == step.accepted_length + 1
        else:
            assert 1 <= step.num_emitted <= step.accepted_length + 1
        context += step.num_emitted
    assert context == output.output_ids.shape[1]


def test_trained_head_gets_multi_token_steps(tiny_target, prompt_factory) -> None:
    """A floor on acceptance, so the identity tests below really exercise multi-token acceptance and compaction."""
    params = TreeParams(8, 3, 3)
    emitted = steps = deepest = 0
    for prompt in prompt_factory(8, 96, 4, 24, seed=99):  # held-out prompts
        output = generate_speculative(
            tiny_target.target, tiny_target.head, prompt, StaticController(params), max_new_tokens=40
        )
        emitted += sum(step.num_emitted for step in output.steps)
        steps += len(output.steps)
        deepest = max([deepest, *(step.accepted_length for step in output.steps)])
    tau = emitted / steps
    assert tau > 1.3, f"{tiny_target.name}: mean tokens per step {tau:.2f} with the trained head"
    assert deepest >= 2


def test_plain_greedy_equals_hf_generate(tiny_target, hf_greedy) -> None:
    for prompt, expected in hf_greedy:
        output = generate_plain(tiny_target.target, prompt, max_new_tokens=MAX_NEW_TOKENS)
        assert output.output_ids[0].tolist() == expected
        assert output.num_new_tokens == MAX_NEW_TOKENS and output.finish_reason == "length"


@pytest.mark.parametrize("params", TREES, ids=lambda p: p.compact)
def test_speculative_greedy_equals_hf_generate(tiny_target, hf_greedy, params: TreeParams) -> None:
    num_accepted = 0
    for prompt, expected in hf_greedy:
        output = generate_speculative(
            tiny_target.target,
            tiny_target.head,
            prompt,
            StaticController(params),
            max_new_tokens=MAX_NEW_TOKENS,
        )
        assert output.output_ids[0].tolist() == expected, f"prompt {prompt} with tree {params.compact}"
        assert output.num_prompt_tokens == len(prompt)
        assert output.num_new_tokens == MAX_NEW_TOKENS and output.finish_reason == "length"
        check_step_records(output, params)
        num_accepted += sum(step.accepted_length for step in output.steps)
    assert num_accepted > len(hf_greedy)  # drafts were really accepted, so compaction was exercised


class CyclingController:
    """Changes the tree every step and records what it saw: output must not depend on it."""

    def __init__(self) -> None:
        self.trees = [TreeParams(1, 0, 1), TreeParams(12, 4, 3), TreeParams(60, 5, 10), TreeParams(3, 1, 2)]
        self.states: list[DecodingState] = []
        self.observed: list[StepStats] = []

    def decide(self, state: DecodingState) -> TreeParams:
        self.states.append(state)
        return self.trees[state.step_index % len(self.trees)]

    def observe(self, stats: StepStats) -> None:
        self.observed.append(stats)

    def finish(self, num_new_tokens: int, wall_seconds: float) -> None:
        return None


def test_output_does_not_depend_on_the_controller(tiny_target, hf_greedy) -> None:
    for prompt, expected in hf_greedy[:6]:
        controller = CyclingController()
        output = generate_speculative(
            tiny_target.target, tiny_target.head, prompt, controller, max_new_tokens=MAX_NEW_TOKENS
        )
        assert output.output_ids[0].tolist() == expected
        check_step_records(output)
        assert controller.observed == output.steps
        assert [s.tree_params for s in output.steps] == [
            controller.trees[i % 4] for i in range(len(output.steps))
        ]
        for state, step in zip(controller.states, output.steps, strict=True):
            assert state.step_index == step.step_index
            assert state.prompt_length == len(prompt)
            assert state.context_length == step.context_length == len(prompt) + state.num_generated
        assert controller.states[0].last_step is None
        assert all(
            s.last_step is prev for s, prev in zip(controller.states[1:], output.steps[:-1], strict=True)
        )


# ---- KV compaction ----------------------------------------------------------------------------------------------

# Candidates (tokens 30..35): a, b at level 1; c, d under a; e under d; f under b. All kept (total_tokens=6), so
# tree index = candidate index + 1: root 0, a 1, b 2, c 3, d 4, f 5, e 6 (level order).
COMPACTION_CANDIDATES = ScoredCandidates(
    token_ids=torch.tensor([30, 31, 32, 33, 35, 34]),
    scores=torch.tensor([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6]),
    parents=torch.tensor([-1, -1, 0, 0, 1, 3]),
)


@pytest.mark.parametrize("accepted", [[0], [0, 2], [0, 1, 4], [0, 1, 4, 6]])
def test_keep_accepted_equals_linear_forward(tiny_target, accepted: list[int]) -> None:
    target = tiny_target.target
    prefix = [3, 17, 42, 8, 65, 11, 2]
    root = 50
    tree = select_tree(root, COMPACTION_CANDIDATES, total_tokens=6)
    assert tree.parents == [-1, 0, 0, 1, 1, 2, 4]
    prefix_length = len(prefix)

    cache = target.new_cache()
    target.prefill(torch.tensor([prefix]), cache)
    mask = additive_mask(tree.ancestor_mask, prefix_length, target.dtype)
    positions = (tree.depths + prefix_length)[None]
    scored = target.forward_tree(tree.token_ids, positions, mask, cache)
    assert TargetModel.cache_length(cache) == prefix_length + tree.num_nodes
    with torch.inference_mode():  # as in the generate loop; see test_keep_accepted_outside_inference_mode
        TargetModel.keep_accepted(cache, prefix_length, torch.tensor(accepted))
    assert TargetModel.cache_length(cache) == prefix_length + len(accepted)

    path_tokens = tree.token_ids[0, accepted].tolist()
    reference = target.new_cache()
    linear = target.prefill(torch.tensor([prefix + path_tokens]), reference)
    for layer, expected in zip(cache.layers, reference.layers, strict=True):
        assert layer.keys.shape == expected.keys.shape
        assert torch.allclose(layer.keys, expected.keys, atol=1e-5)
        assert torch.allclose(layer.values, expected.values, atol=1e-5)
    # Tree-node features and logits equal the same path decoded linearly.
    assert torch.allclose(scored.features[0, accepted], linear.features[0, prefix_length:], atol=1e-4)

    # The next step from the compacted cache sees exactly the linear context.
    next_ids = torch.tensor([[9, 23]])
    from_compacted = target.prefill(next_ids, cache)
    full = tiny_target.model(torch.tensor([prefix + path_tokens + [9, 23]])).logits[:, -1:]
    assert torch.allclose(from_compacted.logits, full, atol=1e-4)


def test_keep_accepted_outside_inference_mode(tiny_target) -> None:
    target = tiny_target.target
    cache = target.new_cache()
    target.prefill(torch.tensor([[1, 2, 3, 4, 5]]), cache)
    TargetModel.keep_accepted(cache, 3, torch.tensor([0, 1]))
    assert TargetModel.cache_length(cache) == 5


# ---- stop rules ---------------------------------------------------------------------------------------------------


def step_chunks(output: GenerationOutput) -> list[list[int]]:
    """New tokens grouped as emitted: the prefill token, then one chunk per step."""
    new = output.new_token_ids
    chunks, offset = [new[:1]], 1
    for step in output.steps:
        chunks.append(new[offset : offset + step.num_emitted])
        offset += step.num_emitted
    return chunks


def test_eos_inside_a_multi_token_step_stops_exactly_there(tiny_target, prompt_factory) -> None:
    params = TreeParams(16, 4, 4)
    num_checked = 0
    for prompt in prompt_factory(12, 96, 3, 20, seed=31):
        free = generate_speculative(
            tiny_target.target, tiny_target.head, prompt, StaticController(params), max_new_tokens=30
        )
        chunks = step_chunks(free)
        seen: set[int] = set()
        eos = cut = None
        for chunk_index, chunk in enumerate(chunks):
            # an eos that is the first token of a multi-token step, and new so far: generation must stop mid-step
            if chunk_index > 0 and len(chunk) >= 2 and chunk[0] not in seen:
                eos, cut = chunk[0], sum(len(c) for c in chunks[:chunk_index]) + 1
                break
            seen.update(chunk)
        if eos is None:
            continue
        output = generate_speculative(
            tiny_target.target,
            tiny_target.head,
            prompt,
            StaticController(params),
            max_new_tokens=30,
            eos_token_id=eos,
        )
        assert output.new_token_ids == free.new_token_ids[:cut]
        assert output.finish_reason == "eos"
        assert output.steps[-1].num_emitted == 1 < output.steps[-1].accepted_length + 1
        check_step_records(output, params)
        hf = tiny_target.model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=30, eos_token_id=eos, pad_token_id=eos
        )
        assert hf[0].tolist() == output.output_ids[0].tolist()
        unused = next(token for token in range(96) if token not in free.new_token_ids)
        plain = generate_plain(tiny_target.target, prompt, max_new_tokens=30, eos_token_id=[unused, eos])
        assert plain.output_ids.tolist() == output.output_ids.tolist() and plain.finish_reason == "eos"
        num_checked += 1
    assert num_checked >= 3


def test_a_stop_check_cuts_a_multi_token_step_exactly_as_plain_decoding(tiny_target, prompt_factory) -> None:
    """A caller's stop rule (here: a two-token pattern, kept through its end) ends speculative generation at the
    token plain decoding with the same rule ends at, even when the pattern ends inside a multi-token step."""
    params = TreeParams(16, 4, 4)

    def speculative(prompt, max_new_tokens=30, stop_check=None):
        return generate_speculative(
            tiny_target.target,
            tiny_target.head,
            prompt,
            StaticController(params),
            max_new_tokens=max_new_tokens,
            stop_check=stop_check,
        )

    num_checked = 0
    for prompt in prompt_factory(12, 96, 3, 20, seed=37):
        free = speculative(prompt)
        new, chunks = free.new_token_ids, step_chunks(free)
        # A pattern that ends at the second token of a later step of 3 or more tokens.
        starts = [sum(len(chunk) for chunk in chunks[:index]) for index in range(len(chunks))]
        end = next((starts[i] + 2 for i in range(1, len(chunks)) if len(chunks[i]) >= 3), None)
        if end is None:
            continue
        pattern = new[end - 2 : end]
        first = next(i + 2 for i in range(len(new) - 1) if new[i : i + 2] == pattern)

        def stop_check(ids: list[int], pattern=pattern) -> int | None:
            found = [i + 2 for i in range(len(ids) - 1) if ids[i : i + 2] == pattern]
            return found[0] if found else None

        output = speculative(prompt, stop_check=stop_check)
        plain = generate_plain(tiny_target.target, prompt, max_new_tokens=30, stop_check=stop_check)
        assert output.new_token_ids == plain.new_token_ids == new[:first]
        assert output.finish_reason == plain.finish_reason == "stop"
        # A stop that completes on the last token the row may emit is still a stop, not the length limit.
        last = speculative(prompt, max_new_tokens=first, stop_check=stop_check)
        assert last.new_token_ids == new[:first] and last.finish_reason == "stop"
        # A check that never fires changes nothing: the length limit still ends the row.
        never = speculative(prompt, stop_check=lambda ids: None)
        assert never.new_token_ids == new and never.finish_reason == free.finish_reason == "length"
        num_checked += 1
    assert num_checked >= 3


def test_eos_as_first_token_and_from_model_config(tiny_llama) -> None:
    prompt = [4, 8, 15, 16, 23, 42]
    first = generate_plain(tiny_llama.target, prompt, max_new_tokens=1).new_token_ids[0]
    output = generate_speculative(
        tiny_llama.target,
        tiny_llama.head,
        prompt,
        StaticController(TreeParams(8, 3, 3)),
        eos_token_id=[95, first],
    )
    assert output.new_token_ids == [first] and output.finish_reason == "eos" and output.steps == []

    free = generate_plain(tiny_llama.target, prompt, max_new_tokens=20).new_token_ids
    config_eos = free[6]
    tiny_llama.model.config.eos_token_id = config_eos
    try:
        output = generate_speculative(
            tiny_llama.target, tiny_llama.head, prompt, StaticController(TreeParams(8, 3, 3))
        )
    finally:
        tiny_llama.model.config.eos_token_id = None
    assert output.new_token_ids == free[: free.index(config_eos) + 1]
    assert output.finish_reason == "eos"


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7])
@pytest.mark.parametrize(
    "params", [TreeParams(8, 3, 3), TreeParams(60, 5, 10), TreeParams(40, 39, 1)], ids=lambda p: p.compact
)
def test_max_new_tokens_is_exact(tiny_target, hf_greedy, max_new_tokens: int, params: TreeParams) -> None:
    for prompt, expected in hf_greedy[:4]:
        output = generate_speculative(
            tiny_target.target,
            tiny_target.head,
            prompt,
            StaticController(params),
            max_new_tokens=max_new_tokens,
        )
        assert output.num_new_tokens == max_new_tokens
        assert output.output_ids[0].tolist() == expected[: len(prompt) + max_new_tokens]
        assert output.finish_reason == "length"
        check_step_records(output, params)


def test_a_deep_chain_is_cut_to_the_tokens_left(tiny_target, hf_greedy, monkeypatch) -> None:
    """Near the end the engine drafts only what can still be emitted; the step keeps the controller's choice."""
    drafted: list[TreeParams] = []
    original = Drafter.draft

    def spy(self, pending, params):
        drafted.append(params)
        return original(self, pending, params)

    monkeypatch.setattr(Drafter, "draft", spy)
    chosen = TreeParams(40, 39, 1)
    prompt, expected = hf_greedy[0]
    output = generate_speculative(
        tiny_target.target, tiny_target.head, prompt, StaticController(chosen), max_new_tokens=7
    )
    assert output.output_ids[0].tolist() == expected[: len(prompt) + 7]
    check_step_records(output, chosen)
    generated = 1  # the prefill's token
    for params, step in zip(drafted, output.steps, strict=True):
        assert params == chosen.capped(7 - generated) and params.depth <= max(7 - generated - 2, 0)
        generated += step.num_emitted


def test_context_limit_from_max_length(tiny_target, hf_greedy) -> None:
    for prompt, expected in hf_greedy[:4]:
        output = generate_speculative(
            tiny_target.target,
            tiny_target.head,
            prompt,
            StaticController(TreeParams(16, 4, 4)),
            max_new_tokens=100,
            max_length=len(prompt) + 5,
        )
        assert output.num_new_tokens == 5
        assert output.finish_reason == "context"
        assert output.output_ids[0].tolist() == expected[: len(prompt) + 5]
        plain = generate_plain(tiny_target.target, prompt, max_new_tokens=100, max_length=len(prompt) + 5)
        assert plain.output_ids.tolist() == output.output_ids.tolist() and plain.finish_reason == "context"


def test_context_limit_from_max_position_embeddings(tiny_llama, prompt_factory) -> None:
    limit = tiny_llama.model.config.max_position_embeddings
    prompt = prompt_factory(1, 96, limit - 6, limit - 6, seed=5)[0]
    output = generate_speculative(
        tiny_llama.target,
        tiny_llama.head,
        prompt,
        StaticController(TreeParams(60, 5, 10)),
        max_new_tokens=100,
    )
    assert output.output_ids.shape[1] == limit
    assert output.finish_reason == "context"
    plain = generate_plain(tiny_llama.target, prompt, max_new_tokens=100)
    assert plain.output_ids.tolist() == output.output_ids.tolist()


def test_max_new_tokens_zero_returns_the_prompt(tiny_llama) -> None:
    prompt = [1, 2, 3]
    output = generate_speculative(
        tiny_llama.target, tiny_llama.head, prompt, StaticController(TreeParams(4, 2, 2)), max_new_tokens=0
    )
    assert output.output_ids.tolist() == [prompt]
    assert output.num_new_tokens == 0 and output.steps == [] and output.new_token_ids == []
    plain = generate_plain(tiny_llama.target, prompt, max_new_tokens=0)
    assert plain.output_ids.tolist() == [prompt] and plain.num_new_tokens == 0


def test_sampling_is_reproducible_with_a_seeded_generator(tiny_llama) -> None:
    sampling = SamplingParams(temperature=1.0, top_p=0.9)

    def run(seed: int) -> GenerationOutput:
        return generate_speculative(
            tiny_llama.target,
            tiny_llama.head,
            [7, 7, 3],
            StaticController(TreeParams(8, 3, 3)),
            sampling=sampling,
            max_new_tokens=24,
            generator=torch.Generator().manual_seed(seed),
        )

    first, again = run(0), run(0)
    assert first.output_ids.tolist() == again.output_ids.tolist()
    assert first.num_new_tokens == 24
    check_step_records(first, TreeParams(8, 3, 3))
    others = {tuple(run(seed).new_token_ids) for seed in range(1, 5)}
    assert others - {tuple(first.new_token_ids)}, "different seeds never changed the sampled text"
