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

Note: [Partitioned fetch]
With N ranks on a node, replicated fetch copies every layer N times from host memory: the node's memory bandwidth
and PCIe switches carry N times the store per pass. With `partitioned_fetch`, local rank r copies only the r-th of
N equal chunks of the layer's bytes from the host into its slot, and the node's ranks all-gather the chunks into
every slot over the GPU interconnect (one in-place `all_gather_single` on a process group of the node's ranks), the
bandwidth-centric partitioning ZeRO-Infinity uses for its parameters. Both run on the copy stream, so the compute
stream's wait for the slot covers the gather too; bytes arrive the same, so the step is the same bit for bit.
- The chunk is `ceil(bytes / N)`; the last rank's chunk runs past the layer into the slot's spare room (slots are
  N bytes longer than the largest layer), and whatever it gathers there is never read.
- A collective needs every rank of the group to call it, in the same order, with the same size. Which layers a
  rank loads, and when, is decided by the same schedule on every rank (the slots, the prefetch window, the
  versions of the shared host bytes), except for routed experts: each rank routes its own tokens. So the gathered
  part of a routed layer is its base (attention, router, shared weights: `base_nbytes`), always, and the experts a
  rank needs, or the rest of a layer it loads whole, are copied by that rank alone after the gather.
- The group is made on the first load, when every rank of the job is in its first forward: `new_subgroups` is a
  collective of the whole job, and the process group may not exist yet when streaming is enabled.
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


class FetchPartition:
    """This rank's share of each layer copy under partitioned fetch (see Note: [Partitioned fetch])."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.rank = ranks.local_rank
        self.size = ranks.local_world_size
        self._group = None

    def chunk(self, nbytes: int) -> int:
        """Bytes of each rank's chunk of an `nbytes` copy."""
        return -(-nbytes // self.size)

    @property
    def group(self):
        """The process group of this node's ranks, made on first use by every rank of the job together.

        Raises:
            ValueError: torch.distributed is not initialised, or the ranks of a node are not numbered contiguously.
        """
        if self._group is None:
            self._group = _node_group(self.ranks)
        return self._group


def _node_group(ranks: Ranks):
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(
            "partitioned_fetch all-gathers each layer among the ranks of a node, but torch.distributed is not "
            "initialised in this process. Start the ranks with torchrun or accelerate launch and let the Trainer (or "
            "`torch.distributed.init_process_group`) set it up before the first forward, or turn partitioned_fetch "
            "off."
        )
    n = ranks.local_world_size
    if ranks.world_size % n or ranks.rank != ranks.node_rank * n + ranks.local_rank:
        raise ValueError(
            f"partitioned_fetch groups the ranks of each node, which must be numbered node by node with the same "
            f"number per node (rank = node rank x ranks per node + local rank), but this is rank {ranks.rank} of "
            f"{ranks.world_size}, local rank {ranks.local_rank} of {n} on node {ranks.node_rank}. Start every node "
            "with the same --nproc_per_node, or turn partitioned_fetch off."
        )
    group, _ = torch.distributed.new_subgroups(group_size=n)
    return group
