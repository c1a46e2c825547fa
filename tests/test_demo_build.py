"""The tiny demo build end to end: artefacts load like hub models, and EAGLE on them is identical to HF greedy."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from demo.build import build_demo, demo_is_built, demo_paths
from engine.ea_model import EaModel
from jobs import bench
from jobs import build_demo as build_demo_job
from jobs.demo import policy_is_built


def test_tiny_build_writes_every_artefact(tiny_demo):
    assert demo_is_built(tiny_demo) and policy_is_built(tiny_demo)
    assert os.path.isfile(os.path.join(demo_paths(tiny_demo)["policy"], "learning_curve.png"))
    paths = demo_paths(tiny_demo)
    with open(paths["report"]) as f:
        report = json.load(f)
    assert report["target"]["num_steps"] > 0
    assert 0.0 <= report["target"]["heldout_top1_accuracy"] <= 1.0
    assert report["target"]["heldout_loss"] > 0
    assert report["draft"]["eval_mean_accepted_tokens"] >= 1.0
    assert sorted(os.listdir(paths["draft"])) == ["config.json", "model.safetensors"]
    table = pq.read_table(paths["prompts"])
    assert table.column_names == ["id", "prompt", "kind"]
    assert table.num_rows > 0


def test_tiny_target_loads_like_a_hub_model(tiny_demo):
    paths = demo_paths(tiny_demo)
    tokenizer = AutoTokenizer.from_pretrained(paths["target"])
    model = AutoModelForCausalLM.from_pretrained(paths["target"])
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers >= 8
    ids = tokenizer("def add(a, b):\n    return a + b").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "def add(a, b):\n    return a + b"


def test_eagle_on_tiny_demo_is_identical_to_hf_greedy(tiny_demo):
    paths = demo_paths(tiny_demo)
    model = EaModel.from_pretrained(
        base_model_path=paths["target"], ea_model_path=paths["draft"], total_token=8, depth=3, top_k=2
    )
    tokenizer = model.get_tokenizer()
    prompts = pq.read_table(paths["prompts"]).column("prompt").to_pylist()[:20]
    assert len(prompts) == 20
    steps = emitted = 0
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt).input_ids])
        reference = model.base_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False
        )
        output, new_tokens, num_steps = model.eagenerate(ids, max_new_tokens=24, log=True)
        assert output.tolist() == reference.tolist(), prompt
        steps += num_steps
        emitted += new_tokens - 1  # the first token comes from the prefill, not a step
    assert emitted / steps >= 1.0


def test_bench_quick_runs_on_tiny_demo(tiny_demo, tmp_path):
    paths = demo_paths(tiny_demo)
    out = tmp_path / "bench.json"
    payload = bench.main(
        [
            "--quick",
            "--prompts",
            paths["prompts"],
            "--model",
            paths["target"],
            "--draft",
            paths["draft"],
            "--policy",
            paths["policy"],
            "--num-prompts",
            "3",
            "--max-new-tokens",
            "12",
            "--json",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert set(saved["methods"]) == {
        "hf_greedy",
        "hf_greedy_packed",
        "hf_prompt_lookup",
        "eagle_defaults",
        "eagle_best_static",
        "heuristic",
        "learned",
        "learned_unoptimized",
    }
    for name in ("learned", "learned_unoptimized"):
        assert 0.0 < saved["methods"][name]["decision_overhead_fraction"] < 1.0
    stats = saved["learned_stats"]
    assert stats["caches"]["decision"]["lookups"] == stats["decisions"]
    for name, result in saved["methods"].items():
        assert result["tokens_per_s"] > 0, name
        assert result["identical_fraction"] == 1.0, name
    assert saved["methods"]["hf_greedy"]["speedup"] == pytest.approx(1.0)
    assert payload["grid"]["best"] in saved["grid"]["tokens_per_s"]


def test_build_demo_rejects_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown demo preset"):
        build_demo("huge", str(tmp_path))
    with pytest.raises(SystemExit):
        build_demo_job.main(["--preset", "huge"])


def test_a_policy_from_an_older_version_counts_as_not_built(tiny_demo, tmp_path):
    """Other observation features (an older version's checkpoint) mean: train again, rather than fail jobs."""
    shutil.copytree(demo_paths(tiny_demo)["policy"], tmp_path / "policy")
    assert policy_is_built(str(tmp_path))
    config_path = tmp_path / "policy" / "policy.json"
    meta = json.loads(config_path.read_text())
    meta["feature_names"] = meta["feature_names"][:-2]
    meta["num_features"] -= 2
    config_path.write_text(json.dumps(meta))
    assert not policy_is_built(str(tmp_path))
