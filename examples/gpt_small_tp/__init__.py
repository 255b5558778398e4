"""GPT-small language model trained with tensor parallelism."""
