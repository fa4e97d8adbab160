"""Per-sample causal-LM loss: each sample's mean token loss (the unit GAST selects on).

The full-vocabulary logits dominate a fine-tuning step's memory (SmolLM2 at 16 × 256 tokens:
0.8 GB per fp32 copy; the plain cross-entropy keeps a log-softmax and its gradient besides).
``per_sample_loss`` therefore works over chunks of tokens: each chunk's fp32 log-softmax
exists only while that chunk is processed, and the backward recomputes it from the logits
and the saved log-sum-exp (torchtune's chunked CE). ``gastune.engine.fused_loss`` goes
further and never forms the batch's logits at all. ``plain_per_sample_loss`` is the
obviously-correct version the tests compare both with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of one chunk's fp32 logits (64 MiB): small next to the batch, large enough that
# the per-chunk matmuls stay efficient.
CHUNK_ELEMENTS = 1 << 24


def chunk_rows(vocab: int) -> int:
    """Tokens per chunk for a vocabulary of ``vocab``."""
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's next-token target, flattened to ``(N·T,)`` (the last position of a
    row has none: -100), and each token's weight ``1/count_i`` (0 where there is no target),
    so that a per-sample mean is a weighted sum. Position-aligned with ``logits.view(N·T, V)``,
    which needs no copy of the logits (shifting them would make one)."""
    shift = F.pad(labels[:, 1:], (0, 1), value=-100)
    valid = shift != -100
    counts = valid.sum(dim=1, keepdim=True).clamp_min(1)
    weights = valid.float() / counts
    return shift.reshape(-1), weights.reshape(-1)


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy ``(M,)`` of one chunk of logits ``(M, V)`` (computed in fp32) and its
    log-sum-exp ``(M,)``. Ignored targets (-100) get loss 0."""
    logits = logits.float()
    valid = targets != -100
    lse = torch.logsumexp(logits, dim=-1)
    loss = torch.where(valid, lse - logits.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1), 0.0)
    return loss, lse


def softmax_minus_onehot_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """The cross-entropy gradient ``softmax - onehot`` of fp32 ``logits (M, V)``, formed in
    their buffer (pass a temporary). Rows of ignored targets are not zeroed: their upstream
    gradient is 0 (their weight in the per-sample mean)."""
    grad = logits.sub_(lse.unsqueeze(1)).exp_()
    safe = targets.clamp_min(0).unsqueeze(1)
    return grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))


class _ChunkedCE(torch.autograd.Function):
    """Per-token cross-entropy over chunks of ``(M, V)`` logits; backward recomputes the
    softmax chunk by chunk from the saved log-sum-exp."""

    @staticmethod
    def forward(ctx, logits, targets, rows):
        loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(loss)
        for s in range(0, logits.shape[0], rows):
            loss[s : s + rows], lse[s : s + rows] = token_ce(logits[s : s + rows], targets[s : s + rows])
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = torch.where(targets != -100, grad_loss, 0.0).unsqueeze(1)
        for s in range(0, logits.shape[0], ctx.rows):
            chunk = logits[s : s + ctx.rows].to(torch.float32, copy=True)
            chunk = softmax_minus_onehot_(chunk, targets[s : s + ctx.rows], lse[s : s + ctx.rows])
            grad[s : s + ctx.rows] = chunk.mul_(scale[s : s + ctx.rows])
        return grad, None, None


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample over its target tokens, computed over
    chunks of tokens (never the whole batch's fp32 log-softmax at once).

    Args:
        logits: ``(N, T, V)``; labels: ``(N, T)`` with -100 where there is no target.

    Returns:
        ``(N,)`` fp32 losses. A sample with no target token gets loss 0 (and zero gradient).

    Example:
        >>> logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
        >>> torch.allclose(per_sample_loss(logits, labels), plain_per_sample_loss(logits, labels))
        True
    """
    n, t, v = logits.shape
    targets, weights = shifted_targets(labels)
    token_loss = _ChunkedCE.apply(logits.reshape(n * t, v), targets, chunk_rows(v))
    return (token_loss * weights).view(n, t).sum(dim=1)


def plain_per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same loss computed the obvious way (one fp32 log-softmax of the whole batch):
    the reference the chunked and fused versions are tested against."""
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    n, t, v = shift_logits.shape
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, v).float(), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(n, t)
    counts = (shift_labels != -100).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp_min(1)


def has_target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: the sample has at least one target token after the causal shift, i.e.
    ``per_sample_loss`` scores it. Pass it as ``GastEngine.step(eligible=...)``.

    Example:
        >>> has_target_tokens(torch.tensor([[5, 6, 7], [5, -100, -100]])).tolist()
        [True, False]
    """
    return (labels[:, 1:] != -100).any(dim=1)
