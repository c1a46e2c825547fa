"""The tree policy: action set validation, controllers stay in the action set, the bandit learns a synthetic
contextual bandit, checkpoints and latency tables round-trip, the heuristic's hysteresis, and a tiny real-engine
training run writes its artefacts."""

from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from engine.types import DecodingState, DraftConfidence, StaticController, StepStats, TreeParams
from policy.actions import DEFAULT_ACTIONS, ActionSet
from policy.bandit import LinearBandit
from policy.checkpoint import WEIGHTS_NAME, load_policy, save_policy
from policy.controllers import HeuristicController, LearnedController
from policy.latency import LatencyTable, latency_signature
from policy.observation import NUM_FEATURES, ObservationBuilder
from training.train_policy import PolicyTrainConfig, train_policy

torch.set_num_threads(1)


def toy_latency(actions: ActionSet) -> LatencyTable:
    """CPU-like costs: draft grows with depth and depth*top_k, verify with width."""
    return LatencyTable(
        draft_seconds={
            p.compact: 0.001 + 0.0006 * (p.depth + 1) + 0.00005 * p.depth * p.top_k for p in actions
        },
        verify_seconds={p.compact: 0.007 + 0.0002 * (p.total_tokens + 1) for p in actions},
    )


def random_stats(rng: random.Random, step_index: int, params: TreeParams, context: int) -> StepStats:
    accepted = rng.randint(0, params.depth + 1)
    return StepStats(
        step_index=step_index,
        tree_params=params,
        accepted_length=accepted,
        num_emitted=accepted + 1,
        draft_seconds=rng.uniform(0.001, 0.01),
        verify_seconds=rng.uniform(0.005, 0.03),
        confidence=DraftConfidence(
            root_top1_prob=rng.random(),
            root_entropy=rng.uniform(0, 6),
            best_path_logprob=-rng.uniform(0, 20),
            mean_node_logprob=-rng.uniform(0, 20),
        ),
        context_length=context,
    )


def drive(controller, rng: random.Random, num_sequences: int = 4, num_steps: int = 40) -> list[TreeParams]:
    """Run a controller over random StepStats sequences; return every decision."""
    decisions = []
    for _ in range(num_sequences):
        last, context = None, rng.randint(1, 300)
        for step in range(num_steps):
            params = controller.decide(DecodingState(step, 10, context - 10, context, last))
            decisions.append(params)
            last = random_stats(rng, step, params, context)
            context += last.num_emitted
            controller.observe(last)
    return decisions


# ---- action set ------------------------------------------------------------------------------------------------


def test_action_set_validates_and_indexes():
    assert 12 <= len(DEFAULT_ACTIONS) <= 20  # small enough for the bandit to try every arm in training
    for i, params in enumerate(DEFAULT_ACTIONS):
        assert DEFAULT_ACTIONS.index(params) == i and DEFAULT_ACTIONS[i] == params
    with pytest.raises(ValueError, match="at least one"):
        ActionSet([])
    with pytest.raises(ValueError, match="duplicate"):
        ActionSet.parse(["8/4/2", "8/4/2"])
    with pytest.raises(ValueError):
        ActionSet.parse(["99/1/1"])  # more nodes than the tree can score
    with pytest.raises(ValueError, match="not in the action set"):
        DEFAULT_ACTIONS.index(TreeParams(7, 6, 1))
    with pytest.raises(AttributeError):
        DEFAULT_ACTIONS._params = ()


# ---- controllers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "inference", "adaptive"])
def test_controllers_stay_inside_action_set(mode):
    rng = random.Random(0)
    actions = DEFAULT_ACTIONS
    bandit = LinearBandit(len(actions), NUM_FEATURES, exploration=2.0, seed=1)
    learned = LearnedController(bandit, actions, ObservationBuilder(), toy_latency(actions), mode=mode)
    for controller in (learned, HeuristicController(actions), StaticController(actions[3])):
        assert all(d in actions for d in drive(controller, rng))
        controller.finish(num_new_tokens=10, wall_seconds=0.5)  # every member of the Controller protocol
    if mode == "inference":
        assert learned.transitions == [] and bandit.counts.sum() == 0
    else:
        assert len(learned.transitions) == 160 and bandit.counts.sum() == 160


