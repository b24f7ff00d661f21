"""The engine's refusal: `UnsupportedModelError`, raised before anything about a model is changed."""


class UnsupportedModelError(ValueError):
    """Raised before any work is done when a model cannot be streamed; the message says why and what to do.

    Every "this model cannot be streamed" decision raises it, and is made by `anatomy.check_streamable` before
    adapters are added, the Trainer is built or a byte is packed.
    """
