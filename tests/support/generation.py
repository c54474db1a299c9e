"""Generation through a model attached to a bank (this module holds no tests)."""

import torch

import prefixrt


def greedy_generate_attached(
    model, bank, ids: torch.Tensor, mask: torch.Tensor, names: list, steps: int, backend: str = "reference"
) -> torch.Tensor:
    """``model.generate`` (greedy, ``steps`` new tokens, pad id 1) with ``bank`` attached through ``backend``
    and row ``b`` on prefix ``names[b]``; the model is detached again afterwards."""
    prefixrt.attach(model, bank, backend=backend)
    try:
        return model.generate(
            ids,
            attention_mask=mask,
            prefix_ids=bank.ids(names),
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=1,
        )
    finally:
        prefixrt.detach(model)
