"""EAGLE-3 heads: the official layout loads (safetensors and .bin), drafts over its draft vocabulary through d2t,
and stays lossless on the tiny target and the real one, one row at a time and batched; a `use_eagle3` that
contradicts the checkpoint is refused; the trainer (training-time test) and its command work; the pipeline's
actor takes an EAGLE-3 folder as its --draft.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest
import torch
from safetensors import safe_open

from actors.generation import GenerationActor
from common.columns import ERROR_COLUMN
from common.config import GenerateConfig
from demo.build import demo_paths
from engine.batch import GenerationRequest, generate_batch
from engine.draft import Drafter, PendingDraftInput
from engine.draft_head import DraftHead, DraftHeadConfig
from engine.ea_model import EaModel
from engine.eagle3_head import Eagle3Head, Eagle3HeadConfig, eagle3_feature_layers
from engine.generate import generate_plain, generate_speculative
from engine.heads import checkpoint_is_eagle3, load_draft_head
from engine.target import TargetModel
from engine.types import SamplingParams, StaticController, TreeParams
from pipeline.rows import validate_rows
from training.train_draft import DraftTrainConfig, train_draft_head
from training.train_eagle3 import ttt_mask

VOCAB = 96
EVEN_IDS = torch.arange(
    0, VOCAB, 2
)  # half the vocabulary: the target often wants a token the draft cannot say
TREE = TreeParams(12, 4, 3)


def random_eagle3(model, draft_ids: torch.Tensor | None, seed: int = 0) -> Eagle3Head:
    """A random EAGLE-3 head for `model` (lm_head started from the target's rows, so it proposes sensibly)."""
    torch.manual_seed(seed)
    size = None if draft_ids is None else int(draft_ids.numel())
    head = Eagle3Head(Eagle3HeadConfig.for_target(model.config, size), eagle3_feature_layers(4))
    if draft_ids is not None:
        head.set_draft_vocab(draft_ids)
    with torch.no_grad():
        head.lm_head.weight.copy_(model.lm_head.weight[head.draft_token_ids])
    return head.eval()


@pytest.fixture(scope="module")
def four_layers(tiny_lm_factory):
    """A tiny 4-layer Llama (EAGLE-3 reads the inputs of its layers 2, 2 and 1) saved as a folder."""
    return tiny_lm_factory("llama", seed=3, num_layers=4)


@pytest.fixture(scope="module")
def trained(four_layers, prompt_factory, tmp_path_factory):
    """An EAGLE-3 head trained with the training-time test for a few seconds, saved in the official layout."""
    out = str(tmp_path_factory.mktemp("eagle3-trained"))
    config = DraftTrainConfig(
        max_new_tokens=40,
        epochs=12,
        batch_size=8,
        warmup_steps=5,
        eagle3=True,
        ttt_steps=3,
        draft_vocab_size=64,
    )
    prompts = prompt_factory(24, VOCAB, 4, 20, seed=4)
    head, report = train_draft_head(
        four_layers, prompts, prompt_factory(4, VOCAB, 3, 12, seed=9), out, config, progress=False
    )
    return head, report, out


def test_ttt_mask_matches_what_each_draft_round_sees():
    assert ttt_mask(3, 0).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # step 1, position 2: step 0's keys 0..1 (real features) and its own key 2; position 0: only itself
    assert ttt_mask(3, 1).tolist() == [
        [False, False, False, True, False, False],
        [True, False, False, False, True, False],
        [True, True, False, False, False, True],
    ]
    step2 = ttt_mask(4, 2)  # position 3: step 0 <= 1, step 1 at 2, step 2 at 3
    assert step2[3].nonzero().flatten().tolist() == [0, 1, 4 + 2, 8 + 3]


@pytest.mark.parametrize("as_bin", [False, True], ids=["safetensors", "bin"])
@pytest.mark.parametrize("draft_ids", [EVEN_IDS, None], ids=["d2t", "same-vocab"])
def test_an_official_layout_head_loads_and_is_lossless(
    four_layers, prompt_factory, tmp_path, as_bin, draft_ids
):
    head = random_eagle3(four_layers, draft_ids)
    head.save_pretrained(str(tmp_path), as_bin=as_bin)
    weights = "pytorch_model.bin" if as_bin else "model.safetensors"
    assert set(os.listdir(tmp_path)) == {"config.json", weights}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
    state = (
        torch.load(tmp_path / weights, weights_only=True) if as_bin else _safetensors_keys(tmp_path / weights)
    )
    assert ("d2t" in state) == (draft_ids is not None) and "embed_tokens.weight" not in state
    assert {
        "fc.weight",
        "midlayer.hidden_norm.weight",
        "midlayer.self_attn.q_proj.weight",
        "lm_head.weight",
    } <= set(state)

    loaded = load_draft_head(str(tmp_path), four_layers)
    assert isinstance(loaded, Eagle3Head) and loaded.feature_layers == (2, 2, 1)
    for key, tensor in head.state_dict().items():
        if key != "embed_tokens.weight":
            assert torch.equal(loaded.state_dict()[key], tensor), key
    target = TargetModel(four_layers)
    prompts = prompt_factory(5, VOCAB, 3, 20, seed=5)
    for prompt in prompts:
        expected = generate_plain(target, prompt, max_new_tokens=20).output_ids.tolist()
        output = generate_speculative(target, loaded, prompt, StaticController(TREE), max_new_tokens=20)
        assert output.output_ids.tolist() == expected
    requests = [GenerationRequest(p, 20, StaticController(TREE), SamplingParams()) for p in prompts]
    for prompt, result in zip(
        prompts, generate_batch(target, loaded, requests, max_batch_size=3), strict=True
    ):
        assert result.error is None
        assert (
            result.output.output_ids.tolist()
            == generate_plain(target, prompt, max_new_tokens=20).output_ids.tolist()
        )


def _safetensors_keys(path) -> set[str]:
    with safe_open(str(path), "pt") as handle:
        return set(handle.keys())


def test_drafts_come_from_the_draft_vocabulary_mapped_by_d2t(four_layers, prompt_factory):
    head = random_eagle3(four_layers, EVEN_IDS)
    target = TargetModel(four_layers, head.feature_layers)
    prompt = torch.tensor([prompt_factory(1, VOCAB, 12, 12, seed=2)[0]])
    with torch.inference_mode():
        features = target.prefill(prompt, target.new_cache()).features
    assert features.shape[-1] == 3 * four_layers.config.hidden_size
    tree = (
        Drafter(head, four_layers.lm_head)
        .draft(PendingDraftInput(features[:, :-1], prompt[:, 1:]), TREE)
        .tree
    )
    drafted = tree.token_ids.flatten()[1:]  # after the root
    assert drafted.numel() == TREE.total_tokens
    assert bool((drafted % 2 == 0).all())  # every proposal is an even id, the draft vocabulary's


def test_a_contradicting_use_eagle3_is_refused_naming_both(four_layers, tmp_path):
    eagle3, eagle = tmp_path / "eagle3", tmp_path / "eagle"
    random_eagle3(four_layers, EVEN_IDS).save_pretrained(str(eagle3))
    DraftHead(DraftHeadConfig.for_target(four_layers.config)).save_pretrained(str(eagle))
    assert checkpoint_is_eagle3(str(eagle3)) and not checkpoint_is_eagle3(str(eagle))
    with pytest.raises(ValueError, match=r"use_eagle3=False but .* holds an EAGLE-3 head"):
        load_draft_head(str(eagle3), four_layers, use_eagle3=False)
    with pytest.raises(ValueError, match=r"use_eagle3=True but .* holds an EAGLE-1/2 head"):
        load_draft_head(str(eagle), four_layers, use_eagle3=True)
    assert isinstance(load_draft_head(str(eagle3), four_layers, use_eagle3=True), Eagle3Head)


def test_broken_eagle3_folders_name_the_problem(four_layers, tmp_path):
    from safetensors.torch import save_file

    head = random_eagle3(four_layers, EVEN_IDS)
    head.save_pretrained(str(tmp_path))
    state = {k: v for k, v in head.state_dict().items() if k not in ("d2t", "t2d", "embed_tokens.weight")}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="no d2t/t2d"):
        load_draft_head(str(tmp_path), four_layers)
    state = {**state, "d2t": torch.full((48,), 10_000), "t2d": head.t2d}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="outside the target's vocabulary"):
        load_draft_head(str(tmp_path), four_layers)
    state = {**state, "d2t": head.d2t, "midlayer.mlp.up_proj.weight": torch.zeros(3, 3)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="midlayer.mlp.up_proj.weight has shape"):
        load_draft_head(str(tmp_path), four_layers)


