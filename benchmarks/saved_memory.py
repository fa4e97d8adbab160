"""Where a training step's memory goes: the bytes autograd saves for backward, by module.

One forward of the step_cost setting (SmolLM2-135M, peft LoRA r=32 on q,k,v,up,down, dropout
0.05, fp32) under ``torch.autograd.graph.saved_tensors_hooks``: every tensor saved for
backward is counted once (by storage) and attributed to the innermost module running when
it was first saved, with the layer index folded (``layers.*``); the model's weights are left
out (they exist anyway). These tensors are what is
alive when backward starts, the step's peak on top of the weights, optimizer state and the
loss's own transient. ``peer`` runs the model's own loss (what plain ``transformers.Trainer``
does); ``gastune`` runs gastune's loss path (``model_per_sample_loss``), which is where the
Trainer's ``compute_loss`` and the GAST support pass go; ``gastune-peft-dropout`` is the same
with peft's own dropout (what gastune ran before ``gastune.engine.lean_dropout``).

Run (one core; memory grows with the batch, 4 × 256 needs ≈ 3 GB):
    OMP_NUM_THREADS=1 python benchmarks/saved_memory.py --batch 4 --seq 256
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch

from gastune.engine import fused_loss, lean_dropout


def folded(name: str) -> str:
    name = re.sub(r"^base_model\.model\.", "", name)
    return re.sub(r"\.layers\.\d+\.", ".layers.*.", name)


@contextmanager
def tally(model: torch.nn.Module):
    """Yields ``{module: bytes}`` of unique storages saved for backward while inside."""
    stack: list[str] = ["(outside any module)"]
    # the model's own weights (saved by every matmul) exist anyway: not counted
    seen: set[int] = {p.untyped_storage()._cdata for p in model.parameters()}
    by_module: dict[str, int] = defaultdict(int)
    handles = []

    def enter(name):
        return lambda module, args: stack.append(name)  # returns None: the inputs are kept

    def leave(module, args, output):
        stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(folded(name))))
        handles.append(module.register_forward_hook(leave, always_call=True))

    def count(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            by_module[stack[-1]] += storage.nbytes()

    def pack(t: torch.Tensor):
        count(t)
        return t

    # gastune's lean LoRA dropout installs its own (innermost) hooks: count what they keep
    # (a tensor, or a recipe's input and mask) instead of what they were handed.
    lean_pack = lean_dropout._Registry._pack

    def counted_lean_pack(self, t):
        packed = lean_pack(self, t)
        dropped = getattr(packed, "dropped", packed)
        for kept in (
            (dropped.source, dropped.mask) if isinstance(dropped, lean_dropout.Dropped) else (packed,)
        ):
            count(kept)
        return packed

    lean_dropout._Registry._pack = counted_lean_pack
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield by_module
    finally:
        lean_dropout._Registry._pack = lean_pack
        for h in handles:
            h.remove()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--variants", default="peer,gastune-peft-dropout,gastune")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()

    from gastune.engine.fused_loss import model_per_sample_loss
    from gastune.models import load_model
    from gastune.training import apply_adapter

    torch.manual_seed(0)
    model = apply_adapter(
        load_model(args.model), tuner="lora", r=args.rank, alpha=2 * args.rank, dropout=args.dropout
    )
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    print(f"{args.model}, LoRA r={args.rank} dropout {args.dropout}, batch {args.batch} × {args.seq}, fp32")
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        with tally(model) as by_module:
            if variant == "peer":
                loss = model(**inputs, labels=ids).loss
            elif variant == "gastune-peft-dropout":
                lean = fused_loss.lean_lora_dropout
                fused_loss.lean_lora_dropout = lambda m: nullcontext()
                try:
                    loss = model_per_sample_loss(model, inputs, ids)[0].mean()
                finally:
                    fused_loss.lean_lora_dropout = lean
            else:
                loss = model_per_sample_loss(model, inputs, ids)[0].mean()
        total = sum(by_module.values())
        print(f"\n{variant}: {total / 2**20:.0f} MiB saved for backward")
        for name, size in sorted(by_module.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {size / 2**20:9.1f} MiB  {100 * size / total:5.1f}%  {name}")
        del loss, by_module


if __name__ == "__main__":
    main()
