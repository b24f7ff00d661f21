"""HostAdamW == torch AdamW + clip_grad_norm_, with layers stepped during backward (speculation and rollback),
gradient accumulation and an LR schedule (fp32, CPU, streamed full fine-tuning)."""

from __future__ import annotations

import copy
import io

import families
import pytest
import torch
from parity import left_padded_batch

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.engine.host_optimizer import HostAdamW

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-5
ACCUMULATION = 2
# Per step: a max_norm far below the gradient norm (clipping scales them) or far above (it leaves them as they are).
MAX_NORMS = [1e-3, 1e6, 1e6, 1e-3]


def _schedule(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - 0.2 * step)


def run(model, make_optimizer, clip, observe=None, early=True):
    """Steps of len(MAX_NORMS), ACCUMULATION micro-batches each (a HostAdamW steps layers during the last backward
    when `early`); returns losses and the clip totals."""
    model.train()
    optimizer = make_optimizer(model)
    scheduler = _schedule(optimizer)
    batches = [left_padded_batch(families.VOCAB, seed=s) for s in range(ACCUMULATION * len(MAX_NORMS))]
    losses, norms = [], []
    for step, max_norm in enumerate(MAX_NORMS):
        optimizer.zero_grad(set_to_none=True)
        for micro in range(ACCUMULATION):
            last = micro == ACCUMULATION - 1
            if early and hasattr(optimizer, "step_during_backward"):
                optimizer.step_during_backward = lambda last=last: last
            before = None if observe is None else observe(model).clone()
            torch.manual_seed(10 * step + micro)
            out = model(**batches[step * ACCUMULATION + micro])
            (out.loss / ACCUMULATION).backward()
            losses.append(float(out.loss.detach()))
            if observe is not None:  # a layer weight moves during the last backward only: stepped early
                optimizer.synchronize()
                assert torch.equal(observe(model), before) != last
        norms.append(float(clip(optimizer, model, max_norm)))
        optimizer.step()
        scheduler.step()
    return losses, norms


def _torch_clip(optimizer, model, max_norm):
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def _own_clip(optimizer, model, max_norm):
    return optimizer.clip_grad_norm_(model.parameters(), max_norm)


def _assert_same_weights(found, expected):
    for (name, p), (_, q) in zip(found.named_parameters(), expected.named_parameters(), strict=True):
        rel = float((p.detach() - q.detach()).norm() / q.detach().norm())
        assert rel <= RTOL, f"{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("clip", [_own_clip, _torch_clip], ids=["own_clip", "torch_clip"])
def test_host_adamw_equals_torch_adamw_with_clipping_and_accumulation(clip):
    base = families.build("llama")
    reference = copy.deepcopy(base)
    ref_losses, ref_norms = run(
        reference, lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1, foreach=False), _torch_clip
    )
    # both branches are exercised: clipping scaled the gradients on some steps and not on others
    clipped = [norm > max_norm for norm, max_norm in zip(ref_norms, MAX_NORMS)]
    assert any(clipped) and not all(clipped)

    streamed = hf_offload.enable_layer_streaming(copy.deepcopy(base), OffloadConfig(device="cpu", full_finetune=True))

    def make(model):
        return HostAdamW(model.parameters(), lr=3e-3, weight_decay=0.1, threads=2)

    def observe(model):
        return model.model.layers[2].mlp.down_proj.weight.detach()

    optimizers = []
    losses, norms = run(streamed, lambda m: optimizers.append(make(m)) or optimizers[-1], clip, observe=observe)
    layers = len(streamed.model.layers)
    assert optimizers[0].layers_stepped_during_backward == layers * len(MAX_NORMS)
    # rolled back where clipping scaled the gradients; with torch's clip (versions moved) on every step
    redone = sum(clipped) if clip is _own_clip else len(MAX_NORMS)
    assert optimizers[0].layers_rolled_back == layers * redone
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=RTOL, atol=0)
    _assert_same_weights(streamed, reference)


def test_host_adamw_state_is_torch_adamw_state():
    """Checkpoints interchange: the state dict has torch AdamW's layout and loads into either optimizer."""
    model = hf_offload.enable_layer_streaming(
        copy.deepcopy(families.build("llama")), OffloadConfig(device="cpu", full_finetune=True)
    )
    optimizer = HostAdamW(model.parameters(), lr=1e-3)
    model(**left_padded_batch(families.VOCAB)).loss.backward()
    optimizer.step()
    state = optimizer.state_dict()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plain.load_state_dict(state)
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["param_groups"][0]["lr"] == 1e-3
    for value in state["param_groups"][0].values():
        assert not callable(value)
    optimizer.close()


