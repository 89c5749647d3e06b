"""Models Genesis' intensity curve through its lookup table: the same mapping as np.interp on the sampled curve."""

import numpy as np
import pytest

from nnssl.methods.models_genesis import ModelsGenesisConfig, intensity_curve, nonlinear_intensity


@pytest.mark.parametrize("seed", range(6))
def test_table_lookup_equals_np_interp_on_the_curve(seed):
    rng = np.random.default_rng(seed)
    curve = intensity_curve(rng.random((2, 2)), bool(seed % 2), ModelsGenesisConfig().bezier_samples)
    image = rng.standard_normal((2, 20, 21, 19)).astype(np.float32)
    lo, hi = np.float32([[[[-1.5]]], [[[-2.0]]]]), np.float32([[[[1.5]]], [[[2.5]]]])
    expected = lo + np.interp(np.clip((image - lo) / (hi - lo), 0, 1), *curve) * (hi - lo)
    mapped = nonlinear_intensity(image, lo, hi, curve)
    assert mapped.dtype == np.float32
    assert np.abs(mapped - expected).max() <= 1e-4 * (hi - lo).max()
    # voxels clipped at either end of the robust range map to the curve's end values
    below = np.broadcast_to(image <= lo, image.shape)
    np.testing.assert_allclose(mapped[below], np.broadcast_to(lo + curve[1][0] * (hi - lo), image.shape)[below],
                               atol=1e-6)
