"""lm-evaluation-harness adapter: `--model swiftkv` = lm-eval's `hf` model with SwiftKV on or off.

    python -m swiftkv.eval.lm_eval_adapter --model swiftkv \\
        --model_args pretrained=runs/smollm2-swiftkv/model,swiftkv=True,dtype=bfloat16 --tasks hellaswag

(`import swiftkv` alone also lets lm-eval's own `hf` type load a SwiftKV checkpoint from Python.)
"""

from __future__ import annotations

import sys

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import swiftkv  # noqa: F401  (registers llama_swiftkv / qwen2_swiftkv with the Auto classes)


@register_model("swiftkv")
class SwiftKVLM(HFLM):
    """`swiftkv=False` evaluates a SwiftKV checkpoint as its own base model (the teacher)."""

    def __init__(self, swiftkv: bool = True, **kwargs):
        super().__init__(**kwargs)
        if hasattr(self.model.config, "swiftkv"):
            self.model.config.swiftkv = bool(swiftkv)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    sys.exit(main())
