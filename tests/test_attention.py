"""Each attention mask against a naive softmax attention with a dense boolean mask built by loops."""

import pytest
import torch

from titans_scale.models import KVCache, causal_attention, segment_attention, window_attention

B, H, D = 2, 3, 8


def naive_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d) masked) v, with mask (n, s) True where a query may look."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def with_prefix(keys, prefix):
    return keys if prefix is None else torch.cat([prefix.expand(B, -1, -1, -1), keys], 2)


@pytest.mark.parametrize("n_persistent", [0, 3])
@pytest.mark.parametrize("window", [None, 1, 4, 5])
@pytest.mark.parametrize("start,n", [(0, 23), (0, 3), (6, 1), (9, 14), (2, 4), (11, 5)])
def test_full_and_window_masks(n_persistent, window, start, n):
    """Queries start .. start + n - 1 of a sequence, given every earlier key as cache (more than needed)."""
    total = start + n
    q, k, v = rand(B, H, total, D), rand(B, H, total, D), rand(B, H, total, D)
    pk, pv = rand(1, H, n_persistent, D), rand(1, H, n_persistent, D)
    prefix = (pk, pv) if n_persistent else None
    mask = torch.zeros(total, n_persistent + total, dtype=torch.bool)
    for t in range(total):
        for p in range(n_persistent):
            mask[t, p] = True
        for s in range(total):
            if s <= t and (window is None or s > t - window):
                mask[t, n_persistent + s] = True
    expected = naive_attention(q, with_prefix(k, pk if n_persistent else None), with_prefix(v, pv if n_persistent else None), mask)
    new = slice(start, total)
    if window is None:
        got = causal_attention(q[:, :, new], k, v, prefix)
    else:
        got = window_attention(q[:, :, new], k, v, window, prefix)
    torch.testing.assert_close(got, expected[:, :, new], rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_persistent", [0, 2])
@pytest.mark.parametrize("start,n", [(0, 8), (0, 1), (3, 1), (2, 5), (7, 1)])
def test_segment_mask(n_persistent, start, n):
    """MAC: token j sees P, h_i and S_i for i <= j; keys laid out [P | h | S]."""
    m = start + n
    q = rand(B, H, m, D)
    hk, hv, sk, sv = (rand(B, H, m, D) for _ in range(4))
    pk, pv = rand(1, H, n_persistent, D), rand(1, H, n_persistent, D)
    mask = torch.zeros(m, n_persistent + 2 * m, dtype=torch.bool)
    for j in range(m):
        mask[j, :n_persistent] = True
        for i in range(m):
            if i <= j:
                mask[j, n_persistent + i] = True  # h_i
                mask[j, n_persistent + m + i] = True  # S_i
    keys = torch.cat([pk.expand(B, -1, -1, -1), hk, sk], 2)
    values = torch.cat([pv.expand(B, -1, -1, -1), hv, sv], 2)
    expected = naive_attention(q, keys, values, mask)[:, :, start:]
    got = segment_attention(q[:, :, start:], KVCache(hk, hv), KVCache(sk, sv), (pk, pv) if n_persistent else None)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
