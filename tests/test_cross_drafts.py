"""Cross-request drafts: the token index, branches merged into draft trees, exactness of rows that draft from
retrieved branches, the planner's branch budget, the outputs store (fingerprints, bounds, snapshots), and the
actor side with a cache actor that is alive, then dead."""

from __future__ import annotations

import os
import signal
import time
import uuid

import numpy as np
import pytest
import ray
import torch

from actors.context_cache import get_or_create_context_cache, shutdown_context_cache
from actors.cross_drafts import CrossRequestDrafts, fingerprint
from engine.batch import GenerationRequest, PlainController, generate_batch
from engine.generate import generate_plain
from engine.suffix import RowProposals, TokenIndex
from engine.tree import build_tree, merge_branch
from engine.types import BatchState, BatchStepStats, SamplingParams, StaticController, TreeParams
from policy.load_planner import LoadLatencyTable, LoadPlanner
from policy.output_store import OutputStore, read_store, write_store

pytestmark = pytest.mark.starts_ray

# ---- the token index --------------------------------------------------------------------------------------


def test_the_longest_suffix_match_proposes_what_followed_it() -> None:
    index = TokenIndex()
    index.add([5, 6, 7, 8, 9], "actor")
    index.add([1, 7, 3], "cluster")
    match = index.match([0, 6, 7], max_tokens=8)  # [6, 7] matched (2 tokens) beats [7] alone
    assert (match.tokens, match.match_length, match.source) == ((8, 9), 2, "actor")
    assert index.match([4, 7], 8).tokens == (3,)  # only [7] matches: the newest place wins
    assert index.match([6, 7], 1).tokens == (8,)
    assert index.match([42], 8) is None
    assert index.match([8, 9], 8) is None  # nothing followed it


def test_places_at_the_same_offset_into_their_output_win() -> None:
    index = TokenIndex()
    index.add([1, 2, 10, 9, 1, 2, 20], "actor")  # [1, 2] is followed by 10 at offset 2, by 20 at offset 6
    assert index.match([1, 2], 4, offset=2).tokens[0] == 10
    assert index.match([1, 2], 4, offset=6).tokens[0] == 20


def test_the_index_drops_its_oldest_sequences_beyond_its_bound() -> None:
    index = TokenIndex(max_sequences=2)
    for tokens in ([1, 2, 3], [4, 5, 6], [7, 8, 9]):
        index.add(tokens, "actor")
    assert len(index) == 2 and index.num_tokens == 6
    assert index.match([1, 2], 4) is None  # the first one's n-grams went with it
    assert index.match([7, 8], 4).tokens == (9,)


def test_a_row_drafts_from_its_own_output_as_it_grows() -> None:
    finished = []
    rows = RowProposals([1, 2, 3], on_finish=finished.append)
    assert rows.match([1, 2, 3], 4) is None  # [3] was never followed by anything
    assert rows.match([1, 2, 3, 1, 2], 4).tokens == (3, 1, 2)  # its prompt, then its output
    rows.finish([1, 2, 3, 1, 2, 4])
    assert finished == [[1, 2, 4]]  # the new tokens only


def test_outputs_of_similar_prompts_win_a_tie_with_the_own_prompt() -> None:
    shared = TokenIndex()
    shared.add([9, 5, 6], "actor")
    rows = RowProposals([9, 7], fetched=[([9, 8], "cluster")], shared=shared)
    assert rows.match([1, 9], 4).source == "cluster"
    rows = RowProposals([9, 7], shared=shared)
    assert rows.match([1, 9], 4).source == "actor"


# ---- branches in draft trees ------------------------------------------------------------------------------


def _chain(tokens: list[int], scores: list[float]):
    return build_tree(torch.tensor(tokens), [-1, *range(len(tokens) - 1)], torch.tensor([0.0, *scores]))


