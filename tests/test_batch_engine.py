"""The batched engine: many rows per forward, continuous batching, trees chosen for the load, and exactness.

Greedy rows equal one-at-a-time plain decoding token for token, across random prompt lengths, batch sizes, rows
that finish early (their own max_new_tokens, an eos, a stop check) and rows that join late (more requests than
max_batch_size). Sampled rows equal plain decoding with the same keyed noise, so a row's text depends on its seed
and not on its neighbours. (The distribution test in a batch is in test_sampling_distribution.py.)
"""

from __future__ import annotations

import threading

import pytest
import torch

from actors.engine_runner import EngineRunner
from engine.batch import BatchEngine, GenerationRequest, PlainController, generate_batch
from engine.ea_model import EaModel, GenerationFailed
from engine.generate import generate_plain
from engine.load_timing import measure_batch_latency
from engine.slots import SlotCache
from engine.types import BatchState, BatchStepStats, SamplingParams, StaticController, TreeParams
from policy.load_planner import LoadLatencyTable, LoadPlanner

TREES = [TreeParams(8, 3, 3), TreeParams(4, 3, 1), TreeParams(1, 0, 1), TreeParams(60, 5, 10)]


class _Layer:
    def __init__(self, keys: torch.Tensor) -> None:
        self.keys, self.values = keys.clone(), -keys.clone()


def _slot_values(layer: _Layer, row: int) -> list[int]:
    return layer.keys[row, 0, :, 0].long().tolist()


# ---- the slot cache ------------------------------------------------------------------------------------------


def test_keep_tree_moves_each_rows_accepted_nodes_and_leaves_holes() -> None:
    """The module docstring's example: row 0 keeps tree nodes [0, 2], row 1 keeps [0]."""
    keys = torch.arange(8.0).repeat(2, 1)[:, None, :, None] + torch.tensor([0.0, 100.0])[:, None, None, None]
    layer = _Layer(keys)  # [2, 1, 8, 1]: slot s of row r holds 100 r + s
    slots = SlotCache([layer], torch.ones(2, 5, dtype=torch.bool))
    slots.extend(torch.ones(2, 3, dtype=torch.bool))  # the tree's 3 nodes at slots 5..7
    slots.keep_tree(5, [[0, 2], [0]])
    assert slots.length == 7
    assert _slot_values(layer, 0) == [0, 1, 2, 3, 4, 5, 7]
    assert _slot_values(layer, 1)[:6] == [100, 101, 102, 103, 104, 105]
    assert slots.valid.tolist() == [[True] * 7, [True] * 6 + [False]]
    assert slots.counts == [7, 6]
    assert torch.equal(layer.values, -layer.keys)
    # positions count valid slots, not slot indices
    assert slots.positions(torch.zeros(2, 1, dtype=torch.long)).tolist() == [[7], [6]]


def test_compact_right_aligns_rows_and_append_left_pads() -> None:
    keys = torch.arange(6.0)[None, None, :, None].repeat(2, 1, 1, 1)
    layer = _Layer(keys)
    valid = torch.tensor([[True, False, True, False, True, False], [False, True, True, False, False, False]])
    slots = SlotCache([layer], valid)
    assert slots.removable_share == pytest.approx(0.5)
    slots.compact()
    assert slots.length == 3
    assert _slot_values(layer, 0) == [0, 2, 4]
    assert _slot_values(layer, 1)[1:] == [1, 2]
    assert slots.valid.tolist() == [[True, True, True], [False, True, True]]
    other = SlotCache([_Layer(torch.full((1, 1, 1, 1), 9.0))], torch.ones(1, 1, dtype=torch.bool))
    slots.append_rows([other])
    assert slots.counts == [3, 2, 1]
    assert slots.valid[2].tolist() == [False, False, True]
    assert _slot_values(layer, 2)[-1] == 9
    slots.select_rows([2, 0])
    assert slots.counts == [1, 3]
    assert _slot_values(layer, 1) == [0, 2, 4]


