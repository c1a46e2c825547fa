"""The generation actor and its prompt-level decisions as plain classes, without a cluster."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from actors.decisions import PromptController, PromptDecisions
from actors.generation import GenerationActor
from actors.stats import ActorStats
from common.columns import ERROR_COLUMN, PLAN_COLUMNS, RESULT_SCHEMA
from common.config import GenerateConfig
from demo.build import demo_paths
from engine.types import DecodingState, DraftConfidence, StepStats, TreeParams
from pipeline.rows import validate_rows


def toy_encoder(texts: list[str]) -> np.ndarray:
    """Deterministic unit vectors by text length bucket: equal texts -> equal vectors."""
    vectors = np.zeros((len(texts), 384), dtype=np.float32)
    for row, text in enumerate(texts):
        vectors[row, len(text) % 384] = 1.0
    return vectors


def steps_of(tree: TreeParams, count: int) -> list[StepStats]:
    confidence = DraftConfidence(0.5, 1.0, -1.0, -1.0)
    return [StepStats(i, tree, 2, 3, 0.01, 0.01, confidence, 10 + i) for i in range(count)]


class RecordingController:
    def __init__(self) -> None:
        self.decided = self.observed = self.finished = 0

    def decide(self, state):
        self.decided += 1
        return TreeParams(8, 4, 2)

    def observe(self, stats):
        self.observed += 1

    def finish(self, num_new_tokens, wall_seconds):
        self.finished += 1


def state(step_index: int) -> DecodingState:
    return DecodingState(step_index, 5, step_index, 5 + step_index, None)


def test_local_decisions_publish_then_hit_and_the_controller_uses_them():
    decisions = PromptDecisions("actor-a", lambda: toy_encoder)
    first = decisions.submit(["abc"], ["k1"])[0]
    assert first.result(timeout=30) is None  # nothing stored yet
    decisions.publish(["k1"], [steps_of(TreeParams(12, 11, 1), 3)]).result(timeout=30)
    again = decisions.submit(["abc"], ["k1"])[0]
    assert again.result(timeout=30) == TreeParams(12, 11, 1)
    policy = RecordingController()
    controller = PromptController(again, policy, decisions)
    assert controller.decide(state(0)) == TreeParams(12, 11, 1)
    controller.observe(steps_of(TreeParams(12, 11, 1), 1)[0])
    controller.finish(10, 0.1)
    assert (policy.decided, policy.observed, policy.finished) == (0, 0, 0)  # the policy was never asked
    counters = decisions.counters
    assert (counters.lookups, counters.local_hits, counters.published) == (2, 1, 1)
    decisions.close()


def test_a_look_up_still_running_at_step_zero_leaves_the_generation_to_the_policy():
    from concurrent.futures import Future

    decisions = PromptDecisions("actor-a", lambda: toy_encoder)
    pending: Future = Future()
    policy = RecordingController()
    controller = PromptController(pending, policy, decisions)
    assert controller.decide(state(0)) == TreeParams(8, 4, 2)
    pending.set_result(TreeParams(12, 11, 1))  # arrives too late for this generation
    assert controller.decide(state(1)) == TreeParams(8, 4, 2)
    assert policy.decided == 2 and decisions.counters.not_ready == 1
    decisions.close()


def test_a_static_policy_falls_back_through_a_static_controller():
    from concurrent.futures import Future

    from engine.types import StaticController

    decisions = PromptDecisions("actor-a", lambda: toy_encoder)
    controller = PromptController(Future(), StaticController(TreeParams(4, 3, 1)), decisions)
    assert controller.decide(state(0)) == controller.decide(state(1)) == TreeParams(4, 3, 1)
    controller.observe(steps_of(TreeParams(4, 3, 1), 1)[0])
    controller.finish(10, 0.1)  # the whole Controller protocol, no isinstance branches
    decisions.close()


def test_a_failing_encoder_costs_only_the_look_up():
    def broken(texts):
        raise RuntimeError("encoder down")

    decisions = PromptDecisions("actor-a", lambda: broken)
    assert decisions.submit(["abc"], ["k1"])[0].result(timeout=30) is None
    assert decisions.counters.failures == 1 and "encoder down" in decisions.last_error
    decisions.close()


@pytest.fixture(scope="module")
def actor_config(tiny_demo) -> dict:
    paths = demo_paths(tiny_demo)
    return GenerateConfig(
        input="unused.parquet",
        output="unused",
        model=paths["target"],
        draft=paths["draft"],
        policy=paths["policy"],
        max_new_tokens=6,
        shared_cache=True,
    ).model_dump()


def test_a_row_that_raises_in_the_engine_fails_alone(actor_config, tiny_demo):
    def fail_second(index, request):
        if index == 1:
            raise RuntimeError("injected engine fault")

    actor = GenerationActor(actor_config, load_encoder=lambda: toy_encoder, before_request=fail_second)
    prompts = ["def f(x):", "import os", "class A:"]
    config = GenerateConfig(**actor_config)
    out = actor(validate_rows(pa.table({"id": [1, 2, 3], "prompt": prompts}), config))
    errors = out.column(ERROR_COLUMN).to_pylist()
    assert errors[0] is None and errors[2] is None
    assert errors[1] == "RuntimeError: injected engine fault"
    texts = out.column("generated_text").to_pylist()
    assert texts[0] is not None and texts[1] is None and texts[2] is not None
    # The plan columns are gone: the input's columns, then the result columns.
    assert out.schema.names == ["id", "prompt", *RESULT_SCHEMA.names]
    assert out.schema.remove(0).remove(0).equals(RESULT_SCHEMA)
    stats = actor.stats()
    assert (stats.totals.rows_ok, stats.totals.rows_error) == (2, 1)
    assert stats.decisions.lookups == 3 and stats.optimizer is not None
    assert stats.totals.decision_seconds == stats.optimizer.decision_seconds
    # What travels to the stats collector and its file: plain JSON data that reads back the same.
    assert ActorStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats


def test_the_actor_takes_the_rows_as_planned_and_refuses_unplanned_ones(actor_config, tiny_demo):
    """The actor reads max_new_tokens and the error from the plan columns; it does not plan rows itself."""
    config = {**actor_config, "shared_cache": False}
    actor = GenerationActor(config)
    with pytest.raises(ValueError, match="plan column"):
        actor(pa.table({"id": [1], "prompt": ["def f(x):"]}))
    table = pa.table({"id": [1, 2], "prompt": ["def f(x):", "import os"]})
    planned = validate_rows(table, GenerateConfig(**config)).drop_columns(list(PLAN_COLUMNS))
    planned = planned.append_column(ERROR_COLUMN, pa.array([None, "planned as an error"], type=pa.string()))
    planned = planned.append_column(PLAN_COLUMNS[1], pa.array([2, None], type=pa.int64()))
    planned = planned.append_column(PLAN_COLUMNS[2], pa.array([0.0, None], type=pa.float64()))
    planned = planned.append_column(PLAN_COLUMNS[3], pa.array([1.0, None], type=pa.float64()))
    planned = planned.append_column(PLAN_COLUMNS[4], pa.array([0, None], type=pa.int64()))
    planned = planned.append_column(PLAN_COLUMNS[5], pa.array([None, None], type=pa.int64()))
    planned = planned.append_column(PLAN_COLUMNS[6], pa.array([[], None], type=pa.list_(pa.string())))
    out = actor(planned)
    generated = out.column("num_generated_tokens").to_pylist()
    assert 1 <= generated[0] <= 2 and generated[1] is None  # 2 new tokens at most, not the job's 6
    assert out.column(ERROR_COLUMN).to_pylist() == [None, "planned as an error"]
    assert out.schema.names == ["id", "prompt", *RESULT_SCHEMA.names]
    assert actor.stats().decisions is None  # the shared cache is off: no prompt decisions


def test_row_limits_give_named_errors_and_spare_the_other_rows(actor_config, tiny_demo):
    """A prompt over max_prompt_tokens, and a row that runs past the row time limit, become error rows."""
    config = {**actor_config, "max_prompt_tokens": 6, "shared_cache": False, "max_new_tokens": 40}

    def slow_first(index, request):  # index among the generated rows: the first is the table's first
        if index == 0:
            # The generation starts after its deadline has passed: it stops before its first step. (Rows that
            # join after it start their clocks later; rows already decoding would count the wait too.)
            import time

            time.sleep(3.2)

    # 3 s: well above what 40 tokens take on the tiny demo (1 s was not, once, beside the other test worker's
    # jobs: 23 tokens in 1.0 s), so only the slowed row runs past it.
    actor = GenerationActor({**config, "row_timeout_s": 3.0}, before_request=slow_first)
    prompts = ["def f(x):", "x " * 40, "import os"]
    out = actor(validate_rows(pa.table({"id": [1, 2, 3], "prompt": prompts}), GenerateConfig(**config)))
    errors = out.column(ERROR_COLUMN).to_pylist()
    assert errors[0].startswith("GenerationTimeout: over the 3 s limit")
    assert "above max_prompt_tokens=6" in errors[1]
    assert errors[2] is None
    assert out.column("generated_text").to_pylist()[2] is not None


def test_the_plain_policy_never_drafts_and_writes_what_the_speculative_actor_writes(actor_config):
    """--policy plain (the speculation-off baseline of the job and the server): every step decodes one token,
    and greedy rows equal the same rows decoded with speculation."""
    prompts = ["def f(x):", "import os", "class A:", "for i in"]
    texts = {}
    for policy in ("plain", actor_config["policy"]):
        config = {**actor_config, "shared_cache": False, "policy": policy, "max_new_tokens": 12}
        actor = GenerationActor(config)
        out = actor(
            validate_rows(pa.table({"id": [1, 2, 3, 4], "prompt": prompts}), GenerateConfig(**config))
        )
        texts[policy] = out.column("generated_text").to_pylist()
        if policy == "plain":
            assert actor.planner is None
            steps = out.column("num_steps").to_pylist()
            generated = out.column("num_generated_tokens").to_pylist()
            assert generated == [n + 1 for n in steps]  # the prefill's token, then one per step
            assert all(
                trees.startswith("plainx") and "," not in trees
                for trees in out.column("tree_params").to_pylist()
            )
        actor.runner.close()
    assert texts["plain"] == texts[actor_config["policy"]]
