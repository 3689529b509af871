import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import model_card_figures as figures  # noqa: E402


def test_kernel_panel_is_centred_and_stretched_to_its_peak():
    kernel = np.zeros((5, 5))
    kernel[2, 1:4] = [0.1, 0.2, 0.1]
    panel = np.asarray(figures.kernel_panel(kernel, side=30, pixels_per_tap=2))[..., 0]
    assert panel.shape == (30, 30)
    assert panel.max() == 255 and panel[0, 0] == 0
    ys, xs = np.nonzero(panel)
    # 3 taps x 2 px wide, 1 tap x 2 px high, centred in the 30 px square
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (14, 15, 12, 17)


def test_figure_layout_with_and_without_kernels():
    a, b = Image.new("RGB", (20, 10), "red"), Image.new("RGB", (40, 20), "blue")
    plain = figures.figure([a, b], height=10)
    assert plain.size == (20 + figures.GAP + 20, 10)
    with_kernels = figures.figure([a, b], [None, np.eye(3) / 3], height=10, pixels_per_tap=1)
    assert with_kernels.size == (50, 10 + figures.GAP + 20)
    assert with_kernels.getpixel((5, 25)) == (255, 255, 255)  # no kernel under the first image
    assert with_kernels.getpixel((30 + 10, 10 + figures.GAP + 10)) == (255, 255, 255)  # peak of the diagonal


def test_cli_refuses_to_overwrite_and_checks_kernel_count(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "green").save(image)
    out = tmp_path / "fig.png"
    figures.main([str(image), str(image), "-o", str(out)])
    assert Image.open(out).size == (8 + figures.GAP + 8, 8)
    with pytest.raises(SystemExit):
        figures.main([str(image), "-o", str(out)])
    with pytest.raises(SystemExit):
        figures.main([str(image), str(image), "-o", str(tmp_path / "b.png"), "--kernels", "-"])
    with pytest.raises(ValueError):
        figures.kernel_panel(np.ones(3), side=8, pixels_per_tap=1)
