"""`hf-offload bench`: the CPU smoke test CI runs, and the pieces the GPU columns are computed from."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_offload.commands import cli
from hf_offload.commands.bench.command import _does_not_fit, offloaded_activation_bytes, parse_lengths
from hf_offload.commands.bench.measure import intersect, overlap_from_trace, union
from hf_offload.commands.bench.methods import DEFAULT_METHODS, METHODS, Setup
from hf_offload.commands.bench.models import PRESETS, build_model, load_config
from hf_offload.commands.bench.report import Row, table
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
    assert list(rows) == DEFAULT_METHODS
    assert "hf_offload-activations" in METHODS and "hf_offload-activations" not in DEFAULT_METHODS
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
    for name in ("deepspeed-zero3-offload", "deepspeed-zero3-offload-full"):
        assert rows[name]["status"] == "skipped" and "CUDA" in rows[name]["reason"]
    streamed = rows["hf_offload"]["extra"]
    layers = doc["model"]["layers"]
    # prefetch 1, a steady step (after warm-up): the turnaround reuses the last two layers, and the forward the first
    # two, which the previous step's backward left in the slots
    assert streamed["stats"]["layer_loads"] == 2 * (layers - 2)
    assert streamed["weight_bytes_per_step"] == streamed["stats"]["bytes_to_device"]
    assert doc["performance_model"]["bytes_per_step"] == streamed["weight_bytes_per_step"]  # the performance model
    ran = [m for m, row in rows.items() if m != "hf_offload" and row["status"] == "ok"]
    assert set(doc["ratios"]) == {f"hf_offload/{m} step time" for m in ran}
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


@pytest.mark.parametrize("row", ["deepspeed-zero3-offload", "deepspeed-zero3-offload-full"])
def test_trainer_driven_timing_without_deepspeed(monkeypatch, row):
    """The DeepSpeed rows run through Trainer callbacks; check that path on the CPU with DeepSpeed switched off."""
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
    outcome = methods.METHODS[row].run(setup, clock)
    assert len(clock.times) == 2 and all(t > 0 for t in clock.times)
    assert len(clock.losses) == 3 and all(math.isfinite(x) for x in clock.losses)
    assert "ZeRO-3" in outcome.notes[0]
    assert outcome.notes[0].endswith("every weight trained") == row.endswith("-full")


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


# --- sweeps over sequence lengths (--seq_lens, --long_context) ---------------------------------------------------
LONG_ROWS = "resident-checkpointed,hf_offload,hf_offload-activations"


def test_a_sweep_reports_a_row_per_length_and_method(capsys):
    doc = run_bench(capsys, "--seq_lens", "16,32", "--methods", LONG_ROWS)
    assert doc["settings"]["seq_lens"] == [16, 32] and doc["settings"]["batch"] == 1
    rows = [(row["seq"], row["method"]) for row in doc["rows"]]
    assert rows == [(seq, m) for seq in (16, 32) for m in LONG_ROWS.split(",")]
    hidden, layers = doc["model"]["hidden_size"], doc["model"]["layers"]
    for seq in (16, 32):
        at = {row["method"]: row for row in doc["rows"] if row["seq"] == seq}
        assert all(row["status"] == "ok" and row["tokens_per_s"] > 0 for row in at.values())
        losses = {name: row["losses"][0] for name, row in at.items()}
        assert max(losses.values()) - min(losses.values()) < 1e-4, losses  # same model, same batch
        stats = at["hf_offload-activations"]["extra"]["stats"]
        assert stats["bytes_to_host"] == stats["bytes_from_host_activations"] == layers * seq * hidden * 4
        assert at["hf_offload"]["extra"]["stats"]["bytes_to_host"] == 0
        notes = at["hf_offload-activations"]["notes"]
        assert any("GB of host buffers" in note and "page-locked" not in note for note in notes), notes
        assert f"hf_offload/resident-checkpointed step time at seq {seq}" in doc["ratios"]
    assert set(doc["performance_model_by_seq"]) == {"16", "32"}  # JSON keys


def test_the_table_of_a_sweep_names_the_length_of_every_row():
    rows = [
        Row(method="resident-checkpointed", status="ok", seq=32768, step_times_s=[2.0], losses=[1.0]),
        Row(method="resident-checkpointed", status="oom", seq=65536, reason="out of device memory (...)"),
        Row(method="resident-checkpointed", status="skipped", seq=131072, reason="out of device memory at seq 65,536"),
    ]
    rows[0].finish(tokens=32768, flops_parameters=10, h2d_bytes=None, h2d_peak_gbps=None)
    text = table(rows).splitlines()
    assert text[0].split()[:3] == ["method", "seq", "step"]
    assert text[2].split()[:3] == ["resident-checkpointed", "32,768", "2.000"]
    assert text[3].split()[:3] == ["resident-checkpointed", "65,536", "oom:"]
    assert text[4].split()[:3] == ["resident-checkpointed", "131,072", "skipped:"]


def test_a_method_out_of_memory_is_skipped_at_the_longer_lengths(capsys, monkeypatch):
    method = METHODS["resident-checkpointed"]
    prepare = type(method).prepare

    def runs_out_from_32_tokens(self, setup, clock):
        if setup.seq >= 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return prepare(self, setup, clock)

    monkeypatch.setattr(type(method), "prepare", runs_out_from_32_tokens)
    doc = run_bench(capsys, "--seq_lens", "16,32,64", "--methods", "resident-checkpointed,hf_offload")
    status = {(row["seq"], row["method"]): (row["status"], row["reason"]) for row in doc["rows"]}
    assert status[16, "resident-checkpointed"][0] == "ok"
    assert status[32, "resident-checkpointed"][0] == "oom"
    assert status[64, "resident-checkpointed"] == ("skipped", "out of device memory at seq 32 already")
    assert all(status[seq, "hf_offload"][0] == "ok" for seq in (16, 32, 64))


def test_the_long_context_sweep_is_refused_on_the_cpu():
    with pytest.raises(SystemExit, match="--long_context measures training steps of 32k to 512k tokens"):
        cli.main(["bench", "--device", "cpu", "--long_context"])


def test_sequence_lengths_are_parsed_and_checked():
    assert parse_lengths("32k,64k,128k,256k,512k") == [32768, 65536, 131072, 262144, 524288]
    assert parse_lengths(" 512, 1K") == [512, 1024]
    for bad in ("", "0", "x", "1.5k", "-4"):
        with pytest.raises(ValueError, match="should be positive sequence lengths"):
            parse_lengths(bad)
    with pytest.raises(ValueError, match="each length once"):
        parse_lengths("1k,1024")
    with pytest.raises(SystemExit, match="--seq and --seq_lens"):
        cli.main(["bench", "--device", "cpu", "--seq", "8", "--seq_lens", "16"])


def test_a_sweep_skips_offloaded_activations_that_would_not_fit_in_host_memory():
    config = load_config("tiny", None)
    facts = measure(config, torch.float32)

    def setup(seq: int, offload: bool = False) -> Setup:
        return Setup(config, facts, torch.float32, torch.device("cpu"), 1, seq, 8, 1, offload)

    huge = 2**40 // (4 * 64 * 4)  # 4 layers x hidden 64 x fp32: 1 TiB of saved hidden states
    assert offloaded_activation_bytes("hf_offload-activations", setup(huge)) == 2**40
    assert offloaded_activation_bytes("hf_offload", setup(huge)) == 0
    assert offloaded_activation_bytes("hf_offload", setup(huge, offload=True)) == 2**40
    assert offloaded_activation_bytes("resident-checkpointed", setup(huge, offload=True)) == 0
    reason = _does_not_fit("hf_offload-activations", setup(huge), model_bytes=1)
    assert reason.startswith("the model and its offloaded activations need") and "page-locked" in reason
    assert _does_not_fit("hf_offload", setup(huge), model_bytes=1) is None
    assert _does_not_fit("hf_offload-activations", setup(64), model_bytes=1) is None
