"""Text prefixes (``add_text_prefix`` / ``text_prefix_kv``): the K/V of a real prompt computed once through the frozen
model. GPT-2: an attached model with the text prefix on ``x`` equals the base model on ``text ++ x`` at the ``x``
positions (forward, padded mixed batches, greedy generate). BART: each site equals the K/V recomputed from the
model's hidden states, and the decoder site equals feeding the text to the decoder first."""

import pytest
import torch
from support.generation import greedy_generate_attached
from support.model_compare import LOGITS_TOL as TOL
from support.tiny import VOCAB, left_padded_prompts, random_ids, tiny_bart, tiny_gpt2

import prefixrt
from prefixrt import PrefixBank
from prefixrt.hf.text_prefix import add_text_prefix, text_prefix_kv

BACKEND = "reference"
pytestmark = pytest.mark.filterwarnings("ignore")


class CharTokenizer:
    """A stand-in for a Hugging Face tokenizer: one id per character; BOS 0 / EOS 2 as special tokens."""

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + ord(c) % (VOCAB - 3) for c in text]
        return {"input_ids": [0, *ids, 2] if add_special_tokens else ids}


def forms(ids: torch.Tensor):
    return {"list": ids.tolist(), "1d": ids, "2d": ids[None]}


# -- GPT-2 ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["list", "1d", "2d"])
@pytest.mark.parametrize("text_length", [1, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpt2_text_prefix_equals_text_then_input(text_length, form, dtype):
    model = tiny_gpt2().to(dtype)
    text = random_ids(1, text_length, seed=1)[0]
    x = random_ids(2, 9, seed=2)
    with torch.no_grad():
        expected = model(torch.cat([text.expand(2, -1), x], 1)).logits[:, text_length:]
    bank = PrefixBank.for_model(model)
    add_text_prefix(bank, "prompt", forms(text)[form], model)
    assert bank.lengths("decoder").tolist() == [text_length]
    prefixrt.attach(model, bank, backend=BACKEND)
    with torch.no_grad():
        out = model(x, prefix_ids=bank.ids(["prompt", "prompt"])).logits
    torch.testing.assert_close(out, expected, **TOL[dtype])


def _bank_of_texts(model, texts: dict) -> PrefixBank:
    """A bank for ``model`` holding one text prefix per ``name -> token ids`` of ``texts``."""
    bank = PrefixBank.for_model(model)
    for name, text in texts.items():
        add_text_prefix(bank, name, text, model)
    return bank


def test_gpt2_mixed_padded_batch_equals_each_text_then_input():
    model = tiny_gpt2()
    texts = {"t5": random_ids(1, 5, seed=3)[0], "t17": random_ids(1, 17, seed=4)[0]}
    bank = _bank_of_texts(model, texts)
    names = ["t17", None, "t5", "t17"]
    prompts = [random_ids(1, n, seed=20 + n)[0] for n in (4, 7, 2, 7)]
    ids, mask = left_padded_prompts(prompts)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # padding-aware positions, as generate passes them
    prefixrt.attach(model, bank, backend=BACKEND)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=position_ids, prefix_ids=bank.ids(names)).logits
    prefixrt.detach(model)
    for row, (name, prompt) in enumerate(zip(names, prompts, strict=True)):
        text = texts[name] if name is not None else prompt[:0]
        with torch.no_grad():
            expected = model(torch.cat([text, prompt])[None]).logits[0, len(text) :]
        torch.testing.assert_close(out[row, -len(prompt) :], expected, **TOL[torch.float32])


def test_gpt2_generate_with_text_prefix_equals_generate_on_text_then_prompt():
    model = tiny_gpt2()
    texts = {"a": random_ids(1, 6, seed=5)[0], "b": random_ids(1, 3, seed=6)[0]}
    bank = _bank_of_texts(model, texts)
    names = ["a", "b", None]
    prompts = [random_ids(1, n, seed=30 + n)[0] for n in (5, 2, 4)]
    ids, mask = left_padded_prompts(prompts)
    steps = 6
    generated = greedy_generate_attached(model, bank, ids, mask, names, steps, backend=BACKEND)
    for row, (name, prompt) in enumerate(zip(names, prompts, strict=True)):
        full = torch.cat([texts[name], prompt]) if name else prompt
        expected = model.generate(full[None], max_new_tokens=steps, do_sample=False, pad_token_id=1)
        assert generated[row, -steps:].tolist() == expected[0, -steps:].tolist(), (row, name)


def test_attached_model_and_training_mode_give_the_same_kv():
    model = tiny_gpt2(resid_pdrop=0.5, attn_pdrop=0.5, embd_pdrop=0.5)
    text = random_ids(1, 8, seed=7)[0]
    expected = text_prefix_kv(model, text)["decoder"]
    assert tuple(expected.shape) == (2, 2, 2, 8, 16)

    bank = PrefixBank.for_model(model)
    bank.add("other", torch.randn(2, 2, 2, 3, 16))
    prefixrt.attach(model, bank, backend=BACKEND)
    torch.testing.assert_close(text_prefix_kv(model, text)["decoder"], expected, **TOL[torch.float32])

    model.train()  # dropout is off while the prompt runs, and the training flag comes back
    assert add_text_prefix(bank, "t", text, model) == 1
    assert model.training
    torch.testing.assert_close(bank.entry("t")["decoder"], expected, **TOL[torch.float32])


def test_strings_need_a_tokenizer_and_use_no_special_tokens():
    model = tiny_gpt2()
    tokenizer = CharTokenizer()
    from_text = text_prefix_kv(model, "Table: name[Aromi]", tokenizer)["decoder"]
    ids = tokenizer("Table: name[Aromi]", add_special_tokens=False)["input_ids"]
    assert torch.equal(from_text, text_prefix_kv(model, ids)["decoder"])
    assert from_text.shape[3] == len("Table: name[Aromi]")


def test_real_gpt2_tokenizer(shared_data):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(shared_data / "gpt2-tokenizer" / "tokenizer.json"))
    model = tiny_gpt2(vocab_size=len(tokenizer))
    text = "Summarize the table:"
    ids = tokenizer(text)["input_ids"]
    bank = PrefixBank.for_model(model)
    add_text_prefix(bank, "prompt", text, model, tokenizer=tokenizer)
    assert bank.lengths("decoder").tolist() == [len(ids)]
    x = torch.tensor([tokenizer(" name[Aromi], eatType[pub]")["input_ids"]])
    with torch.no_grad():
        expected = model(torch.cat([torch.tensor([ids]), x], 1)).logits[:, len(ids) :]
    prefixrt.attach(model, bank, backend=BACKEND)
    with torch.no_grad():
        out = model(x, prefix_ids=bank.ids(["prompt"])).logits
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


