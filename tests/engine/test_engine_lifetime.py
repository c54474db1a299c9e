"""prefixrt.Engine over a long life: no autograd graph whatever the weights, the model in eval mode during steps,
no state left behind by ended requests, abort from a callback, from another thread and by closing a stream,
a full pool makes requests wait (never fail), a callback's exception leaves the engine whole."""

import gc
import threading
import time

import pytest
import torch
from support.tiny import random_bank, random_ids, tiny_bart, tiny_gpt2

import prefixrt
from prefixrt.engine import Engine, RequestStatus, SamplingParams, generate


def _model(kind, **overrides):
    if kind == "gpt2":
        model = tiny_gpt2(seed=1, initializer_range=0.3, **overrides)
    else:
        model = tiny_bart(seed=1, init_std=0.3, **overrides)
    bank = random_bank(model, {"long": 11, "short": 3}, seed=2)
    return prefixrt.attach(model, bank), bank


@pytest.fixture(scope="module", params=["gpt2", "bart"])
def attached(request):
    return _model(request.param)


def _alone(model, bank, prompt, prefix, params):
    """The tokens prefixrt.generate produces for this request alone."""
    out = generate(
        model, prompt[None], prefix_ids=bank.ids([prefix]), seed=params.seed, **params.generate_kwargs()
    )
    head = 1 if model.config.is_encoder_decoder else prompt.numel()
    return out[0, head:].tolist()


def _engine(model, bank, rows=3, **kwargs):
    return Engine(model, bank, max_batch_size=rows, max_prompt_tokens=12, max_new_tokens=10, **kwargs)


def _prompt(i, length=5):
    return random_ids(1, length, seed=200 + i)[0]