# ---- exactness -----------------------------------------------------------------------------------------------


def _requests(prompts, controller, max_new_tokens=24, **options) -> list[GenerationRequest]:
    # Rows finish at different steps: their budgets differ (1 to max_new_tokens).
    return [
        GenerationRequest(prompt, 1 + (index * 7) % max_new_tokens, controller, **options)
        for index, prompt in enumerate(prompts)
    ]


def _plain(tiny_target, request: GenerationRequest, noise_seed=None) -> list[int]:
    return (
        generate_plain(
            tiny_target.target,
            request.prompt_ids,
            sampling=request.sampling,
            max_new_tokens=request.max_new_tokens,
            eos_token_id=None if request.eos_token_ids is None else list(request.eos_token_ids),
            stop_check=request.stop_check,
            noise_seed=noise_seed,
        )
        .output_ids[0]
        .tolist()
    )


@pytest.fixture(scope="module")
def batch_prompts(prompt_factory) -> list[list[int]]:
    return [[7], *prompt_factory(17, 96, 1, 40, seed=321)]


@pytest.mark.parametrize("max_batch_size", [1, 3, 8])
@pytest.mark.parametrize("tree", TREES, ids=[t.compact for t in TREES])
def test_greedy_rows_equal_plain_decoding(tiny_target, batch_prompts, max_batch_size, tree) -> None:
    requests = _requests(batch_prompts, StaticController(tree))
    results = generate_batch(tiny_target.target, tiny_target.head, requests, max_batch_size=max_batch_size)
    accepted = 0
    for request, result in zip(requests, results, strict=True):
        assert result.error is None
        output = result.output
        assert output.output_ids[0].tolist() == _plain(tiny_target, request)
        assert sum(step.num_emitted for step in output.steps) + 1 == output.num_new_tokens
        assert all(
            step.tree_params == tree.capped(64) or step.tree_params.depth <= tree.depth
            for step in output.steps
        )
        accepted += sum(step.accepted_length for step in output.steps)
    assert accepted > 0, "no drafted token was accepted: the test would not exercise the cache moves"


def test_greedy_rows_with_eos_stops_and_plain_steps(tiny_target, batch_prompts) -> None:
    """Rows end at an eos or a stop check mid-step; plain steps (no draft) mix with drafted ones."""
    common = max(set(sum(batch_prompts, [])), key=sum(batch_prompts, []).count)

    class Alternating:  # a drafted step, then a plain one
        def decide(self, state):
            return TreeParams(6, 3, 2) if state.step_index % 2 == 0 else None

        def observe(self, stats):
            return None

        def finish(self, num_new_tokens, wall_seconds):
            return None

    def stop_after_twelve(tokens: list[int]) -> int | None:
        return 12 if len(tokens) >= 12 else None

    requests = [
        GenerationRequest(
            prompt,
            30,
            Alternating(),
            eos_token_ids=(common,) if index % 2 else None,
            stop_check=stop_after_twelve if index % 3 == 0 else None,
        )
        for index, prompt in enumerate(batch_prompts)
    ]
    results = generate_batch(tiny_target.target, tiny_target.head, requests, max_batch_size=5)
    reasons = set()
    for request, result in zip(requests, results, strict=True):
        assert result.output.output_ids[0].tolist() == _plain(tiny_target, request)
        reasons.add(result.output.finish_reason)
    assert {"stop", "length"} <= reasons
    steps = [step.tree_params for result in results for step in result.output.steps]
    assert None in steps and any(params is not None for params in steps)


