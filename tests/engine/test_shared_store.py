"""One host store per node: sharing in one process, two ranks mapping the same files, and the segment's lifecycle
(space check before packing, stale segments swept, a dead creator reported, the launcher's clean-up)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from families import build
from peft import LoraConfig, get_peft_model

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.engine import shared_store
from hf_offload.engine import store as store_module
from hf_offload.engine.anatomy import check_streamable
from hf_offload.engine.shared_store import PREFIX, SharedStoreError

REPO = Path(__file__).resolve().parents[2]
RANK_SCRIPT = str(REPO / "tests" / "dp_scripts" / "shared_rank.py")


@pytest.fixture
def root(tmp_path, monkeypatch):
    folder = tmp_path / "shm"
    folder.mkdir()
    monkeypatch.setattr(shared_store, "ROOT", str(folder))
    monkeypatch.setenv(shared_store.JOB_ENV, "testjob")
    return folder


def _lora_model():
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(build("llama"), config)


def test_one_process_streams_from_the_shared_store_exactly_and_refuses_writes(root):
    reference = _lora_model()
    model = hf_offload.enable_layer_streaming(copy.deepcopy(reference), OffloadConfig(shared_host_store=True))
    runtime = hf_offload.api.get_runtime(model)
    assert runtime.shared_store is not None and list(root.iterdir()) == []  # every local rank mapped: names gone
    with open("/proc/self/maps", encoding="utf-8") as f:
        assert sum(str(runtime.shared_store.path) in line for line in f) == len(runtime.store.packs)
    ids = torch.randint(3, 90, (2, 8), generator=torch.Generator().manual_seed(1))
    for m in (model, reference):
        torch.manual_seed(2)
        m(input_ids=ids, labels=ids).loss.backward()
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        if want.requires_grad:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(RuntimeError, match="cannot merge adapters into base weights kept in the node's shared"):
        model.merge_adapter()
    with pytest.raises(RuntimeError, match="load_state_dict would write .* into the node's shared host store"):
        model.load_state_dict(reference.state_dict())
    hf_offload.disable_layer_streaming(model)
    weight = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj.base_layer").weight
    weight.data.add_(0)  # private and writable again
    torch.testing.assert_close(
        weight, reference.get_submodule("base_model.model.model.layers.0.self_attn.q_proj.base_layer").weight
    )


def test_too_small_tmpfs_is_refused_before_anything_is_packed(root, monkeypatch):
    real = os.statvfs

    def tiny(path):
        stat = real(path)
        return os.statvfs_result((stat.f_bsize, stat.f_frsize, stat.f_blocks, 1, 1, *stat[5:]))

    monkeypatch.setattr(os, "statvfs", tiny)
    model = _lora_model()
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    with pytest.raises(SharedStoreError, match=r"needs .* in .*shm, but it has .* free.*shared_host_store=False"):
        hf_offload.enable_layer_streaming(model, OffloadConfig(shared_host_store=True))
    assert not hf_offload.is_streaming(model) and before == {n: p.data_ptr() for n, p in model.named_parameters()}
    assert list(root.iterdir()) == []


def _hold_lock(path: Path) -> subprocess.Popen:
    """A process holding a shared lock on `path` until killed (a living rank)."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_SH)\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_sweep_removes_segments_nobody_holds(root):
    dead, alive, young = (root / f"{PREFIX}{name}-0" for name in ("dead", "alive", "young"))
    for folder in (dead, alive, young):
        folder.mkdir()
    (dead / "lock").touch()
    holder = _hold_lock(alive / "lock")
    try:
        assert shared_store.sweep() == [str(dead)]
        assert not dead.exists() and alive.exists() and young.exists()  # young: its creator may lock it next
        holder.kill()
        holder.wait()
        assert shared_store.sweep() == [str(alive)]
    finally:
        holder.kill()
    os.utime(young, (time.time() - 3600, time.time() - 3600))
    assert shared_store.sweep() == [str(young)]


def test_a_waiting_rank_reports_a_creator_that_died(root):
    path = root / f"{PREFIX}testjob-abc"
    building = path.with_name(path.name + shared_store.CREATING)
    building.mkdir()
    holder = _hold_lock(building / "lock")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with pytest.raises(SharedStoreError, match="local rank 0 stopped while building"):
        shared_store._wait(path, timeout_s=5)
    with pytest.raises(SharedStoreError, match="did not start"):
        shared_store._wait(root / f"{PREFIX}testjob-never", timeout_s=0.1)