def test_advantage_reward_is_tokens_minus_rate_times_seconds():
    actions = ActionSet.parse(["3/2/1", "8/7/1"])
    table = toy_latency(actions)
    bandit = LinearBandit(len(actions), NUM_FEATURES, ridge_lambda=1e-6)
    controller = LearnedController(
        bandit,
        actions,
        ObservationBuilder(),
        table,
        mode="adaptive",
        reward_kind="advantage",
        reward_rate=100.0,
    )
    state = DecodingState(0, 10, 0, 10, None)
    for step in range(30):  # the same features and outcome every time: theta . x converges to the reward
        params = actions[1]
        features = controller.features(state)
        stats = random_stats(random.Random(step), step, params, 10)
        controller.observe(StepStats(step, params, 5, 6, 0.01, 0.01, stats.confidence, 10))
    expected = 6 - 100.0 * table.step_seconds(actions[1])
    assert bandit.expected_rewards(features)[1] == pytest.approx(expected, rel=1e-3)
    assert controller.transitions[-1].reward == pytest.approx(6 / table.step_seconds(actions[1]))


def test_observation_features_are_cheap_and_finite():
    builder = ObservationBuilder()
    rng = random.Random(3)
    state = DecodingState(0, 10, 0, 10, None)
    first = builder.features(state)
    assert first.shape == (NUM_FEATURES,) and first.dtype == np.float32
    builder.observe(random_stats(rng, 0, TreeParams(8, 7, 1), 11))
    state = DecodingState(1, 10, 3, 13, None)
    started = time.perf_counter()
    for _ in range(1000):
        features = builder.features(state)
    assert (
        time.perf_counter() - started
    ) / 1000 < 200e-6  # microseconds, with a wide margin for a busy machine
    assert np.all(np.isfinite(features)) and not np.array_equal(features, first)


def test_heuristic_hysteresis_on_scripted_acceptance():
    actions = ActionSet.parse(["3/2/1", "4/3/1", "6/5/1", "8/7/1"])
    controller = HeuristicController(actions, ema_decay=0.0, margin=1.0, band=1.0, patience=2)
    assert controller.decide(DecodingState(0, 5, 0, 5, None)) == TreeParams(3, 2, 1)  # 3 levels to start

    def step(accepted: int) -> TreeParams:
        params = controller.current
        stats = random_stats(random.Random(0), 1, params, 20)
        controller.observe(StepStats(1, params, accepted, accepted + 1, 0.001, 0.01, stats.confidence, 20))
        return controller.decide(DecodingState(1, 5, 10, 20, stats))

    assert step(3) == TreeParams(3, 2, 1)  # needed 4 > 3 once: patience holds it
    assert step(2) == TreeParams(3, 2, 1)  # back inside the band resets the count
    assert step(3) == TreeParams(3, 2, 1)
    assert step(3) == TreeParams(4, 3, 1)  # twice outside in a row: deeper
    assert step(4) == TreeParams(4, 3, 1)
    assert step(4) == TreeParams(6, 5, 1)  # needed 5 -> the cheapest action with >= 5 levels
    assert step(1) == TreeParams(6, 5, 1)  # one low step: kept
    assert step(4) == TreeParams(6, 5, 1)
    assert step(0) == TreeParams(6, 5, 1)
    assert step(0) == TreeParams(3, 2, 1)  # persistently low: back to the cheap chain


# ---- bandit learning -------------------------------------------------------------------------------------------


def test_bandit_learns_best_arm_per_context():
    """3 contexts x 5 arms with Gaussian noise; the best arm differs by context."""
    rng = np.random.default_rng(0)
    means = np.array(
        [
            [1.0, 0.6, 0.3, 0.2, 0.5],
            [0.2, 0.4, 1.1, 0.5, 0.3],
            [0.3, 0.2, 0.4, 0.7, 1.2],
        ]
    )
    contexts = np.eye(3)  # one-hot contexts (plus a bias term below)
    bandit = LinearBandit(5, 4, ridge_lambda=1.0, exploration=0.5, seed=0)

    def features(c: int) -> np.ndarray:
        return np.array([1.0, *contexts[c]], dtype=np.float32)

    for _ in range(1500):
        c = int(rng.integers(3))
        arm = bandit.select(features(c), explore=True)
        bandit.update(features(c), arm, means[c, arm] + rng.normal(0.0, 0.3))
    trials = rng.integers(3, size=1000)
    correct = np.mean([bandit.select(features(c), explore=False) == means[c].argmax() for c in trials])
    assert correct > 0.8  # random picks would be right ~0.2 of the time
    started = time.perf_counter()
    x = features(1)
    for _ in range(1000):
        bandit.select(x, explore=False)
    assert (time.perf_counter() - started) / 1000 < 100e-6