def test_a_branch_shares_the_nodes_it_agrees_with_and_ranks_against_the_rest() -> None:
    tree = _chain([100, 1, 2], [-0.1, -3.0])  # root -> 1 -> 2
    merged, branch_nodes, from_tree = merge_branch(tree, [1, 5, 6], [-0.2, -0.4, -0.6], num_nodes=5)
    tokens = merged.token_ids[0].tolist()
    assert tokens[0] == 100 and sorted(tokens[1:]) == [1, 2, 5, 6]
    assert [tokens[n] for n in branch_nodes] == [1, 5, 6]
    assert merged.parents[branch_nodes[0]] == 0 and merged.parents[branch_nodes[1]] == branch_nodes[0]
    assert from_tree == [True, True, True, False, False]
    # Four nodes: the weakest (the tree's 2, at -3.0) goes.
    small, branch_nodes, _ = merge_branch(tree, [1, 5, 6], [-0.2, -0.4, -0.6], num_nodes=4)
    assert small.token_ids[0].tolist() == [100, 1, 5, 6] and len(branch_nodes) == 3
    # More room than nodes: pads under the root.
    padded, _, from_tree = merge_branch(tree, [7], [-0.5], num_nodes=6)
    assert padded.num_nodes == 6 and padded.parents[-1] == 0 and from_tree[-1] is False
    assert bool(padded.ancestor_mask.diagonal().all())


# ---- exactness in the batched engine ----------------------------------------------------------------------


def _plain(tiny_target, request: GenerationRequest, noise_seed=None) -> list[int]:
    return (
        generate_plain(
            tiny_target.target,
            request.prompt_ids,
            sampling=request.sampling,
            max_new_tokens=request.max_new_tokens,
            noise_seed=noise_seed,
        )
        .output_ids[0]
        .tolist()
    )


@pytest.fixture(scope="module")
def cross_prompts(prompt_factory) -> list[list[int]]:
    return prompt_factory(10, 96, 3, 30, seed=77)


@pytest.mark.parametrize(
    "controller", [PlainController(), StaticController(TreeParams(4, 3, 1))], ids=["plain", "4/3/1"]
)
def test_rows_drafting_from_retrieved_branches_equal_plain_decoding(
    tiny_target, cross_prompts, controller
) -> None:
    """Right branches (the row's own plain output, fetched), wrong ones (another row's) and none, together."""
    plain = [_plain(tiny_target, GenerationRequest(p, 20, controller)) for p in cross_prompts]
    requests = []
    for index, prompt in enumerate(cross_prompts):
        if index % 3 == 0:
            fetched = [(plain[index][len(prompt) :], "cluster")]
        elif index % 3 == 1:
            other = (index + 1) % len(cross_prompts)
            fetched = [(plain[other][len(cross_prompts[other]) :], "actor")]
        else:
            fetched = []
        requests.append(GenerationRequest(prompt, 20, controller, proposals=RowProposals(prompt, fetched)))
    results = generate_batch(tiny_target.target, tiny_target.head, requests, max_batch_size=4)
    accepted = 0
    for result, expected in zip(results, plain, strict=True):
        assert result.error is None
        assert result.output.output_ids[0].tolist() == expected
        steps = result.output.steps
        assert all(s.retrieved_accepted <= s.retrieved_proposed for s in steps)
        accepted += sum(s.retrieved_accepted for s in steps if s.retrieved_source == "cluster")
    assert accepted > 0, "no retrieved token was accepted: the branches were never exercised"


def test_sampled_rows_with_branches_equal_keyed_plain_decoding(tiny_target, cross_prompts) -> None:
    sampling = SamplingParams(temperature=0.8)
    controller = StaticController(TreeParams(3, 2, 1))
    requests, expected = [], []
    for index, prompt in enumerate(cross_prompts[:6]):
        request = GenerationRequest(prompt, 16, controller, sampling, seed=index)
        expected.append(_plain(tiny_target, request, noise_seed=index))
        proposals = RowProposals(prompt, [(expected[-1][len(prompt) :], "cluster")])
        requests.append(GenerationRequest(prompt, 16, controller, sampling, seed=index, proposals=proposals))
    results = generate_batch(tiny_target.target, tiny_target.head, requests, max_batch_size=3)
    assert [result.output.output_ids[0].tolist() for result in results] == expected
    assert sum(s.retrieved_accepted for r in results for s in r.output.steps) > 0


def test_a_failing_proposal_costs_the_branch_not_the_row(tiny_target, cross_prompts) -> None:
    class Broken(RowProposals):
        def match(self, output, max_tokens):
            raise RuntimeError("index gone")

    request = GenerationRequest(cross_prompts[0], 8, PlainController(), proposals=Broken(cross_prompts[0]))
    result = generate_batch(tiny_target.target, tiny_target.head, [request])[0]
    assert result.output.output_ids[0].tolist() == _plain(tiny_target, request)


