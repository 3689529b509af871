"""scripts/benchmark_guard.py on two small synthetic photographs."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import smooth_images

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchmark_guard as bench  # noqa: E402


def test_prints_the_distribution_and_counts_the_pairs_the_guard_would_drop(tmp_path, capsys):
    for index in range(2):
        array = (smooth_images(1, 3, 80, 80, seed=index)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(array).save(tmp_path / f"p{index}.png")
    assert bench.main(["--data_dir", str(tmp_path), "--pairs", "2", "--crops", "32", "--kernel_sizes", "5", "9"]) == 0
    printed = capsys.readouterr().out
    assert "4 true sharp/blurry pairs" in printed and "midtone_saturation" in printed and "contrast_gain" in printed
    assert "pairs the guard would drop: 0 of 4" in printed  # smooth photos blurred a little: never a collapse


def test_refuses_a_folder_without_photographs(tmp_path):
    with pytest.raises(SystemExit, match="no PNG/JPEG"):
        bench.main(["--data_dir", str(tmp_path)])
