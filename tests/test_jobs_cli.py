"""Entry points: --help works, bad arguments fail before any work with a message naming the problem."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config import GenerateConfig
from jobs import bench, build_demo, generate, train_draft, train_policy
from jobs.prompts import read_prompt_column


@pytest.mark.parametrize("job", [bench, build_demo, generate, train_draft, train_policy])
def test_every_job_has_help(job, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        job.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_bench_rejects_bad_counts(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--num-prompts", "0"])
    assert exit_info.value.code == 2
    assert "--num-prompts must be >= 1" in capsys.readouterr().err


def test_prompt_reader_names_missing_columns_and_files(tmp_path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), path)
    with pytest.raises(ValueError, match=r"no column 'prompt'; available columns: \['text'\]"):
        read_prompt_column(str(path))
    with pytest.raises(ValueError, match="does not exist"):
        read_prompt_column(str(tmp_path / "missing.parquet"))
    assert read_prompt_column(str(path), "text") == ["a", "b"]


# ---- jobs.generate: the options come from GenerateConfig's fields --------------------------------------------


def test_generate_has_one_option_per_config_field_with_the_config_default(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in GenerateConfig.model_fields:
        assert generate.option_name(name) in text, name
    assert "--no-progress" in text and "--models-root" in text
    assert "(default: 128)" in text  # --max-new-tokens, from the field
    args = generate.parse_args([])
    for name, field in GenerateConfig.model_fields.items():
        if not field.is_required():
            assert getattr(args, name) == field.default, name
    config = generate.build_config(args)
    assert (config.input, config.output) == (generate.DEFAULT_INPUT, generate.DEFAULT_OUTPUT)
    assert config.model.endswith("target") and config.policy.endswith("policy")  # the demo's


def test_generate_flags_keep_their_forms() -> None:
    argv = [
        "--no-progress",
        "--trust-remote-code",
        "--overwrite",
        "--shared-cache",
        "--row-timeout-s",
        "none",
    ]
    argv += ["--max-prompt-tokens", "64", "--num-actors", "2", "--temperature", "0.5", "--namespace", "team"]
    argv += [
        "--model",
        "m",
        "--draft",
        "d",
        "--policy",
        "static",
        "--tree",
        "12/11/1",
        "--cpus-per-actor",
        "1.5",
    ]
    config = generate.build_config(generate.parse_args(argv))
    assert (config.progress, config.trust_remote_code, config.overwrite, config.shared_cache) == (
        False,
        True,
        True,
        True,
    )
    assert (config.row_timeout_s, config.max_prompt_tokens, config.num_actors) == (None, 64, 2)
    assert (config.temperature, config.namespace, config.cpus_per_actor) == (0.5, "team", 1.5)
    assert (config.model, config.draft, config.policy, config.tree) == ("m", "d", "static", "12/11/1")
    assert generate.build_config(generate.parse_args(["--row-timeout-s", "30"])).row_timeout_s == 30.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-actors", "0"], "--num-actors: Input should be greater than or equal to 1"),
        (["--max-new-tokens", "200", "--max-new-tokens-cap", "100"], "--max-new-tokens 200 is above"),
        (["--tree", "8-4-2"], "--tree: "),
        (["--num-actors", "two"], "argument --num-actors: invalid int value: 'two'"),
        (["--max-prompt-tokens", "x"], "argument --max-prompt-tokens: invalid int or 'none' value: 'x'"),
    ],
)
def test_generate_names_the_bad_flag_and_exits_2(argv, message, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        generate.main([*argv, "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