# ---- the planner's branch budget ----------------------------------------------------------------------


def _heavy_table() -> LoadLatencyTable:
    """Verification whose cost grows with every row and token: at 16 rows only sure tokens pay."""
    rows, widths = (1, 4, 16), (1, 3, 5, 9, 17)
    return LoadLatencyTable.from_measurements(
        {
            "verify": [[r, w, 0.01 + 0.002 * r * w] for r in rows for w in widths],
            "draft_base": [[r, k, 0.001 * r] for r in rows for k in (1, 2)],
            "draft_round": [[r, k, 0.001 * r * k] for r in rows for k in (1, 2)],
        }
    )


def _observe_branches(planner: LoadPlanner, accepted: int, proposed: int = 8, matched: int = 6) -> None:
    branches = tuple((proposed, matched, accepted, "cluster") for _ in range(16))
    planner.observe(
        BatchStepStats(0, None, (0,) * 16, (accepted + 1,) * 16, 0.0, 0.0, (), proposed, branches)
    )


def test_the_planner_spends_width_on_branches_that_are_accepted_and_none_on_others() -> None:
    state = BatchState(0, 16, (100,) * 16, 0, ((16, 6, "cluster"),) * 16)
    good = LoadPlanner(_heavy_table())
    for _ in range(30):
        _observe_branches(good, accepted=8)
    params, budget = good.plan(state)
    assert budget >= 8
    bad = LoadPlanner(_heavy_table())
    for _ in range(30):
        _observe_branches(bad, accepted=0)
    assert bad.plan(state)[1] == 0
    assert bad.branch_scores(6, 3, "cluster")[0] < good.branch_scores(6, 3, "cluster")[0] < 0
    assert good.plan(BatchState(0, 16, (100,) * 16, 0, ((16, 6, "prompt"),) * 16))[1] < 8  # not yet tried


# ---- the outputs store ----------------------------------------------------------------------------------


