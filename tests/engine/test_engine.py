"""prefixrt.Engine: each request gets the tokens of prefixrt.generate on that request alone, whatever joins or
leaves around it; abort and bank changes never disturb other requests; bounded pool (waiting, never-fits
rejection); streaming."""

import pytest
import torch
from support.tiny import random_bank, random_ids, random_kv, tiny_bart, tiny_gpt2

import prefixrt
from prefixrt.engine import Engine, RequestStatus, SamplingParams, generate


def _model(kind):
    if kind == "gpt2":
        model = tiny_gpt2(seed=1, initializer_range=0.3)
    else:
        model = tiny_bart(seed=1, init_std=0.3)
    bank = random_bank(model, {"long": 11, "short": 3, "other": 6}, seed=2)
    return prefixrt.attach(model, bank), bank


@pytest.fixture(scope="module", params=["gpt2", "bart"])
def attached(request):
    return _model(request.param)


PARAMS = [
    SamplingParams(max_new_tokens=8),
    SamplingParams(max_new_tokens=10, do_sample=True, top_k=20, seed=5),
    SamplingParams(max_new_tokens=6, repetition_penalty=1.5, min_new_tokens=2),
    SamplingParams(max_new_tokens=9, do_sample=True, top_p=0.8, temperature=0.7, seed=9),
    SamplingParams(max_new_tokens=7, bad_words_ids=[[5], [7, 8]], eos_token_id=[3, 4]),
]
PREFIXES = [None, "long", "short", "other", "long"]


def _alone(model, bank, prompt, prefix, params):
    """The tokens prefixrt.generate produces for this request alone."""
    out = generate(
        model, prompt[None], prefix_ids=bank.ids([prefix]), seed=params.seed, **params.generate_kwargs()
    )
    head = prompt.numel() if model.config.model_type == "gpt2" else 1
    return out[0, head:].tolist()


