"""Building blocks against brute-force NumPy and torch: attention (plain, masked, chunked),
the 2x2 transposed convolution and the space-to-depth layout the mask decoder runs in."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from p2s_jax.model import layers
def numpy_attention(q, k, v, key_mask=None):
    """(..., L, heads, d) inputs, one loop-free softmax in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = np.where(key_mask[..., None, None, :], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("...hqk,...khd->...qhd", weights, v)


def test_attention_matches_numpy():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 7, 4, 8)).astype(np.float32) for _ in range(3))
    out = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    assert np.abs(np.asarray(out) - numpy_attention(q, k, v)).max() <= 1e-5


def test_masked_attention_ignores_masked_keys():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((3, 5, 2, 8)).astype(np.float32)
    k, v = (rng.standard_normal((3, 6, 2, 8)).astype(np.float32) for _ in range(2))
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 1]], bool)
    out = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    assert np.abs(np.asarray(out) - numpy_attention(q, k, v, mask)).max() <= 1e-5
    # masked keys can hold anything
    k2, v2 = k.copy(), v.copy()
    k2[~mask], v2[~mask] = 1e3, -1e3
    out2 = layers.attention(jnp.asarray(q), jnp.asarray(k2), jnp.asarray(v2), jnp.asarray(mask))
    assert np.abs(np.asarray(out2) - np.asarray(out)).max() <= 1e-5


CPU_IMPLEMENTATIONS = ("cpu_chunked", "einsum", "xla")  # cudnn needs a GPU (compiled for one in p2s aot)


