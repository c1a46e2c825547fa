"""Entry points: --help works, bad arguments fail before any work with a message naming the problem."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import bench, build_demo, train_draft, train_policy
from jobs.prompts import read_prompt_column


@pytest.mark.parametrize("job", [bench, build_demo, train_draft, train_policy])
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