def _unit(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_retrieval_returns_nothing_across_fingerprints() -> None:
    store = OutputStore(dim=8)
    vectors = _unit(3)
    store.publish("model-a", vectors, [[1, 2], [3, 4], [5, 6]], "actor-1")
    hits = store.similar("model-a", vectors[:1], k=2)
    assert hits[0][0]["tokens"] == [1, 2] and hits[0][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert store.similar("model-b", vectors, k=2) == [[], [], []]
    assert store.similar("model-a", vectors[:1], k=2, min_similarity=1.1) == [[]]


def test_the_store_stays_under_its_memory_bound() -> None:
    bound = 20_000
    store = OutputStore(dim=8, max_entries=1000, max_memory_bytes=bound)
    for step in range(50):
        store.publish("m", _unit(4, seed=step), [[step] * 100] * 4, "a")
        assert store.memory_bytes <= bound
    stats = store.stats()
    assert stats["evicted"] > 0 and stats["entries"] == len(store) < 200
    newest = store.similar("m", _unit(4, seed=49)[:1], k=1)[0][0]
    assert newest["tokens"][0] == 49  # the oldest went first
    small = OutputStore(dim=8, max_entries=3)
    small.publish("m", _unit(5), [[i] for i in range(5)], "a")
    assert len(small) == 3


def test_the_store_round_trips_through_a_snapshot(tmp_path) -> None:
    store = OutputStore(dim=8)
    vectors = _unit(3)
    store.publish("m", vectors, [[1], [2, 3], [4]], "a")
    store.publish("n", vectors[:1], [[9]], "b")
    write_store(store.export_state(), tmp_path)
    restored = OutputStore(dim=8)
    restored.load_state(*read_store(tmp_path))
    assert len(restored) == 4
    assert restored.similar("m", vectors[1:2], k=1)[0][0]["tokens"] == [2, 3]
    assert restored.similar("n", vectors[:1], k=1)[0][0]["publisher"] == "b"
    assert read_store(tmp_path / "nothing") is None


# ---- through the cache actor --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield


def test_the_cache_actor_serves_outputs_and_snapshots_them(ray_local, tmp_path) -> None:
    name = f"outputs-{uuid.uuid4().hex[:8]}"
    cache = get_or_create_context_cache(name, "test-outputs", dim=8, snapshot_path=str(tmp_path))
    vectors = _unit(2)
    ray.get(cache.publish_outputs.remote("m", vectors, [[1, 2, 3], [4, 5]], "actor-1"))
    hits = ray.get(cache.similar_outputs.remote("m", vectors[1:], 2))
    assert hits[0][0]["tokens"] == [4, 5] and hits[0][0]["publisher"] == "actor-1"
    assert ray.get(cache.similar_outputs.remote("other-model", vectors, 2)) == [[], []]
    assert ray.get(cache.stats.remote())["outputs"]["entries"] == 2
    shutdown_context_cache(cache)  # a final snapshot
    again = get_or_create_context_cache(name, "test-outputs", dim=8, snapshot_path=str(tmp_path))
    assert ray.get(again.similar_outputs.remote("m", vectors[:1], 1))[0][0]["tokens"] == [1, 2, 3]
    ray.kill(again, no_restart=True)


class _Tokenizer:
    def __init__(self, vocab: dict[str, int], template: str | None = None) -> None:
        self.vocab, self.chat_template = vocab, template

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


def test_fingerprints_tell_models_and_tokenizers_apart() -> None:
    base = fingerprint({"hidden_size": 8, "_name_or_path": "/a"}, _Tokenizer({"a": 0}))
    assert base == fingerprint({"hidden_size": 8, "_name_or_path": "/elsewhere"}, _Tokenizer({"a": 0}))
    assert base != fingerprint({"hidden_size": 9}, _Tokenizer({"a": 0}))
    assert base != fingerprint({"hidden_size": 8}, _Tokenizer({"a": 1}))
    assert base != fingerprint({"hidden_size": 8}, _Tokenizer({"a": 0}, "{{ messages }}"))


def _encoder(texts: list[str]) -> np.ndarray:
    """Equal texts -> equal unit vectors [n, 384]."""
    vectors = np.zeros((len(texts), 384), dtype=np.float32)
    vectors[np.arange(len(texts)), [sum(map(ord, text)) % 384 for text in texts]] = 1.0
    return vectors


def test_outputs_reach_another_actor_and_a_dead_cache_means_local_only(ray_local) -> None:
    cache = get_or_create_context_cache(f"cross-{uuid.uuid4().hex[:8]}", "test-cross", max_restarts=0)
    first = CrossRequestDrafts(cache, "model", "actor-a", lambda: _encoder)
    second = CrossRequestDrafts(cache, "model", "actor-b", lambda: _encoder)
    rows = first.start(["a prompt"], [[1, 2, 3]])
    rows[0].finish([1, 2, 3, 7, 8, 9])
    first.publish()
    ray.get(first._in_flight)  # the publish landed
    assert first.counters.published_outputs == 1
    proposed = second.start(["a prompt"], [[1, 2, 3]])[0].match([1, 2, 3, 7], 4)
    assert (proposed.tokens, proposed.source) == ((8, 9), "cluster")
    assert first.start(["a prompt"], [[1, 2, 3]])[0].match([5, 7], 4).source == "actor"  # its own output
    os.kill(ray.get(cache.stats.remote())["pid"], signal.SIGKILL)
    later = second.start(["a prompt"], [[4, 5, 6]])
    assert second.counters.fetch_failures == 1
    assert later[0].match([4, 5, 6, 4], 4).tokens == (5, 6, 4)  # its own prompt and output still draft
    later[0].finish([4, 5, 6, 1, 1])
    second.publish()  # sent; its failure is counted by a later publish
    deadline = time.monotonic() + 30
    while not second.counters.publish_failures:
        assert time.monotonic() < deadline, "the failed publish was never counted"
        time.sleep(0.1)
        second.publish()


def test_an_encoder_that_fails_means_local_only_drafting() -> None:
    def broken(texts: list[str]) -> np.ndarray:
        raise RuntimeError("no embeddings today")

    drafts = CrossRequestDrafts(
        object(), "model", "actor-a", lambda: broken
    )  # never called: the fetch comes after
    rows = drafts.start(["a prompt"], [[1, 2, 3, 1]])
    assert rows[0].match([1, 2, 3, 1], 4).tokens == (2, 3, 1)
    assert drafts.counters.fetch_failures == 1
