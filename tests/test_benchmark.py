"""Benchmarks interleave what they compare: the static-tree grid search times every tree on each prompt before
the next, in a rotating order; the pipeline bench reverses its methods' order on every other pass and runs the
methods named."""

from __future__ import annotations

import pytest

from bench import benchmark
from engine.types import TreeParams


def test_grid_search_interleaves_trees_prompt_by_prompt(monkeypatch):
    calls: list[tuple[int, str]] = []

    class Output:
        num_new_tokens = 4

    def fake_generate(target, head, prompt, controller, max_new_tokens, eos_token_id=None):
        calls.append((prompt[0], controller.decide(None).compact))
        return Output()

    monkeypatch.setattr(benchmark, "generate_speculative", fake_generate)
    grid = [TreeParams.parse(shape) for shape in ("4/3/1", "8/7/1", "8/3/2")]
    best, table = benchmark.grid_search(None, None, [[0], [1], [2], [3]], 4, grid, progress=False)
    assert [prompt for prompt, _ in calls] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [shape for _, shape in calls[:6]] == ["4/3/1", "8/7/1", "8/3/2", "8/7/1", "8/3/2", "4/3/1"]
    assert set(table) == {"4/3/1", "8/7/1", "8/3/2"} and all(rate > 0 for rate in table.values())
    assert best.compact == max(table, key=table.get)


def test_the_pipeline_bench_reverses_its_order_on_every_other_pass():
    from jobs.bench_pipeline import pass_order

    names = ["direct", "pipeline_1", "pipeline_2", "hf_batched"]
    assert pass_order(names, 0) == names and pass_order(names, 2) == names
    assert pass_order(names, 1) == ["hf_batched", "pipeline_2", "pipeline_1", "direct"]


def test_the_pipeline_bench_runs_the_methods_named_and_refuses_unknown_ones(capsys):
    from jobs.bench_pipeline import METHODS, parse_args

    assert parse_args([]).methods == list(METHODS)
    assert parse_args(["--methods", "pipeline_1, hf_batched"]).methods == ["pipeline_1", "hf_batched"]
    for wrong in ("pipeline_3", "direct,direct", ","):
        with pytest.raises(SystemExit):
            parse_args(["--methods", wrong])
        assert "--methods must name each of direct, pipeline_1" in capsys.readouterr().err
