"""Per-sample loss straight from the last hidden states: the batch's logits are never formed.

For a frozen output projection (the usual LoRA set-up: ``lm_head`` is not trained, often
tied to the embeddings) the loss is computed over chunks of tokens from the hidden states
and the ``lm_head`` weight. Each chunk's logits, softmax and the gradient of the hidden
states are formed and dropped before the next chunk (Liger's fused linear cross-entropy, in
plain torch): the gradient is computed in the forward, because the token losses are the end
of the graph and their backward is linear in the upstream gradient — it only rescales each
token's row (under bf16 autocast the backward recomputes each chunk instead, so that the
gradient is rounded to bf16 after scaling, as in ordinary autograd). Peak extra memory is one chunk's logits instead of the batch's logits, their
fp32 log-softmax and their gradient (≈ 2.4 GB for SmolLM2 at 16 × 256 tokens).

How it hooks in without changing the model's forward: while ``fused_per_sample_loss`` runs
the model, the output projection's ``forward`` is swapped for one that computes the losses
and returns them broadcast to the logits' shape (a zero-copy view). The model call itself is
unchanged — DDP's forward, hooks and gradient checkpointing all run as usual — and the
returned "logits" hang off the loss in the autograd graph, so DDP's search for used
parameters still finds every one.

Falls back to the chunked loss on full logits (``loss.per_sample_loss``) when fusing would
be wrong or impossible: a trainable or adapted (LoRA) output projection, a model family
that transforms its logits after the projection (soft-capping, scaling), or a call whose
hidden states do not match the labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from gastune.engine.lean_dropout import lean_lora_dropout
from gastune.engine.loss import chunk_rows, per_sample_loss, shifted_targets, softmax_minus_onehot_, token_ce

# Model families whose logits are exactly ``lm_head(hidden)`` (no soft-capping, scaling or
# copy after the projection in their transformers implementation).
FUSABLE_MODEL_TYPES = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gpt2", "phi3", "smollm3"}
)


class _FusedLinearCE(torch.autograd.Function):
    """Token losses ``(M,)`` of ``hidden (M, H) @ weightᵀ``, chunk by chunk. ``weight``/``bias``
    must be frozen.

    fp32 logits: the gradient is formed in the forward and only rescaled per token in the
    backward (a token without a target has weight 0, so its row vanishes there). Lower
    precision logits (bf16 autocast): the backward recomputes each chunk's logits and scales
    the fp32 softmax gradient *before* rounding it to bf16, as the plain path does, so the
    result carries the same rounding as ordinary autograd (one more ``lm_head`` matmul).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, want_grad):
        loss = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty_like(loss)
        grad_hidden = None
        ctx.rows, ctx.compute = rows, None
        for s in range(0, hidden.shape[0], rows):
            logits = F.linear(hidden[s : s + rows], weight, bias)  # ambient autocast applies
            ctx.compute = compute = logits.dtype
            logits = logits.float()
            loss[s : s + rows], lse = token_ce(logits, targets[s : s + rows])
            lse_all[s : s + rows] = lse
            if want_grad and compute == torch.float32:
                if grad_hidden is None:
                    grad_hidden = torch.empty_like(hidden)
                grad = softmax_minus_onehot_(logits, targets[s : s + rows], lse)
                grad_hidden[s : s + rows] = grad @ weight.float()
            del logits
        if grad_hidden is not None:
            ctx.save_for_backward(grad_hidden)
            ctx.recompute = False
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, lse_all)
            ctx.recompute = True
        ctx.want_grad = want_grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if not ctx.want_grad:
            raise RuntimeError("gastune: fused loss computed without gradient cannot be back-propagated")
        if not ctx.recompute:
            (grad_hidden,) = ctx.saved_tensors
            return grad_hidden * grad_loss.unsqueeze(1).to(grad_hidden.dtype), None, None, None, None, None
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        compute, rows = ctx.compute, ctx.rows
        w = weight.to(compute)
        b = None if bias is None else bias.to(compute)
        grad_hidden = torch.empty_like(hidden)
        scale = torch.where(targets != -100, grad_loss, 0.0).unsqueeze(1)
        for s in range(0, hidden.shape[0], rows):
            logits = F.linear(hidden[s : s + rows].to(compute), w, b).float()
            grad = softmax_minus_onehot_(logits, targets[s : s + rows], lse[s : s + rows])
            grad_hidden[s : s + rows] = grad.mul_(scale[s : s + rows]).to(compute) @ w
        return grad_hidden, None, None, None, None, None


