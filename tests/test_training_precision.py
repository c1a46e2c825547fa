"""Mixed-precision head training: bf16 where the hardware multiplies it, fp32 weights, and drafting unchanged.

bf16 changes how a head is trained (features and losses under autocast), never what the engine accepts: a head
trained that way is saved in fp32 and stays lossless.
"""

from __future__ import annotations

import pytest
import torch

from engine.generate import generate_plain, generate_speculative
from engine.target import TargetModel
from engine.types import StaticController, TreeParams
from jobs import train_draft as train_draft_job
from training import fit as fit_module
from training.fit import autocast, resolve_precision
from training.train_draft import DraftTrainConfig, sequence_features, train_draft_head

CPU = torch.device("cpu")


def test_auto_precision_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(fit_module, "_cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(fit_module, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16" and resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("auto", torch.device("meta")) == "fp32"


def test_an_unknown_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="auto, fp32, bf16.*'fp16'"):
        resolve_precision("fp16", CPU)
    with pytest.raises(SystemExit):
        train_draft_job._parser().parse_args(
            ["--target", "x", "--sharegpt", "1", "--out", "y", "--precision", "x"]
        )


def test_bf16_features_are_computed_under_autocast_and_kept_small(tiny_lm_factory, prompt_factory):
    model = tiny_lm_factory("llama", seed=3)
    sequences = prompt_factory(3, model.config.vocab_size, 6, 12, seed=1)
    exact = sequence_features(model, sequences, progress=False)
    mixed = sequence_features(model, sequences, progress=False, precision="bf16")
    for (ids, features), (mixed_ids, mixed_features) in zip(exact, mixed, strict=True):
        assert torch.equal(ids, mixed_ids)
        assert features.dtype == torch.float32 and mixed_features.dtype == torch.bfloat16
        error = (mixed_features.float() - features).norm() / features.norm()
        assert 0 < error < 0.05  # rounded, not another model
    with autocast("fp32", CPU):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("eagle3", [False, True], ids=["eagle", "eagle3"])
def test_a_head_trained_in_bf16_is_saved_in_fp32_and_lossless(
    tiny_lm_factory, prompt_factory, tmp_path, eagle3
):
    model = tiny_lm_factory("llama", seed=3, num_layers=4)
    vocab = model.config.vocab_size
    config = DraftTrainConfig(
        max_new_tokens=32,
        epochs=8,
        batch_size=8,
        warmup_steps=3,
        eagle3=eagle3,
        ttt_steps=2,
        draft_vocab_size=48,
        precision="bf16",
    )
    prompts = prompt_factory(16, vocab, 4, 16, seed=4)
    head, report = train_draft_head(model, prompts, [], str(tmp_path), config, progress=False)
    assert report.precision == "bf16"
    assert report.losses[-1] < report.losses[0]
    assert all(p.dtype == torch.float32 for p in head.parameters())
    target = TargetModel(model)
    for prompt in prompt_factory(4, vocab, 3, 12, seed=9):
        expected = generate_plain(target, prompt, max_new_tokens=20)
        output = generate_speculative(
            target, head, prompt, StaticController(TreeParams(8, 3, 2)), max_new_tokens=20
        )
        assert output.output_ids.tolist() == expected.output_ids.tolist()
