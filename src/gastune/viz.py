"""Pictures of GAST's selection: which samples of a micro-batch updated which layers.

``GastMethod.masks`` keeps recent ``(step, mask)`` pairs, each mask ``(N, L)`` bool with
``mask[i, l]`` set when sample ``i`` of that micro-batch updated group ``l``. One mask shows one
step's data-layer selection; many are averaged into a selection frequency. Rows are
positions in the micro-batch, not dataset indices (the sampler shuffles), so over many steps
the frequency shows how evenly GAST spreads its picks rather than which examples it likes.

Example:
    >>> plot_selection_heatmap(trainer.method.masks, "selection.png")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from gastune.errors import GastuneError

Masks = Sequence[tuple[int, torch.Tensor]] | Sequence[torch.Tensor]


def _as_mask(entry) -> torch.Tensor:
    mask = entry[1] if isinstance(entry, tuple) else entry
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise GastuneError(
            f"a selection mask must be a 2-D (samples, layers) tensor, got {type(mask).__name__}"
        )
    return mask


def selection_frequency(masks: Masks) -> torch.Tensor:
    """How often each batch position was selected for each layer.

    Args:
        masks: ``(step, mask)`` pairs as kept in ``GastMethod.masks``, or bare masks; each
            mask is ``(N_j, L)``. ``N_j`` may vary (a short last micro-batch).

    Returns:
        ``(N, L)`` float64 with ``N = max N_j``: entry ``(i, l)`` is the share of the masks
        having a row ``i`` in which sample ``i`` updated layer ``l``.
    """
    tensors = [_as_mask(m) for m in masks]
    if not tensors:
        raise GastuneError("no selection masks to aggregate (was GAST trained with keep_masks > 0?)")
    layers = {t.shape[1] for t in tensors}
    if len(layers) != 1:
        raise GastuneError(f"selection masks disagree on the number of layers: {sorted(layers)}")
    n = max(t.shape[0] for t in tensors)
    picked = torch.zeros(n, layers.pop(), dtype=torch.float64)
    present = torch.zeros(n, 1, dtype=torch.float64)  # how many masks have a row i
    for t in tensors:
        picked[: t.shape[0]] += t.detach().cpu().double()
        present[: t.shape[0]] += 1
    return picked / present


def plot_selection_heatmap(
    mask: torch.Tensor | Masks,
    path: str | Path,
    title: str | None = None,
    group_names: Sequence[str] | None = None,
) -> Path:
    """Draw the data × layer selection as a heatmap (layers down, samples across) to ``path``.

    Args:
        mask: one ``(N, L)`` mask (bool, or floats in [0, 1]), or a list of ``(step, mask)``
            pairs, which is averaged with :func:`selection_frequency`.
        path: the image file to write (the format follows its suffix, e.g. ``.png``).
        title: the figure title; by default says what is shown.
        group_names: a label per layer (e.g. ``[g.name for g in engine.groups]``).

    Returns:
        The path written.

    Raises:
        GastuneError: matplotlib is not installed, or the input is not a mask.
    """
    try:
        import matplotlib  # noqa: F401  (fails first, with the clearest error, when missing)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise GastuneError("plotting needs matplotlib: pip install matplotlib (or gastune[plots])") from exc

    if isinstance(mask, torch.Tensor):
        freq = _as_mask(mask).detach().cpu().double()
        default_title = "GAST selection (one micro-batch)"
    else:
        freq = selection_frequency(mask)
        default_title = f"GAST selection frequency over {len(mask)} micro-batches"
    n, layers = freq.shape
    if group_names is not None and len(group_names) != layers:
        raise GastuneError(f"{len(group_names)} group names for {layers} layers")

    # A Figure with an explicit Agg canvas: no pyplot, so no global backend or figure state.
    fig = Figure(figsize=(max(4.0, 0.35 * n + 2.5), max(3.0, 0.3 * layers + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(
        freq.T.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest"
    )
    ax.set_xlabel("sample (position in the micro-batch)")
    ax.set_ylabel("layer")
    if n <= 64:
        ax.set_xticks(range(n))
    if group_names is not None and layers <= 64:
        ax.set_yticks(range(layers), labels=list(group_names), fontsize=7)
    ax.set_title(title or default_title)
    fig.colorbar(image, ax=ax, label="share selected")
    fig.tight_layout()
    path = Path(path)
    # "tight" grows the saved area to every artist, so a title wider than the axes is not cut.
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.15)
    return path
