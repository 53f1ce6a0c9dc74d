"""peftlab serve: the OpenAI API over the continuous-batching engine, checked with the official openai client.

A tiny Llama (with a chat template) serves two LoRA adapters, a prompt-tuning adapter and an (IA)^3
adapter (its own sub-batch). Every greedy answer must equal ``peftlab generate``'s for the same adapter
and prompt (one prompt at a time, as references), alone and in a 200-request load from 16 clients.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the openai client's HTTP library
import pytest
import torch
from transformers import AutoTokenizer

from peftlab.cli import main
from peftlab.config import ServeConfig
from peftlab.eval.generate import generate
from peftlab.models import load_for_inference, load_model
from peftlab.peft import (
    IA3Config,
    LoraConfig,
    PromptTuningConfig,
    apply_ia3,
    apply_lora,
    apply_prompt_tuning,
    save_adapter,
)
from peftlab.peft.core import adapter_parameters
from peftlab.peft.lora import LoraLinear
from peftlab.serve.mixed_lora import MixedLoraLinear, RowAdapters
from peftlab.serve.server import Server, build
from helpers import expect_error

openai = pytest.importorskip("openai")

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
PROMPTS = ["Summarize the following conversation.", "#Person1#: Hi Tom, lunch at noon?", "It is cold outside.",
           "Question: what is the capital of France?", "The customer asks about the price of a ticket.",
           "I am very happy", "def add(a, b):", "She wants to return the shoes."]
MAX_TOKENS = 12
ADAPTERS = ("summarize", "sentiment", "prompt", "ia3")


@pytest.fixture(scope="module")
def folders(tiny_llama_dir, tmp_path_factory):
    """The chat-templated tiny Llama and four adapters in peft's format (random, non-zero weights)."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = root / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    builds = {
        "summarize": (LoraConfig(rank=4, alpha=8, targets="q_proj,v_proj"), apply_lora),
        "sentiment": (LoraConfig(rank=8, alpha=8, targets="q_proj,k_proj,v_proj,o_proj,down_proj", rslora=True), apply_lora),
        "prompt": (PromptTuningConfig(num_virtual_tokens=4), apply_prompt_tuning),
        "ia3": (IA3Config(), apply_ia3),
    }
    adapters = {}
    for seed, (name, (config, apply)) in enumerate(builds.items()):
        torch.manual_seed(seed)
        model = apply(load_model(str(model_dir)).model, config)
        with torch.no_grad():
            for key, p in adapter_parameters(model).items():
                if "lora_B" in key or "ia3" in key:
                    p.normal_(1.0 if "ia3" in key else 0.0, 0.5)
                elif "lora_A" in key:
                    p.normal_(0, 0.5)
        adapters[name] = save_adapter(model, root / "adapters" / name, config)
    return model_dir, adapters


@pytest.fixture(scope="module")
def references(folders):
    """``peftlab generate``'s greedy text for every (model name, prompt), one prompt at a time."""
    model_dir, adapters = folders
    out = {}
    for name in ("base", *ADAPTERS):
        loaded = load_for_inference(str(model_dir), None if name == "base" else str(adapters[name]), "float32", "cpu")
        for prompt in PROMPTS:
            out[name, prompt] = generate(loaded.model, loaded.tokenizer, [prompt], is_seq2seq=False, chat=True,
                                         max_new_tokens=MAX_TOKENS, batch_size=1).texts[0]
    assert len({out[n, PROMPTS[0]] for n in ("base", *ADAPTERS)}) == 5  # the adapters change the answers
    return out


def start(folders, **options):
    model_dir, adapters = folders
    config = ServeConfig(model=str(model_dir), adapter=[f"{n}={adapters[n]}" for n in ADAPTERS], name="base",
                         device="cpu", port=0, **{"max_tokens": 64, "max_prompt_tokens": 64, **options})
    engine, app = build(config)
    server = Server("127.0.0.1", 0)
    server.start(app)
    return engine, server


@pytest.fixture(scope="module")
def served(folders):
    engine, server = start(folders, max_batch=8, max_queue=512, allow_admin=True,
                           adapter_root=str(folders[1]["summarize"].parent))
    yield engine, server
    server.stop()
    engine.stop()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[1].url + "/v1", api_key="unused", max_retries=0, timeout=30)


def post(server, path, body, **kw):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(server.url + path, content=content, headers=headers, **{"timeout": 30, **kw})


def assert_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param


# ---------------------------------------------------------------------------------------------
# the mixed-adapter layer against peftlab's LoRA layer


