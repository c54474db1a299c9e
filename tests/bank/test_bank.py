"""PrefixBank: entries and stable ids, save/load round trips, atomic saves, and a clear error for every bad input
with the stored state left exactly as it was."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file
from support.tiny import random_ids, random_kv, tiny_bart, tiny_gpt2

import prefixrt
from prefixrt import BankFileError, PrefixBank
from prefixrt.bank.spec import ModelSpec

BACKEND = "reference"


def gpt2_bank(lengths=(3, 17, 5), seed=0, **model_kwargs):
    model = tiny_gpt2(**model_kwargs)
    bank = PrefixBank.for_model(model)
    g = torch.Generator().manual_seed(seed)
    kvs = {}
    for i, length in enumerate(lengths):
        name = f"p{i}"
        kvs[name] = random_kv(bank.spec, length, g)["decoder"]
        bank.add(name, kvs[name])
    return model, bank, kvs


def snapshot(bank: PrefixBank) -> dict:
    """Everything observable about a bank's contents (to check a failed call changed nothing)."""
    return {
        "slots": list(bank._slots),
        "names": bank.names,
        "version": bank.version,
        "lengths": {site: bank.lengths(site).tolist() for site in bank.spec.sites},
        "offsets": {site: bank.offsets(site).tolist() for site in bank.spec.sites},
        "kv": {site: bank.kv[site].detach().clone() for site in bank.spec.sites},
    }


def assert_unchanged(bank: PrefixBank, before: dict) -> None:
    after = snapshot(bank)
    for key in ("slots", "names", "version", "lengths", "offsets"):
        assert after[key] == before[key], key
    for site, tensor in before["kv"].items():
        assert torch.equal(after["kv"][site], tensor), site


def assert_banks_equal(a: PrefixBank, b: PrefixBank) -> None:
    assert a.spec == b.spec
    assert a.dtype == b.dtype
    assert a._slots == b._slots
    for site in a.spec.sites:
        assert a.lengths(site).tolist() == b.lengths(site).tolist()
        assert torch.equal(a.kv[site].detach(), b.kv[site].detach())  # bitwise


# -- entries and ids ---------------------------------------------------------------------------------------------
def test_for_model_shapes_the_bank_for_gpt2_and_bart():
    gpt2 = PrefixBank.for_model(tiny_gpt2(n_layer=3, n_head=4, n_embd=32))
    assert gpt2.spec == ModelSpec("gpt2", {"decoder": prefixrt.SiteSpec(3, 4, 8)})
    assert len(gpt2) == 0 and gpt2.names == [] and gpt2.dtype == torch.float32
    assert tuple(gpt2.kv["decoder"].shape) == (3, 2, 4, 0, 8)

    bart = PrefixBank.for_model(tiny_bart(encoder_layers=3, decoder_layers=2), dtype=torch.float64)
    assert bart.spec.sites == {
        "encoder": prefixrt.SiteSpec(3, 2, 16),
        "decoder": prefixrt.SiteSpec(2, 4, 8),
        "cross": prefixrt.SiteSpec(2, 4, 8),
    }
    assert bart.dtype == torch.float64


def test_add_ids_names_len_and_entry():
    _, bank, kvs = gpt2_bank(lengths=(3, 17, 37))
    assert bank.names == ["p0", "p1", "p2"] and len(bank) == 3
    assert "p1" in bank and "nope" not in bank
    assert bank.ids(["p2", "p0", None, "p2"]).tolist() == [2, 0, -1, 2]
    assert bank.ids([]).tolist() == []
    assert bank.lengths("decoder").tolist() == [3, 17, 37]
    assert bank.offsets("decoder").tolist() == [0, 3, 20, 57]
    for name, kv in kvs.items():
        entry = bank.entry(name)
        assert list(entry) == ["decoder"]
        assert torch.equal(entry["decoder"], kv)
    # entry() returns a copy: writing into it does not touch the bank
    bank.entry("p1")["decoder"].zero_()
    assert torch.equal(bank.entry("p1")["decoder"], kvs["p1"])
    # the packed layout: layer_kv views the rows of each entry in id order
    k, v = bank.layer_kv("decoder", 1)
    assert torch.equal(k[:, 3:20], kvs["p1"][1, 0]) and torch.equal(v[:, 20:57], kvs["p2"][1, 1])


