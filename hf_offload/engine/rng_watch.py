"""`RngWatch`: did a piece of code draw random numbers, and if so, undo the draws.

Computing something in pieces (a head in chunks of tokens, an MLP in tiles) is exact only when that something draws
no random numbers: a dropout mask drawn per piece differs from the mask the whole tensor would get. The chunked loss
and the tiled MLP run their first piece under a watch; when it drew, they rewind the generators and compute whole,
so the random stream continues exactly as in an ordinary step.
"""

from __future__ import annotations

import torch

from .device import DeviceOps


class RngWatch:
    """The random state of the CPU and the compute device when the watch was made."""

    def __init__(self, ops: DeviceOps):
        self.ops = ops
        self.state = ops.get_rng_state()

    def moved(self) -> bool:
        """Whether anything drew random numbers since the watch was made."""
        cpu, device = self.ops.get_rng_state()
        if not torch.equal(cpu, self.state[0]):
            return True
        return device is not None and not torch.equal(device, self.state[1])

    def rewind(self) -> None:
        """Put the generators back where they were when the watch was made."""
        cpu, device = self.state
        torch.set_rng_state(cpu)
        if device is not None:
            torch.get_device_module(self.ops.device).set_rng_state(device, self.ops.device)
