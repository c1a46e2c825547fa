"""Resume bookkeeping without a cluster: the job record, reading back finished ids, cut-off files, and the
checks that stop a job whose output cannot be resumed."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from common.config import GenerateConfig
from pipeline.inputs import InputError, resolve_input
from pipeline.resume import JOB_NAME, id_digests, is_done, plan_resume
from pipeline.rows import skip_done_batch


def config_for(tmp_path, **overrides) -> GenerateConfig:
    values = {
        "input": str(tmp_path / "in.parquet"),
        "output": str(tmp_path / "out"),
        "model": "m",
        "draft": "d",
        "policy": "static",
    }
    return GenerateConfig(**{**values, **overrides})


def plan(tmp_path, ids, **overrides):
    pq.write_table(
        pa.table({"id": ids, "prompt": [f"p{i}" for i in range(len(ids))]}), tmp_path / "in.parquet"
    )
    config = config_for(tmp_path, **overrides)
    (tmp_path / "out").mkdir(exist_ok=True)
    inputs = resolve_input(config.input, config.prompt_column)
    return plan_resume(config, inputs, pafs.LocalFileSystem(), str(tmp_path / "out"))


def test_digests_compare_ids_as_text_and_find_the_done_ones():
    done = np.unique(id_digests([3, "b", 10]))
    assert is_done(id_digests(["3", 4, "b", 10, "10"]), done).tolist() == [True, False, True, True, True]
    assert is_done(id_digests([1, 2]), np.zeros(0, np.uint64)).tolist() == [False, False]


def test_a_fresh_output_gets_a_job_record_and_a_rerun_reads_back_the_finished_ids(tmp_path):
    state = plan(tmp_path, [1, 2, 3, 4])
    assert state.num_done == 0 and not state.generate_ids
    assert json.loads((tmp_path / "out" / JOB_NAME).read_text())["fingerprint"]["max_new_tokens"] == 128
    pq.write_table(pa.table({"id": [2, 4], "prompt": ["p1", "p3"]}), tmp_path / "out" / "part-0.parquet")
    (tmp_path / "out" / "part-1.parquet").write_bytes(b"PAR1 cut off mid-write")
    state = plan(tmp_path, [1, 2, 3, 4])
    assert state.num_done == 2
    assert state.deleted_files == [str(tmp_path / "out" / "part-1.parquet")]
    assert not (tmp_path / "out" / "part-1.parquet").exists()
    batch = pa.table({"id": [1, 2, 3, 4], "prompt": ["p0", "p1", "p2", "p3"]})
    left = skip_done_batch(batch, config_for(tmp_path).model_dump(), state.done_digests, False)
    assert left.column("id").to_pylist() == [1, 3]


def test_other_settings_or_foreign_results_stop_the_job(tmp_path):
    plan(tmp_path, [1, 2])
    with pytest.raises(InputError, match=r"(?s)--temperature: 0\.0 before, 0\.5 now.*--overwrite"):
        plan(tmp_path, [1, 2], temperature=0.5)
    (tmp_path / "out" / JOB_NAME).unlink()
    pq.write_table(pa.table({"id": [1]}), tmp_path / "out" / "other.parquet")
    with pytest.raises(InputError, match="no _job.json"):
        plan(tmp_path, [1, 2])


@pytest.mark.parametrize(
    ("ids", "problem"), [([1, 2, 1], "repeats values \\(e.g. 1\\)"), ([1, None], "nulls")]
)
def test_ids_must_be_unique(tmp_path, ids, problem):
    with pytest.raises(InputError, match=problem):
        plan(tmp_path, ids)


def test_input_without_ids_names_rows_by_their_hash(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "in.parquet")
    config = config_for(tmp_path)
    (tmp_path / "out").mkdir()
    state = plan_resume(
        config, resolve_input(config.input, "prompt"), pafs.LocalFileSystem(), str(tmp_path / "out")
    )
    assert state.generate_ids
    batch = pa.table({"prompt": ["a", "b"], "row_hash": pa.array([7, 9], pa.uint64())})
    prepared = skip_done_batch(batch, config.model_dump(), state.done_digests, True)
    assert prepared.column_names[:2] == ["prompt", "id"] and prepared.column("id").to_pylist() == [7, 9]