def _requests(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        length = int(torch.randint(2, 12, (1,), generator=g))
        out.append((random_ids(1, length, seed=100 + i)[0], PREFIXES[i % 5], PARAMS[i % 5]))
    return out


def test_each_request_gets_its_tokens_alone(attached):
    """More requests than rows: requests with different prefixes, prompt lengths and params share steps, leave
    when done and let waiting ones join."""
    model, bank = attached
    engine = Engine(model, bank, max_batch_size=3, max_prompt_tokens=12, max_new_tokens=10)
    requests = _requests(10)
    ids = [engine.add_request(p, prefix=x, params=s) for p, x, s in requests]
    running = []
    while engine.has_unfinished():
        engine.step()
        running.append(engine.num_running)
    assert max(running) == 3 and engine.num_waiting == 0
    for rid, (prompt, prefix, params) in zip(ids, requests, strict=True):
        result = engine.result(rid)
        assert result.status == RequestStatus.FINISHED
        assert result.tokens == _alone(model, bank, prompt, prefix, params), f"request {rid}"


def test_joining_mid_run_does_not_change_tokens(attached):
    model, bank = attached
    (p0, x0, s0), *others = _requests(6, seed=1)
    engine = Engine(model, bank, max_batch_size=4, max_prompt_tokens=12, max_new_tokens=10)
    first = engine.add_request(p0, prefix=x0, params=s0)
    later = []
    for step, (p, x, s) in enumerate(others):
        engine.step()
        if step % 2 == 0:
            later.append((engine.add_request(p, prefix=x, params=s), p, x, s))
    engine.run()
    assert engine.result(first).tokens == _alone(model, bank, p0, x0, s0)
    for rid, p, x, s in later:
        assert engine.result(rid).tokens == _alone(model, bank, p, x, s)


def test_abort_running_and_waiting_requests(attached):
    model, bank = attached
    requests = _requests(5, seed=2)
    engine = Engine(model, bank, max_batch_size=3, max_prompt_tokens=12, max_new_tokens=10)
    ids = [engine.add_request(p, prefix=x, params=s) for p, x, s in requests]
    engine.step()
    engine.step()
    assert engine.status(ids[1]) == RequestStatus.RUNNING and engine.status(ids[4]) == RequestStatus.WAITING
    assert engine.abort(ids[1]) and engine.abort(ids[4])
    engine.run()
    assert not engine.abort(ids[0])  # already finished
    for i, rid in enumerate(ids):
        result = engine.result(rid)
        if i in (1, 4):
            assert result.status == RequestStatus.ABORTED and result.finish_reason == "aborted"
            assert len(result.tokens) == (2 if i == 1 else 0)
        else:
            assert result.tokens == _alone(model, bank, *requests[i])


def test_prefix_removed_before_start_fails_cleanly(attached):
    model, bank = attached
    bank = random_bank(model, {"a": 4, "b": 7}, seed=3)
    engine = Engine(model, bank, max_batch_size=1, max_prompt_tokens=12, max_new_tokens=10)
    params = SamplingParams(max_new_tokens=4)
    p0, p1 = random_ids(1, 5, seed=4)[0], random_ids(1, 6, seed=5)[0]
    expected = _alone_with_bank(model, bank, p0, "a", params)
    first = engine.add_request(p0, prefix="a", params=params)
    second = engine.add_request(p1, prefix="b", params=params)
    engine.step()
    bank.remove("b")
    engine.run()
    assert engine.result(first).tokens == expected
    failed = engine.result(second)
    assert failed.status == RequestStatus.FAILED and failed.tokens == []
    assert "'b' was removed from the bank before the request started" in failed.error


def _alone_with_bank(model, bank, prompt, prefix, params):
    """Tokens of the request alone, on a model attached to ``bank``."""
    binding = prefixrt.hf.binding_of(model)
    old = binding.bank
    prefixrt.detach(model)
    prefixrt.attach(model, bank)
    try:
        return _alone(model, bank, prompt, prefix, params)
    finally:
        prefixrt.detach(model)
        prefixrt.attach(model, old)


def test_prefix_removed_while_running_still_finishes(attached):
    """The running request keeps reading the removed entry's K/V although its slot is reused at once by a new
    entry; requests on the new entry read the new K/V."""
    model, _ = attached
    bank = random_bank(model, {"a": 5, "b": 8}, seed=6)
    params = SamplingParams(max_new_tokens=9)
    p0, p1, p2 = (random_ids(1, n, seed=7 + n)[0] for n in (6, 4, 8))
    expected_a = _alone_with_bank(model, bank, p0, "a", params)
    expected_b = _alone_with_bank(model, bank, p1, "b", params)
    engine = Engine(model, bank, max_batch_size=4, max_prompt_tokens=12, max_new_tokens=10)
    ra = engine.add_request(p0, prefix="a", params=params)
    rb = engine.add_request(p1, prefix="b", params=params)
    engine.step()
    engine.step()
    bank.remove("a")
    z_id = bank.add("z", random_kv(bank.spec, 3, torch.Generator().manual_seed(9)))
    assert z_id == 0  # the freed slot of "a" is reused
    rz = engine.add_request(p2, prefix="z", params=params)
    engine.run()
    assert engine.result(ra).tokens == expected_a
    assert engine.result(rb).tokens == expected_b
    assert engine.result(rz).tokens == _alone_with_bank(model, bank, p2, "z", params)
    assert len(engine.batch.views) <= 1  # the old bank version was released


def test_bank_add_while_running_moves_requests_to_the_new_version(attached):
    model, _ = attached
    bank = random_bank(model, {"a": 5}, seed=10)
    params = SamplingParams(max_new_tokens=8)
    prompt = random_ids(1, 6, seed=11)[0]
    expected = _alone_with_bank(model, bank, prompt, "a", params)
    engine = Engine(model, bank, max_batch_size=2, max_prompt_tokens=12, max_new_tokens=10)
    rid = engine.add_request(prompt, prefix="a", params=params)
    engine.step()
    bank.add("c", random_kv(bank.spec, 4, torch.Generator().manual_seed(12)))
    engine.step()
    assert (
        len(engine.batch.views) == 1 and engine.batch.views[engine.batch.item_view[0]].version == bank.version
    )
    engine.run()
    assert engine.result(rid).tokens == expected


def test_pool_is_bounded_and_requests_wait(attached):
    model, bank = attached
    engine = Engine(model, bank, max_batch_size=2, max_prompt_tokens=12, max_new_tokens=10)
    before = engine.kv_bytes
    pointers = {name: store.k.data_ptr() for name, store in engine.batch.stores.items()}
    ids = [engine.add_request(p, prefix=x, params=s) for p, x, s in _requests(5, seed=3)]
    assert all(engine.status(i) == RequestStatus.WAITING for i in ids)
    engine.step()
    assert [engine.status(i) for i in ids].count(RequestStatus.RUNNING) == 2 and engine.num_waiting == 3
    engine.run()
    assert all(engine.status(i) == RequestStatus.FINISHED for i in ids)
    assert engine.kv_bytes == before
    assert pointers == {name: store.k.data_ptr() for name, store in engine.batch.stores.items()}


def test_requests_that_can_never_fit_are_rejected(attached):
    model, bank = attached
    engine = Engine(model, bank, max_batch_size=2, max_prompt_tokens=8, max_new_tokens=10)
    with pytest.raises(ValueError, match="never fit.*max_prompt_tokens"):
        engine.add_request(random_ids(1, 9)[0])
    with pytest.raises(ValueError, match="never fit.*max_new_tokens"):
        engine.add_request(random_ids(1, 4)[0], params=SamplingParams(max_new_tokens=11))
    big = Engine(model, bank, max_batch_size=1, max_prompt_tokens=8, max_new_tokens=200)
    with pytest.raises(ValueError, match="never fit.*positions"):
        big.add_request(random_ids(1, 4)[0], prefix="long", params=SamplingParams(max_new_tokens=120))
    with pytest.raises(KeyError, match="unknown prefix name"):
        engine.add_request(random_ids(1, 4)[0], prefix="nope")
    assert engine.num_waiting == 0


def test_streaming_callback_and_iterator(attached):
    model, bank = attached
    seen = []
    engine = Engine(model, bank, max_batch_size=2, max_prompt_tokens=12, max_new_tokens=10)
    (p0, x0, s0), (p1, x1, s1) = _requests(2, seed=4)
    a = engine.add_request(p0, prefix=x0, params=s0, on_token=lambda rid, tok: seen.append((rid, tok)))
    b = engine.add_request(p1, prefix=x1, params=s1)
    streamed = list(engine.stream(b))
    engine.run()
    assert streamed == engine.result(b).tokens == _alone(model, bank, p1, x1, s1)
    assert [tok for rid, tok in seen if rid == a] == engine.result(a).tokens


def test_engine_without_attach():
    model = tiny_gpt2(seed=1, initializer_range=0.3)
    bank = random_bank(model, {"long": 11, "short": 3}, seed=2)
    engine = Engine(model, bank, max_batch_size=2, max_prompt_tokens=12, max_new_tokens=10)
    prompt = random_ids(1, 5, seed=13)[0]
    rid = engine.add_request(prompt, prefix="short", params=SamplingParams(max_new_tokens=5))
    engine.run()
    prefixrt.attach(model, bank)
    assert engine.result(rid).tokens == _alone(model, bank, prompt, "short", SamplingParams(max_new_tokens=5))