# -- autograd and eval mode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_grad_requiring_weights_build_no_graph(kind):
    """Weights that require grad (a model being trained elsewhere) must not turn the K/V pool into an ever-growing
    autograd graph: nothing is saved for backward, the pool never requires grad, and the pool stays put."""
    model, bank = _model(kind)
    model.requires_grad_(True)
    engine = _engine(model, bank)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    pointers = {name: store.k.data_ptr() for name, store in engine.batch.stores.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for i in range(12):
            engine.add_request(
                _prompt(i, 3 + i % 4),
                prefix=["long", None, "short"][i % 3],
                params=SamplingParams(max_new_tokens=8),
            )
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
    assert steps > 10 and saved == []  # not one tensor kept for a backward pass
    for store in engine.batch.stores.values():
        for t in (store.k, store.v, store.valid):
            assert not t.requires_grad and t.grad_fn is None
    assert pointers == {name: store.k.data_ptr() for name, store in engine.batch.stores.items()}
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_model_runs_in_eval_mode_and_keeps_its_flags():
    """A model left in training mode (dropout on) decodes as in eval mode; its flags are restored after each step."""
    model, bank = _model("gpt2", resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    params = SamplingParams(max_new_tokens=6)
    expected = _alone(model, bank, _prompt(0), "short", params)
    model.train()
    engine = _engine(model, bank)
    rid = engine.add_request(_prompt(0), prefix="short", params=params)
    engine.step()
    assert all(m.training for m in model.modules())
    engine.run()
    assert engine.result(rid).tokens == expected
    model.eval()


# -- no state left behind -----------------------------------------------------------------------------------
def test_ended_requests_leave_no_state(attached):
    model, bank = attached
    engine = _engine(model, bank, keep_finished=4)
    ids, aborted = [], 0
    for i in range(30):
        params = SamplingParams(max_new_tokens=1 + i % 7, do_sample=i % 2 == 1, seed=i)
        ids.append(
            engine.add_request(_prompt(i, 2 + i % 9), prefix=[None, "long", "short"][i % 3], params=params)
        )
        if i % 5 == 0:
            engine.step()
            if engine.abort(ids[-1]):
                aborted += 1
                assert engine.status(ids[-1]) == RequestStatus.ABORTED
    live = set(engine.requests.live)
    outputs = engine.run()
    assert aborted and len(live) > 4 and live <= set(outputs)  # whatever the history keeps
    assert engine.requests.live == {} and len(engine.requests.finished) == 4
    assert engine.num_running == engine.num_waiting == 0 and engine.batch.n_items == 0
    assert len(engine.batch.views) <= 1 and len(engine._settings) <= engine._settings.size
    last = ids[-1]
    assert engine.result(last).tokens == outputs[last].tokens
    assert engine.pop_result(last).tokens == outputs[last].tokens
    with pytest.raises(KeyError, match="unknown request"):
        engine.result(last)
    with pytest.raises(KeyError, match="unknown request"):
        engine.result(ids[0])  # dropped from the bounded history
    kept = next(iter(engine.requests.finished))
    assert not engine.abort(kept)  # ended and still kept: nothing to abort


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def test_live_tensors_do_not_grow_with_requests(attached):
    """Rounds of requests (prompts, processors, generators, bank views) leave no tensor behind."""
    model, bank = attached
    engine = _engine(model, bank)

    def round_(k):
        for i in range(15):
            params = SamplingParams(max_new_tokens=1 + i % 4, do_sample=i % 3 == 0, seed=i)
            engine.add_request(_prompt(100 * k + i, 2 + i % 5), prefix=[None, "short"][i % 2], params=params)
        engine.run()

    round_(0)
    before = _live_tensors()
    for k in (1, 2, 3):
        round_(k)
    assert _live_tensors() == before


def test_settings_cache_is_bounded():
    model, bank = _model("gpt2")
    engine = _engine(model, bank, keep_finished=0)
    engine._settings.size = 5
    for i in range(12):  # a distinct (params, prompt length) each time
        engine.add_request(_prompt(i, 1 + i % 12), params=SamplingParams(max_new_tokens=1 + i % 3))
    engine.run()
    assert len(engine._settings) == 5 and engine.requests.finished == {} and engine.requests.live == {}


# -- abort ----------------------------------------------------------------------------------------------------
def test_abort_from_a_callback_takes_effect_at_once(attached):
    """Request A's callback aborts B (the next row) in the step in which C reaches max_new_tokens: B gets no
    further token, C ends exactly at its limit, A and C get their tokens alone."""
    model, bank = attached
    pa, pb, pc = _prompt(1), _prompt(2), _prompt(3)
    long, short = SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=3)
    engine = _engine(model, bank)
    ids = {}

    late_aborts = []

    def on_a(rid, token):
        if len(engine.result(rid).tokens) == 3:
            assert engine.abort(ids["b"])
            assert engine.abort(ids["d"])  # waiting: leaves the queue

    def on_c(rid, token):
        if len(engine.result(rid).tokens) == 3:
            late_aborts.append(engine.abort(rid))  # after its last token: it has ended, nothing to abort

    ids["a"] = engine.add_request(pa, prefix="long", params=long, on_token=on_a)
    ids["b"] = engine.add_request(pb, prefix="short", params=long)
    ids["c"] = engine.add_request(pc, params=short, on_token=on_c)
    ids["d"] = engine.add_request(_prompt(4), params=long)
    while engine.has_unfinished():
        engine.step()
    b, c, d = (engine.result(ids[k]) for k in "bcd")
    assert b.status == d.status == RequestStatus.ABORTED and len(b.tokens) == 2 and d.tokens == []
    assert c.status == RequestStatus.FINISHED and c.tokens == _alone(model, bank, pc, None, short)
    assert late_aborts == [False]
    assert engine.result(ids["a"]).tokens == _alone(model, bank, pa, "long", long)
    assert engine.requests.live == {}


def test_abort_from_another_thread_while_a_loop_steps(attached):
    model, bank = attached
    params = SamplingParams(max_new_tokens=10)
    prompts = [_prompt(10 + i, 3 + i) for i in range(4)]
    engine = _engine(model, bank, rows=2)
    started = threading.Event()
    victim = engine.add_request(prompts[0], prefix="long", params=params, on_token=lambda r, t: started.set())
    stop = threading.Event()

    def loop():  # a server's stepping thread
        while not stop.is_set():
            if engine.has_unfinished():
                engine.step()
            time.sleep(0.001)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        others = [
            engine.add_request(p, prefix="short", params=params) for p in prompts[1:]
        ]  # from this thread
        assert started.wait(30)
        assert engine.abort(victim)
        count = len(engine.result(victim).tokens)
        deadline = time.monotonic() + 120
        while any(engine.status(i) != RequestStatus.FINISHED for i in others):
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(30)
    assert engine.status(victim) == RequestStatus.ABORTED and len(engine.result(victim).tokens) == count < 10
    for rid, prompt in zip(others, prompts[1:], strict=True):
        assert engine.result(rid).tokens == _alone(model, bank, prompt, "short", params)
    assert engine.requests.live == {} and engine.batch.n_rows == 0


def test_closing_a_stream_aborts_its_request(attached):
    model, bank = attached
    params = SamplingParams(max_new_tokens=9)
    engine = _engine(model, bank)
    a = engine.add_request(_prompt(20), prefix="long", params=params)
    b = engine.add_request(_prompt(21), params=params)
    stream = engine.stream(a)
    assert [next(stream), next(stream)] == engine.result(a).tokens
    stream.close()
    assert engine.status(a) == RequestStatus.ABORTED and engine.num_running == 1
    forgotten = engine.stream(b)
    next(forgotten)
    del forgotten  # garbage-collected generators are closed too
    assert engine.status(b) == RequestStatus.ABORTED and not engine.has_unfinished()
    assert list(engine.stream(a)) == engine.result(a).tokens  # an ended request streams what it produced


# -- admission --------------------------------------------------------------------------------------------------
def test_full_pool_makes_requests_wait_then_run(attached):
    model, bank = attached
    params = [SamplingParams(max_new_tokens=n) for n in (4, 7, 5, 3, 6, 4)]
    prompts = [_prompt(30 + i, 2 + 2 * i) for i in range(6)]
    engine = _engine(model, bank, rows=2)
    ids = [
        engine.add_request(p, prefix="long", params=s) for p, s in zip(prompts[:4], params[:4], strict=True)
    ]
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 2 and engine.batch.free_rows == 0
    late = [engine.add_request(p, params=s) for p, s in zip(prompts[4:], params[4:], strict=True)]
    assert all(engine.status(i) == RequestStatus.WAITING for i in ids[2:] + late)
    running = []
    while engine.has_unfinished():
        engine.step()
        running.append(engine.num_running)
    assert max(running) == 2
    for rid, prompt, s, prefix in zip(ids + late, prompts, params, ["long"] * 4 + [None] * 2, strict=True):
        result = engine.result(rid)
        assert result.status == RequestStatus.FINISHED and result.tokens == _alone(
            model, bank, prompt, prefix, s
        )


# -- callbacks ------------------------------------------------------------------------------------------------
def test_callback_errors_leave_the_engine_whole():
    model, bank = _model("gpt2")
    params = SamplingParams(max_new_tokens=5)
    engine = _engine(model, bank)
    calls = []

    def flaky(rid, token):
        calls.append(token)
        if len(calls) == 2:
            raise RuntimeError("callback failed")

    a = engine.add_request(_prompt(40), prefix="long", params=params, on_token=flaky)
    b = engine.add_request(_prompt(41), params=params)
    engine.step()
    with pytest.raises(RuntimeError, match="callback failed"):
        engine.step()
    engine.run()
    assert engine.result(a).tokens == calls == _alone(model, bank, _prompt(40), "long", params)
    assert engine.result(b).tokens == _alone(model, bank, _prompt(41), None, params)


def test_step_from_a_callback_is_refused():
    model, bank = _model("bart")
    engine = _engine(model, bank)
    errors = []

    def reenter(rid, token):
        try:
            engine.step()
        except RuntimeError as err:
            errors.append(str(err))

    rid = engine.add_request(_prompt(50), params=SamplingParams(max_new_tokens=2), on_token=reenter)
    engine.run()
    assert engine.result(rid).status == RequestStatus.FINISHED and len(errors) == 2
    assert "inside a step" in errors[0]
