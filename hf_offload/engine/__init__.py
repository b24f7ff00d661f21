"""The streaming engine: finds decoder layers, packs them in host memory, streams them through device slots.

Nothing here knows about `transformers.Trainer` or the command line; the engine works from a plain PyTorch loop.
"""
