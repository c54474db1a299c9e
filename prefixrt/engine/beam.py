"""Beam search with Hugging Face's semantics (transformers 5.x ``GenerationMixin._beam_search``), on the items
that are still searching.

HF keeps, per input, ``num_beams`` running beams and ``num_beams`` finished hypotheses in static tensors, takes
the top ``K = max(2, 1 + #eos) * num_beams`` continuations over all beams at each step, moves those that hit a
stopping criterion (EOS, ``max_length``) into the finished set with the length penalty
``score / (generated_length ** length_penalty)``, and stops when no input can improve (the ``early_stopping``
heuristics). We do the same arithmetic in the same order on the same tensors, restricted to the inputs
(*items*) that are not done: an item is done when its finished set can no longer change (its improvement
heuristic failed, or ``early_stopping=True`` and all its slots are finished) -- from then on HF only adds
``-1e9`` penalties to its candidates, so dropping it changes no output. Its rows then leave the batch.

The cache is reordered by index: the chosen beams' source rows become the new rows of the per-row (generated)
K/V store; the prompt's K/V, stored once per item, are never copied.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BeamSearch"]


def _gather_beams(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tensor [A, beams, ...]`` gathered along the beam dim by ``indices [A, k]``."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


class BeamSearch:
    """State of a beam search over ``batch_size`` items (see the module docstring).

    Parameters
    ----------
    config : GenerationConfig with final lengths and special-token tensors
    prompt : LongTensor ``[B, T]``, the sequence so far per item (GPT-2: the padded prompt; BART: the start token)
    """

    def __init__(self, config, prompt: torch.Tensor):
        device = prompt.device
        batch, cur_len = prompt.shape
        self.num_beams = nb = config.num_beams
        self.max_length = config.max_length
        self.length_penalty = config.length_penalty
        self.early_stopping = config.early_stopping
        self.num_return = config.num_return_sequences
        self.eos = config._eos_token_tensor
        pad = config._pad_token_tensor
        self.prompt_len = self.cur_len = cur_len
        n_eos = self.eos.shape[0] if self.eos is not None else 0
        self.beams_to_keep = max(2, 1 + n_eos) * nb
        self.top_num_beam_mask = torch.cat(
            (torch.ones(nb, dtype=torch.bool), torch.zeros(self.beams_to_keep - nb, dtype=torch.bool))
        ).to(device)
        # HF: `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1` (a pad id of 0 is falsy).
        if self.eos is not None:
            fill = pad if pad is not None and bool(pad) else self.eos[0]
        else:
            fill = -1
        self.running_sequences = torch.full(
            (batch, nb, self.max_length), fill, dtype=torch.int64, device=device
        )
        self.running_sequences[:, :, :cur_len] = prompt[:, None, :]
        self.sequences = self.running_sequences.clone()
        self.running_beam_scores = torch.zeros((batch, nb), dtype=torch.float, device=device)
        self.running_beam_scores[:, 1:] = -1e9
        self.beam_scores = torch.full((batch, nb), -1e9, dtype=torch.float, device=device)
        self.is_sent_finished = torch.zeros((batch, nb), dtype=torch.bool, device=device)
        self.heuristic_unsatisfied = torch.ones((batch, 1), dtype=torch.bool, device=device)
        width = self.max_length - cur_len
        self.running_beam_indices = torch.full((batch, nb, width), -1, dtype=torch.int32, device=device)
        self.beam_indices = self.running_beam_indices.clone()
        self.items = torch.arange(batch, device=device)  # original index of each item still searching
        self.out_sequences = self.sequences[:, : self.num_return].clone()
        self.out_indices = self.beam_indices[:, : self.num_return].clone()

    @property
    def active(self) -> int:
        return self.items.shape[0]

    def step(self, logits: torch.Tensor, processors) -> tuple[torch.Tensor, list[int]]:
        """Advance by one token given the running beams' logits ``[A * nb, V]``.

        Returns ``(tokens [A' * nb], rows)``: the token each surviving beam feeds next, and for each of those
        beams the current row whose generated K/V it continues (item-major, done items removed).
        """
        nb, cur_len, prompt_len = self.num_beams, self.cur_len, self.prompt_len
        items = self.active
        device = logits.device
        log_probs = nn.functional.log_softmax(logits.float(), dim=-1)
        if processors:
            flat = self.running_sequences[:, :, :cur_len].reshape(items * nb, cur_len)
            rows = (self.items[:, None] * nb + torch.arange(nb, device=device)).reshape(-1)
            log_probs = processors(flat, log_probs, rows)
        vocab = log_probs.shape[-1]
        log_probs = log_probs.view(items, nb, vocab) + self.running_beam_scores[:, :, None]
        log_probs = log_probs.reshape(items, nb * vocab)

        # c. top-K continuations over all beams
        topk_log_probs, topk_indices = torch.topk(log_probs, k=self.beams_to_keep)
        topk_beam = topk_indices // vocab
        topk_running_beam_indices = _gather_beams(self.running_beam_indices, topk_beam)
        topk_running_sequences = _gather_beams(self.running_sequences, topk_beam)
        topk_ids = topk_indices % vocab
        topk_running_sequences[:, :, cur_len] = topk_ids
        local_rows = topk_beam + torch.arange(items, device=device).view(-1, 1) * nb
        topk_running_beam_indices[:, :, cur_len - prompt_len] = local_rows.to(torch.int32)

        # d. which continuations hit a stopping criterion (max_length, EOS)
        hits = torch.full(topk_ids.shape, cur_len + 1 >= self.max_length, dtype=torch.bool, device=device)
        if self.eos is not None:
            hits = hits | torch.isin(topk_ids, self.eos)

        # e. the running beams of the next step
        topk_running_log_probs = topk_log_probs + hits.to(torch.float32) * -1.0e9
        next_topk = torch.topk(topk_running_log_probs, k=nb)[1]
        self.running_sequences = _gather_beams(topk_running_sequences, next_topk)
        self.running_beam_scores = _gather_beams(topk_running_log_probs, next_topk)
        self.running_beam_indices = _gather_beams(topk_running_beam_indices, next_topk)

        # f. the finished hypotheses
        just_finished = hits & self.top_num_beam_mask[None, :]
        scored = topk_log_probs / ((cur_len + 1 - prompt_len) ** self.length_penalty)
        full = torch.all(self.is_sent_finished, dim=-1, keepdim=True) & (self.early_stopping is True)
        scored += full.to(torch.float32) * -1.0e9
        scored += (~self.heuristic_unsatisfied).to(torch.float32) * -1.0e9
        scored += (~just_finished) * -1.0e9
        merged_sequences = torch.cat((self.sequences, topk_running_sequences), dim=1)
        merged_scores = torch.cat((self.beam_scores, scored), dim=1)
        merged_indices = torch.cat((self.beam_indices, topk_running_beam_indices), dim=1)
        merged_finished = torch.cat((self.is_sent_finished, just_finished), dim=1)
        best = torch.topk(merged_scores, k=nb)[1]
        self.sequences = _gather_beams(merged_sequences, best)
        self.beam_scores = _gather_beams(merged_scores, best)
        self.beam_indices = _gather_beams(merged_indices, best)
        self.is_sent_finished = _gather_beams(merged_finished, best)

        # g. cache order, early-stop heuristic, per-item stop
        source_rows = self.running_beam_indices[..., cur_len - prompt_len].reshape(-1).tolist()
        self.cur_len = cur_len = cur_len + 1
        self._update_heuristic()
        done = ~self.heuristic_unsatisfied[:, 0] | torch.all(hits, dim=-1)
        if self.early_stopping is True:
            done = done | torch.all(self.is_sent_finished, dim=-1)
        keep = self._retire(done)
        rows = [source_rows[a * nb + j] for a in keep for j in range(nb)]
        tokens = self.running_sequences[:, :, cur_len - 1].reshape(-1)
        return tokens, rows

    def _update_heuristic(self) -> None:
        """HF's ``_check_early_stop_heuristic``."""
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_length - self.prompt_len
        else:
            best_length = self.cur_len - self.prompt_len
        best_running = self.running_beam_scores[:, :1] / (best_length**self.length_penalty)
        worst_finished = torch.where(
            self.is_sent_finished, torch.min(self.beam_scores, dim=1, keepdim=True)[0], -1.0e9
        )
        self.heuristic_unsatisfied = self.heuristic_unsatisfied & torch.any(
            best_running > worst_finished, dim=-1, keepdim=True
        )

    def _retire(self, done: torch.Tensor) -> list[int]:
        """Store the outputs of done items, drop them from the state; returns the kept local indices."""
        done_list = done.tolist()
        if any(done_list):
            idx = torch.tensor([a for a, d in enumerate(done_list) if d], device=done.device)
            orig = self.items[idx]
            self.out_sequences[orig] = self.sequences[idx, : self.num_return]
            self.out_indices[orig] = self.beam_indices[idx, : self.num_return]
        keep = [a for a, d in enumerate(done_list) if not d]
        if len(keep) < len(done_list):
            k = torch.tensor(keep, dtype=torch.long, device=done.device)
            for name in (
                "running_sequences",
                "sequences",
                "running_beam_scores",
                "beam_scores",
                "is_sent_finished",
                "heuristic_unsatisfied",
                "running_beam_indices",
                "beam_indices",
                "items",
            ):
                setattr(self, name, getattr(self, name)[k])
        return keep

    def output(self) -> torch.Tensor:
        """``[B * num_return_sequences, prompt_len + longest returned generation]``, best first per item."""
        batch = self.out_sequences.shape[0]
        indices = self.out_indices.reshape(batch * self.num_return, -1)
        generated = int(((indices + 1).bool()).sum(dim=1).max()) if indices.numel() else 0
        sequences = self.out_sequences.reshape(batch * self.num_return, -1)
        return sequences[:, : self.prompt_len + generated]
