"""PEFT prefix-tuning adapters in and out of a bank: logits equal PEFT's forward pass (GPT-2 exactly; BART's
decoder prefix with PEFT's layer mapping), exports load in PEFT, and every bad adapter is refused clearly.

Padding: PEFT's forward concatenates ones for the prefix to the attention mask and, like the base GPT-2 forward,
gives the real tokens positions ``P + arange(T)`` whatever the padding; attach gives ``arange(T) + P`` as well,
so padded batches agree at every real (unpadded) position. The outputs at pad positions are meaningless in both
(queries that are padding) and are not compared.

Generation is compared with a greedy loop over PEFT's *forward* pass, and with ``PeftModel.generate`` only where
PEFT's generate works: with transformers 5.24 (which renamed ``past_key_values`` to ``cache``) PEFT 0.21's
``prepare_inputs_for_generation`` puts the prefix under ``past_key_values`` next to generate's own empty ``cache``,
the model keeps ``cache``, and the prefix is silently dropped (the step after prefill sees a cache of the real
tokens only). With transformers 5.17 PEFT's generate and ours give the same tokens.
"""

import json

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file
from support.generation import greedy_generate_attached
from support.model_compare import LOGITS_TOL as TOL
from support.tiny import left_padded_prompts, random_ids, random_kv, tiny_bart, tiny_gpt2

import prefixrt
from prefixrt import PrefixBank
from prefixrt.bank.peft_io import PeftAdapterError, peft_layer_map, read_peft_prefix

BACKEND = "reference"
pytestmark = pytest.mark.filterwarnings("ignore")


def peft_gpt2(
    seed: int, num_virtual_tokens: int, projection: bool = False, dtype=torch.float32, **model_kwargs
):
    """A PeftModel over tiny_gpt2 with a randomly initialized prefix (PEFT's own init, seeded)."""
    base = tiny_gpt2(**model_kwargs).to(dtype)
    torch.manual_seed(seed)
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        prefix_projection=projection,
        encoder_hidden_size=24,
    )
    model = get_peft_model(base, config).eval()
    if projection:  # PEFT's default MLP init is small; make the prefix matter
        with torch.no_grad():
            for p in model.prompt_encoder["default"].transform.parameters():
                p.mul_(4)
    return model


def peft_bart(seed: int, num_virtual_tokens: int, layers: int = 3, **model_kwargs):
    base = tiny_bart(
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        **model_kwargs,
    )
    torch.manual_seed(seed)
    config = PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=num_virtual_tokens)
    return get_peft_model(base, config).eval()


def saved(peft_model, path):
    peft_model.save_pretrained(str(path))
    return path


def two_adapters_and_the_base(tmp_path):
    """PEFT adapters ``"a"`` (P=3) and ``"b"`` (P=17) over tiny_gpt2, saved and read into the bank of a fresh
    tiny_gpt2: ``(model, bank, references)``, ``references`` mapping a name (None: no prefix) to the model whose
    forward it must equal."""
    peft_a = peft_gpt2(1, 3)
    peft_b = peft_gpt2(2, 17)
    model = tiny_gpt2()
    bank = PrefixBank.for_model(model)
    bank.add_peft("a", saved(peft_a, tmp_path / "a"))
    bank.add_peft("b", saved(peft_b, tmp_path / "b"))
    return model, bank, {"a": peft_a, "b": peft_b, None: model}


def padded(batch: int, length: int, padding: str, seed: int = 0):
    ids = random_ids(batch, length, seed=seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padding == "left":
        mask[0, :3] = 0
        mask[-1, :1] = 0
    elif padding == "right":
        mask[0, -2:] = 0
        mask[-1, -4:] = 0
    ids[mask == 0] = 1
    return ids, mask


@torch.no_grad()
def greedy_with_forward(forward, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by a full forward per step (no cache): the tokens a model's forward pass implies."""
    for _ in range(steps):
        next_token = forward(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], 1)
    return ids


# -- GPT-2 ------------------------------------------------------------------------------------------------------
def test_layout_is_pefts_view_of_the_embedding(tmp_path):
    """[P, L*2*H*D] viewed (P, L*2, H, D): row 2l is layer l's K, row 2l+1 its V (PeftModel.get_prompt)."""
    peft_model = peft_gpt2(1, 5)
    path = saved(peft_model, tmp_path / "a")
    kv = read_peft_prefix(path, PrefixBank.for_model(tiny_gpt2()).spec)["decoder"]  # [L, 2, H, P, D]
    cache = peft_model.get_prompt(batch_size=1)  # PEFT's own DynamicCache
    for layer in range(kv.shape[0]):
        assert torch.equal(kv[layer, 0], cache.layers[layer].keys[0])
        assert torch.equal(kv[layer, 1], cache.layers[layer].values[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("num_virtual_tokens", [1, 17])
def test_gpt2_logits_equal_peft_forward(tmp_path, num_virtual_tokens, padding, dtype):
    peft_model = peft_gpt2(1, num_virtual_tokens, dtype=dtype)
    path = saved(peft_model, tmp_path / "adapter")
    ids, mask = padded(3, 9, padding)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits

    model = tiny_gpt2().to(dtype)
    bank = PrefixBank.for_model(model)
    assert bank.add_peft("task", path) == 0
    assert bank.lengths("decoder").tolist() == [num_virtual_tokens]
    prefixrt.attach(model, bank, backend=BACKEND)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, prefix_ids=bank.ids(["task"] * 3)).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], expected[real], **TOL[dtype])
    # the prefix matters: without it the logits are far from PEFT's
    with torch.no_grad():
        plain = model(ids, attention_mask=mask, prefix_ids=bank.ids([None] * 3)).logits
    assert (plain[real] - expected[real]).abs().max() > 1e-2