def test_the_ea_model_facade_takes_an_eagle3_head(four_layers, prompt_factory, tmp_path):
    four_layers.save_pretrained(str(tmp_path / "target"))
    random_eagle3(four_layers, EVEN_IDS).save_pretrained(str(tmp_path / "head"), as_bin=True)
    model = EaModel.from_pretrained(
        use_eagle3=True,
        base_model_path=str(tmp_path / "target"),
        ea_model_path=str(tmp_path / "head"),
        total_token=8,
        depth=3,
        top_k=3,
    )
    assert model.ea_layer.kind == "eagle3" and model.target.feature_layers == (2, 2, 1)
    prompt = torch.tensor([prompt_factory(1, VOCAB, 6, 6, seed=1)[0]])
    expected = model.naivegenerate(prompt, max_new_tokens=16)
    assert model.eagenerate(prompt, max_new_tokens=16).tolist() == expected.tolist()
    batch = model.eagenerate_batch([prompt[0], prompt[0, :3]], max_new_tokens=16)
    assert batch[0].tolist() == expected[0].tolist()


def test_the_trained_head_learns_accepts_and_stays_lossless(trained, four_layers, prompt_factory):
    head, report, out = trained
    assert report.losses[-1] < report.losses[0]
    assert report.eval_mean_accepted_tokens > 1.5  # drafts are accepted, not only bonus tokens
    loaded = load_draft_head(out, four_layers)
    assert loaded.kind == "eagle3" and loaded.num_proposal_tokens == 64
    target = TargetModel(four_layers)
    for prompt in prompt_factory(4, VOCAB, 3, 16, seed=11):
        expected = generate_plain(target, prompt, max_new_tokens=24).output_ids.tolist()
        assert (
            generate_speculative(
                target, loaded, prompt, StaticController(TREE), max_new_tokens=24
            ).output_ids.tolist()
            == expected
        )


