"""Two-stage FlashSloth training on one process or many (torchrun: DDP, or FSDP for 3.2B).

    # stage 1 (alignment): SAP + projector train; vision tower, LLM, query tokens, EmbQ frozen
    python -m flashsloth.train --stage 1 --preset tiny --data data/train.jsonl \\
        --tokenizer data/tokenizer.json --output-dir runs/stage1
    # stage 2 (instruction tuning): everything but the vision tower, from stage 1's weights
    python -m flashsloth.train --stage 2 --checkpoint runs/stage1/final --data data/train.jsonl \\
        --tokenizer data/tokenizer.json --output-dir runs/stage2
    # several GPUs (or CPU processes with the gloo backend): torchrun, nothing home-made
    torchrun --nproc-per-node 8 -m flashsloth.train --stage 2 --checkpoint ... --strategy fsdp

Stage defaults follow the original (docs: /work/shared/spec "Training"): AdamW, lr 1e-3
(stage 1) / 2e-5 (stage 2), cosine decay with 3% linear warm-up, no weight decay, gradient
clipping at 1.0. The data format is flashsloth.data's. docs/training.md describes the run's
output folder, checkpoints and resume.

The code lives in :mod:`flashsloth.training` (split by responsibility); this module is the
command line's entry point and keeps the names other code imports from ``flashsloth.train``:
:func:`configure_stage`, :func:`build_optimizer`, :func:`cosine_schedule`, :func:`train_step`,
:func:`evaluate`, :func:`random_batch`, :func:`enable_gradient_checkpointing`, ...
"""

from __future__ import annotations

import sys

from .training import *  # noqa: F403 (the names other code imports from here)
from .training import __all__ as _training_all
from .training import main
from .training.checkpoints import StateView as _StateView
from .training.cli import build_parser as _parser
from .training.distributed import dist_ready as _dist_ready
from .training.distributed import full_model_state as _full_model_state
from .training.loop import train

__all__ = [*_training_all, "train"]
# the names tests and older code import with a leading underscore
_PRIVATE = (_StateView, _parser, _dist_ready, _full_model_state)

if __name__ == "__main__":
    _code = main()
    from flashsloth_kernels import _env

    if _env.torchrun_env()[0] > 1:
        # several processes: end without interpreter finalization (see exit_process)
        from .training.distributed import exit_process

        exit_process(_code)
    sys.exit(_code)