def test_sampled_rows_equal_keyed_plain_decoding_and_ignore_their_neighbours(
    tiny_target, batch_prompts
) -> None:
    sampling = SamplingParams(temperature=0.9, top_p=0.95)
    requests = _requests(batch_prompts, StaticController(TreeParams(8, 3, 3)), sampling=sampling)
    requests = [
        GenerationRequest(r.prompt_ids, r.max_new_tokens, r.controller, sampling, seed=100 + i)
        for i, r in enumerate(requests)
    ]
    batched = generate_batch(tiny_target.target, tiny_target.head, requests, max_batch_size=6)
    for request, result in zip(requests, batched, strict=True):
        assert result.output.output_ids[0].tolist() == _plain(tiny_target, request, noise_seed=request.seed)
    # Another batch composition, another tree: the same text per row.
    other = [
        GenerationRequest(r.prompt_ids, r.max_new_tokens, PlainController(), sampling, r.seed)
        for r in requests
    ]
    alone = generate_batch(tiny_target.target, tiny_target.head, other[::-1], max_batch_size=2)[::-1]
    assert [r.output.output_ids[0].tolist() for r in alone] == [
        r.output.output_ids[0].tolist() for r in batched
    ]
    # ... and another seed, another text.
    reseeded = [GenerationRequest(r.prompt_ids, 24, r.controller, sampling, r.seed + 1) for r in requests[:6]]
    first = [GenerationRequest(r.prompt_ids, 24, r.controller, sampling, r.seed) for r in requests[:6]]
    a = generate_batch(tiny_target.target, tiny_target.head, first, max_batch_size=6)
    b = generate_batch(tiny_target.target, tiny_target.head, reseeded, max_batch_size=6)
    assert [r.output.new_token_ids for r in a] != [r.output.new_token_ids for r in b]


def test_load_planner_rows_equal_plain_decoding(tiny_target, batch_prompts) -> None:
    """The planner's trees, measured on this machine, vary with the load; the output does not."""
    table = LoadLatencyTable.from_measurements(
        measure_batch_latency(
            tiny_target.target, tiny_target.head, rows=(1, 2, 4), widths=(1, 3, 5), repeats=1
        )
    )
    assert all(seconds > 0 for seconds in table.verify.values())
    planner = LoadPlanner(table)
    requests = _requests(batch_prompts, PlainController(), max_new_tokens=32)
    results = generate_batch(
        tiny_target.target, tiny_target.head, requests, max_batch_size=4, planner=planner
    )
    for request, result in zip(requests, results, strict=True):
        assert result.output.output_ids[0].tolist() == _plain(tiny_target, request)
    assert sum(planner.chosen.values()) > 0


# ---- failures ------------------------------------------------------------------------------------------------


def test_a_bad_request_fails_alone(tiny_target, batch_prompts) -> None:
    good = _requests(batch_prompts[:4], StaticController(TreeParams(8, 3, 3)))

    def raising_stop(tokens: list[int]) -> int | None:
        if len(tokens) > 3:
            raise RuntimeError("stop check broke")
        return None

    bad = [
        GenerationRequest([], 8, StaticController(TreeParams(4, 2, 2))),
        GenerationRequest([1] * 300, 8, StaticController(TreeParams(4, 2, 2))),
        GenerationRequest(
            batch_prompts[5], 20, StaticController(TreeParams(4, 2, 2)), stop_check=raising_stop
        ),
        GenerationRequest(batch_prompts[6], 8, StaticController(TreeParams(4, 2, 2))),  # its hook raises
        GenerationRequest(batch_prompts[7], 8, StaticController(TreeParams(4, 2, 2)), timeout_s=1e-9),
    ]
    requests = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], bad[4], good[3]]

    def hook(index: int, request: GenerationRequest) -> None:
        if request is bad[3]:
            raise KeyError("injected")

    results = generate_batch(
        tiny_target.target, tiny_target.head, requests, max_batch_size=3, before_request=hook
    )
    errors = [result.error for result in results]
    assert "input_ids is empty" in errors[1]
    assert "context limit" in errors[3]
    assert errors[4] == "RuntimeError: stop check broke"
    assert errors[6] == "KeyError: 'injected'"
    assert errors[7].startswith("GenerationTimeout: over the 1e-09 s limit")
    for index, request in zip((0, 2, 5, 8), good, strict=True):
        assert results[index].output.output_ids[0].tolist() == _plain(tiny_target, request)