def test_a_step_outside_the_last_backward_is_not_speculated():
    """Without step_during_backward the weights move only in step()."""
    model = hf_offload.enable_layer_streaming(
        copy.deepcopy(families.build("llama")), OffloadConfig(device="cpu", full_finetune=True)
    )
    optimizer = HostAdamW(model.parameters(), lr=1e-2)
    weight = model.model.layers[1].self_attn.q_proj.weight
    before = weight.detach().clone()
    model(**left_padded_batch(families.VOCAB)).loss.backward()
    assert torch.equal(weight.detach(), before)
    optimizer.step()
    assert not torch.equal(weight.detach(), before)


def test_bad_threads_is_refused():
    with pytest.raises(ValueError, match="`threads` should be a positive integer"):
        HostAdamW([torch.nn.Parameter(torch.zeros(2))], threads=0)


def test_dropped_models_and_optimizers_are_freed():
    """torch's optimizer hooks are global: they must not keep a dropped model's host store (or an optimizer's
    state) alive."""
    import gc
    import weakref

    from hf_offload.api import get_runtime

    model = hf_offload.enable_layer_streaming(
        copy.deepcopy(families.build("llama")), OffloadConfig(device="cpu", full_finetune=True)
    )
    optimizer = HostAdamW(model.parameters(), lr=1e-3, step_during_backward=lambda: True)
    model(**left_padded_batch(families.VOCAB)).loss.backward()
    optimizer.step()
    trainable = weakref.ref(get_runtime(model).trainable)
    dropped_optimizer = weakref.ref(optimizer)
    del optimizer
    gc.collect()
    assert dropped_optimizer() is None
    model(**left_padded_batch(families.VOCAB)).loss.backward()  # no listener left behind to call
    del model
    # A backward's graph nodes hold its layer calls (a retained graph can be backpropagated again), and a graph
    # that was part of a reference cycle releases them only when the collector frees it: then the model, next pass.
    for _ in range(3):
        gc.collect()
    assert trainable() is None


def test_a_layer_whose_gradients_grow_after_its_early_step_is_redone():
    """If more gradient reaches a layer already stepped during backward (a layer called twice), step() redoes it,
    even when clipping reported that nothing was scaled."""
    base = families.build("llama")
    streamed = hf_offload.enable_layer_streaming(copy.deepcopy(base), OffloadConfig(device="cpu", full_finetune=True))
    optimizer = HostAdamW(streamed.parameters(), lr=1e-2, step_during_backward=lambda: True)
    runtime = hf_offload.api.get_runtime(streamed)
    streamed(**left_padded_batch(families.VOCAB)).loss.backward()
    optimizer.synchronize()
    extra = [torch.full_like(p, 0.01) for p in runtime.trainable.params(1)]
    runtime.trainable.accumulate(1, extra)  # a second arrival for layer 1, after its early step
    optimizer.note_clipping(torch.tensor(0.0), 1.0)  # "not scaled": the stale layer must be redone anyway
    grads = {n: p.grad.clone() for n, p in streamed.named_parameters()}
    optimizer.step()
    assert optimizer.layers_rolled_back == 1

    reference = copy.deepcopy(base)
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    for name, p in reference.named_parameters():
        p.grad = grads[name]
    plain.step()
    _assert_same_weights(streamed, reference)


def test_a_layer_called_twice_is_stepped_early_only_after_both_backwards():
    """A layer's gradients are complete only once the backward of every call of it in the forward has run: the
    early step waits for the last one (stepping after the first would make the other recompute use new weights)."""
    streamed = hf_offload.enable_layer_streaming(
        copy.deepcopy(families.build("llama")), OffloadConfig(device="cpu", full_finetune=True)
    )
    optimizer = HostAdamW(streamed.parameters(), lr=1e-2, step_during_backward=lambda: True)
    trainable = hf_offload.api.get_runtime(streamed).trainable
    grads = [torch.full_like(p, 0.01) for p in trainable.params(1)]
    trainable.call_opened(1)
    trainable.call_opened(1)
    trainable.accumulate(1, grads)
    assert optimizer.layers_stepped_during_backward == 0
    trainable.accumulate(1, grads)
    assert optimizer.layers_stepped_during_backward == 1
    optimizer.close()


# --- 8-bit state ------------------------------------------------------------------------------------------------------
# bitsandbytes' AdamW8bit on CPU does the same dequantize / update / quantize with the same maps and blocksize; it
# writes the moment update as mul/add where torch uses lerp, so weights differ by float rounding (about 1e-7 after a
# few steps of lr 1e-2) and a code can rarely land on the neighbouring value.
BNB_ATOL = 1e-6


def _wide_llama():
    """The tiny llama, wide enough that its projections (>= 4096 values) get 8-bit moments and its norms and k/v
    projections (< 4096) keep fp32 ones."""
    config_class, kwargs = families.FAMILIES["llama"]
    return families.instantiate(config_class, dict(kwargs, hidden_size=64, intermediate_size=128))