def test_mixed_lora_rows_equal_their_own_lora_layer():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    layers = [LoraLinear(base, rank=r, alpha=8, rslora=rs) for r, rs in ((2, False), (4, True), (3, False))]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B.weight)
    rows = RowAdapters(capacity=4, max_rank=4)
    mixed = MixedLoraLinear(base, rows)
    for slot, layer in enumerate(layers):
        mixed.fill(slot, layer.lora_A.weight, layer.lora_B.weight)
        rows.scaling[slot] = layer.scaling
    x = torch.randn(7, 5, 16)  # (B, T, in)
    slots = [0, 2, -1, 1, 0, 1, -1]
    rows.set_rows(slots, x.device)
    got = mixed(x)
    for b, slot in enumerate(slots):
        want = base(x[b : b + 1]) if slot < 0 else layers[slot](x[b : b + 1])
        torch.testing.assert_close(got[b : b + 1], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[2], base(x[2]))  # a row without adapter gets exact zeros added
    rows.set_rows([1] * 7, x.device)  # one adapter for all rows: LoRA's own path
    torch.testing.assert_close(mixed(x), layers[1](x), rtol=1e-5, atol=1e-5)
    lengths = [3, 1, 4]  # the same layer on one packed row: example b's tokens take slots[b]
    packed = torch.randn(1, sum(lengths), 16)
    rows.set_rows([2, -1, 0], x.device, lengths)
    got = mixed(packed)
    for (a, b), slot in zip(((0, 3), (3, 4), (4, 8)), [2, -1, 0]):
        want = base(packed[:, a:b]) if slot < 0 else layers[slot](packed[:, a:b])
        torch.testing.assert_close(got[:, a:b], want, rtol=1e-5, atol=1e-5)


def test_packed_prefill_equals_each_prompt_alone(folders):
    """Prompts of the base, two LoRA adapters and a soft prompt prefilled in one packed row: each one's
    keys, values and next-token logits equal a forward over that prompt alone."""
    from peftlab.serve.engine import Request, Sampling

    engine, _ = build(ServeConfig(model=str(folders[0]), adapter=[f"{n}={folders[1][n]}" for n in ADAPTERS],
                                  device="cpu", port=0))
    tokenizer = engine.tokenizer
    names = [None, "summarize", "prompt", "sentiment", "summarize", None]
    items = []
    for name, prompt in zip(names, PROMPTS):
        request = Request(name, tokenizer(prompt)["input_ids"], Sampling(max_tokens=4), on_event=lambda *_: None)
        items.append((request, None if name is None else engine.adapters.acquire(name)))
    with torch.no_grad():
        rows, states, logits = engine._prefill_packed(engine.shared, items)
        for i, item in enumerate(items):
            alone_rows, alone_states, alone_logits = engine._prefill_alone(engine.shared, *item)
            assert rows[i].length == alone_rows[0].length == len(item[0].prompt_ids) + (4 if names[i] == "prompt" else 0)
            torch.testing.assert_close(logits[i : i + 1], alone_logits, rtol=1e-4, atol=1e-5)
            for (k, v), (k1, v1) in zip(states[i], alone_states[0]):
                torch.testing.assert_close(k, k1, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(v, v1, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the API with the openai client


def test_model_list(client):
    assert [m.id for m in client.models.list().data] == ["base", *ADAPTERS]


@pytest.mark.parametrize("name", ["base", *ADAPTERS])
def test_greedy_completion_and_chat_equal_peftlab_generate(client, references, name):
    for prompt in PROMPTS[:3]:
        got = client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert got.choices[0].text == references[name, prompt]
        assert got.choices[0].finish_reason in ("stop", "length") and got.usage.completion_tokens <= MAX_TOKENS
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=MAX_TOKENS, temperature=0)
        assert chat.choices[0].message.content == references[name, prompt]
        assert chat.choices[0].message.role == "assistant"


def test_streaming_adds_up_to_the_answer(client, references):
    for name in ("summarize", "prompt"):
        pieces = [c.choices[0].text for c in client.completions.create(
            model=name, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, stream=True)]
        assert "".join(pieces) == references[name, PROMPTS[1]]  # (random weights: bytes held back as unfinished characters may come in one piece)
        chunks = list(client.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPTS[1]}],
                                                     max_tokens=MAX_TOKENS, temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == references[name, PROMPTS[1]]
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_sampling_is_seeded_and_stop_strings_cut(client, references):
    ask = dict(model="sentiment", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=1.5, top_p=0.9)
    first = client.completions.create(**ask, seed=7).choices[0].text
    assert client.completions.create(**ask, seed=7).choices[0].text == first
    texts = {client.completions.create(**ask, seed=s).choices[0].text for s in range(6)}
    assert len(texts) > 1  # sampling does sample
    greedy = references["summarize", PROMPTS[2]]
    cut = greedy[len(greedy) // 2 :][:3]
    assert cut.strip()
    got = client.completions.create(model="summarize", prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0, stop=[cut])
    assert got.choices[0].text == greedy[: greedy.find(cut)].strip() and got.choices[0].finish_reason == "stop"


def test_load_200_requests_16_clients_mixed_adapters(served, references):
    """Every answer equals its single-request greedy reference, whatever it was batched with."""
    client = openai.OpenAI(base_url=served[1].url + "/v1", api_key="unused", max_retries=0, timeout=60)
    names = ["base", *ADAPTERS]
    jobs = [(names[i % 5], PROMPTS[(i * 3) % len(PROMPTS)], i % 3 == 0) for i in range(200)]

    def ask(job):
        name, prompt, chat = job
        if chat:
            r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=MAX_TOKENS, temperature=0)
            return r.choices[0].message.content
        return client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    wrong = [(job, got) for job, got in zip(jobs, answers) if got != references[job[0], job[1]]]
    assert not wrong, wrong[:3]
    assert served[0]._running() == 0 and not served[0].waiting


