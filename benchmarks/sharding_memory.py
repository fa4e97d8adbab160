"""Per-rank memory of GAST under FSDP2 and DeepSpeed ZeRO-3 against DDP: 2 CPU processes (gloo),
random-init Llama.

Each mode runs in its own ``torch.distributed.run`` launch of 2 ranks; modes alternate over
rounds. Every rank builds the model with LoRA (r=8 on q,k,v,up,down), wraps it (DDP; FSDP2:
``fully_shard`` per decoder block and at the root; or ZeRO-3: ``deepspeed.initialize`` with stage
3, every parameter partitioned, as configs/deepspeed/zero3.json), and trains 3 GAST steps (k =
half the batch, support = the batch, SGD; under ZeRO-3 through DeepSpeed's ``backward``/``step``).
It reports the bytes of parameters it holds (FSDP2: its shards; ZeRO-3: its partitions, plus
DeepSpeed's fp32 copy of its adapter partition) and its resident memory: after the build, after
the wrap, and the peak during the steps (sampled every 5 ms). ``MALLOC_MMAP_THRESHOLD_`` makes
freed tensors go back to the OS, so a shard's saving shows in the resident size.

``--base-dtype bfloat16`` stores the (frozen) base weights in bf16, the adapters stay fp32 (the
forward runs in fp32 on the CPU's bf16 weights cast per layer by torch): half the memory, so a
~1B model fits beside other jobs.

Run (about 6 minutes on 2 loaded cores at the default shape; needs the deepspeed extra):
    python benchmarks/sharding_memory.py --shape llama-350m --out docs/results/sharding_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import provenance, write_json  # noqa: E402
from step_cost import rss_bytes  # noqa: E402

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "llama-1b": (2048, 5504, 16, 16, 16, 32000),
    "llama-350m": (1024, 2816, 24, 16, 16, 32000),
    "tiny": (64, 128, 4, 4, 2, 1000),
}
MODES = ("ddp", "fsdp2", "zero3")


class PeakRss:
    """Samples the resident size in a thread; ``peak`` is the largest seen."""

    def __init__(self, every: float = 0.005):
        self.peak, self.every, self._stop = rss_bytes(), every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def local_bytes(model, base_only: bool = False) -> int:
    """Bytes of parameters this rank holds: FSDP2 shards, ZeRO-3 partitions, else whole
    (``base_only``: of the frozen base weights only)."""
    total = 0
    for p in model.parameters():
        if base_only and p.requires_grad:
            continue
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p.to_local() if hasattr(p, "to_local") else p
        total += t.numel() * t.element_size()
    return total


def zero3_engine(model, args):
    """``deepspeed.initialize`` at ZeRO-3 with configs/deepspeed/zero3.json's partitioning."""
    import deepspeed
    import torch

    config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "sub_group_size": 1,
            # free a module's gathered weights after use, as FSDP2's reshard_after_forward does;
            # DeepSpeed's defaults (1e9 each) keep whatever is reused within 1e9 elements gathered
            # (here: all of it, from forward to backward), see docs/distributed.md
            "stage3_max_reuse_distance": args.zero3_reuse,
            "stage3_prefetch_bucket_size": args.zero3_reuse,
        },
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,  # torch SGD, as the Trainer passes its own
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from gastune.engine import GastEngine, GastSettings, per_sample_loss
    from gastune.models import find_decoder_blocks
    from gastune.training import apply_adapter

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    start = rss_bytes()
    hidden, inter, layers, heads, kv, vocab = SHAPES[args.shape]
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, args.base_dtype))  # built in it: no fp32 copy first
    base = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model = apply_adapter(base, r=8, alpha=16, dropout=0.0)
    for p in model.parameters():  # adapters fp32 (peft keeps them so; made sure here)
        if p.requires_grad:
            p.data = p.data.float()
    built, params_total, base_total = rss_bytes(), local_bytes(model), local_bytes(model, base_only=True)
    optimizer = None
    if args.mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    elif args.mode == "zero3":
        wrapped = zero3_engine(model, args)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in find_decoder_blocks(model).blocks:
            fully_shard(block)
        wrapped = fully_shard(model)
    wrapped_rss, params_local, base_local = (
        rss_bytes(),
        local_bytes(model),
        local_bytes(model, base_only=True),
    )
    if args.mode == "zero3":  # DeepSpeed's fp32 partitions of the adapters are held too
        opt = wrapped.optimizer
        params_local += sum(t.numel() * t.element_size() for t in opt.fp32_partitioned_groups_flat)
    else:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine = GastEngine(model, GastSettings(k=0.5)).attach()
    g = torch.Generator().manual_seed(1 + rank)
    with PeakRss() as peak:
        for step in range(args.steps):
            ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
            with engine.step(args.batch, None, step_seed=step):
                out = wrapped(input_ids=ids, attention_mask=torch.ones_like(ids))
                loss = per_sample_loss(out.logits, ids).mean()
                if optimizer is None:
                    wrapped.backward(loss)
                else:
                    loss.backward()
            if optimizer is None:
                wrapped.step()
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    result = {
        "rank": rank,
        "mode": args.mode,
        "param_bytes_held": params_local,
        "param_bytes_total": params_total,
        "base_bytes_held": base_local,
        "base_bytes_total": base_total,
        "param_count": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()),
        "rss_start": start,
        "rss_after_build": built,
        "rss_after_wrap": wrapped_rss,
        "rss_peak_steps": peak.peak,
        "records": len(engine.records),
    }
    Path(args.result_dir, f"{args.mode}-rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(args, mode: str, result_dir: Path) -> list[dict]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "CUDA_VISIBLE_DEVICES": "",
    }
    cmd = [
        *(
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            free_port(),
        ),
        *(__file__, "--worker", "--mode", mode, "--shape", args.shape, "--result-dir", str(result_dir)),
        *("--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)),
        *("--base-dtype", args.base_dtype, "--zero3-reuse", str(args.zero3_reuse)),
    ]
    subprocess.run(cmd, check=True, env=env)
    return [json.loads((result_dir / f"{mode}-rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--shape", default="llama-350m", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--zero3-reuse",
        type=int,
        default=0,
        help="ZeRO-3's stage3_max_reuse_distance and stage3_prefetch_bucket_size (elements); 0 frees "
        "each module's weights after use",
    )
    parser.add_argument("--base-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES)
    )
    parser.add_argument("--result-dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import tempfile

    modes = tuple(m for m in MODES if m in args.modes.split(","))
    if "ddp" not in modes:
        parser.error("--modes must include ddp (the reference)")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for mode in modes if round_ % 2 == 0 else modes[::-1]:
                runs.extend({**r, "round": round_} for r in launch(args, mode, Path(tmp)))
    gib = 2**30
    summary = {}
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        summary[mode] = {
            "param_GiB_held_per_rank": max(r["param_bytes_held"] for r in mine) / gib,
            "base_weights_GiB_held_per_rank": max(r["base_bytes_held"] for r in mine) / gib,
            "rss_GiB_after_wrap_per_rank": max(r["rss_after_wrap"] for r in mine) / gib,
            "rss_GiB_peak_steps_per_rank": max(r["rss_peak_steps"] for r in mine) / gib,
            # above what the process held before building the model (Python, torch, libraries)
            "model_GiB_after_wrap_per_rank": max(r["rss_after_wrap"] - r["rss_start"] for r in mine) / gib,
            "model_GiB_peak_steps_per_rank": max(r["rss_peak_steps"] - r["rss_start"] for r in mine) / gib,
        }
    ratios = {
        f"{mode}_over_ddp": {
            k.replace("_per_rank", ""): summary[mode][k] / summary["ddp"][k] for k in summary["ddp"]
        }
        for mode in modes
        if mode != "ddp"
    }
    settings = ("shape", "batch", "seq", "steps", "rounds", "base_dtype", "modes", "zero3_reuse")
    result = {
        "provenance": provenance(),
        "settings": {k: getattr(args, k) for k in settings},
        "shape": dict(
            zip(("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"), SHAPES[args.shape])
        ),
        "parameters": runs[0]["param_count"],
        "ranks": 2,
        "method": "gast (k=0.5, support=batch), LoRA r=8, SGD",
        "summary": summary,
        **ratios,
        "runs": runs,
    }
    print(json.dumps({"summary": summary, **ratios}, indent=2))
    if args.out:
        write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
