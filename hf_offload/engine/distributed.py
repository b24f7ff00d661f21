"""Where this process stands among data-parallel ranks (torchrun, accelerate launch), and what streaming needs of
DDP.

Note: [Streamed layers under DistributedDataParallel]
Each rank streams the layers from its host store to its own device; DDP all-reduces the adapter gradients. Three
things make that exact and cheap:
- DDP's start-up broadcast copies every parameter of rank 0 into the other ranks (`_sync_module_states`). For a
  streamed model that would move every frozen weight over the process group, write into the host store (fatal for
  a store mapped read-only, and for nf4/int8 "hollow" placeholders, which cannot be written), and DDP would refuse
  a module whose frozen weights sit in host memory while the adapters sit on the GPU ("must be on the same type of
  devices"). The frozen weights are the same on every rank (each loaded the same checkpoint), so the streamed
  parameters are named in DDP's ignore list (`compat.DDP_IGNORE_ATTRIBUTE`) on the model and on its transformers
  model, whichever DDP wraps.
- Adapter gradients come back from the streamed layer's Function as ordinary autograd gradients (Note: [Streamed
  layer call] in layer_fn.py): each lands through its parameter's AccumulateGrad node, where DDP's reducer hooks
  sit, so buckets fill and all-reduce as the backward goes, as for an ordinary model. A parameter the recompute did
  not reach (an expert no token of this rank was routed to) gets an undefined gradient: the hook still fires, and
  DDP, which marks a parameter used only when its gradient is defined, treats it as unused on this rank, as it does
  for an ordinary model with find_unused_parameters=True.
- Full fine-tuning sends each streamed weight's gradient straight to its host master (trainable.py), outside
  autograd, so DDP would never average them: it is refused when there is more than one rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel processes of a job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current_ranks(env: dict[str, str] | None = None) -> Ranks:
    """The ranks of this process: from torch.distributed once it is initialised, else from the variables that
    torchrun and accelerate launch set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK)."""
    env = os.environ if env is None else env

    def number(name: str, default: int) -> int:
        value = env.get(name, "")
        return int(value) if value.strip().lstrip("-").isdigit() else default

    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if initialized else number("RANK", 0)
    world_size = torch.distributed.get_world_size() if initialized else number("WORLD_SIZE", 1)
    local_rank = number("LOCAL_RANK", 0)
    local_world_size = number("LOCAL_WORLD_SIZE", 1)
    node_rank = number("GROUP_RANK", number("NODE_RANK", 0))
    return Ranks(rank, world_size, local_rank, max(local_world_size, 1), node_rank)


def refuse_full_finetune(ranks: Ranks) -> None:
    """See Note: [Streamed layers under DistributedDataParallel].

    Raises:
        ValueError: full fine-tuning with more than one data-parallel process.
    """
    if ranks.distributed:
        raise ValueError(
            f"full_finetune with layer streaming runs in one process, but this is rank {ranks.rank} of "
            f"{ranks.world_size} data-parallel processes: the streamed weights' gradients go straight to their host "
            "masters and would not be averaged across ranks. Train LoRA adapters in data parallel (drop "
            "full_finetune), or run full fine-tuning as one process."
        )