def test_prefix_projection_adapter_holds_the_projected_kv(tmp_path):
    """With prefix_projection=True PEFT saves the MLP's output; the bank reads it like any adapter and matches the
    PeftModel that computes the prefix through its MLP."""
    peft_model = peft_gpt2(2, 6, projection=True)
    path = saved(peft_model, tmp_path / "mlp")
    assert json.loads((path / "adapter_config.json").read_text())["prefix_projection"] is True
    ids, mask = padded(2, 7, "right")
    with torch.no_grad():
        expected = peft_model(
            input_ids=ids, attention_mask=mask
        ).logits  # training-mode config: through the MLP
    model = tiny_gpt2()
    bank = PrefixBank.for_model(model)
    bank.add_peft("mlp", path)
    prefixrt.attach(model, bank, backend=BACKEND)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, prefix_ids=bank.ids(["mlp", "mlp"])).logits
    torch.testing.assert_close(out[mask.bool()], expected[mask.bool()], **TOL[torch.float32])


def test_mixed_batch_of_two_adapters_and_no_prefix_matches_each_model(tmp_path):
    model, bank, references = two_adapters_and_the_base(tmp_path)
    names = ["b", None, "a", "a", "b"]
    ids, mask = padded(5, 8, "left", seed=3)
    mask[2, -3:] = 1  # one more row with its own padding
    mask[2, :4] = 0
    ids[mask == 0] = 1
    prefixrt.attach(model, bank, backend=BACKEND)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, prefix_ids=bank.ids(names)).logits
    prefixrt.detach(model)
    for row, name in enumerate(names):
        reference = references[name]
        with torch.no_grad():
            expected = reference(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]).logits[0]
        real = mask[row].bool()
        torch.testing.assert_close(out[row][real], expected[real], **TOL[torch.float32])


def test_mixed_batch_generate_equals_greedy_over_peft_forward(tmp_path):
    model, bank, references = two_adapters_and_the_base(tmp_path)
    prompts = [random_ids(1, n, seed=10 + n)[0] for n in (6, 3, 5)]
    names = ["a", "b", None]
    ids, mask = left_padded_prompts(prompts)
    width = ids.shape[1]
    steps = 6
    generated = greedy_generate_attached(model, bank, ids, mask, names, steps, backend=BACKEND)
    for row, (prompt, name) in enumerate(zip(prompts, names, strict=True)):
        expected = greedy_with_forward(lambda x, m=references[name]: m(input_ids=x), prompt[None], steps)[0]
        assert generated[row, width - len(prompt) :].tolist() == expected.tolist(), (row, name)


def _peft_generate_drops_the_prefix() -> bool:
    """True on transformers versions whose models take ``cache`` instead of ``past_key_values`` (see the module
    docstring): PEFT 0.21's generate then loses the prefix."""
    import inspect

    from transformers import GPT2LMHeadModel

    return "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters


