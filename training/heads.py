"""The non-flow evidence of a U-Flow bundle: a Gaussian head and a memory-bank head per scale (issue 20).

Both read the backbone features the flow reads (the same tensors, one backbone pass) and give one map
per scale, like the flow's m_s, that the one NFA tests with its own fitted null (docs/nfa.md):

- ``gaussian``: mu and a shrunk covariance S = (1 - a) S_hat + a tr(S_hat)/C I (Ledoit-Wolf's ``a``, at
  least ``MIN_SHRINK``) of all good training feature vectors of the scale; the graph computes
  z = L^-1 (x - mu) as one 1x1 convolution (weight L^-1, bias -L^-1 mu) and the map g_s = mean over
  channels of z^2 (chi^2(C)/C-like on good parts). A positional head has a mean per position
  (C x H x W, subtracted before the convolution) and the residuals' covariance;
- ``memory``: PatchCore-style. Features locally averaged (``pool`` x ``pool``), a coreset of the good
  training patches chosen by greedy k-center on a random projection (:func:`greedy_coreset`), and the
  map k_s = min over the bank of ||x - b||^2 / C, computed in the graph as ||x||^2 + min_b (||b||^2 - 2 x.b)
  (one 1x1 convolution, kernels -2b and bias ||b||^2, then a ReduceMin over the bank axis): TensorRT-legal.

Out-of-sample maps for fitting the nulls (:class:`CrossFit`): a head that memorised an image gives it
maps that are too clean, so the nulls of these heads are fitted on maps of images the head did not
see: k folds for the Gaussian (the image's fold is left out), leave-one-image-out for the bank (the
bank entries that came from the image itself are ignored). docs/nfa.md, "Heads".

- ``texture``: one per model, over every scale: the Mahalanobis distance of the frame's texture statistics
  (channel means and standard deviations) to the good frames', a 1 x 1 map that the image test reads
  (edge_agent/inspection/image_test.py), cross-fitted by k folds like the Gaussian.
- ``detail``: one per model, a positional Gaussian (as above, by default with a covariance per position too)
  at the finest stride. Only the anomaly map
  reads it (where a defect is); no NFA test does, so its heavy tail cannot lower the decision's evidence
  factor (docs/results.md, "The detail map"). Cross-fitted like the Gaussian: the fusion's mean of its map
  comes from images it did not see.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MAP_PREFIX = {"flow": "m", "gaussian": "g", "memory": "k", "texture": "t", "detail": "p"}
TEXTURE_KEY = "texture_0"  # one texture head per model, over every scale
DETAIL_KEY = "detail_0"  # one detail head per model, at the finest stride
MIN_SHRINK = 1e-3  # relative ridge: keeps L^-1 bounded when the features have (near) null directions
FOLDS = 5
PROJECTION_DIM = 128
CHUNK = 8192  # rows of the distance matrix computed at once (memory: CHUNK x bank floats)
# Each position's covariance plus this times I: PaDiM's regulariser (Defard et al. 2021), kept as measured
# (docs/results.md, "The detail map with a covariance per position").
POSITION_RIDGE = 0.01


class GaussianHead(nn.Module):
    """g = mean over channels of (L^-1 (x - mu))^2, with L^-1 and -L^-1 mu as one 1x1 convolution.

    With ``shape`` (H, W) the mean is one per position (PaDiM's idea, one shared covariance of the
    residuals): an object's rim and centre have their own normal features. The graph then subtracts the
    C x H x W mean before the whitening convolution (bias 0), so the square still reads the Conv.
    ``per_position`` (with ``shape``) gives each position its own covariance too, PaDiM's whole fit: the
    graph whitens each position's C-vector by its own L^-1 in one batched MatMul (positions x C x C).
    """

    position_mean: torch.Tensor
    position_whiten: torch.Tensor

    def __init__(self, channels: int, shape: tuple[int, int] | None = None, per_position: bool = False) -> None:
        super().__init__()
        if per_position and shape is None:
            raise ValueError("a covariance per position needs the map's shape")
        self.whiten = nn.Conv2d(channels, channels, 1)
        self.whiten.requires_grad_(False)
        self.positional = shape is not None
        self.per_position = per_position
        if shape is not None:
            self.register_buffer("position_mean", torch.zeros(1, channels, *shape))
        if per_position and shape is not None:
            eye = torch.eye(channels).expand(shape[0] * shape[1], channels, channels)
            self.register_buffer("position_whiten", eye.clone())  # (L^-1)^T per position, row-major
        with torch.no_grad():
            self.whiten.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
            self.whiten.bias.zero_()  # type: ignore[union-attr]

    def set(self, mean: torch.Tensor, inverse_cholesky: torch.Tensor) -> None:
        """Load mu (C, or C x H x W for a positional head) and L^-1 (C x C, or positions x C x C)."""
        c = self.whiten.in_channels
        with torch.no_grad():
            if self.per_position:
                self.position_mean.copy_(mean.reshape(self.position_mean.shape))
                self.position_whiten.copy_(inverse_cholesky.reshape(-1, c, c).transpose(1, 2))
                return
            self.whiten.weight.copy_(inverse_cholesky.reshape(c, c, 1, 1))
            if self.positional:
                self.position_mean.copy_(mean.reshape(self.position_mean.shape))
                self.whiten.bias.zero_()  # type: ignore[union-attr]
            else:
                self.whiten.bias.copy_(-(inverse_cholesky @ mean))  # type: ignore[union-attr]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.positional:
            features = features - self.position_mean
        if self.per_position:
            n, c, h, w = features.shape
            # positions x N x C times positions x C x C: one batched MatMul, then back to N x C x H x W so the
            # square and the channel mean are the same nodes as every other map's (the graph check reads them).
            z = torch.matmul(features.flatten(2).permute(2, 0, 1), self.position_whiten)
            return z.permute(1, 2, 0).reshape(n, c, h, w).pow(2).mean(dim=1)
        return self.whiten(features).pow(2).mean(dim=1)


class MemoryHead(nn.Module):
    """k = min over the bank of ||pool(x) - b||^2 / C, as sum of squares - 2 conv(bank) + ||b||^2, ReduceMin."""

    bank: torch.Tensor
    bank_sq: torch.Tensor

    def __init__(self, channels: int, bank_size: int, pool: int) -> None:
        super().__init__()
        self.channels, self.pool = channels, pool
        self.register_buffer("bank", torch.zeros(bank_size, channels, 1, 1))
        self.register_buffer("bank_sq", torch.zeros(bank_size))

    def set(self, bank: torch.Tensor) -> None:
        """Load the coreset (K x C); K must be the size the head was built with."""
        with torch.no_grad():
            self.bank.copy_(bank.reshape(self.bank.shape))
            self.bank_sq.copy_(bank.pow(2).sum(dim=1))

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        if self.pool <= 1:
            return features
        return F.avg_pool2d(features, self.pool, stride=1, padding=self.pool // 2, count_include_pad=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.pooled(features)
        # min_b ||x - b||^2 = ||x||^2 + min_b (||b||^2 - 2 x.b): the bracket is ONE convolution with a bias
        # (kernels -2b, bias ||b||^2; the export folds -2b into a constant), so the N x K x H x W tensor is
        # written once and read once by the ReduceMin; ||x||^2 is added after, on N x H x W only.
        partial = F.conv2d(x, -2.0 * self.bank, self.bank_sq)  # N x K x H x W
        # amin, not min(dim): exports as one ReduceMin (no ArgMin); clamp: rounding can go below 0
        squared = partial.amin(dim=1) + x.pow(2).sum(dim=1)
        return squared.clamp_min(0.0) / float(self.channels)


def shrunk_covariance(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mean, covariance, shrinkage) of the rows of ``x`` (P x C), Ledoit-Wolf towards tr/C * I."""
    x = x.double()
    mean = x.mean(dim=0)
    centred = x - mean
    n, c = centred.shape
    sample = centred.T @ centred / n
    target = torch.trace(sample) / c
    # Ledoit & Wolf (2004): shrinkage = min(1, beta / delta), beta from the squared deviations of x x^T.
    delta = float(((sample - target * torch.eye(c, dtype=x.dtype)) ** 2).sum())
    beta = 0.0
    for start in range(0, n, CHUNK):
        block = centred[start : start + CHUNK]
        beta += float(((block.pow(2).sum(1)) ** 2).sum()) - 2.0 * float(((block @ sample) * block).sum())
    beta = (beta + n * float((sample**2).sum())) / (n * n)
    shrink = max(MIN_SHRINK, min(1.0, beta / delta if delta > 0 else 1.0))
    covariance = (1.0 - shrink) * sample + shrink * target * torch.eye(c, dtype=x.dtype)
    return mean, covariance, shrink


