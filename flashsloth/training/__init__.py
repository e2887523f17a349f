"""FlashSloth training, split by responsibility (``python -m flashsloth.train`` is the CLI):

- :mod:`.stages`: which parameters each stage trains, AdamW, the cosine schedule, gradient
  checkpointing, the autocast dtype;
- :mod:`.step`: one optimizer step (loss over answer tokens, accumulation, clipping),
  evaluation, random batches;
- :mod:`.checkpoints`: resumable checkpoints and ``final/``, written atomically (a kill at
  any instant loses nothing), completeness checks, clean-up of killed writes;
- :mod:`.distributed`: torchrun's process group, DDP / FSDP2, gathered state dicts;
- :mod:`.metrics`: metrics.jsonl, the loss curve, progress;
- :mod:`.cli` and :mod:`.loop`: the command line and the run it describes.
"""

from .checkpoints import (
    CheckpointWriteError,
    IncompleteCheckpointError,
    TrainState,
    checkpoint_problems,
    clean_leftovers,
    latest_checkpoint,
    load_model_state,
    save_checkpoint,
    save_final,
)
from .cli import build_parser, main
from .distributed import (
    DistInfo,
    full_model_state,
    setup_distributed,
    teardown_distributed,
    unwrap,
    wrap_model,
)
from .metrics import MetricsLog, plot_loss, read_metrics
from .stages import (
    ALWAYS_FROZEN,
    LARGE_PRESETS,
    PRECISIONS,
    STAGE1_TRAINABLE,
    STAGE_DEFAULTS,
    STAGES,
    autocast_dtype,
    build_optimizer,
    configure_stage,
    cosine_schedule,
    enable_gradient_checkpointing,
)
from .step import (
    StepResult,
    answer_tokens,
    evaluate,
    forward_loss,
    random_batch,
    train_step,
)

__all__ = [
    "ALWAYS_FROZEN",
    "LARGE_PRESETS",
    "PRECISIONS",
    "STAGE1_TRAINABLE",
    "STAGES",
    "STAGE_DEFAULTS",
    "CheckpointWriteError",
    "DistInfo",
    "IncompleteCheckpointError",
    "MetricsLog",
    "StepResult",
    "TrainState",
    "answer_tokens",
    "autocast_dtype",
    "build_optimizer",
    "build_parser",
    "checkpoint_problems",
    "clean_leftovers",
    "configure_stage",
    "cosine_schedule",
    "enable_gradient_checkpointing",
    "evaluate",
    "forward_loss",
    "full_model_state",
    "latest_checkpoint",
    "load_model_state",
    "main",
    "plot_loss",
    "random_batch",
    "read_metrics",
    "save_checkpoint",
    "save_final",
    "setup_distributed",
    "teardown_distributed",
    "train_step",
    "unwrap",
    "wrap_model",
]