# ---------------------------------------------------------------------------------------------
# bad requests: status, OpenAI's JSON error, and the server keeps serving


def test_bad_requests_get_json_errors_and_the_server_keeps_serving(served, client, references):
    _, server = served
    assert_error(post(server, "/v1/completions", "{not json"), 400)
    assert_error(post(server, "/v1/completions", "[1, 2]"), 400)
    assert_error(post(server, "/v1/completions", {"model": "nope", "prompt": "hi"}), 404, "model")
    assert post(server, "/v1/completions", {"model": "nope", "prompt": "hi"}).json()["error"]["code"] == "model_not_found"
    assert_error(post(server, "/v1/completions", {"model": "base"}), 400, "prompt")
    assert_error(post(server, "/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": -3}), 400, "max_tokens")
    assert_error(post(server, "/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 10**9}), 400, "max_tokens")
    assert_error(post(server, "/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": "many"}), 400, "max_tokens")
    assert_error(post(server, "/v1/completions", {"model": "base", "prompt": "hi", "temperature": 50}), 400, "temperature")
    assert_error(post(server, "/v1/completions", {"model": "base", "prompt": "hi", "top_p": 0}), 400, "top_p")
    assert_error(post(server, "/v1/completions", {"model": "base", "prompt": "hi", "seed": -1}), 400, "seed")
    assert_error(post(server, "/v1/completions", {"model": "base", "prompt": "hi", "n": 3}), 400, "n")
    assert_error(post(server, "/v1/completions", {"model": "base", "prompt": "hi", "stop": [""]}), 400, "stop")
    assert_error(post(server, "/v1/completions", {"model": "base", "prompt": "word " * 200}), 400, "prompt")
    assert_error(post(server, "/v1/chat/completions", {"model": "base", "messages": []}), 400, "messages")
    assert_error(post(server, "/v1/chat/completions", {"model": "base", "messages": [{"role": "robot", "content": "x"}]}), 400)
    assert_error(httpx.get(server.url + "/v1/nothing-here"), 404)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="base", prompt="hi", max_tokens=0)
    got = client.completions.create(model="summarize", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert got.choices[0].text == references["summarize", PROMPTS[0]]


def test_auth_admin_off_and_full_queue(folders, monkeypatch, references):
    monkeypatch.setenv("PEFTLAB_TEST_KEY", "s3cret")
    engine, server = start(folders, api_key_env="PEFTLAB_TEST_KEY", max_queue=2, max_batch=1)
    try:
        body = {"model": "base", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
        assert_error(post(server, "/v1/completions", body), 401)
        assert_error(post(server, "/v1/completions", body, headers={"authorization": "Bearer wrong"}), 401)
        keyed = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0, timeout=30)
        assert keyed.completions.create(**body).choices[0].text == references["base", PROMPTS[0]]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        admin = httpx.post(server.url + "/v1/admin/adapters", json={"name": "summarize"},
                           headers={"authorization": "Bearer s3cret"})
        assert_error(admin, 403)

        engine.stop()  # nothing is taken from the queue now: two requests fill it, the third gets 429
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(keyed.completions.create, **body) for _ in range(2)]
            deadline = time.monotonic() + 10
            while len(engine.waiting) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert_error(post(server, "/v1/completions", body, headers={"authorization": "Bearer s3cret"}), 429)
            engine._stopping = False
            engine.start()
            assert [w.result().choices[0].text for w in waiting] == [references["base", PROMPTS[0]]] * 2
    finally:
        server.stop()
        engine.stop()


