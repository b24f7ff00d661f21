"""Converting a model must not hold two copies of its weights: packing goes layer by layer and frees as it goes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, torch, transformers
    from peft import LoraConfig, get_peft_model
    import hf_offload

    def rss():
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

    baseline = rss()["VmRSS"]
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                                      num_attention_heads=12, num_key_value_heads=12)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with_model = rss()["VmRSS"]
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark (VmHWM) to the current RSS
    hf_offload.enable_layer_streaming(model, hf_offload.OffloadConfig(device="cpu"))
    after = rss()
    info = hf_offload.summary(model)
    print(json.dumps(dict(baseline=baseline, with_model=with_model, peak=after["VmHWM"], after=after["VmRSS"],
                          model_bytes=model_bytes, max_layer_bytes=info["max_layer_bytes"])))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the process's peak RSS")
def test_enable_never_holds_two_copies_of_the_weights():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["model_bytes"] > 150e6  # big enough that a second copy would stand out of the noise
    # The bound: peak host memory while converting <= model bytes x 1.15 + 300 MB (over the bare process).
    assert m["peak"] - m["baseline"] <= m["model_bytes"] * 1.15 + 300e6
    # Tighter: converting adds at most about one layer over the model already in memory.
    assert m["peak"] - m["with_model"] <= 2 * m["max_layer_bytes"] + 32e6, m
    assert m["after"] - m["with_model"] <= m["max_layer_bytes"] + 32e6, m
