"""`hf-offload bench`: the CPU smoke test CI runs, and the pieces the GPU columns are computed from."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_offload.commands import cli
from hf_offload.commands.bench.measure import intersect, overlap_from_trace, union
from hf_offload.commands.bench.methods import METHODS
from hf_offload.commands.bench.models import PRESETS, build_model, load_config
from hf_offload.commands.model_sizes import measure

ROW_FIELDS = {
    "method",
    "status",
    "reason",
    "step_time_s",
    "tokens_per_s",
    "model_tflops",
    "h2d_gbps",
    "h2d_of_peak",
    "copy_overlap_share",
    "copy_hidden_share",
    "gpu_busy_share",
    "peak_gpu_bytes",
    "peak_host_rss_bytes",
    "losses",
    "notes",
}


def run_bench(capsys, *options: str) -> dict:
    # one thread: on a shared 2-core runner, two spinning OpenMP threads make tiny steps 5x slower
    argv = ["bench", "--device", "cpu", "--preset", "tiny", "--steps", "1", "--warmup", "1", "--threads", "1", "--json"]
    argv += options
    code = cli.main(argv)
    document = json.loads(capsys.readouterr().out)
    assert code == 0, document
    return document


def test_cpu_smoke_run_reports_every_method(capsys):
    doc = run_bench(capsys)
    rows = {row["method"]: row for row in doc["rows"]}
    assert list(rows) == list(METHODS)
    for row in rows.values():
        assert row.keys() >= ROW_FIELDS, row["method"]
    for name in ("resident", "resident-checkpointed", "hf_offload", "accelerate-cpu-offload"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["step_time_s"] > 0 and row["tokens_per_s"] > 0 and row["model_tflops"] > 0
        assert len(row["losses"]) == 2 and all(math.isfinite(x) for x in row["losses"])
        # link columns are CUDA-only: absent, not invented
        assert row["h2d_gbps"] is None and row["copy_overlap_share"] is None and row["peak_gpu_bytes"] is None
    # same weights, same adapters, same batch: the first losses agree
    first = {name: rows[name]["losses"][0] for name in ("resident", "resident-checkpointed", "hf_offload")}
    assert max(first.values()) - min(first.values()) < 1e-4, first
    ds = rows["deepspeed-zero3-offload"]
    assert ds["status"] == "skipped" and "CUDA" in ds["reason"]
    streamed = rows["hf_offload"]["extra"]
    layers = doc["model"]["layers"]
    # prefetch 1, a steady step (after warm-up): the turnaround reuses the last two layers, and the forward the first
    # two, which the previous step's backward left in the slots
    assert streamed["stats"]["layer_loads"] == 2 * (layers - 2)
    assert streamed["weight_bytes_per_step"] == streamed["stats"]["bytes_to_device"]
    assert doc["performance_model"]["bytes_per_step"] == streamed["weight_bytes_per_step"]  # the performance model
    assert set(doc["ratios"]) == {f"hf_offload/{m} step time" for m in rows if m not in ("hf_offload", ds["method"])}
    assert doc["flops_formula"].startswith("model TFLOP/s = 6 * N * tokens_per_step")
    assert doc["settings"]["order"] == "interleaved" and doc["process_peak_host_rss_bytes"] > 0


def test_sequential_order_measures_memory_per_method(capsys):
    doc = run_bench(capsys, "--order", "sequential", "--methods", "resident,hf_offload", "--prefetch", "0")
    rows = {row["method"]: row for row in doc["rows"]}
    assert list(rows) == ["resident", "hf_offload"]
    for row in rows.values():
        assert row["status"] == "ok" and row["peak_host_rss_bytes"] > 0
    assert rows["hf_offload"]["extra"]["stats"]["peak_resident_layers"] == 1


def test_unknown_or_repeated_methods_are_refused():
    with pytest.raises(SystemExit, match="unknown method"):
        cli.main(["bench", "--device", "cpu", "--methods", "resident,zero4"])
    with pytest.raises(SystemExit, match="names a method twice"):
        cli.main(["bench", "--device", "cpu", "--methods", "resident,hf_offload,resident"])


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="Unknown preset 'nope'"):
        load_config("nope", None)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="no `model_type`"):
        load_config(None, str(path))
    with pytest.raises(ValueError, match="--layers should be a positive integer"):
        load_config("tiny", None, layers=0)


def test_config_json_and_layer_override(tmp_path):
    config = load_config("tiny", None)
    path = tmp_path / "config.json"
    path.write_text(config.to_json_string())
    loaded = load_config(None, str(path), layers=2)
    assert loaded.model_type == "llama" and loaded.num_hidden_layers == 2 and loaded.hidden_size == 64


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_sizes_match_the_real_checkpoints(preset):
    expected = {"8b": 8.03e9, "14b": 14.77e9, "32b": 32.76e9, "70b": 70.55e9, "moe-30b-a3b": 30.53e9}
    config = load_config(preset, None)
    facts = measure(config, torch.bfloat16)  # on the meta device: no memory used
    if preset in expected:
        assert facts.total_params == pytest.approx(expected[preset], rel=2e-3)
    embedding = config.vocab_size * config.hidden_size  # a lookup, not a matmul: not in the FLOPs
    if preset == "moe-30b-a3b":
        assert facts.compute_params == pytest.approx(3.35e9 - embedding, rel=1e-2)
    else:
        assert facts.compute_params == facts.total_params - embedding
    assert sum(facts.layer_bytes) + facts.resident_bytes == 2 * facts.total_params


def test_random_weights_are_finite_deterministic_and_complete():
    config = load_config("tiny", None)
    a, b = build_model(config, torch.float32, "cpu", seed=3), build_model(config, torch.float32, "cpu", seed=3)
    reference = torch.nn.Module.state_dict(a)
    for name, value in torch.nn.Module.state_dict(b).items():
        assert torch.isfinite(value).all() and torch.equal(value, reference[name]), name
    q = a.model.layers[0].self_attn.q_proj.weight
    assert q.std().item() == pytest.approx(0.02, rel=0.1)
    assert not torch.equal(q, a.model.layers[1].self_attn.q_proj.weight)  # layers differ
    # rotary tables were computed, not left uninitialised by materialisation
    fresh = build_model(config, torch.float32, "cpu", seed=4)
    assert torch.equal(fresh.model.rotary_emb.inv_freq, a.model.rotary_emb.inv_freq)
    assert fresh.model.rotary_emb.inv_freq[0] == 1.0


def test_interval_arithmetic():
    assert union([(3, 4), (0, 1), (0.5, 2)]) == [(0, 2), (3, 4)]
    assert intersect([(0, 2), (3, 4)], [(1, 3.5)]) == [(1, 2), (3, 3.5)]
    assert intersect([(0, 1)], [(1, 2)]) == []


def test_overlap_from_a_profiler_trace():
    """A Chrome trace as torch.profiler writes it: two kernels, two host->device copies on another stream."""

    def event(cat, name, ts, dur, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}

    trace = {
        "traceEvents": [
            event("cpu_op", "aten::mm", 0, 500),  # host-side events do not count
            event("kernel", "gemm", 100, 100, stream=7),
            event("kernel", "gemm", 250, 50, stream=7),
            event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 150, 100, stream=13, bytes=1000),
            event("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 300, 100, stream=7, bytes=5),
        ]
    }
    overlap = overlap_from_trace(trace)
    assert overlap.span_s == pytest.approx(300e-6)  # 100 .. 400
    assert overlap.compute_s == pytest.approx(150e-6)
    assert overlap.copy_s == pytest.approx(100e-6)
    assert overlap.overlap_s == pytest.approx(50e-6)  # copy 150..250 against kernels 100..200
    assert overlap.copy_hidden_share == pytest.approx(0.5)
    assert overlap.copy_overlap_share == pytest.approx(50 / 300)
    assert overlap.h2d_bytes == 1000
    assert overlap_from_trace({"traceEvents": [event("cpu_op", "aten::mm", 0, 5)]}) is None


def test_trainer_driven_timing_without_deepspeed(monkeypatch):
    """The DeepSpeed row runs through Trainer callbacks; check that path on the CPU with DeepSpeed switched off."""
    from hf_offload.commands.bench import methods
    from hf_offload.commands.bench.measure import StepClock

    monkeypatch.setattr(methods, "deepspeed_config", lambda optimizer: None)
    config = load_config("tiny", None)
    setup = methods.Setup(
        config=config,
        facts=measure(config, torch.float32),
        dtype=torch.float32,
        device=torch.device("cpu"),
        batch=2,
        seq=16,
        lora_r=4,
        prefetch=1,
        offload_activations=False,
    )
    clock = StepClock(setup.device, warmup=1, steps=2, profile=False)
    outcome = methods.DeepSpeedZero3Offload().run(setup, clock)
    assert len(clock.times) == 2 and all(t > 0 for t in clock.times)
    assert len(clock.losses) == 3 and all(math.isfinite(x) for x in clock.losses)
    assert "ZeRO-3" in outcome.notes[0]


def test_full_finetune_rows_streamed_and_resident(capsys):
    doc = run_bench(capsys, "--methods", "resident-full,hf_offload-full", "--steps", "2")
    rows = {row["method"]: row for row in doc["rows"]}
    assert list(rows) == ["resident-full", "hf_offload-full"]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["step_time_s"] > 0 and len(row["losses"]) == 3 and all(math.isfinite(x) for x in row["losses"])
    # same weights and batch, every weight trained by AdamW: the losses agree step after step
    resident, streamed = rows["resident-full"]["losses"], rows["hf_offload-full"]["losses"]
    assert max(abs(a - b) for a, b in zip(resident, streamed)) < 1e-4, (resident, streamed)
    assert resident[-1] != resident[0]  # the weights moved
    extra = rows["hf_offload-full"]["extra"]
    assert extra["stats"]["layer_loads"] > 0 and extra["grad_bytes_to_host_per_step"] > 0
    assert any("gradients to the host" in note for note in rows["hf_offload-full"]["notes"])
    from hf_offload.commands.bench.command import header

    assert "every weight trained (full fine-tuning)" in header(doc) and "LoRA" not in header(doc)
    doc["settings"]["methods"] = ["hf_offload", "hf_offload-full"]
    assert "LoRA r=16 on all linear layers (hf_offload-full: every weight trained)" in header(doc)