def _rank(root: Path, local_rank: int, world: int, *extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(world),
        shared_store.JOB_ENV: "twojob",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, RANK_SCRIPT, str(root), *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_ranks_map_the_same_files_and_leave_nothing_behind(root):
    ranks = [_rank(root, k, 2) for k in (0, 1)]
    outputs = [rank.communicate(timeout=180) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert reports[0]["inodes"] == reports[1]["inodes"] and len(reports[0]["inodes"]) == 4  # one file per layer
    assert reports[0]["loss"] == reports[1]["loss"]
    assert list(root.iterdir()) == []


def test_a_segment_left_by_a_killed_rank_is_swept_at_the_next_start(root):
    """Rank 0 of 2 maps the store, then is SIGKILLed before rank 1 came: the next start on the node removes it."""
    rank = _rank(root, 0, 2, "hold")
    report = json.loads(rank.stdout.readline())
    assert report["segment_exists"]  # rank 1 has not mapped it yet
    rank.send_signal(signal.SIGKILL)
    rank.wait()
    assert shared_store.sweep() == [report["segment"]] and list(root.iterdir()) == []


def test_the_launcher_removes_its_jobs_segments_when_the_command_ends(tmp_path):
    code = (
        "import os, sys\n"
        f"os.mkdir(os.path.join({shared_store.ROOT!r}, {PREFIX!r} + os.environ[{shared_store.JOB_ENV!r}] + '-x'))\n"
        "print(os.environ[" + repr(shared_store.JOB_ENV) + "])\n"
        "sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "hf_offload", "launch", "--", sys.executable, "-c", code],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    job = done.stdout.strip()
    assert job.startswith("launch") and not (Path(shared_store.ROOT) / f"{PREFIX}{job}-x").exists()


def _counting_empty(sizes: list):
    """`page_aligned_empty` that notes every buffer packing allocates."""
    real = store_module.page_aligned_empty
    return lambda n: sizes.append(n) or real(n)


def _as_local_rank(monkeypatch, local_rank: int) -> None:
    """This process plays local rank `local_rank` of 2 (the segment counter restarts, as in a fresh process)."""
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(shared_store, "_shared_in_this_process", 0)


def test_other_local_ranks_map_rank_0s_store_without_packing_and_refuse_other_weights(root, monkeypatch, caplog):
    """Local rank 0 builds the segment; local rank 1 (played by this process) maps it and packs nothing; a rank
    holding other weights stops with a clear error before anything is packed."""
    ids = torch.randint(3, 90, (2, 8), generator=torch.Generator().manual_seed(1))
    models = {}
    for local_rank in (0, 1):
        _as_local_rank(monkeypatch, local_rank)
        packed = []
        monkeypatch.setattr(store_module, "page_aligned_empty", _counting_empty(packed))
        with caplog.at_level("INFO", logger="hf_offload"):
            config = OffloadConfig(base_weight_dtype="nf4")
            models[local_rank] = hf_offload.enable_layer_streaming(_lora_model(), config)
        assert (packed == []) == (local_rank == 1), "local rank 1 packed a layer of its own"
    assert "local rank 1 maps the node's shared host store built by local rank 0" in caplog.text
    runtimes = [hf_offload.api.get_runtime(models[k]) for k in (0, 1)]
    assert all(r.shared_store is not None for r in runtimes) and list(root.iterdir()) == []  # both mapped: gone
    for a, b in zip(runtimes[0].store.packs, runtimes[1].store.packs, strict=True):
        assert torch.equal(a.host, b.host) and a.host.data_ptr() != b.host.data_ptr()  # two mappings, one file
    losses = [models[k].eval()(input_ids=ids, labels=ids).loss for k in (0, 1)]
    assert losses[0].item() == losses[1].item()

    _as_local_rank(monkeypatch, 0)
    hf_offload.enable_layer_streaming(_lora_model(), OffloadConfig())
    _as_local_rank(monkeypatch, 1)
    other = _lora_model()
    with torch.no_grad():
        other.get_submodule("base_model.model.model.layers.1.mlp.up_proj.base_layer").weight.mul_(2)
    with pytest.raises(SharedStoreError, match="built by local rank 0 from other weights.*shared_host_store=False"):
        hf_offload.enable_layer_streaming(other, OffloadConfig())
    assert not hf_offload.is_streaming(other)


def test_weights_key_tells_models_apart():
    from hf_offload.engine.runtime import _layouts, _weights_key

    def key(model):
        model.requires_grad_(False)
        anatomy = check_streamable(model)
        groups = [[] for _ in anatomy.layers]
        return _weights_key(anatomy.layers, _layouts(anatomy, None, groups), None)

    assert key(build("llama", seed=0)) == key(build("llama", seed=0))
    assert key(build("llama", seed=0)) != key(build("llama", seed=1))


def test_local_rank_0_encodes_the_nodes_store_on_every_core_it_may_use(root, monkeypatch):
    """torchrun gives each rank one thread; the node's other ranks wait while local rank 0 builds, so it encodes on
    every core of its affinity, and only while it builds."""
    from hf_offload.engine import nf4_encode

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    workers = []
    original = nf4_encode.run_parallel

    def recording(tasks, n=None):  # the threads the encoder would use, then one (this test's speed is not the point)
        workers.append(n or nf4_encode.default_workers())
        original(tasks, 1)

    monkeypatch.setattr(nf4_encode, "run_parallel", recording)
    for local_rank in (0, 1):
        _as_local_rank(monkeypatch, local_rank)
        hf_offload.enable_layer_streaming(_lora_model(), OffloadConfig(base_weight_dtype="nf4"))
        if local_rank == 0:
            assert workers and set(workers) == {6}, workers
            workers.clear()
    assert workers == []  # local rank 1 encodes nothing
    assert nf4_encode.default_workers() == 1  # back to torch's thread count once the store is built
    _as_local_rank(monkeypatch, 0)
    hf_offload.enable_layer_streaming(_lora_model(), OffloadConfig(base_weight_dtype="nf4", shared_host_store=False))
    assert workers and set(workers) == {1}  # a store of its own: nobody waits for it