def gaussian_parameters(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, L^-1) in float32 for feature rows ``x`` (P x C)."""
    mean, covariance, _ = shrunk_covariance(x)
    return mean.float(), inverse_cholesky(covariance).float()


def inverse_cholesky(covariance: torch.Tensor) -> torch.Tensor:
    """L^-1 of covariance = L L^T (C x C, or a batch ... x C x C), by a triangular solve."""
    cholesky = torch.linalg.cholesky(covariance)
    eye = torch.eye(covariance.shape[-1], dtype=covariance.dtype).expand_as(covariance)
    return torch.linalg.solve_triangular(cholesky, eye, upper=False)


def positional_parameters(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu: C x H x W, L^-1: C x C) of good features ``f`` (N x C x H x W): a mean per position, and one
    shrunk covariance of the residuals around it (float32)."""
    mean = f.double().mean(dim=0)
    _, inverse = gaussian_parameters(rows(f.double() - mean))
    return mean.float(), inverse


def per_position_parameters(f: torch.Tensor, ridge: float = POSITION_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu: C x H x W, L^-1: H W x C x C) of good features ``f`` (N x C x H x W): PaDiM's fit, a mean and a
    covariance per position, each covariance plus ``ridge`` x I (float32)."""
    x = f.double()
    mean = x.mean(dim=0)
    centred = (x - mean).flatten(2).permute(2, 0, 1)  # positions x N x C
    covariance = centred.transpose(1, 2) @ centred / max(len(f) - 1, 1)
    covariance += ridge * torch.eye(covariance.shape[-1], dtype=covariance.dtype)
    return mean.float(), inverse_cholesky(covariance).float()


def _gaussian_fit(head: GaussianHead, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if head.per_position:
        return per_position_parameters(f)
    return positional_parameters(f) if head.positional else gaussian_parameters(rows(f))


def greedy_coreset(x: torch.Tensor, size: int, seed: int = 0, projection_dim: int = PROJECTION_DIM) -> torch.Tensor:
    """Indices of ``size`` rows of ``x`` (P x C) chosen by greedy k-center on a random projection.

    Each step adds the row farthest from the rows chosen so far (PatchCore's approximate coreset);
    the distances are computed on a Johnson-Lindenstrauss projection to ``projection_dim`` dimensions,
    so a step costs P x projection_dim, whatever C is.
    """
    count, channels = x.shape
    if size >= count:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(seed)
    if channels > projection_dim:
        matrix = torch.randn(channels, projection_dim, generator=generator) / math.sqrt(projection_dim)
        x = x.float() @ matrix
    x = x.float().contiguous()
    norms = x.pow(2).sum(1)
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = int(torch.randint(count, (1,), generator=generator))
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one matrix-vector pass over x per step, no P x C temporary
    nearest = (norms - 2.0 * (x @ x[chosen[0]]) + norms[chosen[0]]).clamp_min_(0.0)
    for step in range(1, size):
        index = int(torch.argmax(nearest))
        chosen[step] = index
        distance = torch.addmv(norms, x, x[index], alpha=-2.0).add_(norms[index])
        torch.minimum(nearest, distance, out=nearest)
    return chosen


class TextureHead(nn.Module):
    """t = mean over D of (L^-1 (v - mu))^2: v, the frame's texture statistics, is every scale's channel
    means and standard deviations (D = 2 sum C_s), whitened by one linear layer; a 1 x 1 map per frame.

    The image test reads it (edge_agent/inspection/image_test.py): it sees a change that covers much of the
    frame, which no region test can.
    """

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.whiten = nn.Linear(dims, dims)
        self.whiten.requires_grad_(False)
        with torch.no_grad():
            self.whiten.weight.copy_(torch.eye(dims))
            self.whiten.bias.zero_()

    def set(self, mean: torch.Tensor, inverse_cholesky: torch.Tensor) -> None:
        """Load mu (D) and L^-1 (D x D)."""
        with torch.no_grad():
            self.whiten.weight.copy_(inverse_cholesky)
            self.whiten.bias.copy_(-(inverse_cholesky @ mean))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        z = self.whiten(texture_statistics(features))
        return z.pow(2).mean(dim=1).view(-1, 1, 1)


def texture_statistics(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """N x D: per scale the channel means, then the channel standard deviations (centred first: no
    cancellation in float32), of N x C_s x H_s x W_s features."""
    means, stds = [], []
    for f in features:
        mean = f.mean(dim=(2, 3), keepdim=True)
        centred = f - mean
        means.append(mean.flatten(1))
        stds.append(centred.mul(centred).mean(dim=(2, 3)).sqrt())
    return torch.cat(means + stds, dim=1)


def rows(features: torch.Tensor) -> torch.Tensor:
    """N x C x H x W -> (N H W) x C feature vectors."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def nearest_squared(
    queries: torch.Tensor, bank: torch.Tensor, query_owner: torch.Tensor | None, bank_owner: torch.Tensor | None
) -> torch.Tensor:
    """min over bank rows of ||q - b||^2 per query row, ignoring bank rows of the query's own image."""
    bank = bank.float()
    bank_sq = bank.pow(2).sum(1)
    out = torch.empty(len(queries))
    for start in range(0, len(queries), CHUNK):
        q = queries[start : start + CHUNK].float()
        d = q.pow(2).sum(1, keepdim=True) - 2.0 * q @ bank.T + bank_sq
        if query_owner is not None and bank_owner is not None:
            d = d.masked_fill(query_owner[start : start + CHUNK, None] == bank_owner[None, :], math.inf)
        out[start : start + CHUNK] = d.amin(1).clamp_min(0.0)
    return out


