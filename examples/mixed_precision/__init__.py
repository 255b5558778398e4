"""Mixed precision: bfloat16, and float16 with dynamic loss scaling, against float32 (GPT tiny)."""
