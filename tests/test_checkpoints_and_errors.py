"""Draft-head checkpoints in the official EAGLE layout, the `EaModel` facade, and the errors users get for bad
checkpoints, bad models and bad arguments."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from engine.draft_head import DraftHead, DraftHeadConfig
from engine.ea_model import EaModel
from engine.generate import generate_plain, generate_speculative
from engine.target import TargetModel
from engine.types import SamplingParams, StaticController, TreeParams

# ---- draft-head checkpoints ---------------------------------------------------------------------------------------


def head_inputs(head: DraftHead, length: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    token_ids = torch.randint(0, head.config.vocab_size, (1, length), generator=generator)
    features = torch.randn(1, length, head.config.hidden_size, generator=generator)
    return token_ids, features, torch.arange(length)[None]


def assert_same_head(loaded: DraftHead, original: DraftHead) -> None:
    assert loaded.config == original.config
    expected = original.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(*head_inputs(loaded)), original(*head_inputs(original)))


@pytest.fixture(scope="module")
def trained_head(tiny_llama) -> DraftHead:
    return tiny_llama.head


def target_embeddings(tiny_llama) -> torch.Tensor:
    return tiny_llama.model.get_input_embeddings().weight.detach()


def test_save_pretrained_writes_the_official_layout(tmp_path, trained_head, tiny_llama) -> None:
    trained_head.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["hidden_size"] == 64 and config["vocab_size"] == 96 and config["bias"] is True
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert "embed_tokens.weight" not in keys
    assert {
        "fc.weight",
        "fc.bias",
        "layers.0.self_attn.q_proj.weight",
        "layers.0.mlp.down_proj.weight",
    } <= keys
    assert not any("input_layernorm" in key for key in keys)  # EAGLE's layer 0 has none

    loaded = DraftHead.from_pretrained(str(tmp_path), target_embeddings=target_embeddings(tiny_llama))
    assert_same_head(loaded, trained_head)
    assert not loaded.training


def test_round_trip_with_embeddings_needs_no_target(tmp_path, trained_head) -> None:
    trained_head.save_pretrained(str(tmp_path), include_embeddings=True)
    assert "embed_tokens.weight" in load_file(str(tmp_path / "model.safetensors"))
    assert_same_head(DraftHead.from_pretrained(str(tmp_path)), trained_head)


def test_missing_embeddings_without_target_embeddings_is_an_error(tmp_path, trained_head) -> None:
    trained_head.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="embed_tokens"):
        DraftHead.from_pretrained(str(tmp_path))


def test_pytorch_model_bin_loads_with_weights_only(tmp_path, trained_head, tiny_llama) -> None:
    trained_head.save_pretrained(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    state = {k: v for k, v in trained_head.state_dict().items() if k != "embed_tokens.weight"}
    torch.save(
        {f"model.{k}": v for k, v in state.items()}, tmp_path / "pytorch_model.bin"
    )  # prefixed keys too
    loaded = DraftHead.from_pretrained(str(tmp_path), target_embeddings=target_embeddings(tiny_llama))
    assert_same_head(loaded, trained_head)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pytorch_model_bin_is_never_a_bare_unpickle(tmp_path, trained_head) -> None:
    trained_head.save_pretrained(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    marker = tmp_path / "code-ran"
    state = dict(trained_head.state_dict())
    state["payload"] = _RunsCodeWhenUnpickled(str(marker))
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception):  # noqa: B017 - torch's UnpicklingError, or a ValueError wrapping it
        DraftHead.from_pretrained(str(tmp_path))
    assert not marker.exists()


def test_head_without_fc_bias_round_trips(tmp_path) -> None:
    config = DraftHeadConfig(
        vocab_size=30,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        fc_bias=False,
    )
    torch.manual_seed(0)
    head = DraftHead(config).eval()
    head.save_pretrained(str(tmp_path), include_embeddings=True)
    assert json.loads((tmp_path / "config.json").read_text())["bias"] is False
    loaded = DraftHead.from_pretrained(str(tmp_path))
    assert loaded.fc.bias is None
    assert_same_head(loaded, head)


def write_head_folder(folder, state: dict[str, torch.Tensor], config: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


def test_eagle3_head_is_refused_by_name(tmp_path) -> None:
    hidden = 16
    state = {
        "fc.weight": torch.zeros(hidden, 3 * hidden),
        "midlayer.self_attn.q_proj.weight": torch.zeros(hidden, 2 * hidden),
        "midlayer.hidden_norm.weight": torch.ones(hidden),
        "norm.weight": torch.ones(hidden),
        "lm_head.weight": torch.zeros(20, hidden),
        "d2t": torch.zeros(20, dtype=torch.long),
        "t2d": torch.ones(30, dtype=torch.bool),
    }
    config = {"vocab_size": 30, "hidden_size": hidden, "intermediate_size": 32, "num_attention_heads": 2}
    with pytest.raises(ValueError, match="EAGLE-3"):
        DraftHead.from_pretrained(write_head_folder(tmp_path / "eagle3", state, config))


def test_broken_head_folders_name_the_problem(tmp_path, trained_head) -> None:
    with pytest.raises(ValueError, match="config.json"):
        DraftHead.from_pretrained(str(tmp_path / "does-not-exist"))

    no_config = tmp_path / "no-config"
    trained_head.save_pretrained(str(no_config), include_embeddings=True)
    os.remove(no_config / "config.json")
    with pytest.raises(ValueError, match="config.json"):
        DraftHead.from_pretrained(str(no_config))

    no_weights = tmp_path / "no-weights"
    trained_head.save_pretrained(str(no_weights), include_embeddings=True)
    os.remove(no_weights / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors"):
        DraftHead.from_pretrained(str(no_weights))


def official_config(head: DraftHead) -> dict:
    return head.config.to_official_json()


def test_shape_mismatch_is_an_error(tmp_path, trained_head) -> None:
    state = dict(trained_head.state_dict())
    state["fc.weight"] = torch.zeros(64, 100)
    with pytest.raises(ValueError, match=r"fc\.weight has shape \(64, 100\), expected \(64, 128\)"):
        DraftHead.from_pretrained(write_head_folder(tmp_path / "a", state, official_config(trained_head)))

    # a config that disagrees with the weights is the same kind of error
    config = {**official_config(trained_head), "intermediate_size": 64}
    with pytest.raises(ValueError, match="has shape"):
        DraftHead.from_pretrained(write_head_folder(tmp_path / "b", trained_head.state_dict(), config))


def test_missing_and_unexpected_keys_are_listed(tmp_path, trained_head) -> None:
    state = dict(trained_head.state_dict())
    state.pop("layers.0.mlp.up_proj.weight")
    state["layers.0.input_layernorm.weight"] = torch.ones(64)
    with pytest.raises(ValueError, match=r"missing \['layers.0.mlp.up_proj.weight'\].*input_layernorm"):
        DraftHead.from_pretrained(write_head_folder(tmp_path, state, official_config(trained_head)))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_hidden_layers": 2}, "num_hidden_layers=1"),
        ({"vocab_size": None}, "vocab_size"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ],
)
def test_unsupported_head_configs_are_refused(tmp_path, trained_head, change: dict, message: str) -> None:
    config = {**official_config(trained_head), **change}
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        DraftHead.from_pretrained(write_head_folder(tmp_path, trained_head.state_dict(), config))


# ---- EaModel ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ea_folders(tmp_path_factory, tiny_llama) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("ea")
    base, head = str(folder / "base"), str(folder / "head")
    tiny_llama.model.save_pretrained(base)
    tiny_llama.head.save_pretrained(head)
    return base, head


@pytest.fixture(scope="module")
def ea_model(ea_folders) -> EaModel:
    base, head = ea_folders
    return EaModel.from_pretrained(base_model_path=base, ea_model_path=head, total_token=8, depth=3, top_k=3)


def test_ea_model_generations_match_hf(ea_model, tiny_llama) -> None:
    assert ea_model.tree_params == TreeParams(8, 3, 3)
    assert_same_head(ea_model.ea_layer, tiny_llama.head)
    num_accepted = []
    for prompt in ([5], [3, 17, 42, 8], list(range(20, 45))):
        input_ids = torch.tensor([prompt])
        expected = tiny_llama.model.generate(input_ids, do_sample=False, max_new_tokens=24)
        speculative = ea_model.eagenerate(input_ids, max_new_tokens=24)
        assert speculative.tolist() == expected.tolist()
        num_accepted.append(sum(s.accepted_length for s in ea_model.last_output.steps))
        assert ea_model.naivegenerate(input_ids, max_new_tokens=24).tolist() == expected.tolist()
    assert sum(num_accepted) > 0, num_accepted  # the reloaded head still drafts useful tokens


def test_ea_model_log_and_per_call_tree(ea_model) -> None:
    input_ids = torch.tensor([[9, 8, 7, 6]])
    ids, num_new_tokens, num_steps = ea_model.eagenerate(input_ids, max_new_tokens=20, log=True)
    assert ids.shape == (1, 24) and num_new_tokens == 20
    assert num_steps == len(ea_model.last_output.steps) and 0 < num_steps < 20
    assert {s.tree_params for s in ea_model.last_output.steps} == {TreeParams(8, 3, 3)}

    other = ea_model.eagenerate(input_ids, max_new_tokens=20, tree_params=TreeParams(4, 2, 2))
    assert other.tolist() == ids.tolist()
    assert {s.tree_params for s in ea_model.last_output.steps} == {TreeParams(4, 2, 2)}
    assert ea_model.tree_params == TreeParams(8, 3, 3)  # a per-call tree is not stored on the model

    naive_ids, naive_new, _ = ea_model.naivegenerate(input_ids, max_new_tokens=20, log=True)
    assert naive_ids.tolist() == ids.tolist() and naive_new == 20


def test_ea_model_sampling_is_seeded(ea_model) -> None:
    input_ids = torch.tensor([[1, 2, 3]])

    def sample(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return ea_model.eagenerate(
            input_ids, temperature=0.8, top_p=0.9, max_new_tokens=12, generator=generator
        ).tolist()

    assert sample(3) == sample(3)


def test_ea_model_without_tokenizer(ea_model) -> None:
    with pytest.raises(ValueError, match="no tokenizer"):
        ea_model.get_tokenizer()


def test_ea_model_from_pretrained_errors(tmp_path, ea_folders) -> None:
    base, head = ea_folders
    with pytest.raises(ValueError, match="base_model_path"):
        EaModel.from_pretrained(ea_model_path=head)
    with pytest.raises(ValueError, match="ea_model_path"):
        EaModel.from_pretrained(base_model_path=base, ea_model_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="base_model_path"):
        EaModel.from_pretrained(base_model_path=str(tmp_path / "missing"), ea_model_path=head)
    with pytest.raises(ValueError, match="exceeds"):
        EaModel.from_pretrained(base_model_path=base, ea_model_path=head, total_token=100, depth=2, top_k=3)


def test_ea_model_refuses_an_unsupported_target_folder(tmp_path, ea_folders) -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=96, n_positions=64))
    gpt2.save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="gpt2"):
        EaModel.from_pretrained(base_model_path=str(tmp_path / "gpt2"), ea_model_path=ea_folders[1])


def test_ea_model_refuses_a_head_of_another_width(tmp_path, ea_folders) -> None:
    config = DraftHeadConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1
    )
    DraftHead(config).save_pretrained(str(tmp_path / "narrow"))
    with pytest.raises(ValueError, match="hidden_size|shape"):
        EaModel.from_pretrained(base_model_path=ea_folders[0], ea_model_path=str(tmp_path / "narrow"))


# ---- bad input to the engine --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "input_ids, message",
    [
        ([], "empty"),
        (torch.zeros(1, 0, dtype=torch.long), "empty"),
        (torch.ones(2, 4, dtype=torch.long), "batch size 2"),
        (torch.ones(1, 1, 4, dtype=torch.long), "shape"),
        (torch.ones(1, 4), "integer"),
    ],
)
def test_bad_input_ids(tiny_llama, input_ids, message: str) -> None:
    for generate in (
        lambda ids: generate_speculative(
            tiny_llama.target, tiny_llama.head, ids, StaticController(TreeParams(4, 2, 2))
        ),
        lambda ids: generate_plain(tiny_llama.target, ids),
    ):
        with pytest.raises(ValueError, match=message):
            generate(input_ids)


def test_prompt_too_long_for_the_context(tiny_llama) -> None:
    with pytest.raises(ValueError, match="context limit of 5 tokens"):
        generate_speculative(
            tiny_llama.target, tiny_llama.head, [1] * 8, StaticController(TreeParams(4, 2, 2)), max_length=5
        )
    with pytest.raises(ValueError, match="context limit of 5 tokens"):  # equal length leaves no room either
        generate_plain(tiny_llama.target, [1] * 5, max_length=5)
    with pytest.raises(ValueError, match="context limit of 256 tokens"):  # max_position_embeddings
        generate_speculative(
            tiny_llama.target, tiny_llama.head, [1] * 300, StaticController(TreeParams(4, 2, 2))
        )
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_speculative(
            tiny_llama.target,
            tiny_llama.head,
            [1, 2],
            StaticController(TreeParams(4, 2, 2)),
            max_new_tokens=-1,
        )


def test_unsupported_architectures_are_refused() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=64))
    with pytest.raises(ValueError, match="'gpt2' is not supported.*llama"):
        TargetModel(gpt2)
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    )
    with pytest.raises(ValueError, match="encoder-decoder"):
        TargetModel(t5)


@pytest.mark.parametrize("implementation", ["flex_attention", "flash_attention_2"])
def test_attention_that_cannot_take_a_tree_mask_is_refused(tiny_lm_factory, implementation: str) -> None:
    model = tiny_lm_factory("llama", seed=0, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    TargetModel(model)  # sdpa is fine
    model.config._attn_implementation = implementation
    with pytest.raises(ValueError, match=f"'{implementation}'.*sdpa"):
        TargetModel(model)


def test_qwen2_sliding_window_is_refused(tiny_lm_factory) -> None:
    model = tiny_lm_factory(
        "qwen2",
        seed=0,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=0,
    )
    with pytest.raises(ValueError, match="sliding-window"):
        TargetModel(model)


def tiny_mistral_config(sliding_window: int | None) -> MistralConfig:
    return MistralConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        sliding_window=sliding_window,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="sdpa",
    )


def test_mistral_sliding_window_is_refused() -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="sliding-window attention \\(window 8\\)"):
        TargetModel(MistralForCausalLM(tiny_mistral_config(sliding_window=8)).eval())


def test_mistral_without_sliding_window_is_identical_to_hf() -> None:
    torch.manual_seed(0)
    config = tiny_mistral_config(sliding_window=None)
    model = MistralForCausalLM(config).eval()
    target = TargetModel(model)
    head = DraftHead(DraftHeadConfig.for_target(config)).eval()
    prompt = list(range(10, 30))
    expected = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8)
    output = generate_speculative(
        target, head, prompt, StaticController(TreeParams(4, 2, 2)), max_new_tokens=8
    )
    assert output.output_ids.tolist() == expected.tolist()


# ---- value types ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        ((100, 2, 3), "exceeds the 21 nodes"),
        ((0, 2, 3), "total_tokens must be >= 1"),
        ((4, -1, 3), "depth must be >= 0"),
        ((4, 2, 0), "top_k must be >= 1"),
        ((4.0, 2, 3), "must be an int"),
        ((4, True, 3), "must be an int"),
    ],
)
def test_tree_params_validation(args, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TreeParams(*args)


def test_tree_params_parse() -> None:
    assert TreeParams.parse("60/5/10") == TreeParams(60, 5, 10)
    assert TreeParams.parse(TreeParams(21, 2, 3).compact) == TreeParams(21, 2, 3)
    assert TreeParams(60, 5, 10).max_nodes == 10 + 5 * 100
    for text in ("bad", "1/2", "1/2/x", "1/2/3/4", "-1/2/3", ""):
        with pytest.raises(ValueError, match="total_tokens/depth/top_k"):
            TreeParams.parse(text)
    with pytest.raises(ValueError, match="exceeds"):
        TreeParams.parse("99/1/2")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": 1.0, "top_p": 1.5}, "top_p"),
        ({"temperature": 1.0, "top_k": -1}, "top_k"),
    ],
)
def test_sampling_params_validation(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
    assert SamplingParams().is_greedy and not SamplingParams(temperature=0.5).is_greedy