def fused_token_losses(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean token loss ``(N,)`` from the last hidden states ``(N, T, H)`` and a
    frozen output projection; equal to ``per_sample_loss(head(hidden), labels)``."""
    n, t, h = hidden.shape
    targets, weights = shifted_targets(labels)
    want_grad = torch.is_grad_enabled() and hidden.requires_grad
    flat = hidden.reshape(n * t, h)
    # Only tokens with a target reach the output projection: with the loss on the response
    # alone (the default), prompt and padding tokens are most of the batch, and their
    # vocabulary-wide matmul (forward and backward) would be spent on a zero loss.
    rows = (targets != -100).nonzero().squeeze(1)
    if rows.numel() == n * t:
        rows = None
    else:
        flat, targets = flat.index_select(0, rows), targets.index_select(0, rows)
    token_loss = _FusedLinearCE.apply(
        flat, head.weight, head.bias, targets, chunk_rows(head.out_features), want_grad
    )
    if rows is not None:
        token_loss = token_loss.new_zeros(n * t).index_put((rows,), token_loss)
    return (token_loss * weights.to(token_loss.device)).view(n, t).sum(dim=1)


def fusable_head(model: nn.Module) -> nn.Linear | None:
    """The model's output projection if the loss may be fused with it, else ``None``."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FUSABLE_MODEL_TYPES:
        return None
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return None  # an adapted (LoRA) or wrapped projection
    if "forward" in head.__dict__:
        return None  # already patched (e.g. a nested call)
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return None  # a trained head needs its weight gradient: use the chunked loss on logits
    if hasattr(head.weight, "ds_id"):
        # DeepSpeed ZeRO-3: the fused backward needs the whole weight, but the head's own
        # backward hook (which would gather it) never runs — the loss bypasses its output
        return None
    return head


class _Captured:
    losses: torch.Tensor | None = None


@contextmanager
def _fused_head(head: nn.Linear, labels: torch.Tensor) -> Iterator[_Captured]:
    captured = _Captured()

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape) or captured.losses is not None:
            return F.linear(hidden, head.weight, head.bias)
        captured.losses = fused_token_losses(hidden, head, labels.to(hidden.device))
        n, t = labels.shape
        return captured.losses.view(n, 1, 1).expand(n, t, head.out_features)

    head.forward = forward
    try:
        yield captured
    finally:
        del head.forward


def model_per_sample_loss(
    model: nn.Module, inputs: dict, labels: torch.Tensor, unwrapped: nn.Module | None = None
) -> tuple[torch.Tensor, object]:
    """Run ``model(**inputs)`` and return ``(per-sample losses (N,), outputs)``.

    The losses are fused with the output projection when possible (then ``outputs.logits``
    is not the logits but the losses broadcast to their shape: use ``per_sample_loss`` on a
    plain call when the logits are needed), and peft's LoRA dropouts save a mask instead of
    their output (``gastune.engine.lean_dropout``; the same results). ``unwrapped`` is the model under any
    data-parallel wrapper (``accelerator.unwrap_model(model)``), where the projection lives.

    Example:
        >>> losses, _ = model_per_sample_loss(model, {"input_ids": ids}, labels)  # doctest: +SKIP
    """
    inner = unwrapped if unwrapped is not None else model
    head = fusable_head(inner)
    if head is None:
        with lean_lora_dropout(inner):
            outputs = model(**inputs)
        return per_sample_loss(outputs.logits, labels), outputs
    with _fused_head(head, labels) as captured, lean_lora_dropout(inner):
        outputs = model(**inputs)
    if captured.losses is None:  # the projection never saw the batch's hidden states
        return per_sample_loss(outputs.logits, labels), outputs
    return captured.losses, outputs
