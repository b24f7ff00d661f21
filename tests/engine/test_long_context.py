"""Long sequences: the chunked head + loss and the tiled MLP are exact (engine/chunked_loss.py, engine/tiled_mlp.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from families import FAMILIES, VOCAB, build, instantiate
from moe_families import CORE, with_expert_lora
from moe_families import FAMILIES as MOE_FAMILIES
from moe_families import build as build_moe
from parity import assert_same_step, eval_logits, left_padded_batch, reference_and_streamed, train_step
from peft import get_peft_model

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.engine import chunked_loss

pytestmark = pytest.mark.usefixtures("one_thread")

# Small chunks and tiles, so that the 3 x 12-token test batch runs in several of each.
SMALL = dict(device="cpu", loss_chunk_tokens=5, mlp_tile_tokens=8)

# MLPs that draw random numbers (their own dropout) compute whole; these layers have no dense MLP child.
MLP_WITH_DROPOUT = {"gpt2", "gptj", "gpt_bigcode"}
NO_DENSE_MLP = {"bloom", "opt", "mpt", "rwkv"}  # MLP takes the residual too / no MLP child / token-mixing


def runtime(model):
    return hf_offload.api.get_runtime(model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_loss_and_tiled_mlp_equal_ordinary(family):
    # No LoRA dropout, so that MLPs can be tiled; the models keep their own dropout.
    reference, streamed = reference_and_streamed(build(family), OffloadConfig(**SMALL), lora_dropout=0.0)
    batch = left_padded_batch(VOCAB)
    assert_same_step(reference, streamed, batch)
    engine = runtime(streamed)
    assert engine.chunked_loss.chunked_forwards == 1
    tiled = engine.tiled_mlps
    if family in NO_DENSE_MLP:
        assert not tiled.mlps
    elif family in MLP_WITH_DROPOUT:
        assert tiled.mlps and tiled.tiled_calls == 0 and tiled.whole_calls > 0
    else:  # 4 layers: the forward and the backward recompute of each
        assert tiled.tiled_calls == 8 and tiled.whole_calls == 0
    # eval: full logits, MLPs tiled in the (no-grad) forward as well
    torch.testing.assert_close(eval_logits(streamed, batch), eval_logits(reference, batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_mlp_with_lora_dropout_computes_whole_and_stays_exact(family):
    reference, streamed = reference_and_streamed(build(family), OffloadConfig(**SMALL), lora_dropout=0.1)
    assert_same_step(reference, streamed, left_padded_batch(VOCAB))
    assert runtime(streamed).tiled_mlps.tiled_calls == 0 and runtime(streamed).tiled_mlps.whole_calls == 8


MOE_ALL = [f if f in CORE else pytest.param(f, marks=pytest.mark.slow) for f in MOE_FAMILIES]


@pytest.mark.parametrize("family", MOE_ALL)
def test_moe_chunked_loss_with_aux_loss_equals_ordinary(family):
    base = build_moe(family)
    batch = left_padded_batch(VOCAB)
    reference = with_expert_lora(copy.deepcopy(base), family)
    streamed = with_expert_lora(copy.deepcopy(base), family)
    streamed.load_state_dict(reference.state_dict())
    hf_offload.enable_layer_streaming(streamed, OffloadConfig(**SMALL))
    assert_same_step(reference, streamed, batch)
    assert runtime(streamed).chunked_loss.chunked_forwards == 1
    with torch.no_grad():  # the aux loss is part of the compared loss (the model adds it after its loss)
        out = reference(**batch)
    assert out.aux_loss is None or out.aux_loss > 0
    # MoE blocks are never tiled; DeepSeek's first (dense) layer and Qwen2-MoE's dense last layer are.
    tiled = runtime(streamed).tiled_mlps
    if family in CORE:
        expected = {"deepseek_v3": 1, "qwen2_moe": 1}.get(family, 0)
        assert len(tiled.mlps) == expected
    assert tiled.tiled_calls + tiled.whole_calls == 2 * len(tiled.mlps)


def test_tied_head_with_lora_on_it_gets_every_gradient():
    base = build("gemma")
    head = base.get_output_embeddings()
    assert head.weight is base.get_input_embeddings().weight  # tied
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    reference, streamed = reference_and_streamed(base, OffloadConfig(**SMALL), lora_dropout=0.0, target_modules=targets)
    loss_ref, grads = train_step(reference, left_padded_batch(VOCAB))
    assert any("lm_head" in name for name in grads)
    assert_same_step(reference, streamed, left_padded_batch(VOCAB))
    assert runtime(streamed).chunked_loss.chunked_forwards >= 1


def test_trainable_tied_embedding_gets_both_gradients():
    """A fully trainable tied embedding: its gradient sums the head's (chunked) and the embedding's."""
    base = build("gemma")
    reference = copy.deepcopy(base)
    streamed = copy.deepcopy(base)
    for model in (reference, streamed):
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.requires_grad_(True)
    hf_offload.enable_layer_streaming(streamed, OffloadConfig(**SMALL))
    assert_same_step(reference, streamed, left_padded_batch(VOCAB))


def test_head_that_draws_random_numbers_runs_unchunked_and_exact():
    targets = ["q_proj", "v_proj", "lm_head"]
    reference, streamed = reference_and_streamed(build("llama"), OffloadConfig(**SMALL), target_modules=targets)
    assert_same_step(reference, streamed, left_padded_batch(VOCAB))  # lora_dropout=0.1 on lm_head too
    assert runtime(streamed).chunked_loss.chunked_forwards == 0


def test_num_items_in_batch_and_explicit_shift_labels_match():
    reference, streamed = reference_and_streamed(build("qwen2"), OffloadConfig(**SMALL))
    batch = left_padded_batch(VOCAB)
    assert_same_step(reference, streamed, dict(batch, num_items_in_batch=torch.tensor(17)))
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:].contiguous()
    shifted[0, 3:6] = -100
    assert_same_step(reference, streamed, dict(batch, shift_labels=shifted))


def test_every_label_ignored_gives_the_same_loss():
    reference, streamed = reference_and_streamed(build("llama"), OffloadConfig(**SMALL))
    batch = left_padded_batch(VOCAB)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    for model in (reference, streamed):
        model.train()
    torch.manual_seed(0)
    ref = reference(**batch, num_items_in_batch=torch.tensor(4)).loss
    torch.manual_seed(0)
    st = streamed(**batch, num_items_in_batch=torch.tensor(4)).loss
    assert ref.item() == st.item() == 0.0
    torch.manual_seed(0)
    assert torch.isnan(streamed(**batch).loss) and torch.isnan(reference(**batch).loss)  # as cross_entropy's mean


def test_outputs_logits_in_a_chunked_step_and_full_logits_elsewhere():
    _, streamed = reference_and_streamed(build("llama"), OffloadConfig(**SMALL))
    batch = left_padded_batch(VOCAB)
    streamed.train()
    out = streamed(**batch)
    assert out.logits.shape == (3, 12, 0)  # documented: the full logits were never built
    as_tuple = streamed(**batch, return_dict=False)
    assert as_tuple[1].shape == (3, 12, 0) and as_tuple[0].requires_grad
    assert streamed(input_ids=batch["input_ids"]).logits.shape == (3, 12, VOCAB)  # no labels
    with torch.no_grad():
        assert streamed(**batch).logits.shape == (3, 12, VOCAB)  # no grad
    streamed.eval()
    assert streamed(**batch).logits.shape == (3, 12, VOCAB)  # eval
    assert runtime(streamed).chunked_loss.chunked_forwards == 2


def test_summary_shows_the_long_sequence_options():
    _, streamed = reference_and_streamed(build("gpt2"), OffloadConfig(**SMALL))
    summary = hf_offload.summary(streamed)
    assert summary["chunked_loss"] and summary["loss_chunk_tokens"] == 5 and summary["mlp_tile_tokens"] == 8
    assert summary["tiled_mlp_layers"] == 4
    _, plain = reference_and_streamed(build("bloom"), OffloadConfig(device="cpu", chunked_loss=False))
    summary = hf_offload.summary(plain)
    assert not summary["chunked_loss"] and summary["tiled_mlp_layers"] == 0  # Bloom's MLP takes the residual


def test_chunked_loss_off_keeps_full_logits():
    reference, streamed = reference_and_streamed(build("llama"), OffloadConfig(device="cpu", chunked_loss=False))
    batch = left_padded_batch(VOCAB)
    assert_same_step(reference, streamed, batch)
    assert runtime(streamed).chunked_loss is None
    streamed.train()
    assert streamed(**batch).logits.shape == (3, 12, VOCAB)


def test_unknown_logit_transform_is_refused(monkeypatch):
    """A family that transformed its logits without an entry in the table is stopped, never computed wrong."""
    monkeypatch.setitem(chunked_loss.LOGIT_TRANSFORMS, "gemma2", chunked_loss._identity)  # pretend we did not know
    _, streamed = reference_and_streamed(build("gemma2"), OffloadConfig(**SMALL))
    streamed.train()
    with pytest.raises(RuntimeError, match="transforms its head's output before the loss"):
        streamed(**left_padded_batch(VOCAB))


def test_granite_logits_scaling_and_cohere_logit_scale_are_applied():
    for family, attribute in (("granite", "logits_scaling"), ("cohere", "logit_scale")):
        base = build(family)
        setattr(base.config, attribute, 4.0)
        if family == "cohere":
            base.logit_scale = 4.0
        reference, streamed = reference_and_streamed(base, OffloadConfig(**SMALL))
        assert_same_step(reference, streamed, left_padded_batch(VOCAB))


def test_disable_restores_head_mlps_and_loss_function():
    _, streamed = reference_and_streamed(build("llama"), OffloadConfig(**SMALL))
    inner = streamed.get_base_model()
    hf_offload.disable_layer_streaming(streamed)
    assert "forward" not in inner.lm_head.__dict__ and "_loss_function" not in inner.__dict__
    assert all("forward" not in layer.mlp.__dict__ for layer in inner.model.layers)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_chunk_tokens=-1), "loss_chunk_tokens"),
        (dict(mlp_tile_tokens=-3), "mlp_tile_tokens"),
        (dict(mlp_tile_tokens=True), "mlp_tile_tokens"),
        (dict(chunked_loss="yes"), "chunked_loss"),
    ],
)
def test_bad_long_context_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OffloadConfig(**kwargs)


def test_tiled_mlp_under_cpu_autocast_matches():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    base = instantiate("LlamaConfig", config.to_diff_dict())
    reference, streamed = reference_and_streamed(base, OffloadConfig(**SMALL), lora_dropout=0.0)
    batch = left_padded_batch(VOCAB)
    results = []
    for model in (reference, streamed):
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_ref, grads_ref), (loss_st, grads_st) = results
    torch.testing.assert_close(loss_st, loss_ref, rtol=2e-2, atol=0)
    for name, g in grads_ref.items():
        assert (grads_st[name] - g).norm() / g.norm() < 5e-2, name
    assert runtime(streamed).tiled_mlps.tiled_calls > 0


def test_trainer_flag_on_a_long_sequence_logs_the_losses_of_an_ordinary_run(tmp_path, monkeypatch):
    """OffloadTrainer with the flag vs a plain Trainer with the same LoRA, on 8,200-token rows: the MLPs tile at the
    default threshold (8,192 tokens) and the loss runs in chunks of 1,024 tokens (small chunk budget)."""
    from faces import logged, tiny_args, token_dataset
    from transformers import Trainer

    from hf_offload import OffloadTrainer

    monkeypatch.setattr(chunked_loss, "DEFAULT_CHUNK_BYTES", 4 * VOCAB * 1024)
    # No attention dropout: on the CPU, attention with dropout materializes (heads x tokens x tokens) weights.
    kwargs = dict(FAMILIES["llama"][1], attention_dropout=0.0, max_position_embeddings=8256, num_hidden_layers=2)
    base = instantiate("LlamaConfig", kwargs)
    data = token_dataset(rows=2, length=8200)
    common = dict(max_steps=2, per_device_train_batch_size=1, offload_lora_dropout=0.0)

    plain_args = tiny_args(tmp_path / "plain", **common)
    torch.manual_seed(0)
    plain_model = get_peft_model(copy.deepcopy(base), plain_args.lora_config())
    plain = Trainer(model=plain_model, args=plain_args, train_dataset=data)
    plain.train()

    args = tiny_args(tmp_path / "streamed", layer_streaming=True, **common)
    torch.manual_seed(0)
    streamed = OffloadTrainer(model=copy.deepcopy(base), args=args, train_dataset=data)
    streamed.train()
    engine = runtime(streamed.model)
    assert len(logged(plain)) == 2
    assert logged(streamed) == pytest.approx(logged(plain), rel=1e-5)
    # 2 steps, each chunked; 2 steps x (forward + backward recompute) x 2 layers tiled
    assert engine.chunked_loss.chunked_forwards == 2 and engine.tiled_mlps.tiled_calls == 2 * 2 * 2


@pytest.mark.slow  # two fresh processes: ~25 s on 2 busy cores
def test_streamed_step_peak_memory_is_a_fraction_of_the_ordinary_one():
    """tools/long_context_memory.py at a small size: 2,048 tokens, a 16k vocabulary, 128-token loss chunks."""
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "long_context_memory.py"
    spec = importlib.util.spec_from_file_location("long_context_memory", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = argparse.Namespace(
        tokens=[2048],
        vocab=16000,
        hidden=128,
        layers=2,
        threads=1,
        loss_chunk_tokens=128,
        mlp_tile_tokens=256,
        chunked_loss=True,
    )
    (row,) = tool.run(args)
    assert row["exact"], row
    assert row["chunked_forwards"] == 1 and row["tiled_mlp_calls"] == 2 * 2, row
    assert row["ratio"] <= 0.25, row


def test_chunks_whose_labels_are_all_ignored_skip_the_head():
    """A masked prompt: rows of 12 tokens whose first 10 labels are ignored, 5-token chunks over the 36 tokens."""
    reference, streamed = reference_and_streamed(build("llama"), OffloadConfig(**SMALL))
    batch = left_padded_batch(VOCAB)
    batch["labels"][:, :10] = -100
    calls = []
    streamed.get_base_model().lm_head.register_forward_hook(lambda *args: calls.append(1))
    assert_same_step(reference, streamed, batch)
    # scored tokens (flattened, after the shift): 9, 10, 21, 22, 33, 34 -> chunks 5-10, 10-15, 20-25, 30-35.
    # The model's own call of the head, then 4 chunks in the forward and 4 in the backward (of 8 chunks).
    assert len(calls) == 1 + 4 + 4


def test_tiled_mlp_with_a_quantized_host_store_equals_the_dequantized_model():
    """nf4 base weights: the tiles (and their recompute in backward) run inside the layer's dequantization window."""
    from parity import with_lora
    from test_quant import dequantized_reference

    base = build("llama")
    streamed = with_lora(copy.deepcopy(base))
    hf_offload.enable_layer_streaming(streamed, OffloadConfig(base_weight_dtype="nf4", **SMALL))
    reference = dequantized_reference(base, streamed)  # same adapters: with_lora seeds them alike
    for model in (reference, streamed):  # no LoRA dropout, so that the MLPs tile
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Dropout) and ".lora_dropout." in name:
                module.p = 0.0
    assert_same_step(reference, streamed, left_padded_batch(VOCAB))
    assert runtime(streamed).tiled_mlps.tiled_calls == 8


