"""A short real train + eval through gastune's own entry points, on any device (part (c) of
``benchmarks/gpu_check.sh``).

The lent GPU machine cannot hold the default model (its 98 MB GGUF is over what a call may
carry, and the machine has no ``gguf`` package and no network) nor the commonsense assets
(no ``datasets``). So this trains the default model's *architecture* (SmolLM2-135M: 30 blocks,
hidden 576, randomly initialised) on real commonsense records carried in the tree
(``benchmarks/data/commonsense_small_*.jsonl``, exported here with ``load_commonsense``), with
``gastune.training.run.train`` — the path ``gastune train`` takes — and then scores the
validation records with ``gastune.eval.loglik.evaluate_commonsense``. The tokenizer is the
real one when a folder holding it is given (``--tokenizer``), else a byte-level BPE trained on
the records in a second. The run fails unless every logged loss is finite and the loss fell.

    python benchmarks/gpu_train_eval.py --device cuda --out runs/gpu_check/train_eval.json
    python benchmarks/gpu_train_eval.py --device cpu --shape tiny --steps 4   # the dry run
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
SHAPES = {  # hidden, intermediate, layers, heads, kv heads (SmolLM2-135M's config)
    "smollm2-135m": (576, 1536, 30, 9, 3),
    "tiny": (64, 128, 2, 4, 2),
}


def build_tokenizer(folder: str | None, records: list[dict]):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if folder:
        return AutoTokenizer.from_pretrained(folder)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [r["instruction"] + "\n" + r["output"] for r in records]
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=2048,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--tokenizer", default=None, help="folder with the real tokenizer (optional)")
    p.add_argument("--method", default="gast")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-records", type=int, default=80)
    p.add_argument("--work", default=str(ROOT / "runs" / "gpu_check" / "train_eval"))
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_check" / "train_eval.json"))
    args = p.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gastune.eval.loglik import evaluate_commonsense
    from gastune.provenance import provenance, write_json
    from gastune.training.config import DataConfig, GastuneConfig, ModelConfig
    from gastune.training.run import train

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    started = time.perf_counter()
    train_file = DATA / "commonsense_small_train.jsonl"
    validation = read_jsonl(DATA / "commonsense_small_validation.jsonl")[: args.eval_records]
    tokenizer = build_tokenizer(args.tokenizer, read_jsonl(train_file))
    hidden, inter, layers, heads, kv = SHAPES[args.shape]
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    folder = Path(args.work) / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    bf16 = args.device == "cuda"
    config = GastuneConfig(
        output_dir=str(Path(args.work) / "adapter"),
        method=args.method,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=2e-3,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        bf16=bf16,
        gast_k=args.batch // 2,
        gast_support_size=4,
        seed=0,
        dataloader_drop_last=True,
    )
    result = train(ModelConfig(model=str(folder)), DataConfig(data=str(train_file), cutoff_len=256), config)
    losses = [e["loss"] for e in result.trainer.state.log_history if "loss" in e]
    model = result.model.eval()
    with torch.autocast(args.device, dtype=torch.bfloat16, enabled=bf16):
        evaluation = evaluate_commonsense(model, result.tokenizer, validation, batch_size=16, progress=False)
    device_seen = str(next(model.parameters()).device)
    report = {
        "benchmark": "gpu_train_eval",
        "settings": vars(args),
        "model": f"random-init {args.shape} architecture, vocab {len(tokenizer)}",
        "device_of_parameters": device_seen,
        "cuda_device": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "losses": losses,
        "accuracy": evaluation.average,
        "tasks": {k: v.accuracy for k, v in evaluation.tasks.items()},
        "wall_s": time.perf_counter() - started,
        **provenance(args.device),
    }
    write_json(args.out, report)
    print(json.dumps({k: report[k] for k in ("device_of_parameters", "losses", "accuracy", "wall_s")}))
    head, tail = losses[: max(1, len(losses) // 4)], losses[-max(1, len(losses) // 4) :]
    if len(losses) != args.steps or not all(math.isfinite(v) for v in losses):
        raise SystemExit(f"expected {args.steps} finite logged losses, got {losses}")
    if not sum(tail) / len(tail) < sum(head) / len(head):
        raise SystemExit(f"the training loss did not fall: {losses}")
    if not device_seen.startswith(args.device):
        raise SystemExit(f"the model trained on {device_seen}, not {args.device}")


if __name__ == "__main__":
    main()
