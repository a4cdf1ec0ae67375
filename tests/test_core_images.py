"""Picture grids: torchvision's layout, pixel for pixel, without importing torchvision."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cfebm.images import grid_png, make_grid


@pytest.mark.parametrize(
    "n, channels, nrow, scale",
    [(1, 1, None, 1), (2, 3, None, 1), (5, 1, None, 2), (7, 3, 3, 4), (9, 1, 9, 8), (3, 3, 8, 1)],
)
def test_grid_equals_torchvision_make_grid(n, channels, nrow, scale):
    from torchvision.utils import make_grid as tv_grid

    rng = np.random.default_rng(n * 10 + scale)
    images = rng.integers(0, 256, (n, channels, 5, 4), dtype=np.uint8)
    x = torch.from_numpy(images)
    if scale > 1:
        x = torch.nn.functional.interpolate(x.float(), scale_factor=scale).to(torch.uint8)
    cols = nrow or int(np.ceil(np.sqrt(n)))
    expected = tv_grid(x, nrow=cols, padding=max(1, scale // 2), pad_value=0).permute(1, 2, 0)
    grid = make_grid(images, nrow, scale)
    assert grid.dtype == np.uint8 and grid.shape == tuple(expected.shape)
    assert np.array_equal(grid, expected.numpy())
    decoded = np.asarray(Image.open(io.BytesIO(grid_png(images, nrow, scale))))
    assert np.array_equal(decoded, grid)


def test_grids_refuse_what_is_not_uint8_nchw():
    with pytest.raises(ValueError, match="uint8 images"):
        make_grid(np.zeros((2, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match="uint8 images"):
        make_grid(np.zeros((1, 4, 4), np.uint8))


def test_drawing_a_grid_imports_neither_torchvision_nor_dynamo():
    code = (
        "import sys, numpy as np; from cfebm.images import grid_png;"
        "grid_png(np.zeros((4, 1, 4, 4), np.uint8), scale=2);"
        "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]"]
