"""Every docstring example in the package runs and prints what it shows."""

import doctest
import importlib

import pytest


MODULES = [
    "diffusers_blind.metrics.image",
    "diffusers_blind.metrics.kernel",
    "diffusers_blind.ops.blur",
    "diffusers_blind.ops.guidance",
    "diffusers_blind.ops.kernels",
    "diffusers_blind.ops.noise",
    "diffusers_blind.ops.operators",
    "diffusers_blind.ops.warp",
    "diffusers_blind.pipelines.pipeline_utils",
    "diffusers_blind.pipelines.tiling",
]
WITH_EXAMPLES = {
    "diffusers_blind.metrics.image",
    "diffusers_blind.ops.blur",
    "diffusers_blind.ops.operators",
    "diffusers_blind.ops.warp",
    "diffusers_blind.pipelines.pipeline_utils",
    "diffusers_blind.pipelines.tiling",
}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed (see stdout)"
    if name in WITH_EXAMPLES:
        assert result.attempted > 0, f"{name} lost its docstring examples"
