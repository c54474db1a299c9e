"""Read and write PEFT ``PrefixTuningConfig`` adapters as prefix-bank entries.

The file format
---------------
An adapter directory written by PEFT's ``save_pretrained`` holds ``adapter_config.json`` and
``adapter_model.safetensors`` with one tensor, ``prompt_embeddings`` of shape ``[P, L * 2 * token_dim]``
(``token_dim = heads * head_dim``, ``L = num_layers``). With ``prefix_projection=True`` (the paper's MLP
reparameterization) PEFT saves the *projected* values (``get_prompt_embedding_to_save`` runs the MLP), so both
kinds of adapter hold the K/V themselves and are read the same way; the MLP is not saved by PEFT.

PEFT's ``get_prompt`` views that tensor as ``[P, L * 2, heads, head_dim]`` and permutes it to
``[L * 2, heads, P, head_dim]``: row ``2 * l`` is layer ``l``'s K, row ``2 * l + 1`` its V. So an entry is
``prompt_embeddings.view(P, L, 2, H, D).permute(1, 2, 3, 0, 4)``, i.e. ``[layers, 2, heads, P, head_dim]``.

GPT-2 (``CAUSAL_LM``, one transformer submodule)
    Layer ``l`` of the adapter is layer ``l``'s self-attention prefix; exact.

BART (``SEQ_2_SEQ_LM``, two transformer submodules) -- as PEFT 0.21 applies it with transformers 5.x
    ``L`` is the model's ``num_hidden_layers`` (BART's *encoder* layer count). ``get_prompt`` concatenates the
    ``[.., 2L, ..]`` rows with themselves and splits them into chunks of 4, one per decoder layer, read as
    ``(self_k, self_v, cross_k, cross_v)`` by ``EncoderDecoderCache``; it then throws the cross-attention part
    away (``cross_attention_cache = DynamicCache()``) and the encoder never sees ``past_key_values``. So only the
    decoder self-attention gets a prefix, and decoder layer ``i`` gets adapter layer ``(2 * i) % L``
    (``L = 3``: layers 0, 2, 1; ``L = 2``: layers 0, 0; odd adapter layers of an even ``L`` are unused). This
    mapping was found by comparing PEFT's logits with an attached model under every candidate mapping
    (``tests/hf/test_peft_interop.py`` checks it). A BART with more decoder than encoder layers makes PEFT itself
    fail, so such adapters are refused.

prefixrt never unpickles: an adapter that only has ``adapter_model.bin`` is refused with an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from prefixrt.bank.spec import ModelSpec
from prefixrt.fileio import atomic_write, atomic_write_json

__all__ = [
    "PeftAdapterError",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "peft_layer_map",
    "read_peft_config",
    "read_peft_prefix",
    "write_peft_prefix",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin")
EMBEDDING_KEY = "prompt_embeddings"
# model type -> (PEFT task type written on export, num_transformer_submodules PEFT uses for it)
TASK_BY_MODEL = {"gpt2": ("CAUSAL_LM", 1), "bart": ("SEQ_2_SEQ_LM", 2)}


class PeftAdapterError(ValueError):
    """A PEFT adapter directory is missing, corrupt, not prefix tuning, or built for another architecture."""


def peft_layer_map(model_type: str, num_layers: int, num_decoder_layers: int) -> list[int]:
    """Which adapter layer feeds each decoder self-attention layer, as PEFT applies a prefix-tuning adapter.

    Parameters
    ----------
    model_type : ``"gpt2"`` or ``"bart"``
    num_layers : the adapter's ``num_layers`` (PEFT sets it to the model's ``num_hidden_layers``)
    num_decoder_layers : the model's decoder layers

    Returns
    -------
    list of ``num_decoder_layers`` adapter layer indices (GPT-2: ``0 .. L-1``; BART: ``(2 * i) % L``).
    """
    if model_type == "bart":
        return [(2 * i) % num_layers for i in range(num_decoder_layers)]
    return list(range(num_decoder_layers))


def read_peft_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a PEFT prefix-tuning adapter, with its fields checked."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise PeftAdapterError(f"adapter_dir {str(adapter_dir)!r} is not a directory")
    config_path = adapter_dir / CONFIG_NAME
    if not config_path.is_file():
        raise PeftAdapterError(f"adapter_dir {str(adapter_dir)!r} has no {CONFIG_NAME} (not a PEFT adapter?)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PeftAdapterError(f"{str(config_path)!r} is not readable JSON ({err})") from err
    if not isinstance(config, dict):
        raise PeftAdapterError(f"{str(config_path)!r} must hold a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    if peft_type != "PREFIX_TUNING":
        raise PeftAdapterError(
            f"{str(config_path)!r} has peft_type={peft_type!r}; prefixrt reads only PREFIX_TUNING adapters"
        )
    for key in ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise PeftAdapterError(f"{str(config_path)!r}: {key} must be a positive integer, got {value!r}")
    if config["token_dim"] % config["num_attention_heads"]:
        raise PeftAdapterError(
            f"{str(config_path)!r}: token_dim={config['token_dim']} is not a multiple of "
            f"num_attention_heads={config['num_attention_heads']}"
        )
    return config


def _describe_adapter(config: Mapping[str, Any]) -> str:
    heads = config["num_attention_heads"]
    return (
        f"{config.get('task_type') or 'an unknown task type'} with {config['num_layers']} layers x {heads} heads x "
        f"{config['token_dim'] // heads} dims (token_dim={config['token_dim']})"
    )


def _check_adapter_fits(config: Mapping[str, Any], spec: ModelSpec, where: str) -> None:
    """Raise unless the adapter's layers/heads/token_dim and task fit the bank's architecture."""
    if spec.model_type not in TASK_BY_MODEL:
        raise PeftAdapterError(
            f"PEFT adapters are supported for {sorted(TASK_BY_MODEL)}, not {spec.model_type}"
        )
    task_type, submodules = TASK_BY_MODEL[spec.model_type]
    adapter_submodules = config.get("num_transformer_submodules") or (
        2 if config.get("task_type") == "SEQ_2_SEQ_LM" else 1
    )
    decoder = spec.sites["decoder"]
    # PEFT sets num_layers from num_hidden_layers: the decoder's for GPT-2, the encoder's for BART.
    layers = spec.sites["encoder"].num_layers if spec.model_type == "bart" else decoder.num_layers
    heads, token_dim = decoder.num_heads, decoder.num_heads * decoder.head_dim
    fits = (
        adapter_submodules == submodules
        and config["num_layers"] == layers
        and config["num_attention_heads"] == heads
        and config["token_dim"] == token_dim
    )
    if not fits:
        raise PeftAdapterError(
            f"adapter {where} was built for {_describe_adapter(config)}, num_transformer_submodules="
            f"{adapter_submodules}, but the bank is {spec.describe()}: a PEFT adapter for it is {task_type} with "
            f"{layers} layers x {heads} heads (token_dim={token_dim}), num_transformer_submodules={submodules}"
        )
    if spec.model_type == "bart" and decoder.num_layers > layers:
        raise PeftAdapterError(
            f"the bank is {spec.describe()}: PEFT prefix tuning gives only num_hidden_layers={layers} (encoder) "
            f"layers to {decoder.num_layers} decoder layers and fails itself on such a model"
        )


def read_peft_prefix(adapter_dir: str | os.PathLike, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Read a PEFT prefix-tuning adapter into bank K/V for ``spec``.

    Parameters
    ----------
    adapter_dir : directory written by ``PeftModel.save_pretrained`` (``adapter_config.json`` and
        ``adapter_model.safetensors``)
    spec : the bank's :class:`~prefixrt.bank.spec.ModelSpec`

    Returns
    -------
    ``{"decoder": Tensor [decoder_layers, 2, heads, P, head_dim]}`` in the file's dtype (GPT-2: exact; BART:
    decoder self-attention only, with PEFT's layer mapping :func:`peft_layer_map`).

    Raises
    ------
    PeftAdapterError
        Missing files, only a pickled ``.bin``, corrupt safetensors, not ``PREFIX_TUNING``, a shape that does not
        match the config, non-finite values, or an adapter built for another architecture.
    """
    adapter_dir = Path(adapter_dir)
    config = read_peft_config(adapter_dir)
    _check_adapter_fits(config, spec, repr(str(adapter_dir)))
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [name for name in PICKLE_NAMES if (adapter_dir / name).is_file()]
        if pickled:
            raise PeftAdapterError(
                f"adapter_dir {str(adapter_dir)!r} has only {pickled[0]}: prefixrt only reads safetensors "
                f"({WEIGHTS_NAME}) and never unpickles files; re-save the adapter with "
                "save_pretrained(..., safe_serialization=True)"
            )
        raise PeftAdapterError(f"adapter_dir {str(adapter_dir)!r} has no {WEIGHTS_NAME}")

    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            if EMBEDDING_KEY not in keys:
                raise PeftAdapterError(
                    f"{str(weights)!r} has no {EMBEDDING_KEY!r} tensor (keys: {keys}); not a prefix-tuning adapter"
                )
            embedding = f.get_tensor(EMBEDDING_KEY)
    except PeftAdapterError:
        raise
    except Exception as err:  # safetensors raises several types for truncated or foreign files
        raise PeftAdapterError(f"{str(weights)!r} is not a readable safetensors file ({err})") from err

    num_tokens, num_layers = config["num_virtual_tokens"], config["num_layers"]
    heads = config["num_attention_heads"]
    head_dim = config["token_dim"] // heads
    expected = (num_tokens, num_layers * 2 * config["token_dim"])
    if tuple(embedding.shape) != expected:
        raise PeftAdapterError(
            f"{str(weights)!r}: {EMBEDDING_KEY} has shape {list(embedding.shape)}, but the config says "
            f"[num_virtual_tokens, num_layers * 2 * token_dim] = {list(expected)}"
            + (
                " (prefix_projection=True adapters must be saved by PEFT, which stores the projected K/V)"
                if config.get("prefix_projection")
                else ""
            )
        )
    if not embedding.is_floating_point():
        raise PeftAdapterError(
            f"{str(weights)!r}: {EMBEDDING_KEY} must be floating point, got {embedding.dtype}"
        )
    if not torch.isfinite(embedding).all():
        raise PeftAdapterError(f"{str(weights)!r}: {EMBEDDING_KEY} contains NaN or inf")

    # [P, L*2*H*D] -> [P, L, 2, H, D] -> [L, 2, H, P, D]
    layers = embedding.view(num_tokens, num_layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4)
    decoder_layers = spec.sites["decoder"].num_layers
    mapping = peft_layer_map(spec.model_type, num_layers, decoder_layers)
    return {"decoder": layers[mapping].contiguous()}


