"""The training-curves picture draws exactly the logged points, in the panels users read."""
import io

import numpy as np
from PIL import Image

from dups.tracking.plots import curves_figure


def test_curves_figure_draws_the_logged_points():
    history = {"train/loss": [(2, 5.0), (1, 9.0), (3, 2.0)], "val/mIoU": [(3, 41.5)],
               "val/split_ratio_block1": [(3, 0.8)], "val/oracle_ratio_block1": [(3, 0.6)],
               "val/split_ratio_block3": [(3, 0.3)]}
    fig = curves_figure(history)
    loss, metrics, split = fig.axes[:3]
    np.testing.assert_array_equal(loss.lines[0].get_xydata(), [[1, 9.0], [2, 5.0], [3, 2.0]])  # sorted by step
    assert loss.get_yscale() == "log"
    assert [line.get_label() for line in metrics.lines] == ["mIoU"]
    labels = {line.get_label(): line for line in split.lines}
    assert labels["block 1 (32 px) split"].get_linestyle() == "-"
    assert labels["block 1 ground truth"].get_linestyle() == "--"
    assert labels["block 1 (32 px) split"].get_color() == labels["block 1 ground truth"].get_color()
    assert "block 3 (8 px) split" in labels and "block 2 (16 px) split" not in labels
    png = io.BytesIO()
    fig.savefig(png, format="png")
    assert Image.open(png).size[0] > 1000


def test_curves_figure_without_evaluations_yet():
    fig = curves_figure({"train/loss": [(1, 3.0)]})
    assert [t.get_text() for t in fig.axes[1].texts] == ["no data yet"]
    assert [t.get_text() for t in fig.axes[2].texts] == ["no data yet"]
