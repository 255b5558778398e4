"""The GPT example trained with pipeline parallelism (the same model file as gpt_small_tp)."""
