"""A Gaussian generative classifier of the embedded 8x8 digits: a second reward model of another family than the CNN.

Each digit d is a Gaussian in the space of the first ``rank`` principal components of the ``reward`` split's
pixels (quadratic discriminant analysis, equal class priors)::

    z = (2x - 1 - m) P                       x float [B, 1, 8, 8] in [0, 1] -> flattened [B, 64]; P [64, r]
    log p(x | d) = -1/2 (z - mu_d)^T S_d^-1 (z - mu_d) - 1/2 log det S_d     (+ a constant shared by all d)
    S_d = cov(z of the digits labelled d) + ridge * I
    p(d | x) = softmax_d log p(x | d)

m is the split's mean image and P its top-``rank`` eigenvectors of the pixel covariance (in [-1, 1] pixels, the
flow model's scale). A CNN reads a drawing by the local strokes it has learned to look for, and stays confident far
from anything it was trained on; this model scores how well the whole drawing fits the spread of the real
drawings of d, so a shape that is unlike every real d gets a low p(d | x) here even where the CNN is sure. The two
disagree where either is being fooled, which is what a conservative ensemble of them uses
(``flowrl.rewards.ensemble``).

Nothing is trained by gradient: :func:`fit_gaussian_classifier` is closed-form (a symmetric eigendecomposition and
per-class covariances, in float64), so the model is rebuilt from the shipped digits in milliseconds and
identically on every machine (eigenvector signs cancel in the quadratic form). It never sees the ``judge`` split.
``rank`` 20 keeps 90% of the split's pixel variance; ``ridge`` 0.05 keeps each class covariance (42-67 drawings
per class in 20 dimensions) well conditioned. Both were set before any measurement against the judge.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from flowrl.pipelines.digits import IMAGE_SIZE, _check_images, digits_split


class GaussianDigitClassifier(nn.Module):
    """p(digit | image) of a Gaussian per digit in a PCA space (see the module docstring for the formula).

    Buffers: ``mean`` [64], ``components`` P [64, r], ``class_means`` [10, r], ``precisions`` [10, r, r],
    ``logdets`` [10]. ``forward(images float [B, 1, 8, 8] in [0, 1]) -> logits [B, 10]`` (log p(x | d) up to a
    constant; their softmax is p(d | x) under equal priors). Differentiable in the images.
    """

    def __init__(self, mean: Tensor, components: Tensor, class_means: Tensor, precisions: Tensor, logdets: Tensor):
        super().__init__()
        r = components.shape[1]
        if (mean.shape != (IMAGE_SIZE * IMAGE_SIZE,) or components.shape != (IMAGE_SIZE * IMAGE_SIZE, r)
                or class_means.shape != (10, r) or precisions.shape != (10, r, r) or logdets.shape != (10,)):
            raise ValueError("Gaussian digit classifier: need mean [64], components [64, r], class_means [10, r], "
                             f"precisions [10, r, r], logdets [10]; got {tuple(mean.shape)}, {tuple(components.shape)}, "
                             f"{tuple(class_means.shape)}, {tuple(precisions.shape)}, {tuple(logdets.shape)}")
        for name, t in (("mean", mean), ("components", components), ("class_means", class_means),
                        ("precisions", precisions), ("logdets", logdets)):
            self.register_buffer(name, t.float())

    def project(self, images: Tensor) -> Tensor:
        """z = (2x - 1 - m) P: images float [B, 1, 8, 8] in [0, 1] -> float [B, r], the principal coordinates."""
        _check_images(images, "images")
        return (images.flatten(1).float() * 2.0 - 1.0 - self.mean) @ self.components

    def forward(self, images: Tensor) -> Tensor:
        z = self.project(images)  # [B, r]
        dz = z[:, None, :] - self.class_means[None]  # [B, 10, r]
        maha = torch.einsum("bdi,dij,bdj->bd", dz, self.precisions, dz)
        return -0.5 * (maha + self.logdets[None])


def fit_gaussian_classifier(images: Tensor, labels: Tensor, *, rank: int = 20, ridge: float = 0.05) -> GaussianDigitClassifier:
    """Fit the model to real digits: ``images`` float [N, 1, 8, 8] in [-1, 1] (``digits_split``'s scale), ``labels``
    long [N] in 0..9, every digit present at least twice. Closed form, float64."""
    _check_images(images, "images")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be long [N] = ({images.shape[0]},); got {tuple(labels.shape)}")
    counts = torch.bincount(labels.long(), minlength=10)
    if counts.numel() != 10 or bool((counts < 2).any()):
        raise ValueError(f"every digit 0..9 needs at least 2 images to fit its covariance; counts {counts.tolist()}")
    if not 1 <= int(rank) <= IMAGE_SIZE * IMAGE_SIZE:
        raise ValueError(f"rank must be in 1..{IMAGE_SIZE * IMAGE_SIZE}; got {rank}")
    if not float(ridge) > 0.0:
        raise ValueError(f"ridge must be > 0 (it keeps the class covariances invertible); got {ridge}")
    x = images.flatten(1).double()
    mean = x.mean(0)
    _, vectors = torch.linalg.eigh((x - mean).T @ (x - mean) / x.shape[0])  # ascending eigenvalues
    components = vectors[:, -int(rank):].flip(-1)
    z = (x - mean) @ components
    onehot = nn.functional.one_hot(labels.long(), 10).double()  # [N, 10]: every class at once, no loop
    n = onehot.sum(0)  # [10]
    class_means = (onehot.T @ z) / n[:, None]
    dz = z[:, None, :] - class_means[None]  # [N, 10, r]
    cov = torch.einsum("nd,ndi,ndj->dij", onehot, dz, dz) / (n - 1)[:, None, None]
    cov = cov + float(ridge) * torch.eye(int(rank), dtype=torch.float64)
    return GaussianDigitClassifier(mean, components, class_means, torch.linalg.inv(cov), torch.logdet(cov)).eval()


@functools.lru_cache(maxsize=4)
def _fitted_on_reward_split(rank: int, ridge: float) -> GaussianDigitClassifier:
    x, y = digits_split("reward")
    return fit_gaussian_classifier(x, y, rank=rank, ridge=ridge)


def load_digit_gaussian(*, rank: int = 20, ridge: float = 0.05, device: str | torch.device = "cpu") -> GaussianDigitClassifier:
    """The Gaussian classifier fitted on the ``reward`` split (the CNN's data; never the judge's), frozen, on
    ``device``: images [B, 1, 8, 8] in [0, 1] -> logits [B, 10]. The fit is cached per (rank, ridge)."""
    import copy

    return copy.deepcopy(_fitted_on_reward_split(int(rank), float(ridge))).to(device).requires_grad_(False)
