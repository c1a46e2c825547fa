"""Training a head further: from an existing EAGLE-1/2 head on new data (`init_head`, `--init-head`), and new data
from later in ShareGPT's train split (`--skip-exchanges`).

Training further starts from the given head's weights and keeps its draft vocabulary; the given head is left as
it was, and the result stays lossless like any head."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from assets import draft_data
from assets.sharegpt import Conversation
from engine.generate import generate_plain, generate_speculative
from engine.target import TargetModel
from engine.types import StaticController, TreeParams
from training.train_draft import DraftTrainConfig, train_draft_head

CONFIG = DraftTrainConfig(max_new_tokens=24, epochs=3, batch_size=8, warmup_steps=2, draft_vocab_size=48)


@pytest.fixture(scope="module")
def trained(tiny_lm_factory, prompt_factory):
    model = tiny_lm_factory("llama", seed=5, num_layers=4)
    head, report = train_draft_head(
        model, prompt_factory(16, model.config.vocab_size, 4, 16, seed=2), [], None, CONFIG, progress=False
    )
    return model, head, report


def test_training_further_starts_from_the_head_and_keeps_its_vocabulary(trained, prompt_factory):
    model, head, first = trained
    before = {k: v.clone() for k, v in head.state_dict().items()}
    prompts = prompt_factory(16, model.config.vocab_size, 4, 16, seed=7)  # new data
    fresh, fresh_report = train_draft_head(model, prompts, [], None, CONFIG, progress=False)
    further, report = train_draft_head(model, prompts, [], None, CONFIG, progress=False, init_head=head)
    # the warm start is used: its first loss is below a fresh head's on the same data, and at learning rate 0
    # the result is the given head itself
    assert report.losses[0] < fresh_report.losses[0]
    still, _ = train_draft_head(
        model, prompts, [], None, replace(CONFIG, learning_rate=0.0), progress=False, init_head=head
    )
    assert all(torch.equal(still.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(further.draft_vocab, head.draft_vocab)
    assert all(torch.equal(head.state_dict()[k], v) for k, v in before.items())  # the given head is untouched
    target = TargetModel(model)
    for prompt in prompt_factory(3, model.config.vocab_size, 3, 12, seed=11):
        expected = generate_plain(target, prompt, max_new_tokens=16)
        output = generate_speculative(
            target, further, prompt, StaticController(TreeParams(8, 3, 2)), max_new_tokens=16
        )
        assert output.output_ids.tolist() == expected.output_ids.tolist()


def test_a_contradicting_draft_vocabulary_or_head_kind_is_refused(trained, prompt_factory):
    model, head, _ = trained
    prompts = prompt_factory(2, model.config.vocab_size, 4, 8, seed=1)
    wrong_size = DraftTrainConfig(max_new_tokens=4, epochs=1, draft_vocab_size=32)
    with pytest.raises(ValueError, match="draft_vocab_size 32 .* 48 tokens"):
        train_draft_head(model, prompts, [], None, wrong_size, progress=False, init_head=head)
    eagle3 = DraftTrainConfig(max_new_tokens=4, epochs=1, eagle3=True)
    with pytest.raises(ValueError, match="EAGLE-1/2 heads only"):
        train_draft_head(model, prompts, [], None, eagle3, progress=False, init_head=head)


def test_skipped_exchanges_are_the_first_ones_of_the_same_order(monkeypatch):
    conversations = [
        Conversation(
            f"c{i}",
            ({"role": "user", "content": f"question number {i}"}, {"role": "assistant", "content": f"a{i}"}),
        )
        for i in range(10)
    ]
    monkeypatch.setattr(draft_data, "iter_conversations", lambda split: iter(conversations))
    everything = list(draft_data._train_exchanges(7))
    assert list(draft_data._train_exchanges(4, skip=3)) == everything[3:7]
    assert list(draft_data._train_exchanges(5, skip=8)) == [
        ("question number 8", "a8"),
        ("question number 9", "a9"),
    ]
