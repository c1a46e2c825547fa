"""A simulated two-node GPU cluster (`ray.cluster_utils.Cluster`, each node with num_gpus=1): one generation actor
per node, both generate, and they share prompt decisions through the one cache actor."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from actors.context_cache import get_or_create_context_cache
from actors.decisions import PROMPT_EMBEDDING_CHARS
from common.columns import ERROR_COLUMN
from common.config import GenerateConfig
from demo.build import demo_paths
from pipeline.build import run_generate
from policy.embedding import load_minilm_batch_encoder

pytestmark = pytest.mark.starts_ray


@pytest.fixture(scope="module")
def two_node_cluster():
    if ray.is_initialized():
        ray.shutdown()  # the module-scoped local Ray of other test modules; they start it again when needed
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 1, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_nodes_generate_and_share_the_cache(two_node_cluster, tiny_demo, tmp_path):
    paths = demo_paths(tiny_demo)
    distinct = pq.read_table(paths["prompts"]).column("prompt").to_pylist()[:4]
    # Each prompt twelve times, in 24 batches: enough work that the second actor is up before the first is done.
    prompts = [distinct[i % len(distinct)] for i in range(48)]
    input_path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": list(range(len(prompts))), "prompt": prompts}), input_path)
    config = GenerateConfig(
        input=str(input_path),
        output=str(tmp_path / "out"),
        model=paths["target"],
        draft=paths["draft"],
        policy=paths["policy"],
        max_new_tokens=8,
        batch_size=2,
        num_actors=2,
        num_gpus_per_actor=1.0,
        shared_cache=True,
        progress=False,
        cache_name=f"cluster-cache-{os.getpid()}",
        namespace=f"cluster-{os.getpid()}",
    )
    # Hold a handle so the cache actor outlives the job for the checks below (the job finds it by name).
    cache = get_or_create_context_cache(config.cache_name, config.namespace)
    summary = run_generate(config)

    table = pq.read_table(str(tmp_path / "out"))
    assert sorted(table.column("id").to_pylist()) == list(range(len(prompts)))
    assert table.column(ERROR_COLUMN).null_count == len(prompts)
    # Both actors worked, one per node (each node has one GPU and each actor takes one).
    per_actor = summary["per_actor"]
    assert len(per_actor) == 2 and all(actor["rows"] > 0 for actor in per_actor.values())
    assert len({actor["node_id"] for actor in per_actor.values()}) == 2
    # They shared one cluster-wide store: each actor looked up in it, and either published into it or reused
    # what the other published; every distinct prompt is answered there. (Which of the two depends on the
    # scheduling: both actors may miss a prompt at once and both publish it, and then neither reuses the other's.)
    assert all(
        actor["shared_lookups"] > 0 and actor["decisions_published"] + actor["cross_actor_hits"] > 0
        for actor in per_actor.values()
    )
    embeddings = load_minilm_batch_encoder()(
        [prompt[-PROMPT_EMBEDDING_CHARS:] for prompt in distinct]
    )  # as the actors embed
    hits = ray.get(cache.lookup_batch.remote(embeddings))
    assert all(hit is not None for hit in hits)
    publishers = {hit["value"]["actor"] for hit in hits}
    assert publishers <= {actor["actor_id"] for actor in per_actor.values()}
    # Shared look-ups went over the cache actor's look-up link, from both nodes' actors.
    decisions = summary["prompt_decisions"]
    assert decisions["link_lookups"] == decisions["shared_lookups"] > 0 and decisions["link_failures"] == 0
