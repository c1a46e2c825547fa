"""The online endpoint over HTTP: a real Ray Serve application on localhost, driven by the official `openai`
client (and raw HTTP where a client would refuse to send the bad request).

One Serve instance holds two applications on the tiny demo target (with a chat template): `main` at / (batches of
4) and `small` at /small (one row, no queue: its limit is one request, for overload and disconnects). Answers are
compared with the offline job's generation actor on the same prompts. The last test runs `python -m jobs.serve`
as a user would and stops it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pyarrow as pa
import pytest

from actors.generation import GenerationActor
from actors.openai_api import ApiError, TextDeltas, parse_request
from common.config import GenerateConfig, ServeConfig
from demo.build import demo_paths
from pipeline.rows import validate_rows

pytestmark = pytest.mark.starts_ray

REPO = Path(__file__).resolve().parents[1]
CHATS = [
    [{"role": "user", "content": "def add(a, b):"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "class Stack:"}],
    [{"role": "user", "content": "for i in range(10):"}],
]
PROMPTS = ["def add(a, b):", "import os\nimport sys\n", "class Stack:"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def models(tiny_demo, templated_copy, tmp_path_factory) -> dict:
    paths = demo_paths(tiny_demo)
    target = templated_copy(tmp_path_factory.mktemp("serve") / "target")
    return {"model": target, "draft": paths["draft"], "policy": paths["policy"]}


@pytest.fixture(scope="module")
def server(models, local_ray):
    from ray import serve

    from pipeline.serve import deploy

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    main = ServeConfig(**models, max_batch_size=4, max_new_tokens=24, served_model_name="tiny")
    small = ServeConfig(**models, max_batch_size=1, max_queued_requests=0, served_model_name="tiny")
    # No CPUs asked: the replicas start whatever an earlier module's Ray still holds (their torch threads are
    # the process default).
    deploy(main, "main", "/", 0.0, 0.0)
    deploy(small, "small", "/small", 0.0, 0.0)
    yield {"base": f"http://127.0.0.1:{port}", "config": main}
    serve.shutdown()


def client(server, prefix: str = "") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server['base']}{prefix}/v1", api_key="unused", max_retries=0, timeout=120
    )


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def stats(server, prefix: str = "") -> dict:
    with urllib.request.urlopen(f"{server['base']}{prefix}/eagleray/stats", timeout=30) as response:
        return json.load(response)


def offline_texts(models: dict, rows: list, chat: bool, max_new_tokens: int) -> list[str]:
    """What the offline job's generation actor writes for these rows (messages, or raw-text prompts)."""
    config = GenerateConfig(
        input="unused.parquet",
        output="unused",
        **models,
        max_new_tokens=max_new_tokens,
        chat_template=chat,
        max_batch_size=4,
    )
    column = "messages" if chat else "prompt"
    table = validate_rows(pa.table({"id": [str(i) for i in range(len(rows))], column: rows}), config)
    actor = GenerationActor(config.model_dump())
    try:
        out = actor(table)
    finally:
        actor.runner.close()
    assert out.column("__inference_error__").null_count == len(rows)
    return out.column("generated_text").to_pylist()


# ---- the request checks and the text stream, without a server ---------------------------------------------------


def test_requests_are_checked_field_by_field():
    config = ServeConfig(model="m", draft="d", policy="static", max_new_tokens=50, max_new_tokens_cap=100)

    def problem(body, chat=True) -> ApiError:
        with pytest.raises(ApiError) as raised:
            parse_request(
                json.dumps(body).encode() if not isinstance(body, bytes) else body, chat, "tiny", config
            )
        assert raised.value.status == 400
        return raised.value

    hello = [{"role": "user", "content": "hi"}]
    assert "not valid JSON" in problem(b"{nope").message
    assert problem({"model": "gpt-4", "messages": hello}).param == "model"
    assert "unknown role 'robot'" in problem({"messages": [{"role": "robot", "content": "hi"}]}).message
    assert problem({"messages": hello, "max_tokens": 0}).param == "max_tokens"
    assert "at most 100" in problem({"messages": hello, "max_tokens": 101}).message
    assert problem({"messages": hello, "temperature": "hot"}).param == "temperature"
    assert problem({"messages": hello, "top_p": 0}).param == "top_p"
    assert problem({"messages": hello, "stop": ["a", "b", "c", "d", "e"]}).param == "stop"
    assert problem({"messages": hello, "n": 2}).param == "n"
    assert problem({"messages": hello, "logprobs": True}).param == "logprobs"
    assert problem({"prompt": ["a", "b"]}, chat=False).param == "prompt"
    assert problem({"prompt": "  "}, chat=False).param == "prompt"
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    completion = parse_request(
        json.dumps({"messages": parts, "top_p": 1.0, "stop": "x"}).encode(), True, "tiny", config
    )
    assert completion.prompt == [{"role": "user", "content": "ab"}]
    assert completion.top_p == 0.0 and completion.stop == ("x",) and completion.temperature == 0.0
    assert completion.max_tokens is None and not completion.stream


