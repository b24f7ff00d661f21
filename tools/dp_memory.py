"""Host memory of data-parallel ranks streaming one model: the sum over ranks of proportional memory (Pss).

Each rank of a torchrun job (gloo, CPU) loads the same checkpoint, adds LoRA, streams it with hf_offload and trains a
few DDP steps. After every step the ranks meet at a barrier and each reads its own `/proc/self/smaps_rollup`:
Pss_Anon + Pss_Shmem (each shared page divided among the processes that map it, so the sum over ranks counts a page
once). The largest sum over the steps is reported, with the host store's size (the frozen weights). Pss_File
(clean page-cache pages of mapped files: libraries, and on the CPU the checkpoint's safetensors mapping, which the
resident tensors loaded from it keep mapped) is shown apart: the kernel can drop those pages under pressure.

Per rank, `floor` is the same job on a model of one tiny layer (interpreter, torch, transformers, peft, the process
group), and `rest` is what a rank of this job holds besides the frozen weights: (anon+shmem - stores) / ranks. The
baseline is the `rest` of the 1-rank run (it includes the adapters, their optimizer state and, on the CPU, the
layer slots that a GPU would hold in device memory). The claim checked is

    sum of (Pss_Anon + Pss_Shmem) over N ranks  <=  1.25 x frozen weights  +  N x baseline

for N = 1, 2, 4 with the node's store shared (the default with several ranks), and, for comparison, with one store
per rank (`--no-shared`).

Start-up is measured too: while each rank loads the model and starts streaming, a thread samples its Pss_Anon +
Pss_Shmem every 5 ms; the samples are summed over ranks on a common 10 ms clock, and the largest sum is `startup`.
`--load_into_store` loads with `HostStoreConfig` (what `hf-offload launch` does) instead of an ordinary load.

Usage (not in CI; a model of about 1 GB in fp32, written once under --workdir):
    python tools/dp_memory.py --ranks 1 2 4
    python tools/dp_memory.py --ranks 2 --no-shared
    python tools/dp_memory.py --ranks 1 2 4 --load_into_store
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's hf_offload

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 512


def pss_bytes() -> dict[str, int]:
    """This process's Pss, Pss_Anon and Pss_Shmem (bytes) from /proc/self/smaps_rollup."""
    wanted = {"Pss:": "pss", "Pss_Anon:": "anon", "Pss_Shmem:": "shmem", "Pss_File:": "file"}
    out = {}
    with open("/proc/self/smaps_rollup", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in wanted:
                out[wanted[parts[0]]] = int(parts[1]) * 1024
    return out


class Sampler:
    """This rank's Pss_Anon + Pss_Shmem every 5 ms, with the wall-clock time (comparable across the node's ranks)."""

    def __init__(self):
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            pss = pss_bytes()
            self.samples.append((time.time(), pss["anon"] + pss["shmem"]))
            time.sleep(0.005)

    def stop(self) -> list[tuple[float, int]]:
        self._done.set()
        self._thread.join()
        return self.samples


def peak_of_sum(per_rank: list[list[tuple[float, int]]], tick: float = 0.01) -> int:
    """The largest sum over ranks, each rank counted at its latest sample, on a common clock of `tick` seconds."""
    start = min(samples[0][0] for samples in per_rank)
    end = max(samples[-1][0] for samples in per_rank)
    best, positions = 0, [0] * len(per_rank)
    t = start
    while t <= end + tick:
        total = 0
        for r, samples in enumerate(per_rank):
            while positions[r] + 1 < len(samples) and samples[positions[r] + 1][0] <= t:
                positions[r] += 1
            total += samples[positions[r]][1] if samples[positions[r]][0] <= t else samples[0][1]
        best = max(best, total)
        t += tick
    return best


def checkpoint(path: str, layers: int, hidden: int) -> str:
    """A random Llama of `layers` layers of width `hidden`, saved once at `path`."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 64, 1),
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def worker(args) -> None:
    """One rank: load, LoRA, stream, DDP, `args.steps` steps; rank 0 writes the Pss sums to `args.result`."""
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import hf_offload
    from hf_offload import HostStoreConfig, OffloadConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    dist.barrier()
    sampler = Sampler()
    config = HostStoreConfig(shared_host_store=args.shared) if args.load_into_store else None
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, quantization_config=config)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    hf_offload.enable_layer_streaming(model, OffloadConfig(shared_host_store=args.shared, show_progress=False))
    startup_samples = sampler.stop()
    store_bytes = hf_offload.summary(model).host_store_bytes
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, startup_samples)
    startup = peak_of_sum(gathered)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(dist.get_rank())
    sums = []
    for _ in range(args.steps):
        ids = torch.randint(3, VOCAB, (1, 16), generator=g)
        ddp(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        dist.barrier()
        mine = pss_bytes()
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        total = {key: sum(r[key] for r in everyone) for key in mine}
        sums.append({**total, "anon_shmem": total["anon"] + total["shmem"]})
        dist.barrier()
    if dist.get_rank() == 0:
        peak = max(sums, key=lambda s: s["anon_shmem"])
        with open(args.result, "w", encoding="utf-8") as f:
            json.dump({"ranks": dist.get_world_size(), "store_bytes": store_bytes, "startup": startup, **peak}, f)
    dist.barrier()  # then exit: gloo's destroy_process_group has hung here with 4 ranks on 2 cores


def run(model: str, ranks: int, shared: bool, steps: int, load_into_store: bool = False) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
        "--master_port", str(29500 + os.getpid() % 1000), os.path.abspath(__file__), "--worker", "--model", model,
        "--result", result, "--steps", str(steps), "--shared" if shared else "--no-shared",
        "--load_into_store" if load_into_store else "--no-load_into_store",
    ]  # fmt: skip
    path = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    subprocess.run(command, env=env, check=True)
    with open(result, encoding="utf-8") as f:
        out = json.load(f)
    os.remove(result)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--shared", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--load_into_store", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "hf_offload_dp_memory"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    big = checkpoint(os.path.join(args.workdir, f"llama-{args.layers}x{args.hidden}"), args.layers, args.hidden)
    tiny = checkpoint(os.path.join(args.workdir, "llama-1x64"), 1, 64)
    gib = lambda n: f"{n / 2**30:6.3f} GiB"
    print(f"{'ranks':>5}  {'shared':>6}  {'frozen':>10}  {'anon+shmem':>10}  {'anon':>10}  {'shmem':>10}  "
          f"{'file':>10}  {'floor/rank':>10}  {'rest/rank':>10}  {'bound':>10}  ok  {'startup':>10}")  # fmt: skip
    baseline = None  # per rank: what one rank holds besides the frozen weights, from the first 1-rank run
    for n in args.ranks:
        floor = run(tiny, n, args.shared, args.steps, args.load_into_store)["anon_shmem"] / n
        got = run(big, n, args.shared, args.steps, args.load_into_store)
        copies = 1 if args.shared else n
        rest = (got["anon_shmem"] - copies * got["store_bytes"]) / n
        if baseline is None and n == 1:
            baseline = rest
        bound = 1.25 * got["store_bytes"] + n * (baseline if baseline is not None else floor)
        print(
            f"{n:>5}  {str(args.shared):>6}  {gib(got['store_bytes'])}  {gib(got['anon_shmem'])}  {gib(got['anon'])}  "
            f"{gib(got['shmem'])}  {gib(got['file'])}  {gib(floor)}  {gib(rest)}  {gib(bound)}  "
            f"{got['anon_shmem'] <= bound}  {gib(got['startup'])}",
            flush=True,
        )


if __name__ == "__main__":
    main()