def test_the_pipeline_actor_takes_an_eagle3_draft_folder(tiny_demo, tmp_path):
    from transformers import AutoModelForCausalLM

    paths = demo_paths(tiny_demo)
    model = AutoModelForCausalLM.from_pretrained(paths["target"])
    layers = model.config.num_hidden_layers
    head = Eagle3Head(Eagle3HeadConfig.for_target(model.config, 512), eagle3_feature_layers(layers))
    head.set_draft_vocab(torch.arange(512))
    head.save_pretrained(str(tmp_path / "eagle3"))
    prompts = ["def f(x):", "import os", "class A:"]
    texts = {}
    for name, draft in (("eagle", paths["draft"]), ("eagle3", str(tmp_path / "eagle3"))):
        config = GenerateConfig(
            input="unused.parquet",
            output="unused",
            model=paths["target"],
            draft=draft,
            policy="static",
            shared_cache=False,
            max_new_tokens=12,
        ).model_dump()
        actor = GenerationActor(config)
        assert actor.model.ea_layer.kind == name
        table = validate_rows(pa.table({"id": [1, 2, 3], "prompt": prompts}), GenerateConfig(**config))
        out = actor(table)
        assert out.column(ERROR_COLUMN).to_pylist() == [None] * 3
        texts[name] = out.column("generated_text").to_pylist()
        actor.runner.close()
    assert texts["eagle3"] == texts["eagle"]


# ---- the real target ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_target() -> str:
    from jobs.models import COMMITTED_ROOT, ensure_models

    return ensure_models(COMMITTED_ROOT)["target"]


