"""Training toolkit: the block-diffusion objective, example sources, LoRA, and a resumable data-parallel trainer
(DDP, or FSDP2 with sharded checkpoints: fsdp.py; `dgemma train plan` sizes it: train_memory.py).

    from dgemma.train import Trainer, TrainConfig, TextCorpusSource
    trainer = Trainer(model, source, TrainConfig(steps=1000, batch_size=16), "runs/a")
    trainer.train()
    trainer.export()          # runs/a/final: HF layout (+ tokenizer, + adapter/ for LoRA), for dgemma and transformers

The command line is `dgemma train` (dgemma/train/cli.py).
"""

from .data import (
    Batch,
    CallableSource,
    ChunkedSource,
    ExampleSource,
    TextCorpusSource,
    as_source,
    collate,
    layout,
    make_source,
    register_source,
)
from .evaluation import evaluate
from .lora import LoRAConfig, apply_lora, merge_lora, unmerge_lora
from .peft_adapter import read_adapter, save_adapter
from .objective import DecoderSegment, EncoderSegment, ObjectiveConfig, draw, loss, loss_parts
from .trainer import TrainConfig, Trainer, setup_distributed

__all__ = [
    "Batch",
    "CallableSource",
    "ChunkedSource",
    "DecoderSegment",
    "EncoderSegment",
    "ExampleSource",
    "LoRAConfig",
    "ObjectiveConfig",
    "TextCorpusSource",
    "TrainConfig",
    "Trainer",
    "apply_lora",
    "as_source",
    "collate",
    "draw",
    "evaluate",
    "layout",
    "loss",
    "loss_parts",
    "make_source",
    "merge_lora",
    "read_adapter",
    "register_source",
    "save_adapter",
    "setup_distributed",
    "unmerge_lora",
]
