"""Train the GPT example with pipeline parallelism: the same model, a plan with ``pipeline_parallel``.

    python examples/gpt_small_pp/train.py                                        # PP 2 x DP 2 x TP 2, 1f1b
    python examples/gpt_small_pp/train.py --config examples/configs/gpt_tiny_pp4_interleaved.yaml
    python examples/gpt_small_pp/train.py --set plan.pipeline_parallel.schedule=gpipe

The model file is ``examples/gpt_small_tp/model.py``, unchanged: its ``tx.nn.LayerStack`` runs as
a scan without a pipeline axis and as pipeline stages under ``tx.PP``. The training loop is the
GPT example's (``examples/gpt_small_tp/train.py``); only the YAML differs.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from examples.gpt_small_tp.train import main as train  # noqa: E402

DEFAULT_CONFIG = os.path.join(ROOT, "examples", "configs", "gpt_tiny_pp2_dp2_tp2.yaml")


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", DEFAULT_CONFIG, *argv]
    return train(argv)


if __name__ == "__main__":
    main()
