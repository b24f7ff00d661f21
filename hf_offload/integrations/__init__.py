"""How hf_offload plugs into the Hugging Face stack: the Trainer, accelerate, checkpoints, the Hub, metrics.

Everything here builds on the engine (`hf_offload.engine`) through the public API (`hf_offload.api`); nothing in
the engine imports from here.
"""

from .versions import check_versions

check_versions()  # before any integration hooks in: an unsupported transformers/peft/accelerate is named here