# -- BART -------------------------------------------------------------------------------------------------------
def _heads(x: torch.Tensor, attention) -> torch.Tensor:
    """[1, T, H*D] -> [H, T, D]"""
    return x.view(x.shape[1], attention.num_heads, attention.head_dim).transpose(0, 1)


def _assert_projections(site_kv: torch.Tensor, attention, hidden: torch.Tensor) -> None:
    """``site_kv [2, H, T, D]`` is ``attention``'s K and V projections of ``hidden [1, T, C]``."""
    torch.testing.assert_close(site_kv[0], _heads(attention.k_proj(hidden), attention))
    torch.testing.assert_close(site_kv[1], _heads(attention.v_proj(hidden), attention))


@pytest.mark.parametrize("text_length", [1, 17])
def test_bart_sites_are_the_k_and_v_of_the_text(text_length):
    model = tiny_bart(encoder_layers=3, decoder_layers=2)
    text = random_ids(1, text_length, seed=8)
    kv = text_prefix_kv(model, text)
    spec = PrefixBank.for_model(model).spec
    for site, s in spec.sites.items():
        assert tuple(kv[site].shape) == (s.num_layers, 2, s.num_heads, text_length, s.head_dim), site

    # recompute every site from the hidden states the model reports
    with torch.no_grad():
        out = model(input_ids=text, decoder_input_ids=text, output_hidden_states=True)
        for i, layer in enumerate(model.model.encoder.layers):
            _assert_projections(kv["encoder"][i], layer.self_attn, out.encoder_hidden_states[i])
        for i, layer in enumerate(model.model.decoder.layers):
            _assert_projections(kv["decoder"][i], layer.self_attn, out.decoder_hidden_states[i])
            _assert_projections(kv["cross"][i], layer.encoder_attn, out.encoder_last_hidden_state)