@dataclass
class CrossFit:
    """What out-of-sample head maps need: the Gaussian of every fold and the bank's owners."""

    folds: np.ndarray  # fold of each fitting image
    gaussian: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]  # head key -> per fold (mu, L^-1)
    banks: dict[int, tuple[torch.Tensor, torch.Tensor]]  # scale -> (bank K x C, owner image of each row)
    texture: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per fold (mu, L^-1) of the texture head


def fold_of(count: int, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """A balanced random fold index per image."""
    order = np.random.default_rng(seed).permutation(count)
    out = np.empty(count, dtype=np.int64)
    out[order] = np.arange(count) % max(1, min(folds, count))
    return out


def fit_heads(heads: nn.ModuleDict, features: Sequence[torch.Tensor], seed: int = 0, folds: int = FOLDS) -> CrossFit:
    """Fit every head in ``heads`` (keys ``gaussian_<s>`` / ``memory_<s>`` / ``texture_0`` / ``detail_0``) on good
    images' features.

    ``features``: per scale N x C x H x W of the good images the heads may memorise (all of them).
    Returns what :func:`out_of_sample_maps` needs to give each of those images maps from heads that did
    not see it.
    """
    count = len(features[0]) if len(heads) else 0  # every scale holds the same images
    fold = fold_of(count, folds, seed)
    gaussian: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    banks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    texture = None
    for key, head in heads.items():
        kind, scale = key.split("_")
        if kind == "texture":
            assert isinstance(head, TextureHead)
            v = texture_statistics([f.float() for f in features])
            head.set(*gaussian_parameters(v))
            texture = [gaussian_parameters(v[torch.from_numpy(fold != k)]) for k in range(fold.max() + 1)]
            continue
        s = int(scale)
        f = features[s].float()
        if kind in ("gaussian", "detail"):
            assert isinstance(head, GaussianHead)
            head.set(*_gaussian_fit(head, f))
            gaussian[key] = [_gaussian_fit(head, f[torch.from_numpy(fold != k)]) for k in range(fold.max() + 1)]
        else:
            assert isinstance(head, MemoryHead)
            x = rows(head.pooled(f))
            owner = torch.arange(count).repeat_interleave(f.shape[2] * f.shape[3])
            index = greedy_coreset(x, head.bank.shape[0], seed=seed + s)
            if len(index) < head.bank.shape[0]:  # fewer patches than the bank: repeat rows (same minimum)
                index = index[torch.arange(head.bank.shape[0]) % len(index)]
            head.set(x[index])
            banks[s] = (x[index], owner[index])
    return CrossFit(fold, gaussian, banks, texture)


def by_fold(
    values: torch.Tensor,
    image_folds: np.ndarray,
    fits: Sequence[tuple[torch.Tensor, torch.Tensor]],
    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``score(values[pick], mean, inverse)`` for each fold's images ``pick``, with that fold's (mean, L^-1)."""
    out: torch.Tensor | None = None
    for k, (mean, inverse) in enumerate(fits):
        pick = torch.from_numpy(np.flatnonzero(image_folds == k))
        if len(pick):
            scored = score(values[pick], mean, inverse)
            if out is None:
                out = torch.empty(len(values), *scored.shape[1:])
            out[pick] = scored
    assert out is not None, "no image in any fold"
    return out


def whitened_square_mean(x: torch.Tensor, mean: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """mean over channels of (L^-1 (x - mu))^2 of N x C x H x W features; mu is C, or C x H x W (positional);
    L^-1 is C x C, or H W x C x C (a covariance per position)."""
    centre = mean.unsqueeze(0) if mean.dim() == 3 else mean.view(1, -1, 1, 1)
    if inverse.dim() == 3:
        n, _, h, w = x.shape
        return torch.einsum("pdc,ncp->ndp", inverse, (x - centre).flatten(2)).pow(2).mean(1).reshape(n, h, w)
    return torch.einsum("dc,nchw->ndhw", inverse, x - centre).pow(2).mean(1)


def out_of_sample_maps(
    heads: nn.ModuleDict, cross: CrossFit, features: Sequence[torch.Tensor], owners: np.ndarray
) -> dict[str, np.ndarray]:
    """Head maps (key -> N x H x W) of images whose features are given, each from heads that did not
    see ``owners[i]`` (the index, among the fitting images, of the good image it is or was planted on)."""
    out: dict[str, np.ndarray] = {}
    owner_t = torch.from_numpy(np.asarray(owners, dtype=np.int64))
    image_folds = cross.folds[owners]
    for key, head in heads.items():
        kind, scale = key.split("_")
        if kind == "texture":
            assert cross.texture is not None
            v = texture_statistics([f.float() for f in features])
            scores = by_fold(v, image_folds, cross.texture, lambda x, m, inv: ((x - m) @ inv.T).pow(2).mean(1))
            out[key] = scores.view(-1, 1, 1).numpy()
            continue
        s = int(scale)
        f = features[s].float()
        n, c, h, w = f.shape
        if kind in ("gaussian", "detail"):
            out[key] = by_fold(f, image_folds, cross.gaussian[key], whitened_square_mean).numpy()
        else:
            assert isinstance(head, MemoryHead)
            bank, bank_owner = cross.banks[s]
            queries = rows(head.pooled(f))
            query_owner = owner_t.repeat_interleave(h * w)
            out[key] = (nearest_squared(queries, bank, query_owner, bank_owner) / c).reshape(n, h, w).numpy()
    return out