def test_remove_keeps_other_ids_and_frees_the_slot():
    _, bank, kvs = gpt2_bank(lengths=(3, 17, 5, 4))
    bank.remove("p1")
    assert bank.names == ["p0", "p2", "p3"] and len(bank) == 3
    assert bank.ids(["p0", "p2", "p3"]).tolist() == [0, 2, 3]  # not renumbered
    assert bank.lengths("decoder").tolist() == [3, 0, 5, 4]
    assert bank.live_ids() == [0, 2, 3] and bank.num_slots == 4
    for name in ("p0", "p2", "p3"):
        assert torch.equal(bank.entry(name)["decoder"], kvs[name])
    # a later add reuses the free slot
    new = torch.randn(2, 2, 2, 9, 16)
    assert bank.add("new", new) == 1
    assert bank.ids(["new", "p3"]).tolist() == [1, 3]
    assert torch.equal(bank.entry("new")["decoder"], new)
    # trailing free slots are forgotten, so ids never grow past the live ones
    bank.remove("p3")
    bank.remove("p2")
    assert bank.num_slots == 2 and bank.add("again", new) == 2
    bank.clear()
    assert len(bank) == 0 and bank.num_slots == 0
    assert tuple(bank.kv["decoder"].shape) == (2, 2, 2, 0, 16)


def test_replace_keeps_the_id_and_dtype_is_the_banks():
    _, bank, kvs = gpt2_bank()
    other = torch.randn(2, 2, 2, 11, 16, dtype=torch.float64)
    assert bank.add("p1", other, replace=True) == 1
    assert bank.lengths("decoder").tolist() == [3, 11, 5]
    assert bank.entry("p1")["decoder"].dtype == torch.float32
    torch.testing.assert_close(bank.entry("p1")["decoder"], other.float())
    assert torch.equal(bank.entry("p2")["decoder"], kvs["p2"])


def test_bart_entries_per_site_with_their_own_lengths():
    bank = PrefixBank.for_model(tiny_bart())
    g = torch.Generator().manual_seed(0)
    full = random_kv(bank.spec, 7, g)
    full["cross"] = random_kv(bank.spec, 13, g, sites=["cross"])["cross"]
    assert bank.add("all", full) == 0
    assert bank.add("decoder_only", random_kv(bank.spec, 4, g, sites=["decoder"])) == 1
    assert bank.lengths("encoder").tolist() == [7, 0]
    assert bank.lengths("decoder").tolist() == [7, 4]
    assert bank.lengths("cross").tolist() == [13, 0]
    entry = bank.entry("all")
    for site in bank.spec.sites:
        assert torch.equal(entry[site], full[site])
    assert bank.entry("decoder_only")["encoder"].shape[3] == 0


def test_requires_grad_survives_add_and_remove():
    _, bank, _ = gpt2_bank()
    bank.requires_grad_(True)
    bank.add("x", torch.randn(2, 2, 2, 4, 16))
    bank.remove("p0")
    assert bank.kv["decoder"].requires_grad


