"""BART with prefixes at all three sites (encoder self-attention, decoder self-attention, cross-attention):
equal to an independent eager float64 implementation, row-independent in mixed batches, base model for id -1."""

import pytest
import torch
from support.tiny import left_padded, random_bank, random_ids, tiny_bart

import prefixrt


def eager_attention(x_q, x_kv, attn, prefix_kv, visible):
    """One BART attention module written out. x_q [Tq, C], x_kv [Tk, C], prefix_kv [2, H, P, D],
    visible [Tq, Tk] (own keys only; the prefix is always visible)."""
    heads, head_dim = attn.num_heads, attn.head_dim
    q = attn.q_proj(x_q).view(-1, heads, head_dim).transpose(0, 1)  # [H, Tq, D]
    k = attn.k_proj(x_kv).view(-1, heads, head_dim).transpose(0, 1)
    v = attn.v_proj(x_kv).view(-1, heads, head_dim).transpose(0, 1)
    k = torch.cat([prefix_kv[0], k], dim=1)
    v = torch.cat([prefix_kv[1], v], dim=1)
    full_visible = torch.cat(
        [torch.ones(visible.shape[0], prefix_kv.shape[2], dtype=torch.bool), visible], dim=1
    )
    scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5
    scores = scores.masked_fill(~full_visible, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # [H, Tq, D]
    return attn.out_proj(out.transpose(0, 1).reshape(x_q.shape[0], -1))


def eager_bart_row(model, bank, name, src, src_mask, dec, dec_mask):
    """Logits [Tdec, V] for one row, from the weights, with the entry's prefixes at every site."""
    base, cfg = model.model, model.config
    act = torch.nn.functional.gelu
    kv = bank.entry(name) if name is not None else None

    def site_kv(site, layer, heads, head_dim):
        if kv is None:
            return torch.zeros(2, heads, 0, head_dim, dtype=torch.float64)
        return kv[site][layer]

    src_vis = src_mask.bool()[None, :].expand(src.shape[0], -1)
    h = base.encoder.embed_tokens(src) + base.encoder.embed_positions.weight[torch.arange(src.shape[0]) + 2]
    h = base.encoder.layernorm_embedding(h)
    for i, layer in enumerate(base.encoder.layers):
        a = layer.self_attn
        h = layer.self_attn_layer_norm(
            h + eager_attention(h, h, a, site_kv("encoder", i, a.num_heads, a.head_dim), src_vis)
        )
        h = layer.final_layer_norm(h + layer.fc2(act(layer.fc1(h))))
    enc = h

    shift = kv["decoder"].shape[3] if kv is not None else 0
    t = dec.shape[0]
    dec_vis = dec_mask.bool()[None, :] & torch.ones(t, t, dtype=torch.bool).tril()
    cross_vis = src_mask.bool()[None, :].expand(t, -1)
    h = base.decoder.embed_tokens(dec) + base.decoder.embed_positions.weight[torch.arange(t) + shift + 2]
    h = base.decoder.layernorm_embedding(h)
    for i, layer in enumerate(base.decoder.layers):
        a, c = layer.self_attn, layer.encoder_attn
        h = layer.self_attn_layer_norm(
            h + eager_attention(h, h, a, site_kv("decoder", i, a.num_heads, a.head_dim), dec_vis)
        )
        h = layer.encoder_attn_layer_norm(
            h + eager_attention(h, enc, c, site_kv("cross", i, c.num_heads, c.head_dim), cross_vis)
        )
        h = layer.final_layer_norm(h + layer.fc2(act(layer.fc1(h))))
    assert cfg.scale_embedding is False
    return model.lm_head(h) + model.final_logits_bias[0]


def right_padded(lengths, total, seed):
    """BART's encoder positions ignore padding, so sources are right-padded (as BART tokenizers do)."""
    ids, mask = left_padded(lengths, total, seed=seed)
    return ids.flip(1), mask.flip(1)


@pytest.fixture
def setup():
    model = tiny_bart().double()
    bank = random_bank(model, {"sum": 7, "t2t": 3, "dec_only": 4}, scale=0.5)
    bank.to(torch.float64)
    # An entry with a decoder prefix only (as PEFT applies it to BART).
    bank.remove("dec_only")
    g = torch.Generator().manual_seed(5)
    s = bank.spec.sites["decoder"]
    bank.add(
        "dec_only",
        {
            "decoder": torch.randn(
                s.num_layers, 2, s.num_heads, 4, s.head_dim, generator=g, dtype=torch.float64
            )
        },
    )
    return model, bank


def test_all_three_sites_equal_an_independent_float64_implementation(setup):
    model, bank = setup
    src, src_mask = left_padded([7, 4, 6, 5], 7, seed=1)
    dec = random_ids(4, 5, seed=2)
    dec_mask = torch.ones(4, 5, dtype=torch.long)
    dec_mask[1, 4:] = 0  # right padding on the decoder side
    names = ["sum", "t2t", None, "dec_only"]
    prefixrt.attach(model, bank)
    out = model(
        src,
        attention_mask=src_mask,
        decoder_input_ids=dec,
        decoder_attention_mask=dec_mask,
        prefix_ids=bank.ids(names),
    ).logits
    for row, name in enumerate(names):
        want = eager_bart_row(model, bank, name, src[row], src_mask[row], dec[row], dec_mask[row])
        real = dec_mask[row].bool()
        torch.testing.assert_close(out[row][real], want[real], rtol=1e-9, atol=1e-9)


def test_no_prefix_rows_equal_the_base_model(setup):
    model, bank = setup
    src, src_mask = left_padded([7, 3], 7, seed=3)
    dec = random_ids(2, 4, seed=4)
    base = model(src, attention_mask=src_mask, decoder_input_ids=dec).logits
    prefixrt.attach(model, bank)
    out = model(src, attention_mask=src_mask, decoder_input_ids=dec, prefix_ids=torch.tensor([-1, -1])).logits
    torch.testing.assert_close(out, base, rtol=1e-10, atol=1e-10)


def test_mixed_batch_rows_equal_rows_alone(setup):
    model, bank = setup
    src, src_mask = right_padded([7, 4, 6], 7, seed=5)
    dec = random_ids(3, 5, seed=6)
    prefix_ids = bank.ids(["t2t", "sum", "dec_only"])
    prefixrt.attach(model, bank)
    batch = model(src, attention_mask=src_mask, decoder_input_ids=dec, prefix_ids=prefix_ids).logits
    for row in range(3):
        real = src_mask[row].bool()
        alone = model(
            src[row : row + 1, real],
            decoder_input_ids=dec[row : row + 1],
            prefix_ids=prefix_ids[row : row + 1],
        ).logits
        torch.testing.assert_close(batch[row], alone[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_generate_mixed_batch_rows_equal_rows_alone(setup, mode):
    model, bank = setup
    src, src_mask = right_padded([6, 3, 5], 6, seed=7)
    prefix_ids = bank.ids(["sum", None, "t2t"])
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    if mode == "beam":
        kwargs.update(num_beams=3, num_return_sequences=2)
    prefixrt.attach(model, bank)
    batch = model.generate(src, attention_mask=src_mask, prefix_ids=prefix_ids, **kwargs)
    per = kwargs.get("num_return_sequences", 1)
    for row in range(3):
        real = src_mask[row].bool()
        alone = model.generate(src[row : row + 1, real], prefix_ids=prefix_ids[row : row + 1], **kwargs)
        torch.testing.assert_close(batch[row * per : (row + 1) * per], alone)


def test_detach_restores_bart(setup):
    model, bank = setup
    src, src_mask = left_padded([5, 3], 5, seed=8)
    dec = random_ids(2, 3, seed=9)
    before = model(src, attention_mask=src_mask, decoder_input_ids=dec).logits
    prefixrt.attach(model, bank)
    prefixrt.detach(model)
    assert not model.model.decoder.embed_positions._forward_hooks
    torch.testing.assert_close(
        model(src, attention_mask=src_mask, decoder_input_ids=dec).logits, before, rtol=0, atol=0
    )


def test_bart_bank_rejected_by_gpt2_and_vice_versa(setup):
    from support.tiny import tiny_gpt2

    _, bank = setup
    with pytest.raises(ValueError, match="bank was built for bart"):
        prefixrt.attach(tiny_gpt2(), bank)