def test_labels_passed_by_position_are_seen():
    reference, streamed = reference_and_streamed(build("llama"), OffloadConfig(**SMALL))
    batch = left_padded_batch(VOCAB)
    inner = streamed.get_base_model()
    inner.train()
    # LlamaForCausalLM.forward(input_ids, attention_mask, position_ids, cache, inputs_embeds, labels, ...)
    out = inner(batch["input_ids"], batch["attention_mask"], None, None, None, batch["labels"])
    assert out.logits.shape == (3, 12, 0) and runtime(streamed).chunked_loss.chunked_forwards == 1


def test_trainable_head_through_modules_to_save_matches():
    targets = ["q_proj", "v_proj"]
    reference, streamed = reference_and_streamed(
        build("qwen2"), OffloadConfig(**SMALL), target_modules=targets, modules_to_save=["lm_head"]
    )
    loss, grads = train_step(reference, left_padded_batch(VOCAB))
    assert any("modules_to_save" in name and "lm_head" in name for name in grads)
    assert_same_step(reference, streamed, left_padded_batch(VOCAB))
    assert runtime(streamed).chunked_loss.chunked_forwards >= 1


# GIT slices the logits along the sequence (image tokens) before its loss: the probe check refuses it loudly.
REFUSED_BY_THE_PROBE_CHECK = {"git"}