def test_a_failing_planner_costs_speed_not_rows(tiny_target, batch_prompts) -> None:
    class BrokenPlanner:
        def decide(self, state):
            raise RuntimeError("planner broke")

        def observe(self, stats):
            raise AssertionError("a step the planner did not choose is not reported to it")

    requests = _requests(batch_prompts[:6], PlainController())
    engine = BatchEngine(tiny_target.target, tiny_target.head, max_batch_size=3, planner=BrokenPlanner())
    for index, request in enumerate(requests):
        engine.submit(index, request)
    engine.run()
    for index, request in enumerate(requests):
        assert engine.results[index].output.output_ids[0].tolist() == _plain(tiny_target, request)
    assert engine.planner_failures > 0


def test_a_failing_step_fails_the_rows_in_flight_and_the_queue_goes_on(tiny_target, batch_prompts) -> None:
    class ExplodingOnce(StaticController):  # raises on the second step of the first batch, then never again
        raised = False

        def decide(self, state):
            if state.step_index == 1 and not ExplodingOnce.raised:
                ExplodingOnce.raised = True
                raise RuntimeError("controller broke")
            return super().decide(state)

    controller = ExplodingOnce(TreeParams(4, 2, 2))
    # 12 new tokens: no row can finish in the one step before the failure (a step gains at most 4).
    requests = [GenerationRequest(prompt, 12, controller) for prompt in batch_prompts[:6]]
    results = generate_batch(tiny_target.target, tiny_target.head, requests, max_batch_size=3)
    assert [r.error for r in results[:3]] == ["RuntimeError: controller broke"] * 3
    for request, result in zip(requests[3:], results[3:], strict=True):
        assert result.output.output_ids[0].tolist() == _plain(tiny_target, request)


def test_eagenerate_batch_returns_tensors_in_order(tiny_target, batch_prompts) -> None:
    model = EaModel(tiny_target.model, tiny_target.head, TreeParams(8, 3, 3), None, "tiny")
    prompts = [batch_prompts[1], torch.tensor(batch_prompts[2]), [], batch_prompts[3]]
    outputs = model.eagenerate_batch(prompts, max_new_tokens=10, max_batch_size=2)
    assert isinstance(outputs[2], GenerationFailed) and "empty" in str(outputs[2])
    for prompt, output in zip(
        [prompts[0], prompts[1], prompts[3]], [outputs[0], outputs[1], outputs[3]], strict=True
    ):
        ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt
        assert output.dim() == 1
        assert (
            output.tolist()
            == generate_plain(tiny_target.target, ids, max_new_tokens=10).output_ids[0].tolist()
        )


