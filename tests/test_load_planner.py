"""The load planner's latency table: measured shapes, corrections from measured steps, and what they choose."""

from __future__ import annotations

import random

import pytest

from engine.load_timing import nondecreasing
from engine.types import BatchState, BatchStepStats, TreeParams
from policy.load_planner import LoadLatencyTable, LoadPlanner, width

ROWS = 4


def _table() -> LoadLatencyTable:
    """A start-up table for ROWS rows: 100 ms plus 25 ms per verified token, 10 ms to draft plus 5 ms a round."""
    return LoadLatencyTable.from_measurements(
        {
            "verify": [[ROWS, w, 0.100 + 0.025 * (w - 1)] for w in (1, 2, 3, 5, 9)],
            "draft_base": [[ROWS, k, 0.010] for k in (1, 2)],
            "draft_round": [[ROWS, k, 0.005] for k in (1, 2)],
        }
    )


def test_measured_dips_are_pooled_into_a_nondecreasing_cost() -> None:
    assert nondecreasing([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert nondecreasing([5.0, 1.0, 1.0]) == pytest.approx([7 / 3] * 3)
    assert nondecreasing([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]


def test_an_unused_shape_borrows_the_nearest_used_shapes_correction() -> None:
    table = _table()
    assert table.correction(("verify", ROWS, 4)) == 1.0  # nothing observed yet
    for _ in range(60):  # width 2 runs at half the table's cost
        table.observe(ROWS, TreeParams(1, 0, 1), 0.005, table._lookup(table.verify, ROWS, 2) / 2)
    assert table.correction(("verify", ROWS, 2)) == pytest.approx(0.5, abs=0.01)
    # Width 4 was never verified: it takes width 2's factor. Another row count keeps the table's.
    assert table.verify_seconds(ROWS, 4) == pytest.approx(0.5 * (0.100 + 0.025 * 3), rel=0.02)
    assert table.verify_seconds(8, 4) == pytest.approx(table._lookup(table.verify, 8, 4))
    # Drafting: a deeper chain borrows from the depth observed; a top_k never observed borrows from any.
    assert table.correction(("draft", ROWS, 3, 1)) == table.correction(("draft", ROWS, 0, 1)) < 1.0
    assert table.correction(("draft", ROWS, 2, 2)) == table.correction(("draft", ROWS, 0, 1))


def _run(planner: LoadPlanner, true_seconds, alpha: float, steps: int, seed: int = 0) -> dict[str, int]:
    """Drive the planner on a simulated batch: chains accept each draft position with chance alpha; steps cost
    true_seconds(params). Returns the trees it chose in the last half."""
    rng = random.Random(seed)
    late: dict[str, int] = {}
    for step in range(steps):
        params = planner.decide(BatchState(step, ROWS, (200,) * ROWS))
        accepted = []
        for _ in range(ROWS):
            n = 0
            while params is not None and n < params.depth + 1 and rng.random() < alpha:
                n += 1
            accepted.append(n)
        draft, verify = true_seconds(params)
        planner.observe(
            BatchStepStats(
                step, params, tuple(accepted), tuple(a + 1 for a in accepted), draft, verify, (200,) * 4
            )
        )
        if step >= steps // 2:
            name = "plain" if params is None else params.compact
            late[name] = late.get(name, 0) + 1
    return late


def test_a_table_from_a_busier_day_does_not_keep_the_planner_off_the_best_chain() -> None:
    """The table overrates every step by 1.7x (measured while the machine was busy) and a verified token costs
    little on top of the first one. Once the planner has run some chain, the deeper chains it has not run
    borrow that chain's measured factor, and it moves to the one that is truly fastest."""
    table = _table()
    chains = (None, TreeParams(1, 0, 1), TreeParams(2, 1, 1), TreeParams(3, 2, 1), TreeParams(4, 3, 1))

    def true_seconds(params):
        return (
            table._lookup(table.draft_base, ROWS, 1) / 1.7 * (params is not None)
            + (0 if params is None else params.depth * 0.005 / 1.7),
            (0.100 + 0.004 * (width(params) - 1)) / 1.7,
        )

    def true_rate(params):
        planner = LoadPlanner(_table(), candidates=chains)
        for _ in range(7):  # the chain acceptance the simulation draws
            planner.chains.reached.append(10**6)
            planner.chains.accepted.append(int(0.8 * 10**6))
        draft, verify = true_seconds(params)
        return ROWS * planner.expected_tau(params) / (draft + verify)

    best = max(chains, key=true_rate)
    assert best == TreeParams(4, 3, 1)
    late = _run(LoadPlanner(table, candidates=chains), true_seconds, alpha=0.8, steps=400)
    assert late.get(best.compact, 0) > 0.7 * sum(late.values()), late


def test_with_a_true_table_exploring_costs_few_steps_off_the_best() -> None:
    """Where the table is right and drafting does not pay (a verified token costs as much as the first one),
    the planner settles on plain decoding: cost optimism tries the others a few times, then stops."""
    table = _table()

    def true_seconds(params):
        return table.draft_seconds(ROWS, params), 0.100 * width(params)

    expensive = LoadLatencyTable.from_measurements(
        {
            "verify": [[ROWS, w, 0.100 * w] for w in (1, 2, 3, 5, 9)],
            "draft_base": [[ROWS, k, 0.010] for k in (1, 2)],
            "draft_round": [[ROWS, k, 0.005] for k in (1, 2)],
        }
    )
    planner = LoadPlanner(expensive)
    late = _run(planner, true_seconds, alpha=0.6, steps=400)
    assert late.get("plain", 0) >= 0.95 * sum(late.values()), late
    assert sum(planner.chosen.values()) - planner.chosen["plain"] < 40, planner.chosen


def test_the_last_tree_keeps_its_place_unless_another_is_better_by_the_margin() -> None:
    chain = TreeParams(1, 0, 1)
    planner = LoadPlanner(_table(), (None, chain), exploration=0.0, cost_exploration=0.0)
    state = BatchState(0, ROWS, (200,) * ROWS)
    plain = planner.throughput(None, ROWS)
    # Make the chain 3% faster than plain: within the 5% margin, the plain decoding of the last step stays ...
    planner.chains.reached.append(10**6)
    planner.chains.accepted.append(0)
    target_tau = 1.03 * plain * planner.latency.step_seconds(ROWS, chain) / ROWS
    planner.chains.accepted[0] = int((target_tau - 1) * 10**6)
    planner.chains.reached.append(10**6)
    planner.chains.accepted.append(0)
    assert planner.throughput(chain, ROWS) == pytest.approx(1.03 * plain, rel=1e-3)
    planner.last = None
    assert planner.decide(state) is None
    # ... and once the chain ran last, it stays too; with no margin the faster one wins either way.
    planner.last = chain
    assert planner.decide(state) == chain
    planner.switch_margin, planner.last = 0.0, None
    assert planner.decide(state) == chain