def test_left_padded_generate_vs_peft_generate(tmp_path):
    """Equal to PeftModel.generate where PEFT's generate works; where it silently drops the prefix (models that
    take ``cache=``, transformers 5.2x), PEFT's generate disagrees with PEFT's own forward and ours does not."""
    peft_model = peft_gpt2(1, 5)
    path = saved(peft_model, tmp_path / "a")
    prompts = [random_ids(1, n, seed=40 + n)[0] for n in (6, 3)]
    ids, mask = left_padded_prompts(prompts)
    width = ids.shape[1]
    expected = peft_model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=1
    )
    model = tiny_gpt2()
    bank = PrefixBank.for_model(model)
    bank.add_peft("a", path)
    prefixrt.attach(model, bank, backend=BACKEND)
    generated = model.generate(
        ids,
        attention_mask=mask,
        prefix_ids=bank.ids(["a", "a"]),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=1,
    )
    if not _peft_generate_drops_the_prefix():
        assert generated.tolist() == expected.tolist()
        return
    # PEFT's generate disagrees with a greedy loop over PEFT's own forward (the prefix was lost); ours agrees.
    peft_forward = [greedy_with_forward(lambda x: peft_model(input_ids=x), p[None], 6)[0] for p in prompts]
    pefts_rows = [expected[r, width - len(p) :].tolist() for r, p in enumerate(prompts)]
    our_rows = [generated[r, width - len(p) :].tolist() for r, p in enumerate(prompts)]
    assert pefts_rows != [t.tolist() for t in peft_forward]
    assert our_rows == [t.tolist() for t in peft_forward]


@pytest.mark.parametrize("num_virtual_tokens", [1, 17])
def test_export_loads_in_peft_with_the_same_logits(tmp_path, num_virtual_tokens):
    model = tiny_gpt2()
    bank = PrefixBank.for_model(model)
    g = torch.Generator().manual_seed(5)
    bank.add("mine", random_kv(bank.spec, num_virtual_tokens, g))
    bank.export_peft("mine", tmp_path / "export", base_model_name_or_path="tiny-gpt2")
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["base_model_name_or_path"] == "tiny-gpt2"

    peft_model = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "export")).eval()
    ids, mask = padded(2, 7, "right", seed=4)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    prefixrt.attach(model, bank, backend=BACKEND)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, prefix_ids=bank.ids(["mine", "mine"])).logits
    torch.testing.assert_close(out[mask.bool()], expected[mask.bool()], **TOL[torch.float32])

    # and back: export -> add_peft is bitwise the same entry
    bank.add_peft("back", tmp_path / "export")
    assert torch.equal(bank.entry("back")["decoder"], bank.entry("mine")["decoder"])


def test_export_then_import_of_a_peft_adapter_is_bitwise(tmp_path):
    path = saved(peft_gpt2(3, 4), tmp_path / "orig")
    bank = PrefixBank.for_model(tiny_gpt2())
    bank.add_peft("x", path)
    bank.export_peft("x", tmp_path / "again")
    assert torch.equal(
        load_file(path / "adapter_model.safetensors")["prompt_embeddings"],
        load_file(tmp_path / "again" / "adapter_model.safetensors")["prompt_embeddings"],
    )


# -- BART -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers, mapping", [(1, [0]), (2, [0, 0]), (3, [0, 2, 1]), (4, [0, 2, 0, 2])])
def test_bart_layer_mapping(layers, mapping):
    assert peft_layer_map("bart", layers, layers) == mapping
    assert peft_layer_map("gpt2", layers, layers) == list(range(layers))


def _bart_inputs():
    ids = random_ids(3, 7, seed=7)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # encoder padding
    ids[mask == 0] = 1
    decoder_ids = random_ids(3, 5, seed=8)
    return ids, mask, decoder_ids


@pytest.mark.parametrize("layers", [2, 3])
def test_bart_decoder_prefix_equals_peft_forward(tmp_path, layers):
    peft_model = peft_bart(1, 6, layers=layers)
    path = saved(peft_model, tmp_path / "bart")
    ids, mask, decoder_ids = _bart_inputs()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits

    model = peft_model.get_base_model()  # the same frozen weights; PEFT does not modify them
    bank = PrefixBank.for_model(model)
    bank.add_peft("dec", path)
    assert bank.lengths("decoder").tolist() == [6]
    assert bank.lengths("encoder").tolist() == [0] and bank.lengths("cross").tolist() == [0]
    prefixrt.attach(model, bank, backend=BACKEND)
    with torch.no_grad():
        out = model(
            ids, attention_mask=mask, decoder_input_ids=decoder_ids, prefix_ids=bank.ids(["dec"] * 3)
        ).logits
        torch.testing.assert_close(out, expected, **TOL[torch.float32])

        # evidence for the mapping: the layer-for-layer reading (decoder layer i <- adapter layer i) is not what
        # PEFT computes once adapter layers differ from the mapped ones
        embedding = load_file(path / "adapter_model.safetensors")["prompt_embeddings"]
        spec = bank.spec.sites["decoder"]
        naive = embedding.view(6, layers, 2, spec.num_heads, spec.head_dim).permute(1, 2, 3, 0, 4)
        bank.add("naive", {"decoder": naive})
        wrong = model(
            ids, attention_mask=mask, decoder_input_ids=decoder_ids, prefix_ids=bank.ids(["naive"] * 3)
        )
        assert (wrong.logits - expected).abs().max() > 1e-3