def test_every_family_that_transforms_its_logits_is_in_the_table():
    """Scan the installed transformers: every causal LM whose forward reassigns its logits between the head and
    `self.loss_function` must have its transform in LOGIT_TRANSFORMS (or be refused by the probe check)."""
    import re
    from pathlib import Path

    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = Path(transformers.__file__).parent / "models"
    transforming, scanned = {}, 0
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        for path in sorted((root / model_type_to_module_name(model_type)).glob("modeling_*.py")):
            found = re.search(rf"^class {class_name}\(.*?(?=^class |\Z)", path.read_text(), re.S | re.M)
            if found:
                break
        else:
            continue
        body = found.group(0)[found.group(0).find("def forward") :]
        head = re.search(r"^\s*\w*logits\w* = self\.(lm_head|head|embed_out|output)\(.*$", body, re.M)
        loss = body.find("loss_function(")
        if head is None or loss < head.end():
            continue
        scanned += 1
        lines = [line.strip() for line in body[head.end() : loss].splitlines()]
        assignments = [line for line in lines if re.match(r"(lm_|shifted_)?logits\s*=", line)]
        if assignments:
            transforming[model_type] = assignments
    assert scanned > 100 and "gemma2" in transforming and "llama" not in transforming  # the scan sees the code
    missing = {t: a for t, a in transforming.items() if t not in chunked_loss.LOGIT_TRANSFORMS}
    assert set(missing) <= REFUSED_BY_THE_PROBE_CHECK, f"add to LOGIT_TRANSFORMS: {missing}"


@pytest.mark.parametrize("prefetch", [0, 2])
def test_with_offloaded_activations_and_other_prefetch_windows(prefetch):
    config = OffloadConfig(offload_activations=True, prefetch=prefetch, **SMALL)
    reference, streamed = reference_and_streamed(build("qwen3"), config, lora_dropout=0.0)
    assert_same_step(reference, streamed, left_padded_batch(VOCAB))
    assert runtime(streamed).tiled_mlps.tiled_calls == 8 and runtime(streamed).chunked_loss.chunked_forwards == 1
    assert hf_offload.stats(streamed)["bytes_to_host"] > 0
