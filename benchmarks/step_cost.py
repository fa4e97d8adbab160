"""Step time and peak memory of each method, as ratios to the peer and to gastune LoRA, side by side.

The peer is what a user runs today: plain ``transformers.Trainer`` + peft LoRA, trained on the
model's own loss (``peer``). Every gastune method trains through ``GastuneTrainer`` on the same
batches. Each (variant, round) runs in a fresh subprocess so its peak memory is its own, and
rounds alternate variants (A B C C B A …) so machine noise hits all of them alike.

Variants: ``peer``, any registered method (``lora``, ``gast``, ``ist``, ``rst`` …; docs/methods.md),
``gast-batch`` (GAST with ``--gast_support batch``), ``gast-twopass`` (GAST with a separate
support pass, ``--gast_support_pass two``: the memory option) and ``gast-onepass`` (the support
rows riding in the batch's forward/backward: what ``gast`` runs by default).

Run (CPU, embedded model, the issue's setting):
    python benchmarks/step_cost.py --methods peer,lora,gast,gast-batch,gast-twopass,ist,rst --batch 16 --seq 256 \
        --steps 3 --out docs/results/step_cost_cpu.json --readme
GPU, randomly initialised LLaMA-7B shape in bf16 (benchmarks/gpu_check.sh):
    python benchmarks/step_cost.py --device cuda --shape llama-7b --bf16 --out docs/results/step_cost_gpu.json
Re-render the README table from a results JSON (e.g. after a re-run elsewhere):
    python benchmarks/step_cost.py --render docs/results/step_cost_cpu.json --readme
Series/parallel bottleneck adapters (the "lora" row is then the dense step on that tuner):
    python benchmarks/step_cost.py --tuner series --bottleneck-size 256 --methods lora,gast
Fisher scores its layers during the warm-up step; IST's probe runs every 10 steps (ist_interval),
so a run of fewer steps times IST without it (three gradient-free forwards of 16 rows per 10 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import provenance, update_readme_block, write_json  # noqa: E402

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "llama-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama-1b": (2048, 5504, 16, 16, 16, 32000),
    "tiny": (64, 128, 4, 4, 2, 1000),
}


# variant name -> (gastune method, extra GastuneConfig fields); "peer" is plain Trainer + peft.
VARIANTS = {
    "gast-batch": ("gast", {"gast_support": "batch"}),
    "gast-onepass": ("gast", {"gast_support_pass": "one"}),
    "gast-twopass": ("gast", {"gast_support_pass": "two"}),
}


def build_model(args):
    import torch

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.shape:
        from transformers import LlamaConfig, LlamaForCausalLM

        hidden, inter, layers, heads, kv, vocab = SHAPES[args.shape]
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            max_position_embeddings=max(2048, args.seq),
        )
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg).to(dtype)  # random weights: cost does not depend on them
        return model, vocab
    from gastune.models import load_model

    model = load_model(args.model, dtype=dtype).to(args.device)
    return model, model.config.vocab_size


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> dict:
    import resource

    import torch
    from transformers import TrainerCallback

    from gastune.training import GastuneConfig, GastuneTrainer, apply_adapter
    from gastune.training.adapters import BOTTLENECK_TUNERS

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, vocab = build_model(args)
    method, extra = VARIANTS.get(args.method, (args.method, {}))
    tuner = "dora" if method == "dora" else args.tuner  # --method dora is dense DoRA
    if tuner in BOTTLENECK_TUNERS:  # dense "lora" then means the dense step on this tuner
        model = apply_adapter(model, tuner=tuner, bottleneck_size=args.bottleneck_size)
    else:
        model = apply_adapter(model, tuner=tuner, r=args.rank, alpha=2 * args.rank, dropout=0.05)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps = args.warmup + args.steps
    g = torch.Generator().manual_seed(1)
    data = [
        {"input_ids": torch.randint(0, vocab, (args.seq,), generator=g)} for _ in range(args.batch * steps)
    ]

    def collate(features):
        ids = torch.stack([f["input_ids"] for f in features])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    common = dict(
        output_dir=str(ROOT / "runs" / "bench"),
        per_device_train_batch_size=args.batch,
        max_steps=steps,
        learning_rate=1e-4,
        optim="adamw_torch",
        save_strategy="no",
        report_to="none",
        logging_steps=10_000,
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        seed=0,
        dataloader_drop_last=True,
        gradient_checkpointing=args.checkpointing,
    )
    if method == "peer":  # what users run today: the plain Trainer on the model's own loss
        from transformers import Trainer, TrainingArguments

        trainer_cls, config = Trainer, TrainingArguments(**common)
    else:
        trainer_cls = GastuneTrainer
        config = GastuneConfig(**common, method=method, gast_k=args.k, gast_support_size=args.k_sup, **extra)
    baseline_rss = rss_bytes()
    trainer = trainer_cls(
        model=model, args=config, train_dataset=data, data_collator=collate, callbacks=[StepTimer()]
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            trainer.train()
        sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=25)
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        (Path(args.profile) / f"{args.method}.txt").write_text(table)
    else:
        trainer.train()
    measured = times[args.warmup :]
    result = {
        "method": args.method,
        "step_times_s": measured,
        "median_step_s": statistics.median(measured),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_training_bytes": baseline_rss,
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    if args.device == "cuda":
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return result


def parent(args) -> None:
    origin = provenance(args.device)  # before any worker runs: the code being measured
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for reference in ("lora", "peer"):  # the references every ratio is taken against
        if reference not in methods:
            methods.insert(0, reference)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for round_index in range(args.rounds):
        order = methods if round_index % 2 == 0 else list(reversed(methods))
        for method in order:
            cmd = [sys.executable, __file__, "--worker", "--method", method, *sys.argv[1:]]
            if args.pin_cpu is not None:  # a dedicated core keeps other jobs' noise out of the ratios
                cmd = ["taskset", "-c", str(args.pin_cpu), *cmd]
            print(f"round {round_index + 1}/{args.rounds}: {method} ...", flush=True)
            env = dict(os.environ)
            if args.malloc_mmap_threshold:
                # glibc keeps freed heap memory resident, so peak RSS would also count its cache
                # (which a method's differently sized passes fragment differently). Serving large
                # blocks by mmap returns them on free: peak RSS then tracks live tensor memory,
                # as torch.cuda.max_memory_allocated does on a GPU.
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
            out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                sys.stderr.write(out.stderr[-4000:])
                raise SystemExit(f"worker for {method} failed (exit {out.returncode})")
            runs[method].append(json.loads(lines[-1][len("RESULT ") :]))
        report = summarize(args, runs, origin, rounds_done=round_index + 1)
        write_json(args.out, report)  # after every round: an interrupted run keeps what it measured
    publish(report, args)


def summarize(args, runs: dict[str, list[dict]], origin: dict, rounds_done: int) -> dict:
    memory_key = "peak_cuda_bytes" if args.device == "cuda" else "peak_rss_bytes"
    summary = {}
    for method, results in runs.items():
        all_times = [t for r in results for t in r["step_times_s"]]
        summary[method] = {
            "median_step_s": statistics.median(all_times),
            "peak_memory_bytes": max(r[memory_key] for r in results),
            "peak_increase_bytes": max(r[memory_key] - r["rss_before_training_bytes"] for r in results)
            if args.device == "cpu"
            else None,
        }
    for name, suffix in (("lora", ""), ("peer", "_vs_peer")):
        ref = summary[name]
        for s in summary.values():
            s[f"time_ratio{suffix}"] = s["median_step_s"] / ref["median_step_s"]
            s[f"memory_ratio{suffix}"] = s["peak_memory_bytes"] / ref["peak_memory_bytes"]
            if s["peak_increase_bytes"] is not None:
                s[f"memory_increase_ratio{suffix}"] = s["peak_increase_bytes"] / ref["peak_increase_bytes"]
    report = {
        "benchmark": "step_cost",
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("worker", "method", "readme", "render", "note")
        },
        "note": args.note,
        "rounds_completed": rounds_done,
        "memory_metric": memory_key,
        "summary": summary,
        "runs": runs,
        **origin,
    }
    report["output"] = args.out
    return report


def publish(report: dict, args) -> None:
    table = render_table(report)
    print(table)
    if args.readme:
        block = args.readme_block or report["settings"].get("readme_block") or f"step_cost_{args.device}"
        update_readme_block(ROOT / "README.md", block, table)


LABELS = {
    "peer": "peer: `transformers.Trainer` + peft LoRA, model's own loss",
    "gast-batch": "gastune gast, `--gast_support batch`",
    "gast": "gastune gast (support drawn from the training set; one pass, the default)",
    "gast-onepass": "gastune gast, `--gast_support_pass one`",
    "gast-twopass": "gastune gast, `--gast_support_pass two`",
}


def _ratio(row: dict, key: str) -> str:
    return f"×{row[key]:.2f}" if key in row else "–"  # results from before the peer existed


def render_table(report: dict) -> str:
    s = report["settings"]
    model = (s["shape"] and f"random {s['shape']}") or s["model"]
    bottleneck = s["tuner"] in ("series", "parallel")
    size = f"bottleneck {s.get('bottleneck_size', 256)}" if bottleneck else f"r={s['rank']}"
    lines = [
        f"Model {model}, {s['tuner']} {size}, batch {s['batch']} × {s['seq']} tokens, "
        f"GAST k={s['k']} K_sup={s['k_sup']}, {'bf16' if s['bf16'] else 'fp32'} on {report['machine']['device_name']}"
        + (f", {s['threads']} thread(s)" if s.get("threads") else "")
        + (
            f", peak RSS with MALLOC_MMAP_THRESHOLD_={s['malloc_mmap_threshold']} (≈ live memory)"
            if s.get("malloc_mmap_threshold") and report["settings"]["device"] == "cpu"
            else ", peak RSS with the default allocator (includes its cache of freed memory)"
            if report["settings"]["device"] == "cpu"
            else ""
        )
        + "; "
        f"{report.get('rounds_completed', s['rounds'])} interleaved round(s) × {s['steps']} steps"
        + (f" after {s['warmup']} warm-up" if s["warmup"] else " (no warm-up step)")
        + f"; {report['date'][:10]}, commit {(report['git']['commit'] or 'unknown')[:8]}"
        + (" (dirty)" if report["git"]["dirty"] else ""),
        "",
        "| variant | median step (s) | time vs peer | time vs LoRA | peak memory (GiB) "
        "| memory vs peer | memory vs LoRA |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, r in report["summary"].items():
        name = LABELS.get(method, f"gastune {method}")
        lines.append(
            f"| {name} | {r['median_step_s']:.2f} | {_ratio(r, 'time_ratio_vs_peer')} | ×{r['time_ratio']:.2f} "
            f"| {r['peak_memory_bytes'] / 2**30:.2f} | {_ratio(r, 'memory_ratio_vs_peer')} | ×{r['memory_ratio']:.2f} |"
        )
    lines.append("")
    if report.get("note"):
        lines += [report["note"], ""]
    lines.append(f"Source: `{report['command']}` → `{report['output']}`")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="peer,lora,gast")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="random-weight LLaMA shape instead")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--tuner", default="lora")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--bottleneck-size", type=int, default=256, help="--tuner series|parallel")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--k", type=float, default=8)
    p.add_argument("--k-sup", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument(
        "--profile", default=None, help="folder: each worker writes its torch.profiler op table there"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in each worker")
    p.add_argument("--pin-cpu", type=int, default=None, help="run workers on this CPU core (taskset)")
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=65536,
        help="glibc MALLOC_MMAP_THRESHOLD_ for workers (0: allocator default, peak RSS then includes its cache)",
    )
    p.add_argument("--out", default="docs/results/step_cost.json")
    p.add_argument("--readme", action="store_true", help="update the README's table from this run")
    p.add_argument("--readme-block", default=None, help="README block name (default step_cost_<device>)")
    p.add_argument("--note", default=None, help="a sentence printed under the table (e.g. machine load)")
    p.add_argument("--render", default=None, help="re-render the table from this results JSON; runs nothing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
    elif args.render:
        report = json.loads(Path(args.render).read_text())
        args.device = report["settings"]["device"]
        if args.note:
            report["note"] = args.note
        publish(report, args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