def test_a_random_official_head_is_lossless_on_the_real_target(real_target, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(real_target)
    head = Eagle3Head(
        Eagle3HeadConfig.for_target(config, 8192), eagle3_feature_layers(config.num_hidden_layers)
    )
    head.set_draft_vocab(
        torch.randperm(config.vocab_size, generator=torch.Generator().manual_seed(0))[:8192].sort().values
    )
    head.save_pretrained(str(tmp_path))
    model = EaModel.from_pretrained(
        use_eagle3=True,
        base_model_path=real_target,
        ea_model_path=str(tmp_path),
        total_token=16,
        depth=4,
        top_k=4,
    )
    assert model.target.feature_layers == (2, 15, 27)
    tokenizer = AutoTokenizer.from_pretrained(real_target)
    messages = [{"role": "user", "content": "Name three primary colours."}]
    ids = torch.tensor(
        [tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)]
    )
    expected = model.naivegenerate(ids, max_new_tokens=16)
    assert model.eagenerate(ids, max_new_tokens=16).tolist() == expected.tolist()


def test_the_eagle3_training_command_works_at_a_tiny_budget(real_target, tmp_path):
    from jobs import train_draft

    out = tmp_path / "draft-eagle3"
    train_draft.main(
        [
            "--eagle3",
            "--target",
            real_target,
            "--sharegpt",
            "3",
            "--responses",
            "dataset",
            "--max-tokens",
            "48",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--ttt-steps",
            "2",
            "--num-eval",
            "1",
            "--draft-vocab-size",
            "512",
            "--eval-tree",
            "6/3/2",
            "--out",
            str(out),
        ]
    )
    report = json.loads((out / "training_report.json").read_text())
    assert (
        report["kind"] == "eagle3" and report["num_steps"] == 2 and report["eval_mean_accepted_tokens"] >= 1.0
    )
    assert report["command"].startswith("python -m jobs.train_draft --eagle3 ")
    assert checkpoint_is_eagle3(str(out))
    assert json.loads((out / "config.json").read_text())["draft_vocab_size"] == 512


def test_the_bench_runs_an_eagle3_head_beside_the_eagle_head(tiny_demo, tmp_path):
    from transformers import AutoConfig

    from jobs import bench

    paths = demo_paths(tiny_demo)
    config = AutoConfig.from_pretrained(paths["target"])
    head = Eagle3Head(Eagle3HeadConfig.for_target(config), eagle3_feature_layers(config.num_hidden_layers))
    head.save_pretrained(str(tmp_path / "eagle3"))
    payload = bench.main(
        [
            "--prompts",
            paths["prompts"],
            "--model",
            paths["target"],
            "--draft",
            paths["draft"],
            "--compare-draft",
            str(tmp_path / "eagle3"),
            "--policy",
            paths["policy"],
            "--num-prompts",
            "2",
            "--max-new-tokens",
            "8",
            "--grid",
            "4/2/2,6/3/2",
            "--grid-prompts",
            "1",
        ]
    )
    methods = payload["methods"]
    assert {"eagle3_defaults", "eagle3_best_static", "eagle3_heuristic", "eagle3_learned"} <= set(methods)
    assert {"eagle_best_static", "learned", "learned_unoptimized"} <= set(methods)
    for name, result in methods.items():
        assert result["identical_fraction"] == 1.0, name
    assert methods["eagle3_best_static"]["tree_params"] == payload["grids"]["eagle3"]["best"]
    assert payload["config"]["compare_draft"] == str(tmp_path / "eagle3")


def test_the_recorded_eagle3_build_command_parses_and_a_built_head_is_kept(tmp_path, monkeypatch):
    from jobs import models, train_draft

    args = train_draft._parser().parse_args([*models.EAGLE3_TRAIN_ARGS, "--target", "t", "--out", "o"])
    assert args.eagle3 and args.draft_vocab_size == 8192 and args.responses == "dataset"
    folder = tmp_path / models.EAGLE3_FOLDER
    folder.mkdir()
    (folder / "training_report.json").write_text("{}")
    monkeypatch.setattr(train_draft, "main", lambda argv: pytest.fail("a built head was trained again"))
    assert models.build_eagle3_head(str(tmp_path)) is None