def test_bandit_state_shapes_are_checked():
    bandit = LinearBandit(4, 3)
    state = bandit.state_dict()
    state["theta"] = np.zeros((4, 2))
    with pytest.raises(ValueError, match="theta"):
        bandit.load_state_dict(state)


# ---- persistence -----------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_tampering(tmp_path):
    actions = DEFAULT_ACTIONS
    table = toy_latency(actions)
    bandit = LinearBandit(len(actions), NUM_FEATURES, exploration=1.0, seed=2)
    drive(LearnedController(bandit, actions, ObservationBuilder(), table, mode="train"), random.Random(1))
    save_policy(str(tmp_path), bandit, actions, reference_seconds=0.01, training_summary={"note": "test"})
    loaded = load_policy(str(tmp_path))
    assert loaded.actions == actions and loaded.training_summary == {"note": "test"}
    original = LearnedController(bandit, actions, ObservationBuilder(), table, mode="inference")
    reloaded = LearnedController(loaded.bandit, loaded.actions, ObservationBuilder(), table, mode="inference")
    assert drive(original, random.Random(5)) == drive(reloaded, random.Random(5))

    weights = load_file(str(tmp_path / WEIGHTS_NAME))
    weights["A_inv"] = weights["A_inv"][:, :-1]
    save_file(weights, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="A_inv"):
        load_policy(str(tmp_path))

    save_policy(str(tmp_path), bandit, actions)
    meta = json.loads((tmp_path / "policy.json").read_text())
    meta["actions"] = meta["actions"][:-1]
    (tmp_path / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shape"):
        load_policy(str(tmp_path))
    meta["actions"] = ["8/4/2", "8/4/2"]
    (tmp_path / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="duplicate"):
        load_policy(str(tmp_path))


def test_latency_table_json_round_trip_and_remeasure(tmp_path):
    actions = ActionSet.parse(["3/2/1", "8/7/1", "12/5/2", "60/5/10"])
    table = toy_latency(actions)
    path = str(tmp_path / "latency.json")
    signature = {"machine": "a", "model": "x"}
    calls = []

    def measure() -> LatencyTable:
        calls.append(1)
        return toy_latency(actions)

    first = LatencyTable.load_or_measure(path, signature, measure)
    again = LatencyTable.load_or_measure(path, signature, measure)
    assert len(calls) == 1 and again.to_json() == first.to_json()
    for params in actions:
        assert again.step_seconds(params) == pytest.approx(table.step_seconds(params))
    LatencyTable.load_or_measure(path, {"machine": "b", "model": "x"}, measure)
    assert len(calls) == 2 and LatencyTable.load(path).signature["machine"] == "b"
    # an unmeasured shape is estimated between its neighbours
    assert table.step_seconds(TreeParams(3, 2, 1)) < table.step_seconds(TreeParams(24, 6, 4))
    assert table.step_seconds(TreeParams(24, 6, 4)) < table.step_seconds(TreeParams(60, 5, 10))
    assert set(latency_signature({"a": 1}, "cpu")) >= {"processor", "cpu_count", "torch", "device", "model"}


# ---- real engine -----------------------------------------------------------------------------------------------


def test_train_policy_smoke_on_tiny_llama(tiny_llama, prompt_factory, tmp_path):
    actions = ("3/2/1", "4/3/1", "6/3/2", "8/4/2")
    prompts = prompt_factory(3, 96, 4, 20, seed=11)
    config = PolicyTrainConfig(epochs=1, max_new_tokens=16, latency_repeats=1, actions=actions)
    report = train_policy(tiny_llama.target, tiny_llama.head, prompts, config, str(tmp_path), progress=False)
    for name in ("policy.safetensors", "policy.json", "learning_curve.png", "latency.json"):
        assert os.path.isfile(tmp_path / name), name
    assert report.num_transitions > 0 and report.epochs[0].num_new_tokens == 3 * 16
    loaded = load_policy(str(tmp_path))
    assert loaded.actions.compact == list(actions)
    assert loaded.bandit.counts.sum() == report.num_transitions
