"""What ``generate()`` means in Hugging Face terms: ``prefix_ids`` through ``prepare_inputs_for_generation``,
generation arguments resolved as HF resolves them, and HF's own logits processors."""