# -- save / load -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_save_load_round_trip_is_bitwise_and_keeps_ids(tmp_path, dtype):
    model = tiny_gpt2()
    bank = PrefixBank.for_model(model, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    for name, length in [("a", 3), ("b", 17), ("c", 1), ("d", 37)]:
        bank.add(name, random_kv(bank.spec, length, g))
    bank.remove("b")  # a freed slot in the middle: ids 0, 2, 3 must survive as they are
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    loaded = PrefixBank.load(path)
    assert_banks_equal(bank, loaded)
    assert loaded.ids(["a", "c", "d"]).tolist() == [0, 2, 3]
    assert loaded.live_ids() == [0, 2, 3]
    # the freed slot is free in the loaded bank too, and is the one a new entry takes
    assert loaded.add("e", random_kv(loaded.spec, 2, g)) == 1
    # dtype on load
    as64 = PrefixBank.load(path, dtype=torch.float64)
    assert as64.dtype == torch.float64
    assert torch.equal(as64.entry("d")["decoder"], bank.entry("d")["decoder"].double())


def test_save_load_round_trip_bart_and_empty_bank(tmp_path):
    bank = PrefixBank.for_model(tiny_bart())
    g = torch.Generator().manual_seed(2)
    bank.add("full", random_kv(bank.spec, 5, g))
    bank.add("dec", random_kv(bank.spec, 17, g, sites=["decoder"]))
    bank.save(tmp_path / "bart.safetensors")
    assert_banks_equal(bank, PrefixBank.load(tmp_path / "bart.safetensors"))

    empty = PrefixBank.for_model(tiny_gpt2())
    empty.save(tmp_path / "empty.safetensors")
    assert_banks_equal(empty, PrefixBank.load(tmp_path / "empty.safetensors"))


def test_loaded_bank_gives_the_same_logits(tmp_path):
    model, bank, _ = gpt2_bank()
    bank.save(tmp_path / "bank.safetensors")
    ids = random_ids(3, 6)
    prefix_ids = bank.ids(["p2", None, "p1"])
    prefixrt.attach(model, bank, backend=BACKEND)
    expected = model(ids, prefix_ids=prefix_ids).logits
    prefixrt.detach(model)
    prefixrt.attach(model, PrefixBank.load(tmp_path / "bank.safetensors"), backend=BACKEND)
    assert torch.equal(model(ids, prefix_ids=prefix_ids).logits, expected)


def test_failed_save_leaves_the_old_file_intact(tmp_path, monkeypatch):
    import safetensors.torch

    _, bank, _ = gpt2_bank()
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    old_bytes = path.read_bytes()
    bank.add("more", torch.randn(2, 2, 2, 4, 16))

    def half_written_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(old_bytes[: len(old_bytes) // 2])  # a partial file, as a crash mid-write would leave
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written_then_fail)
    with pytest.raises(OSError, match="disk full"):
        bank.save(path)
    assert path.read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == ["bank.safetensors"]  # no temp file left behind
    monkeypatch.undo()
    assert PrefixBank.load(path).names == ["p0", "p1", "p2"]
    assert bank.names == ["p0", "p1", "p2", "more"]  # the in-memory bank is untouched by the failed save


# -- bad inputs: a clear error, and nothing stored changes ---------------------------------------------------------
@pytest.mark.parametrize(
    "kv, match",
    [
        (
            torch.randn(3, 2, 2, 4, 16),
            r"kv\['decoder'\].*\[layers, 2, heads, P, head_dim\].*got \[3, 2, 2, 4, 16\]",
        ),
        (torch.randn(2, 2, 4, 4, 8), r"kv\['decoder'\].*got \[2, 2, 4, 4, 8\]"),
        (torch.randn(2, 2, 2, 4, 15), r"kv\['decoder'\].*got \[2, 2, 2, 4, 15\]"),
        (torch.randn(2, 2, 4, 16), r"kv\['decoder'\].*got \[2, 2, 4, 16\]"),
        (torch.randn(2, 3, 2, 4, 16), r"kv\['decoder'\].*got \[2, 3, 2, 4, 16\]"),
        (torch.randint(0, 5, (2, 2, 2, 4, 16)), r"kv\['decoder'\] must be a floating-point tensor"),
        ({"encoder": torch.randn(2, 2, 2, 4, 16)}, r"unknown site 'encoder'"),
        ({}, r"non-empty mapping"),
        ("not a tensor", r"kv must be a tensor or a non-empty mapping"),
    ],
)
def test_add_rejects_bad_kv(kv, match):
    _, bank, _ = gpt2_bank()
    before = snapshot(bank)
    with pytest.raises(ValueError, match=match):
        bank.add("bad", kv)
    assert_unchanged(bank, before)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_add_rejects_non_finite_values(bad_value):
    _, bank, _ = gpt2_bank()
    before = snapshot(bank)
    kv = torch.randn(2, 2, 2, 5, 16)
    kv[1, 1, 0, 4, 3] = bad_value
    with pytest.raises(ValueError, match=r"prefix 'bad' contains NaN or inf"):
        bank.add("bad", kv)
    with pytest.raises(ValueError, match=r"contains NaN or inf"):
        bank.add("p1", kv, replace=True)  # replacing with a bad value keeps the old entry
    assert_unchanged(bank, before)


def test_bart_bank_errors():
    bank = PrefixBank.for_model(tiny_bart())
    g = torch.Generator().manual_seed(0)
    bank.add("ok", random_kv(bank.spec, 3, g))
    before = snapshot(bank)
    with pytest.raises(ValueError, match=r"pass kv as a mapping site"):
        bank.add("bare", torch.randn(2, 2, 4, 3, 8))
    bad = random_kv(bank.spec, 3, g)
    bad["encoder"] = torch.randn(2, 2, 4, 3, 8)  # decoder's head layout on the encoder site
    with pytest.raises(ValueError, match=r"kv\['encoder'\].*got \[2, 2, 4, 3, 8\]"):
        bank.add("bad", bad)  # all or nothing: the valid sites are not stored either
    assert_unchanged(bank, before)


@pytest.mark.parametrize("name", ["", None, 3])
def test_add_rejects_bad_names(name):
    _, bank, _ = gpt2_bank()
    before = snapshot(bank)
    with pytest.raises(ValueError, match=r"name must be a non-empty string"):
        bank.add(name, torch.randn(2, 2, 2, 4, 16))
    assert_unchanged(bank, before)


def test_duplicate_and_unknown_names():
    _, bank, _ = gpt2_bank()
    before = snapshot(bank)
    with pytest.raises(ValueError, match=r"'p1' is already in the bank.*replace=True"):
        bank.add("p1", torch.randn(2, 2, 2, 4, 16))
    for call in (
        lambda: bank.ids(["p0", "missing"]),
        lambda: bank.remove("missing"),
        lambda: bank.entry("missing"),
        lambda: bank.id_of("missing"),
    ):
        with pytest.raises(
            KeyError, match=r"unknown prefix name 'missing'; the bank holds \['p0', 'p1', 'p2'\]"
        ):
            call()
    with pytest.raises(KeyError, match=r"no live entry with id 7"):
        bank.name_of(7)
    with pytest.raises(ValueError, match=r"unknown site 'cross'"):
        bank.lengths("cross")
    assert_unchanged(bank, before)


@pytest.mark.parametrize(
    "prefix_ids, match",
    [
        (torch.tensor([0, 5, -1]), r"prefix_ids holds ids \[5\] that are not in the bank"),
        (torch.tensor([0, -2, -1]), r"prefix_ids holds ids \[-2\]"),
        (torch.tensor([1, 0, 1]), r"prefix_ids holds ids \[1\]"),  # 1 is a freed slot
        (torch.tensor([0, 2]), r"prefix_ids must be a LongTensor \[batch=3\]"),
        (torch.tensor([[0], [2], [-1]]), r"prefix_ids must be a LongTensor \[batch=3\]"),
        (torch.tensor([0.0, 2.0, -1.0]), r"prefix_ids must be a 1-D integer tensor"),
        ([0, 2, -1], r"prefix_ids must be a LongTensor \[batch\], got list"),
        (None, r"pass prefix_ids=LongTensor\[batch\]"),
    ],
)
def test_bad_prefix_ids_through_attach_and_forward(prefix_ids, match):
    model, bank, _ = gpt2_bank()
    bank.remove("p1")
    before = snapshot(bank)
    prefixrt.attach(model, bank, backend=BACKEND)
    kwargs = {} if prefix_ids is None else {"prefix_ids": prefix_ids}
    with pytest.raises(ValueError, match=match):
        model(random_ids(3, 5), **kwargs)
    assert_unchanged(bank, before)
    # the model still works afterwards
    out = model(random_ids(3, 5), prefix_ids=torch.tensor([0, 2, -1])).logits
    assert torch.isfinite(out).all()


def test_bad_prefix_ids_in_bart_and_generate():
    model = tiny_bart()
    bank = PrefixBank.for_model(model)
    bank.add("a", random_kv(bank.spec, 3, torch.Generator().manual_seed(0)))
    before = snapshot(bank)
    prefixrt.attach(model, bank, backend=BACKEND)
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match=r"prefix_ids holds ids \[4\]"):
        model(ids, decoder_input_ids=ids, prefix_ids=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"prefix_ids holds ids \[1\]"):
        model.generate(ids, prefix_ids=torch.tensor([1, 0]), max_new_tokens=2)
    assert_unchanged(bank, before)


@pytest.mark.parametrize(
    "other",
    [
        lambda: tiny_bart(),
        lambda: tiny_gpt2(n_layer=3),
        lambda: tiny_gpt2(n_head=4),
        lambda: tiny_gpt2(n_embd=64),
    ],
    ids=["bart", "gpt2-3-layers", "gpt2-4-heads", "gpt2-wider"],
)
def test_bank_for_another_model_is_refused(tmp_path, other):
    _, bank, _ = gpt2_bank()
    bank.save(tmp_path / "bank.safetensors")
    loaded = PrefixBank.load(tmp_path / "bank.safetensors")
    before = snapshot(loaded)
    model = other()
    with pytest.raises(
        ValueError, match=r"this bank was built for gpt2 \(decoder: 2 layers x 2 heads x 16 dims\)"
    ):
        prefixrt.attach(model, loaded, backend=BACKEND)
    assert not prefixrt.is_attached(model)
    assert_unchanged(loaded, before)


def test_bart_bank_on_gpt2_is_refused():
    bank = PrefixBank.for_model(tiny_bart())
    with pytest.raises(ValueError, match=r"built for bart .* but the model is gpt2"):
        prefixrt.attach(tiny_gpt2(), bank, backend=BACKEND)


# -- corrupt files ----------------------------------------------------------------------------------------------
def _saved(tmp_path):
    _, bank, _ = gpt2_bank()
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    return bank, path


def _rewrite(path, tensors=None, **metadata_changes):
    """Rewrite a saved bank with changed tensors and/or header fields."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        old = {k: f.get_tensor(k) for k in f.keys()}
    metadata.update(metadata_changes)
    save_file(old if tensors is None else tensors(old), str(path), metadata=metadata)


def test_missing_file(tmp_path):
    with pytest.raises(BankFileError, match=r"does not exist"):
        PrefixBank.load(tmp_path / "nope.safetensors")


def test_truncated_file(tmp_path):
    bank, path = _saved(tmp_path)
    data = path.read_bytes()
    for cut in (4, 40, len(data) - 7):
        path.write_bytes(data[:cut])
        with pytest.raises(BankFileError, match=r"is not a readable safetensors file"):
            PrefixBank.load(path)


def test_garbage_header(tmp_path):
    path = tmp_path / "bank.safetensors"
    path.write_bytes(struct.pack("<Q", 40) + b"{this is not json at all!!!!!!!!!!!!!!!}" + b"\0" * 8)
    with pytest.raises(BankFileError, match=r"is not a readable safetensors file"):
        PrefixBank.load(path)
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")  # header length far past the end of the file
    with pytest.raises(BankFileError, match=r"is not a readable safetensors file"):
        PrefixBank.load(path)
    path.write_bytes(os.urandom(64))
    with pytest.raises(BankFileError):
        PrefixBank.load(path)


def test_non_bank_safetensors(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.randn(3, 4)}, str(path))
    with pytest.raises(BankFileError, match=r"is not a prefixrt bank \(metadata format=None\)"):
        PrefixBank.load(path)
    save_file({"weight": torch.randn(3, 4)}, str(path), metadata={"format": "pt"})
    with pytest.raises(BankFileError, match=r"is not a prefixrt bank \(metadata format='pt'\)"):
        PrefixBank.load(path)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"version": "99"}, r"bank format version '99'"),
        ({"spec": "{not json"}, r"corrupt bank header"),
        ({"entries": "[{]"}, r"corrupt bank header"),
        ({"dtype": "no_such_dtype"}, r"corrupt bank header"),
        (
            {
                "entries": json.dumps(
                    [{"id": 0, "name": "a", "lengths": {"decoder": 3}}, {"id": 0, "name": "b"}]
                )
            },
            r"bad or repeated entry id/name 0/'b'",
        ),
        (
            {"entries": json.dumps([{"id": -1, "name": "a", "lengths": {"decoder": 3}}])},
            r"bad or repeated entry",
        ),
        (
            {"entries": json.dumps([{"id": 5, "name": "a", "lengths": {"decoder": 3}}])},
            r"entry 'a' lacks tensor '5.decoder'",
        ),
    ],
)
def test_corrupt_header_fields(tmp_path, change, match):
    _, path = _saved(tmp_path)
    _rewrite(path, **change)
    with pytest.raises(BankFileError, match=match):
        PrefixBank.load(path)


def test_corrupt_tensors(tmp_path):
    _, path = _saved(tmp_path)

    def with_nan(tensors):
        tensors["1.decoder"] = tensors["1.decoder"].clone()
        tensors["1.decoder"][0, 0, 0, 0, 0] = float("nan")
        return tensors

    _rewrite(path, with_nan)
    with pytest.raises(
        BankFileError, match=r"is corrupt: kv\['decoder'\] for prefix 'p1' contains NaN or inf"
    ):
        PrefixBank.load(path)

    _, path = _saved(tmp_path)
    _rewrite(path, lambda t: {**t, "2.decoder": torch.randn(2, 2, 4, 5, 8)})
    with pytest.raises(
        BankFileError, match=r"is corrupt: kv\['decoder'\] for prefix 'p2'.*got \[2, 2, 4, 5, 8\]"
    ):
        PrefixBank.load(path)


def test_loading_a_corrupt_file_changes_nothing(tmp_path):
    bank, path = _saved(tmp_path)
    good = tmp_path / "good.safetensors"
    good.write_bytes(path.read_bytes())
    before = snapshot(bank)
    path.write_bytes(path.read_bytes()[:100])
    truncated = path.read_bytes()
    with pytest.raises(BankFileError):
        PrefixBank.load(path)
    assert path.read_bytes() == truncated  # load never writes
    assert_unchanged(bank, before)
    assert_banks_equal(bank, PrefixBank.load(good))


def test_an_entry_without_tokens_is_refused_and_the_bank_is_unchanged():
    from support.tiny import tiny_gpt2

    bank = prefixrt.PrefixBank.for_model(tiny_gpt2())
    s = bank.spec.sites["decoder"]
    bank.add("real", torch.randn(s.num_layers, 2, s.num_heads, 2, s.head_dim))
    with pytest.raises(ValueError, match="has no tokens"):
        bank.add("empty", torch.zeros(s.num_layers, 2, s.num_heads, 0, s.head_dim))
    assert bank.names == ["real"]