def test_engine_runner_serves_concurrent_callers(tiny_target, batch_prompts) -> None:
    """Two callers' rows share the engine thread; each gets its own results, in its own order."""
    runner = EngineRunner(tiny_target.target, tiny_target.head, None, 4)
    first = _requests(batch_prompts[:8], StaticController(TreeParams(8, 3, 3)))
    second = _requests(batch_prompts[8:], StaticController(TreeParams(8, 3, 3)))
    results: dict[str, list] = {}
    threads = [
        threading.Thread(
            target=lambda name=name, requests=requests: results.update({name: runner.generate(requests)})
        )
        for name, requests in (("first", first), ("second", second))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    runner.close()
    for name, requests in (("first", first), ("second", second)):
        for request, result in zip(requests, results[name], strict=True):
            assert result.output.output_ids[0].tolist() == _plain(tiny_target, request)
    assert runner.busy_seconds > 0


# ---- the load planner ----------------------------------------------------------------------------------------


def _table(verify_per_token_row: float, fixed: float = 0.01) -> LoadLatencyTable:
    """A CPU-like table: a fixed cost plus a cost per verified token and row; drafting cheap."""
    rows, widths = (1, 4, 16), (1, 3, 5, 9)
    return LoadLatencyTable.from_measurements(
        {
            "verify": [[r, w, fixed + verify_per_token_row * r * w] for r in rows for w in widths],
            "draft_base": [[r, k, 0.001 * r] for r in rows for k in (1, 2)],
            "draft_round": [[r, k, 0.001 * r * k] for r in rows for k in (1, 2)],
        }
    )


def _observe(planner: LoadPlanner, params: TreeParams | None, accepted: list[int]) -> None:
    planner.observe(BatchStepStats(0, params, tuple(accepted), tuple(a + 1 for a in accepted), 0.0, 0.0, ()))


def test_planner_drafts_at_low_load_and_decodes_plainly_at_high_load() -> None:
    planner = LoadPlanner(_table(0.004))
    for _ in range(50):  # a head that is always right for three tokens
        _observe(planner, TreeParams(4, 3, 1), [3] * 8)
    assert planner.decide(BatchState(0, 1, (100,))) is not None
    # Verification that grows with every row and token leaves no room for drafts at 16 rows.
    heavy = LoadPlanner(_table(0.05, fixed=0.0))
    for _ in range(50):
        _observe(heavy, TreeParams(4, 3, 1), [0] * 8)  # ... and a head that is always wrong
    assert heavy.decide(BatchState(0, 16, (100,) * 16)) is None


def test_a_chain_teaches_the_planner_about_every_chain() -> None:
    planner = LoadPlanner(_table(0.004))
    _observe(planner, TreeParams(6, 5, 1), [4, 0, 6])
    # Position j is reached by rows that accepted j - 1 and accepted by rows that accepted j.
    assert planner.reached == [3, 2, 2, 2, 2, 1]
    assert planner.accepted == [2, 2, 2, 2, 1, 1]
    alpha_1, alpha_2 = (2 + 1) / (3 + 2), (2 + 1) / (2 + 2)  # with the prior: 0.5 weighted 2
    assert planner.chain_tau(1) == pytest.approx(1 + alpha_1 + alpha_1 * alpha_2)
    assert planner.acceptance[TreeParams(8, 4, 2)].count == 0  # wider trees learn only from themselves


def test_latency_table_interpolates_and_round_trips(tmp_path) -> None:
    table = _table(0.004)
    assert table.verify_seconds(4, 3) == pytest.approx(0.01 + 0.004 * 12)
    low, high = table.verify_seconds(4, 3), table.verify_seconds(16, 3)
    assert table.verify_seconds(8, 3) == pytest.approx(
        low + (high - low) * (8 - 4) / (16 - 4)
    )  # linear in rows
    assert table.verify_seconds(32, 3) == pytest.approx(high * 2)  # proportional past the largest
    assert table.verify_seconds(4, 4) == pytest.approx(
        (table.verify_seconds(4, 3) + table.verify_seconds(4, 5)) / 2
    )
    table.signature = {"machine": "this"}
    path = str(tmp_path / "table.json")
    table.save(path)
    again = LoadLatencyTable.load(path, {"machine": "this"})
    assert again.verify == table.verify and again.draft_round == table.draft_round
    assert LoadLatencyTable.load(path, {"machine": "another"}) is None
    assert LoadLatencyTable.load(str(tmp_path / "missing.json"), {}) is None


def test_observed_steps_correct_their_row_count_and_leave_the_others() -> None:
    table = _table(0.004)
    before_plain, before_wide = table.verify_seconds(15, 1), table.verify_seconds(15, 7)
    other_rows = table.verify_seconds(8, 7)
    for _ in range(50):  # plain steps of 15 rows that take twice what the table says
        table.observe(15, None, 0.0, 2 * before_plain)
    assert table.verify_seconds(15, 1) == pytest.approx(2 * before_plain, rel=0.02)
    # Width 7 was not run at 15 rows: it borrows width 1's factor, so the two keep the table's ratio ...
    assert table.verify_seconds(15, 7) == pytest.approx(2 * before_wide, rel=0.02)
    assert table.verify_seconds(8, 7) == pytest.approx(
        other_rows
    )  # ... and another row count keeps the table's
    assert table.verify_seconds(15, 7) > table.verify_seconds(15, 1) / 2