def _attention_shapes(name: str):
    """(label, q shape, k shape) of every attention of model `name` at 512 px: each Hiera stage's
    windowed attention (2 windows), the global attention (32 x 32 tokens) and the decoder's."""
    from p2s_jax.model.configs import get_config

    config = get_config(name, 512)
    trunk, decoder = config.trunk, config.decoder
    shapes = []
    for stage, window in enumerate(trunk.window_spec):
        dim = int(trunk.embed_dim * trunk.dim_mul ** stage)
        heads = int(trunk.num_heads * trunk.head_mul ** stage)
        shapes.append((f"stage {stage + 1} window", (2, window * window, heads, dim // heads),
                       (2, window * window, heads, dim // heads)))
    stage = len(trunk.window_spec) - 2
    dim, heads = int(trunk.embed_dim * trunk.dim_mul ** stage), int(trunk.num_heads * trunk.head_mul ** stage)
    shapes.append(("global", (1, 1024, heads, dim // heads), (1, 1024, heads, dim // heads)))
    head_dim = decoder.embed_dim // decoder.transformer_heads
    cross = head_dim // decoder.attention_downsample_rate
    shapes.append(("decoder tokens", (3, 7, decoder.transformer_heads, head_dim),
                   (3, 7, decoder.transformer_heads, head_dim)))
    shapes.append(("decoder image -> tokens", (3, 256, decoder.transformer_heads, cross),
                   (3, 7, decoder.transformer_heads, cross)))
    return shapes


@pytest.mark.parametrize("name", ["sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+",
                                  "sam2.1_hiera_l"])
@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS)
def test_every_attention_shape_matches_numpy(name, implementation, monkeypatch):
    """Each CPU-capable implementation equals a float64 NumPy softmax on every attention shape of
    every model size, with and without a key mask; the chunked path runs on the global shape."""
    monkeypatch.setattr(layers, "CHUNK_LOGITS", 1024 * 1024 - 1)
    monkeypatch.setattr(layers, "QUERY_CHUNK", 256)
    rng = np.random.default_rng(0)
    for label, q_shape, k_shape in _attention_shapes(name):
        q = rng.standard_normal(q_shape).astype(np.float32)
        k, v = (rng.standard_normal(k_shape).astype(np.float32) for _ in range(2))
        masks = [None]
        if label.startswith("decoder"):
            mask = rng.random(k_shape[:2]) < 0.6
            mask[:, 0] = True  # the output tokens are never masked
            masks.append(mask)
        for mask in masks:
            out = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                   None if mask is None else jnp.asarray(mask), implementation)
            error = np.abs(np.asarray(out) - numpy_attention(q, k, v, mask)).max()
            assert error <= 1e-5, (label, mask is not None, error)


@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS)
def test_attention_broadcasts_leading_axes(implementation):
    """Keys shared by every person (leading axis 1) give what per-person copies give."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((4, 9, 2, 8)).astype(np.float32)
    k, v = (rng.standard_normal((1, 12, 2, 8)).astype(np.float32) for _ in range(2))
    mask = rng.random((4, 12)) < 0.7
    mask[:, 0] = True
    shared = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask),
                              implementation)
    copies = np.repeat(k, 4, 0), np.repeat(v, 4, 0)
    assert np.abs(np.asarray(shared) - numpy_attention(q, *copies, mask)).max() <= 1e-5


def test_auto_attention_per_backend():
    resolve = layers.resolve_attention
    assert resolve("auto", jnp.float32, 56, "cpu") == "cpu_chunked"
    assert resolve("auto", jnp.bfloat16, 56, "cpu") == "cpu_chunked"
    assert resolve("auto", jnp.bfloat16, 56, "gpu") == "cudnn"
    assert resolve("auto", jnp.float16, 128, "gpu") == "cudnn"
    assert resolve("auto", jnp.float32, 56, "gpu") == "xla"  # cuDNN flash needs 16-bit inputs
    assert resolve("auto", jnp.bfloat16, 72 + 4, "gpu") == "xla"  # head dim not a multiple of 8
    assert resolve("auto", jnp.bfloat16, 256, "gpu") == "xla"
    assert resolve("auto", jnp.bfloat16, 56, "tpu") == "einsum"
    assert resolve("xla", jnp.float32, 56, "cpu") == "xla"
    with pytest.raises(ValueError, match="attention must be one of"):
        resolve("flash", jnp.float32, 56)


def test_chunked_attention_equals_whole(monkeypatch):
    """Above CHUNK_LOGITS the queries go one head and one chunk at a time: same numbers."""
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 64, 3, 8)).astype(np.float32) for _ in range(3))
    whole = np.asarray(layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
    monkeypatch.setattr(layers, "CHUNK_LOGITS", 64 * 64 - 1)
    monkeypatch.setattr(layers, "QUERY_CHUNK", 16)
    chunked = np.asarray(layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
    # Outputs are O(1): 1e-5 is ~80 float32 ulp against float64 (softmax of 64 logits and a
    # 64-term sum); chunked and whole do the same products, only vectorised differently: 8 ulp.
    assert np.abs(chunked - numpy_attention(q, k, v)).max() <= 1e-5
    assert np.abs(chunked - whole).max() <= 1e-6


def test_conv_transpose_matches_torch(torch_module):
    torch = torch_module
    rng = np.random.default_rng(3)
    ours = layers.ConvTranspose2x2(6, 5, rngs=nnx.Rngs(0))
    ours.bias[...] = jnp.asarray(rng.standard_normal(5), jnp.float32)
    theirs = torch.nn.ConvTranspose2d(6, 5, kernel_size=2, stride=2)
    with torch.no_grad():  # torch (in, out, 2, 2) = ours (in, 2, 2, out) with the out axis moved
        theirs.weight.copy_(torch.from_numpy(np.asarray(ours.kernel[...]).transpose(0, 3, 1, 2)))
        theirs.bias.copy_(torch.from_numpy(np.asarray(ours.bias[...])))
    x = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    out = np.asarray(ours(jnp.asarray(x)))
    assert out.shape == (2, 6, 8, 5)
    assert np.abs(out - ref).max() <= 1e-5
    # the un-interleaved blocks are the same pixels in the space-to-depth layout
    blocks = np.asarray(ours.blocks(jnp.asarray(x)))
    assert np.array_equal(np.asarray(layers.to_blocks(jnp.asarray(out), 1)), blocks)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_space_to_depth_layout(levels):
    rng = np.random.default_rng(levels)
    s = 2 ** levels
    x = rng.standard_normal((2, 3 * s, 2 * s, 4)).astype(np.float32)
    blocks = np.asarray(layers.to_blocks(jnp.asarray(x), levels))
    assert blocks.shape == (2, 3, 2) + (2, 2) * levels + (4,)
    # pixel (s i + sum_l 2**(L-l) a_l, s j + sum_l 2**(L-l) b_l) -> (i, j, a_1, b_1, ..., a_L, b_L)
    for _ in range(20):
        n, i, j, c = rng.integers(2), rng.integers(3), rng.integers(2), rng.integers(4)
        a, b = rng.integers(0, 2, levels), rng.integers(0, 2, levels)
        weights = 2 ** np.arange(levels - 1, -1, -1)
        row, col = s * i + a @ weights, s * j + b @ weights
        index = (n, i, j) + tuple(v for pair in zip(a, b) for v in pair) + (c,)
        assert blocks[index] == x[n, row, col, c]
    for c in range(4):
        back = layers.from_blocks(jnp.asarray(blocks[..., c]), levels)
        assert np.array_equal(np.asarray(back), x[..., c])


def test_gelu_matches_torch():
    """torch.nn.GELU() (exact erf form) on a wide range, tails included, against float64.

    Error budget of x / 2 (1 + erf(x / sqrt 2)) in float32: erf near +-1 carries an absolute error
    of a few ulp of 1 (each library and each CPU's vector code evaluates it differently), which
    the cancellation in 1 + erf keeps and x / 2 scales; the final products add a few ulp of the
    result. So |gelu - exact| <= K eps (|x| / 2 + |exact|) with K = 8 (an erf within 4 ulp, the
    products within 4), and ours and torch's, each within it, differ by at most 2 K. The tanh
    approximation would be off by 5e-4."""
    from support import reference
    from scipy.special import erf

    torch = reference.import_torch()
    x = np.concatenate([np.linspace(-12, 12, 20001, dtype=np.float32),
                        np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 4])
    x64 = x.astype(np.float64)
    exact = x64 / 2 * (1 + erf(x64 / np.sqrt(2)))
    budget = 8 * np.finfo(np.float32).eps * (np.abs(x64) / 2 + np.abs(exact))
    ours = np.asarray(layers.gelu(jnp.asarray(x)), np.float64)
    theirs = torch.nn.GELU()(torch.from_numpy(x)).numpy().astype(np.float64)
    assert np.all(np.abs(theirs - exact) <= budget), "the budget must hold for torch too"
    assert np.all(np.abs(ours - exact) <= budget)
    assert np.all(np.abs(ours - theirs) <= 2 * budget)
    tanh_form = np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=True), np.float64)
    assert np.mean(np.abs(tanh_form - exact) > budget) > 0.5  # the budget tells the forms apart