def test_text_deltas_hold_back_what_could_still_change():
    deltas = TextDeltas(lambda ids: "".join(chr(i) for i in ids), ("STOP",))
    assert deltas.push([ord("a"), ord("b")]) == "ab"
    assert deltas.push([ord(c) for c in "abST"]) == ""  # "ST" may begin the stop string
    assert deltas.push([ord(c) for c in "abSTx"]) == "STx"
    assert deltas.push([ord(c) for c in "abSTx"] + [0xFFFD]) == ""  # an unfinished character waits
    assert deltas.finish("abSTxy") == "y"
    assert deltas.sent == "abSTxy"


# ---- over HTTP ---------------------------------------------------------------------------------------------------


def test_models_route_names_the_served_model(server):
    assert [model.id for model in client(server).models.list()] == ["tiny"]


def test_greedy_chat_and_completions_equal_the_offline_job(server, models):
    api = client(server)
    chats = [api.chat.completions.create(model="tiny", messages=chat, max_tokens=12) for chat in CHATS]
    assert [answer.choices[0].message.content for answer in chats] == offline_texts(models, CHATS, True, 12)
    for answer in chats:
        assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
        assert answer.usage.completion_tokens <= 12
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    texts = [api.completions.create(model="tiny", prompt=prompt, max_tokens=12) for prompt in PROMPTS]
    assert [answer.choices[0].text for answer in texts] == offline_texts(models, PROMPTS, False, 12)
    assert {answer.choices[0].finish_reason for answer in chats + texts} <= {"stop", "length"}


