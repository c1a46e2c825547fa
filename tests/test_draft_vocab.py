"""A draft vocabulary changes what the head proposes, never what is accepted.

With every token in it the drafter builds the same trees as without one; with a reduced one every proposal is
in it and greedy output still equals plain decoding. The vocabulary travels beside the official weights file.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from engine.draft import Drafter, PendingDraftInput
from engine.draft_head import DRAFT_VOCAB_NAME, DraftHead
from engine.generate import generate_plain, generate_speculative
from engine.target import TargetModel
from engine.types import StaticController, TreeParams
from training.train_draft import DraftTrainConfig, choose_draft_vocab, collect_features, train_head


def with_vocab(head: DraftHead, token_ids) -> DraftHead:
    reduced = copy.deepcopy(head)
    reduced.set_draft_vocab(torch.as_tensor(token_ids))
    return reduced


def test_the_whole_vocabulary_as_draft_vocabulary_builds_the_same_trees(tiny_llama):
    model, head = tiny_llama.model, tiny_llama.head
    everything = with_vocab(head, range(model.config.vocab_size))
    prompt = torch.tensor([tiny_llama.train_prompts[0]])
    with torch.inference_mode():
        features = model.model(input_ids=prompt).last_hidden_state
    pending = PendingDraftInput(features[:, :-1], prompt[:, 1:])
    params = TreeParams(12, 4, 3)
    plain = Drafter(head, model.lm_head).draft(pending, params).tree
    full = Drafter(everything, model.lm_head).draft(pending, params).tree
    assert torch.equal(plain.token_ids, full.token_ids)
    assert torch.equal(plain.ancestor_mask, full.ancestor_mask)
    assert torch.allclose(plain.scores, full.scores)


@pytest.mark.parametrize("tree", [TreeParams(8, 3, 3), TreeParams(16, 4, 4)])
def test_a_reduced_vocabulary_proposes_only_its_tokens_and_stays_lossless(tiny_llama, prompt_factory, tree):
    model = tiny_llama.model
    vocab = list(range(0, model.config.vocab_size, 2))  # half the tokens: the target often wants the others
    reduced = with_vocab(tiny_llama.head, vocab)
    drafter = Drafter(reduced, model.lm_head)
    assert drafter.projection.weight.shape[0] == len(vocab)
    for prompt in prompt_factory(6, model.config.vocab_size, 3, 20, seed=5):
        expected = generate_plain(tiny_llama.target, prompt, max_new_tokens=24)
        output = generate_speculative(
            tiny_llama.target, reduced, prompt, StaticController(tree), max_new_tokens=24
        )
        assert output.output_ids.tolist() == expected.output_ids.tolist()
    with torch.inference_mode():
        ids = torch.tensor([tiny_llama.train_prompts[1]])
        features = model.model(input_ids=ids).last_hidden_state
        drafted = drafter.draft(PendingDraftInput(features[:, :-1], ids[:, 1:]), tree).tree
    assert set(drafted.token_ids[0, 1:].tolist()) <= set(vocab)


def test_the_draft_vocabulary_is_saved_beside_the_official_weights(tiny_llama, tmp_path):
    model = tiny_llama.model
    reduced = with_vocab(tiny_llama.head, [9, 3, 3, 40])
    reduced.save_pretrained(str(tmp_path))
    embeddings = model.get_input_embeddings().weight
    loaded = DraftHead.from_pretrained(str(tmp_path), target_embeddings=embeddings)
    assert loaded.draft_vocab.tolist() == [3, 9, 40]  # sorted, each once
    tiny_llama.head.save_pretrained(str(tmp_path))  # a head without one removes the stale file
    assert DraftHead.from_pretrained(str(tmp_path), target_embeddings=embeddings).draft_vocab is None


def test_a_bad_draft_vocabulary_is_refused(tiny_llama, tmp_path):
    head = tiny_llama.head
    with pytest.raises(ValueError, match="token ids in"):
        with_vocab(head, [0, head.config.vocab_size])
    head.save_pretrained(str(tmp_path))
    save_file({"token_ids": torch.tensor([1.0, 2.0])}, str(tmp_path / DRAFT_VOCAB_NAME))
    with pytest.raises(ValueError, match="int64"):
        DraftHead.from_pretrained(
            str(tmp_path), target_embeddings=tiny_llama.model.get_input_embeddings().weight
        )


def test_training_over_a_draft_vocabulary_keeps_the_most_frequent_tokens(tiny_lm_factory, prompt_factory):
    model = tiny_lm_factory("llama", seed=3)
    prompts = prompt_factory(16, model.config.vocab_size, 4, 16, seed=4)
    config = DraftTrainConfig(max_new_tokens=24, epochs=4, batch_size=8, warmup_steps=2, draft_vocab_size=24)
    examples = collect_features(model, prompts, config, progress=False)
    head, losses, _ = train_head(model, examples, config, progress=False)
    assert head.draft_vocab.tolist() == choose_draft_vocab(examples, 24, model.config.vocab_size).tolist()
    counts = torch.bincount(torch.cat([ids for ids, _ in examples]), minlength=model.config.vocab_size)
    kept = counts[head.draft_vocab]
    left_out = counts[[i for i in range(model.config.vocab_size) if i not in set(head.draft_vocab.tolist())]]
    assert kept.min() >= left_out.max()  # no token left out is more frequent than one kept
    assert losses[-1] < losses[0]
    for prompt in prompts[:4]:
        expected = generate_plain(TargetModel(model), prompt, max_new_tokens=16)
        output = generate_speculative(
            TargetModel(model), head, prompt, StaticController(TreeParams(8, 3, 2)), max_new_tokens=16
        )
        assert output.output_ids.tolist() == expected.output_ids.tolist()