def test_bart_decoder_site_equals_the_text_fed_to_the_decoder_first():
    model = tiny_bart()
    text = random_ids(1, 6, seed=9)
    y = random_ids(2, 5, seed=10)
    with torch.no_grad():
        expected = model(
            input_ids=text.expand(2, -1), decoder_input_ids=torch.cat([text.expand(2, -1), y], 1)
        )
    bank = PrefixBank.for_model(model)
    bank.add("dec", {"decoder": text_prefix_kv(model, text)["decoder"]})
    prefixrt.attach(model, bank, backend=BACKEND)
    with torch.no_grad():
        out = model(input_ids=text.expand(2, -1), decoder_input_ids=y, prefix_ids=bank.ids(["dec", "dec"]))
    torch.testing.assert_close(out.logits, expected.logits[:, 6:], **TOL[torch.float32])


def test_bart_add_text_stores_all_sites_and_runs_attached():
    model = tiny_bart()
    bank = PrefixBank.for_model(model)
    prefixrt.attach(model, bank, backend=BACKEND)
    assert add_text_prefix(bank, "prompt", "summarize:", model, tokenizer=CharTokenizer()) == 0
    for site in ("encoder", "decoder", "cross"):
        assert bank.lengths(site).tolist() == [len("summarize:")]
    detached_kv = text_prefix_kv(prefixrt.detach(model), "summarize:", CharTokenizer())
    for site, tensor in bank.entry("prompt").items():
        torch.testing.assert_close(tensor, detached_kv[site], **TOL[torch.float32])
    prefixrt.attach(model, bank, backend=BACKEND)
    ids = random_ids(2, 5)
    generated = model.generate(ids, prefix_ids=bank.ids(["prompt", None]), max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 4)  # decoder start + 3 tokens


# -- bad inputs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text_or_ids, tokenizer, match",
    [
        ("some text", None, r"text_or_ids is a string: pass tokenizer="),
        ("some text", "not callable", r"tokenizer must be a Hugging Face tokenizer"),
        ("", CharTokenizer(), r"text_or_ids is empty"),
        ([], None, r"text_or_ids is empty"),
        (torch.zeros(0, dtype=torch.long), None, r"text_or_ids is empty"),
        ([3, VOCAB, 4], None, rf"text_or_ids holds ids outside the model's vocabulary \[0, {VOCAB}\)"),
        (torch.tensor([3, -1]), None, r"text_or_ids holds ids outside the model's vocabulary"),
        (torch.tensor([3.0, 4.0]), None, r"text_or_ids must hold integer token ids"),
        (torch.tensor([[3, 4], [5, 6]]), None, r"text_or_ids must be a LongTensor \[T\] or \[1, T\]"),
        ([3, 4.5], None, r"text_or_ids must be a string, a list of int token ids"),
        (3, None, r"text_or_ids must be a string, a list of int token ids"),
        (
            list(range(3, 3 + 100)) * 2,
            None,
            r"text_or_ids has 200 tokens, more than the model's 128 positions",
        ),
    ],
)
def test_bad_text_inputs_raise_and_leave_the_bank_unchanged(text_or_ids, tokenizer, match):
    model = tiny_gpt2()
    bank = PrefixBank.for_model(model)
    add_text_prefix(bank, "keep", [5, 6, 7], model)
    before = (bank.names, bank.version, bank.kv["decoder"].detach().clone())
    with pytest.raises(ValueError, match=match):
        add_text_prefix(bank, "bad", text_or_ids, model, tokenizer=tokenizer)
    assert bank.names == before[0] and bank.version == before[1]
    assert torch.equal(bank.kv["decoder"].detach(), before[2])


def test_text_prefix_for_another_model_is_refused():
    bank = PrefixBank.for_model(tiny_gpt2())
    with pytest.raises(ValueError, match=r"kv\['decoder'\] for prefix 'x' must be .* got \[3, 2, 2, 4, 16\]"):
        add_text_prefix(bank, "x", [3, 4, 5, 6], tiny_gpt2(n_layer=3))
    with pytest.raises(ValueError, match=r"model must be a GPT-2 or BART model, got model_type=None"):
        text_prefix_kv(torch.nn.Linear(2, 2), [3, 4])
    assert len(bank) == 0
