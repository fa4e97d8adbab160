"""The selection heatmap: frequencies by hand, and a real PNG on disk."""

from __future__ import annotations

import sys

import pytest
import torch

from gastune.engine.stats import SelectionRecord, selection_mask
from gastune.errors import GastuneError
from gastune.viz import plot_selection_heatmap, selection_frequency

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_selection_frequency_by_hand():
    a = torch.tensor([[1, 0], [1, 1], [0, 0]], dtype=torch.bool)
    b = torch.tensor([[0, 0], [1, 0], [1, 1]], dtype=torch.bool)
    c = torch.tensor([[1, 1], [0, 1]], dtype=torch.bool)  # a short last micro-batch: no row 2
    expected = torch.tensor([[2 / 3, 1 / 3], [2 / 3, 2 / 3], [1 / 2, 1 / 2]], dtype=torch.float64)
    torch.testing.assert_close(selection_frequency([(0, a), (1, b), (1, c)]), expected)
    # bare masks work too, and one mask is its own frequency
    torch.testing.assert_close(selection_frequency([a]), a.double())


def test_selection_frequency_rejects_bad_input():
    with pytest.raises(GastuneError, match="no selection masks"):
        selection_frequency([])
    with pytest.raises(GastuneError, match="number of layers"):
        selection_frequency([torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)])
    with pytest.raises(GastuneError, match="2-D"):
        selection_frequency([(0, torch.ones(3, dtype=torch.bool))])


def _is_png(path, min_size=(100, 100)) -> tuple[int, int]:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = imread(path).shape[:2]
    assert height >= min_size[1] and width >= min_size[0]
    return height, width


def test_heatmap_of_one_mask_and_of_many_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    records = [SelectionRecord(0, [0, 2], [1.0, 0.0, 2.0, -1.0]), SelectionRecord(1, [1, 2], [0.0] * 4)]
    mask = selection_mask(records, batch_size=4, n_groups=3)
    one = plot_selection_heatmap(mask, tmp_path / "one.png", group_names=["a", "b", "c"])
    assert one == tmp_path / "one.png"
    _is_png(one)
    masks = [
        (step, torch.rand(4, 3, generator=torch.Generator().manual_seed(step)) > 0.5) for step in range(5)
    ]
    many = plot_selection_heatmap(masks, tmp_path / "many.png", title="five steps")
    _is_png(many)


def test_heatmap_rejects_mismatched_names(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(GastuneError, match="2 group names for 3 layers"):
        plot_selection_heatmap(
            torch.zeros(4, 3, dtype=torch.bool), tmp_path / "x.png", group_names=["a", "b"]
        )


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(GastuneError, match="pip install matplotlib"):
        plot_selection_heatmap(torch.zeros(2, 2, dtype=torch.bool), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_heatmap_title_wider_than_the_axes_is_not_clipped(tmp_path):
    """The saved image grows to hold the whole title (one line of 120 characters here)."""
    from matplotlib.image import imread

    masks = [(s, torch.rand(8, 30) < 0.5) for s in range(4)]
    short = plot_selection_heatmap(masks, tmp_path / "short.png", title="t")
    long = plot_selection_heatmap(masks, tmp_path / "long.png", title="x" * 120)
    short_w, long_w = imread(short).shape[1], imread(long).shape[1]
    # 120 characters of 12 pt text are about 900 px at 100 dpi; the axes alone are ~530 px.
    assert long_w > short_w + 300