def _params(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, 5000)), torch.nn.Parameter(torch.randn(100))]


def _grads(step):
    torch.manual_seed(100 + step)
    return [torch.randn(3, 5000), torch.randn(100)]


def _steps(params, optimizer, steps):
    for step in steps:
        for p, g in zip(params, _grads(step), strict=True):
            p.grad = g
        optimizer.step()


def test_8bit_state_is_bitsandbytes_adamw8bit():
    bnb = pytest.importorskip("bitsandbytes")
    ours, theirs, fp32 = _params(), _params(), _params()
    optimizer = HostAdamW(ours, lr=1e-2, weight_decay=0.1, state_bits=8)
    _steps(ours, optimizer, range(5))
    _steps(theirs, bnb.optim.AdamW8bit(theirs, lr=1e-2, weight_decay=0.1), range(5))
    _steps(fp32, torch.optim.AdamW(fp32, lr=1e-2, weight_decay=0.1), range(5))
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=BNB_ATOL)
    # 8-bit moments are not fp32 ones: the large tensor moved away from fp32 AdamW, far beyond that tolerance
    assert float((ours[0] - fp32[0]).detach().abs().max()) > 100 * BNB_ATOL
    large, small = optimizer.state[ours[0]], optimizer.state[ours[1]]
    assert large["exp_avg"].dtype == large["exp_avg_sq"].dtype == torch.uint8
    assert large["exp_avg_absmax"].shape == (-(-15000 // 256),)
    assert small["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in small
    nbytes = sum(v.numel() * v.element_size() for k, v in large.items() if k != "step")
    assert nbytes == 2 * 15000 + 2 * 4 * 59  # ~2 bytes per parameter, against 8 for fp32 moments


def test_8bit_state_dict_round_trip_resumes_exactly():
    """Saved after 2 steps and loaded into a fresh optimizer, 3 more steps equal the uninterrupted run bit for bit;
    the codes stay uint8 (torch's load would cast them to the parameter's dtype)."""
    straight = _params()
    _steps(straight, HostAdamW(straight, lr=1e-2, state_bits=8), range(5))

    first = _params()
    optimizer = HostAdamW(first, lr=1e-2, state_bits=8)
    _steps(first, optimizer, range(2))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    again = HostAdamW(resumed, lr=1e-2, state_bits=8)
    buffer.seek(0)
    again.load_state_dict(torch.load(buffer))
    assert again.state[resumed[0]]["exp_avg"].dtype == torch.uint8
    _steps(resumed, again, range(2, 5))
    for p, q in zip(resumed, straight, strict=True):
        assert torch.equal(p, q)

    with pytest.raises(ValueError, match="keeps 8-bit moments.*state_bits=32"):
        HostAdamW([torch.nn.Parameter(p.detach().clone()) for p in first]).load_state_dict(optimizer.state_dict())


def test_8bit_early_steps_and_rollback_equal_stepping_everything_in_step():
    """Layers stepped during backward (kept, or rolled back from their 8-bit copies when clipping scaled), on two
    threads, give the same weights bit for bit as the same optimizer stepping everything in step()."""
    base = _wide_llama()
    results = []
    for early in (True, False):
        model = hf_offload.enable_layer_streaming(copy.deepcopy(base), OffloadConfig(device="cpu", full_finetune=True))
        optimizers = []

        def make(m, optimizers=optimizers):
            optimizers.append(HostAdamW(m.parameters(), lr=3e-3, weight_decay=0.1, threads=2, state_bits=8))
            return optimizers[-1]

        losses, _ = run(model, make, _own_clip, early=early)
        results.append((model, losses, optimizers[0]))
    (early_model, early_losses, early_opt), (plain_model, plain_losses, plain_opt) = results
    layers = len(early_model.model.layers)
    assert early_opt.layers_stepped_during_backward == layers * len(MAX_NORMS)
    assert 0 < early_opt.layers_rolled_back < layers * len(MAX_NORMS)
    assert plain_opt.layers_stepped_during_backward == 0
    assert early_losses == plain_losses
    for (name, p), (_, q) in zip(early_model.named_parameters(), plain_model.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    q_proj = early_model.model.layers[0].self_attn.q_proj.weight
    assert early_opt.state[q_proj]["exp_avg"].dtype == torch.uint8
    weight, moments = early_opt._backups_of[q_proj]  # the rollback copies hold codes and absmaxes
    assert moments["exp_avg"].dtype == torch.uint8 and set(moments) == {
        "exp_avg",
        "exp_avg_sq",
        "exp_avg_absmax",
        "exp_avg_sq_absmax",
    }


def test_bad_state_bits_is_refused():
    with pytest.raises(ValueError, match="`state_bits` should be 32 .* or 8"):
        HostAdamW([torch.nn.Parameter(torch.zeros(2))], state_bits=16)