def test_streaming_equals_non_streaming_with_and_without_stop_strings(server):
    api = client(server)
    for chat in CHATS:
        whole = api.chat.completions.create(model="tiny", messages=chat, max_tokens=20)
        content = whole.choices[0].message.content
        chunks = list(
            api.chat.completions.create(
                model="tiny",
                messages=chat,
                max_tokens=20,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        if len(content) > 6:  # a stop string from the middle of the answer cuts it there, streamed or not
            stop = content[3:6]
            cut = api.chat.completions.create(model="tiny", messages=chat, max_tokens=20, stop=[stop])
            assert cut.choices[0].message.content == content[: content.index(stop)]
            assert cut.choices[0].finish_reason == "stop"
            streamed = api.chat.completions.create(
                model="tiny", messages=chat, max_tokens=20, stop=[stop], stream=True
            )
            assert (
                "".join(c.choices[0].delta.content or "" for c in streamed) == cut.choices[0].message.content
            )
    text = api.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20).choices[0].text
    streamed = api.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == text


def test_the_stream_is_server_sent_events_ending_with_done(server):
    body = json.dumps({"prompt": PROMPTS[1], "max_tokens": 5, "stream": True}).encode()
    request = urllib.request.Request(
        f"{server['base']}/v1/completions", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(event.startswith("data: ") for event in events)
    assert json.loads(events[-2].removeprefix("data: "))["object"] == "text_completion"


def test_concurrent_requests_decode_in_one_batch_and_keep_their_answers(server):
    api = client(server)
    alone = [
        api.completions.create(model="tiny", prompt=p, max_tokens=16).choices[0].text for p in PROMPTS * 2
    ]
    before = stats(server)
    answers: dict[int, str] = {}

    def ask(index: int) -> None:
        answers[index] = (
            api.completions.create(model="tiny", prompt=(PROMPTS * 2)[index], max_tokens=16).choices[0].text
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    after = stats(server)
    assert [answers[i] for i in range(6)] == alone
    row_steps = after["steps"] - before["steps"]
    engine_steps = after["engine_steps"] - before["engine_steps"]
    assert 0 < engine_steps < row_steps  # rows shared steps: the requests decoded together


def test_each_bad_request_is_a_400_naming_it_and_the_replica_keeps_serving(server):
    base = f"{server['base']}/v1"
    hello = [{"role": "user", "content": "hi"}]
    cases = [
        ("chat/completions", b'{"messages": [', "not valid JSON"),
        (
            "chat/completions",
            json.dumps({"model": "gpt-4", "messages": hello}).encode(),
            "'gpt-4' is not served",
        ),
        (
            "chat/completions",
            json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(),
            "unknown role",
        ),
        ("chat/completions", json.dumps({"messages": hello, "max_tokens": 0}).encode(), "max_tokens must be"),
        (
            "chat/completions",
            json.dumps({"messages": hello, "max_tokens": 10**6}).encode(),
            "max_tokens must be",
        ),
        ("completions", json.dumps({"prompt": "word " * 600}).encode(), "the model's context holds 512"),
        ("completions", json.dumps({"prompt": "def f():", "max_tokens": 511}).encode(), "together above"),
    ]
    for route, body, named in cases:
        status, error = post(f"{base}/{route}", body)
        assert status == 400, (route, body[:60], error)
        assert named in error["error"]["message"] and error["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):  # what the official client raises for one of them
        client(server).chat.completions.create(model="gpt-4", messages=hello)
    status, answer = post(f"{base}/completions", json.dumps({"prompt": PROMPTS[0], "max_tokens": 4}).encode())
    assert status == 200 and answer["choices"][0]["text"] is not None
    assert stats(server)["requests"]["400"] >= len(cases)


def test_overload_is_a_429_and_a_disconnected_client_frees_its_row(server):
    api = client(server, "/small")
    before = stats(server, "/small")
    # The only row: a stream long enough to still be decoding while the next request arrives.
    stream = api.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=480, stream=True)
    next(iter(stream))
    with pytest.raises(openai.RateLimitError) as raised:
        api.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=4)
    assert "holds its limit of 1 requests" in raised.value.body["message"]
    stream.close()  # the client goes away: its row ends at the next step
    deadline = time.monotonic() + 30
    while stats(server, "/small")["active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    after = stats(server, "/small")
    assert after["active"] == 0 and after["cancelled"] == before["cancelled"] + 1
    assert after["generated_tokens"] == before["generated_tokens"]  # the cancelled row never finished its 480
    assert api.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=4).choices[0].text is not None


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_jobs_serve_answers_then_sigterm_stops_it_and_its_ray(models):
    port = free_port()
    command = [sys.executable, "-m", "jobs.serve", "--port", str(port), "--max-new-tokens", "8"]
    command += ["--model", models["model"], "--draft", models["draft"], "--policy", models["policy"]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any("eagleray: serving" in line for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines[-30:])
            time.sleep(0.5)
        status, answer = post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json.dumps({"messages": CHATS[0], "max_tokens": 4}).encode(),
        )
        assert status == 200 and answer["usage"]["completion_tokens"] <= 4
        ray_processes = _descendants(process.pid)
        assert len(ray_processes) >= 3  # at least the GCS, the raylet and a worker
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(timeout=10)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in ray_processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in ray_processes if _alive(pid)], "Ray processes outlived the server"
    output = "".join(lines)
    assert "eagleray: stopped (SIGTERM)" in output


def test_a_bad_server_config_fails_before_ray_starts_naming_the_option(models, capsys):
    import ray

    from jobs import serve

    started = ray.is_initialized()
    flags = ["--model", models["model"], "--draft", models["draft"], "--policy", models["policy"]]
    for argv, named in (
        (["--max-batch-size", "0", *flags], "--max-batch-size: Input should be greater than or equal to 1"),
        (["--port", "70000", *flags], "--port: Input should be less than or equal to 65535"),
        (["--model", "/no/such/model", "--draft", models["draft"], "--policy", "plain"], "is not a folder"),
    ):
        with pytest.raises(SystemExit) as exited:
            serve.main(argv)
        assert exited.value.code == 2 and named in capsys.readouterr().err
    assert ray.is_initialized() == started