def write_peft_prefix(
    entry_kv: Mapping[str, torch.Tensor],
    spec: ModelSpec,
    adapter_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write one bank entry as a PEFT prefix-tuning adapter that ``PeftModel.from_pretrained`` loads.

    Parameters
    ----------
    entry_kv : ``{site: Tensor [layers, 2, heads, P, head_dim]}`` (``PrefixBank.entry``)
    spec : the bank's :class:`~prefixrt.bank.spec.ModelSpec`
    adapter_dir : created if needed; ``adapter_model.safetensors`` then ``adapter_config.json`` are each written
        atomically (a reader never sees a half-written file)
    base_model_name_or_path : recorded in the config (PEFT uses it to find the base model)

    GPT-2 is exact. BART is written only when PEFT can express the entry: a decoder-only prefix whose decoder
    layers that PEFT feeds from the same adapter layer (:func:`peft_layer_map`) hold equal K/V; adapter layers PEFT
    never reads are zero.
    """
    if spec.model_type not in TASK_BY_MODEL:
        raise PeftAdapterError(f"PEFT export supports {sorted(TASK_BY_MODEL)}, not {spec.model_type}")
    task_type, submodules = TASK_BY_MODEL[spec.model_type]
    decoder_spec = spec.sites["decoder"]
    kv = entry_kv.get("decoder")
    if kv is None or kv.dim() != 5 or kv.shape[3] == 0:
        raise PeftAdapterError("entry_kv has no decoder prefix: PEFT prefix tuning needs one")
    expected = (decoder_spec.num_layers, 2, decoder_spec.num_heads, decoder_spec.head_dim)
    if (kv.shape[0], kv.shape[1], kv.shape[2], kv.shape[4]) != expected:
        raise PeftAdapterError(
            f"entry_kv['decoder'] must be [layers, 2, heads, P, head_dim] with {expected} for {spec.describe()}, "
            f"got {list(kv.shape)}"
        )
    for site, tensor in entry_kv.items():
        if site != "decoder" and tensor.shape[3] > 0:
            raise PeftAdapterError(
                f"the entry has a {site!r} prefix of length {tensor.shape[3]}: PEFT prefix tuning applies only the "
                "decoder self-attention prefix, so it cannot be exported without losing it"
            )
    if not torch.isfinite(kv).all():
        raise PeftAdapterError("entry_kv['decoder'] contains NaN or inf")
    kv = kv.detach().cpu()
    num_tokens, heads, head_dim = kv.shape[3], decoder_spec.num_heads, decoder_spec.head_dim

    if spec.model_type == "bart":
        num_layers = spec.sites["encoder"].num_layers
        if decoder_spec.num_layers > num_layers:
            raise PeftAdapterError(
                f"PEFT cannot apply prefix tuning to {spec.describe()} (more decoder than encoder layers)"
            )
        layers = kv.new_zeros(num_layers, 2, heads, num_tokens, head_dim)
        source: dict[int, int] = {}
        for i, j in enumerate(peft_layer_map("bart", num_layers, decoder_spec.num_layers)):
            if j in source and not torch.equal(kv[source[j]], kv[i]):
                raise PeftAdapterError(
                    f"PEFT feeds decoder layers {source[j]} and {i} of {spec.describe()} from the same adapter "
                    f"layer {j}, but the entry holds different K/V for them: PEFT cannot express this prefix"
                )
            source[j] = i
            layers[j] = kv[i]
    else:
        num_layers = decoder_spec.num_layers
        layers = kv

    # [L, 2, H, P, D] -> [P, L, 2, H, D] -> [P, L*2*H*D]
    embedding = (
        layers.permute(3, 0, 1, 2, 4).reshape(num_tokens, num_layers * 2 * heads * head_dim).contiguous()
    )
    token_dim = heads * head_dim
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "encoder_hidden_size": token_dim,
        "inference_mode": True,
        "init_weights": None,
        "modules_to_save": None,
        "num_attention_heads": heads,
        "num_layers": num_layers,
        "num_transformer_submodules": submodules,
        "num_virtual_tokens": num_tokens,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": False,
        "revision": None,
        "task_type": task_type,
        "token_dim": token_dim,
    }

    from safetensors.torch import save_file

    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    # Weights first, config last: a directory with a config always has its weights.
    atomic_write(
        adapter_dir / WEIGHTS_NAME,
        lambda tmp: save_file({EMBEDDING_KEY: embedding}, str(tmp), metadata={"format": "pt"}),
    )
    atomic_write_json(adapter_dir / CONFIG_NAME, config)