def test_bart_mixed_batch_with_peft_rows_and_no_prefix(tmp_path):
    peft_model = peft_bart(1, 6, layers=3)
    path = saved(peft_model, tmp_path / "bart")
    ids, mask, decoder_ids = _bart_inputs()
    model = peft_model.get_base_model()
    with torch.no_grad():
        with_prefix = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        base = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    bank = PrefixBank.for_model(model)
    g = torch.Generator().manual_seed(0)
    bank.add("other", random_kv(bank.spec, 4, g))  # id 0: an all-sites entry, so the PEFT entry is not id 0
    bank.add_peft("dec", path)
    prefixrt.attach(model, bank, backend=BACKEND)
    with torch.no_grad():
        out = model(
            ids, attention_mask=mask, decoder_input_ids=decoder_ids, prefix_ids=bank.ids(["dec", None, "dec"])
        ).logits
    torch.testing.assert_close(out[[0, 2]], with_prefix[[0, 2]], **TOL[torch.float32])
    torch.testing.assert_close(out[1], base[1], **TOL[torch.float32])


def test_bart_export_round_trip_loads_in_peft(tmp_path):
    peft_model = peft_bart(4, 5, layers=3)
    path = saved(peft_model, tmp_path / "bart")
    model = peft_model.get_base_model()
    bank = PrefixBank.for_model(model)
    bank.add_peft("dec", path)
    bank.export_peft("dec", tmp_path / "export")
    # layers 0, 2, 1 of a 3-layer adapter are all used: the export is the original file
    assert torch.equal(
        load_file(path / "adapter_model.safetensors")["prompt_embeddings"],
        load_file(tmp_path / "export" / "adapter_model.safetensors")["prompt_embeddings"],
    )
    reloaded = PeftModel.from_pretrained(
        tiny_bart(encoder_layers=3, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4),
        str(tmp_path / "export"),
    ).eval()
    ids, mask, decoder_ids = _bart_inputs()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        got = reloaded(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


def test_bart_export_refuses_what_peft_cannot_express(tmp_path):
    model = tiny_bart(
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4
    )
    bank = PrefixBank.for_model(model)
    g = torch.Generator().manual_seed(0)
    bank.add("all_sites", random_kv(bank.spec, 3, g))
    bank.add("per_layer", random_kv(bank.spec, 3, g, sites=["decoder"]))
    shared = random_kv(bank.spec, 3, g, sites=["decoder"])
    shared["decoder"][1] = shared["decoder"][0]
    bank.add("shared", shared)
    with pytest.raises(
        PeftAdapterError, match=r"'encoder' prefix of length 3: PEFT prefix tuning applies only"
    ):
        bank.export_peft("all_sites", tmp_path / "a")
    with pytest.raises(
        PeftAdapterError, match=r"feeds decoder layers 0 and 1 .* from the same adapter layer 0"
    ):
        bank.export_peft("per_layer", tmp_path / "b")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    bank.export_peft("shared", tmp_path / "c")  # expressible: both decoder layers read adapter layer 0
    bank.add_peft("shared_back", tmp_path / "c")
    assert torch.equal(bank.entry("shared_back")["decoder"], bank.entry("shared")["decoder"])


# -- bad adapters -----------------------------------------------------------------------------------------------
@pytest.fixture
def good_adapter(tmp_path):
    return saved(peft_gpt2(1, 4), tmp_path / "good")


def _bank_with_entry():
    bank = PrefixBank.for_model(tiny_gpt2())
    bank.add("keep", random_kv(bank.spec, 3, torch.Generator().manual_seed(0)))
    return bank


def _state(bank):
    return bank.names, bank.version, bank.kv["decoder"].detach().clone()


def _rewrite_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _corruptions():
    def lora(p):
        _rewrite_config(p, peft_type="LORA")

    def no_config(p):
        (p / "adapter_config.json").unlink()

    def bad_json(p):
        (p / "adapter_config.json").write_text("{not json")

    def no_weights(p):
        (p / "adapter_model.safetensors").unlink()

    def only_bin(p):
        (p / "adapter_model.safetensors").unlink()
        (p / "adapter_model.bin").write_bytes(b"\x80\x04 this would be a pickle")

    def truncated(p):
        data = (p / "adapter_model.safetensors").read_bytes()
        (p / "adapter_model.safetensors").write_bytes(data[: len(data) - 9])

    def garbage(p):
        (p / "adapter_model.safetensors").write_bytes(b"\xff" * 64)

    def wrong_key(p):
        save_file({"weight": torch.randn(4, 128)}, str(p / "adapter_model.safetensors"))

    def wrong_shape(p):
        save_file({"prompt_embeddings": torch.randn(5, 128)}, str(p / "adapter_model.safetensors"))

    def nan(p):
        e = load_file(p / "adapter_model.safetensors")["prompt_embeddings"]
        e[2, 7] = float("nan")
        save_file({"prompt_embeddings": e}, str(p / "adapter_model.safetensors"))

    def bad_field(p):
        _rewrite_config(p, num_virtual_tokens=0)

    def other_layers(p):
        _rewrite_config(p, num_layers=3)

    def other_heads(p):
        _rewrite_config(p, num_attention_heads=4)

    def seq2seq(p):
        _rewrite_config(p, task_type="SEQ_2_SEQ_LM", num_transformer_submodules=2)

    return [
        (lora, r"peft_type='LORA'; prefixrt reads only PREFIX_TUNING"),
        (no_config, r"has no adapter_config.json"),
        (bad_json, r"adapter_config.json' is not readable JSON"),
        (no_weights, r"has no adapter_model.safetensors"),
        (only_bin, r"has only adapter_model.bin: prefixrt only reads safetensors .* never unpickles"),
        (truncated, r"is not a readable safetensors file"),
        (garbage, r"is not a readable safetensors file"),
        (wrong_key, r"has no 'prompt_embeddings' tensor \(keys: \['weight'\]\)"),
        (wrong_shape, r"prompt_embeddings has shape \[5, 128\], but the config says .* \[4, 128\]"),
        (nan, r"prompt_embeddings contains NaN or inf"),
        (bad_field, r"num_virtual_tokens must be a positive integer, got 0"),
        (
            other_layers,
            r"was built for CAUSAL_LM with 3 layers x 2 heads .* but the bank is gpt2 \(decoder: 2 layers",
        ),
        (other_heads, r"was built for CAUSAL_LM with 2 layers x 4 heads x 8 dims .* but the bank is gpt2"),
        (seq2seq, r"num_transformer_submodules=2, but the bank is gpt2"),
    ]


@pytest.mark.parametrize("corrupt, match", _corruptions(), ids=[c.__name__ for c, _ in _corruptions()])
def test_bad_adapters_raise_and_leave_the_bank_unchanged(good_adapter, corrupt, match):
    bank = _bank_with_entry()
    before = _state(bank)
    corrupt(good_adapter)
    with pytest.raises(PeftAdapterError, match=match):
        bank.add_peft("new", good_adapter)
    names, version, kv = _state(bank)
    assert names == before[0] and version == before[1] and torch.equal(kv, before[2])


def test_missing_adapter_dir(tmp_path):
    with pytest.raises(PeftAdapterError, match=r"adapter_dir .* is not a directory"):
        _bank_with_entry().add_peft("x", tmp_path / "nowhere")


def test_adapter_for_another_architecture(tmp_path):
    gpt2_adapter = saved(peft_gpt2(1, 4), tmp_path / "gpt2")
    bart_adapter = saved(peft_bart(1, 4, layers=2), tmp_path / "bart")
    bart_bank = PrefixBank.for_model(tiny_bart(encoder_attention_heads=4))
    with pytest.raises(PeftAdapterError, match=r"built for CAUSAL_LM .* but the bank is bart"):
        bart_bank.add_peft("x", gpt2_adapter)
    with pytest.raises(PeftAdapterError, match=r"built for SEQ_2_SEQ_LM .* but the bank is gpt2"):
        _bank_with_entry().add_peft("x", bart_adapter)
    wider = PrefixBank.for_model(tiny_gpt2(n_embd=64))
    with pytest.raises(
        PeftAdapterError, match=r"token_dim=32\).* but the bank is gpt2 \(decoder: 2 layers x 2 heads x 32"
    ):
        wider.add_peft("x", gpt2_adapter)
    deeper_decoder = PrefixBank.for_model(
        tiny_bart(encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4)
    )
    with pytest.raises(
        PeftAdapterError, match=r"gives only num_hidden_layers=2 \(encoder\) layers to 3 decoder"
    ):
        deeper_decoder.add_peft("x", bart_adapter)
    assert len(bart_bank) == 0 and len(wider) == 0 and len(deeper_decoder) == 0


def test_export_errors(tmp_path):
    bank = _bank_with_entry()
    with pytest.raises(KeyError, match=r"unknown prefix name 'missing'"):
        bank.export_peft("missing", tmp_path / "x")
    assert not (tmp_path / "x").exists()
