"""Check `hf-offload plan`'s measuring by layer kind against building every layer, for every test family.

Each family of tests/families.py and tests/moe_families.py is configured 40 layers deep (`layer_types` repeated to
the depth) and measured both ways (`measure(config)` and `measure(config, every_layer=True)`); the plan estimates
(dense, nf4, full fine-tuning) and the per-layer bytes must be equal. Prints one line per family: the number of
kinds the plan built, whether the figures agree, and the seconds of the by-kind measure.

Usage:
    python tools/plan_by_kind_sweep.py [--depth 40]
Exits 1 if any family's figures differ.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # this checkout's hf_offload, and the test families


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=40)
    args = parser.parse_args(argv)
    import families
    import moe_families
    import torch
    import transformers

    from hf_offload.commands.model_sizes import _DEPTH_NAMES, measure
    from hf_offload.commands.plan import estimate

    differ = 0
    for module in (families, moe_families):
        for family, (config_class, kwargs) in module.FAMILIES.items():
            kwargs = dict(kwargs)
            kwargs[next((k for k in _DEPTH_NAMES if k in kwargs), "num_hidden_layers")] = args.depth
            if "layer_types" in kwargs:
                kwargs["layer_types"] = (kwargs["layer_types"] * args.depth)[: args.depth]
            try:
                config = getattr(transformers, config_class)(**kwargs)
                start = time.perf_counter()
                by_kind = measure(config, torch.float32)
                seconds = time.perf_counter() - start
                whole = measure(config, torch.float32, every_layer=True)
            except Exception as err:  # a test config that does not build at this depth: reported, not judged
                print(f"{family:20s} does not build: {type(err).__name__}: {str(err)[:120]}")
                continue
            options = ({}, {"base_weight_dtype": "nf4"}, {"full_finetune": True})
            same = by_kind.layer_bytes == whole.layer_bytes and all(
                estimate(by_kind, **o).as_dict() == estimate(whole, **o).as_dict() for o in options
            )
            differ += not same
            print(f"{family:20s} kinds={len(by_kind.kinds):3d} same={same} {seconds:.2f} s", flush=True)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