def test_a_client_that_goes_away_frees_its_slot(folders, references):
    engine, server = start(folders, max_batch=1)
    step, cancelled = engine._step, []
    engine._step = lambda lane: (time.sleep(0.02), step(lane))  # slow decoding: 60 tokens take > 1.2 s
    cancel = engine.cancel
    engine.cancel = lambda request: (cancelled.append(request), cancel(request))
    try:
        body = {"model": "summarize", "prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0}
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as response:
            next(response.iter_lines())  # a streaming client reads a little, then leaves
        deadline = time.monotonic() + 10
        while (len(cancelled) < 1 or engine._running()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(cancelled) == 1 and engine._running() == 0
        assert all(len(r.tokens) < 60 for r in cancelled)  # they stopped decoding early
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up waiting
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.4)
        deadline = time.monotonic() + 10
        while (len(cancelled) < 2 or engine._running()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(cancelled) == 2 and engine._running() == 0
        assert len(cancelled[1].tokens) < 60
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)
        got = client.completions.create(model="base", prompt=PROMPTS[3], max_tokens=MAX_TOKENS, temperature=0)
        assert got.choices[0].text == references["base", PROMPTS[3]]
    finally:
        server.stop()
        engine.stop()


# ---------------------------------------------------------------------------------------------
# adapters at run time: admin load / unload, LRU cap


def test_admin_load_unload_and_lru_cap(folders, references):
    model_dir, adapters = folders
    config = ServeConfig(model=str(model_dir), adapter=[f"summarize={adapters['summarize']}"], name="base", device="cpu",
                         port=0, max_adapters=2, max_lora_rank=8, allow_admin=True,
                         adapter_root=str(adapters["summarize"].parent))
    engine, app = build(config)
    server = Server("127.0.0.1", 0)
    server.start(app)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)
    ask = lambda name: client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,  # noqa: E731
                                                 temperature=0).choices[0].text
    try:
        assert_error(post(server, "/v1/admin/adapters", {"name": "x", "path": "/etc"}), 400, "path")
        assert_error(post(server, "/v1/admin/adapters", {"name": "x", "path": "../model"}), 400, "path")
        assert_error(post(server, "/v1/admin/adapters", {"name": "x"}), 400)
        assert_error(post(server, "/v1/admin/adapters", {"name": "x", "path": "nothing"}), 400)
        for name in ("sentiment", "prompt"):
            assert post(server, "/v1/admin/adapters", {"name": name, "path": name}).status_code == 200
        assert [m.id for m in client.models.list().data] == ["base", "summarize", "sentiment", "prompt"]
        assert list(engine.adapters.loaded) == ["sentiment", "prompt"]  # the cap of 2 evicted summarize
        for name in ("summarize", "prompt", "sentiment", "summarize"):  # evicted ones load again on demand
            assert ask(name) == references[name, PROMPTS[0]]
        assert len(engine.adapters.loaded) == 2
        assert httpx.delete(server.url + "/v1/admin/adapters/sentiment").status_code == 200
        assert_error(post(server, "/v1/completions", {"model": "sentiment", "prompt": "hi"}), 404, "model")
        assert_error(httpx.delete(server.url + "/v1/admin/adapters/sentiment"), 404)
        assert ask("base") == references["base", PROMPTS[0]]
    finally:
        server.stop()
        engine.stop()


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_mistakes_end_in_one_line(folders, tmp_path, capsys):
    model_dir, adapters = folders
    assert "no adapter_config.json" not in expect_error(["serve", "--model", str(model_dir), "--adapter", "oops"], capsys)
    assert "does not exist" in expect_error(["serve", "--model", str(model_dir), "--adapter", f"a={tmp_path / 'no'}"], capsys)
    assert "twice" in expect_error(["serve", "--model", str(model_dir), "--adapter", f"a={adapters['ia3']}",
                                    "--adapter", f"a={adapters['ia3']}"], capsys)
    assert "PEFTLAB_UNSET_KEY" in expect_error(["serve", "--model", str(model_dir), "--api-key-env", "PEFTLAB_UNSET_KEY"], capsys)
    assert "--max-adapters" in expect_error(["serve", "--model", str(model_dir), "--max-adapters", "1", "--device", "cpu",
                                             "--adapter", f"a={adapters['ia3']}", "--adapter", f"b={adapters['prompt']}"], capsys)
    assert "--port" in expect_error(["serve", "--model", str(model_dir), "--port", "70000"], capsys)
    assert "does not exist" in expect_error(["chat", "--model", str(model_dir), "--adapter", str(tmp_path / "no")], capsys)


def test_chat_command_answers_as_generate(folders, references, monkeypatch, capsys):
    model_dir, adapters = folders
    turns = iter([PROMPTS[0], ""])

    def ask(_):
        try:
            return next(turns)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", ask)
    assert main(["chat", "--model", str(model_dir), "--adapter", str(adapters["summarize"]), "--device", "cpu",
                 "--max-tokens", str(MAX_TOKENS)]) == 0
    out = capsys.readouterr().out
    assert references["summarize", PROMPTS[0]] in out
