"""Exact RGB pixel statistics of the training split, for `stats.json`.

The statistics are taken from the shards' JPEGs decoded again: the pixels a reader of the shards
(the trainer) sees. The pixels before encoding would halve their cost (about 0.25 of 0.5 ms per 256 px
image), but JPEG's 4:2:0 chroma and quantisation move the result beyond the 1e-3 (mean, std, cov) and
2% (eigenvalues) that a check against the decoded shards allows: std by up to 2.2e-3 and eigenvalues
by 2.6% on the synthetic train set (benchmarks/prep_throughput.py, docs/benchmarks.md).

Decoding every written image again costs about a third of a build's CPU time, so a large train split
is sampled: the images at places 0, k, 2k, ... of the written order, which is a seeded permutation,
so the sample is a seeded uniform random one (the same for any number of workers or resumes). k is
`sample_every(n)`: 1 (every image, exact) up to 2 x MIN_SAMPLE train images, otherwise as large as
keeps at least MIN_SAMPLE images, at most MAX_EVERY (ImageNet's 1,281,167: k = 8, 160,146 images).
The sample's statistics are exact; against every image's they differ by sampling error alone, a
standard error of about s * sqrt((1 - 1/k) / n) for the mean, s the spread of the images' own means
(docs/benchmarks.md gives the numbers; tests/test_stats.py checks the sample and the bound).

Every image contributes integer sums of its 256x256 uint8 pixels (per-channel sums and the 3x3 sums
of channel products). Integer sums are exact and their total does not depend on the order they are
added in, so the statistics are the same whatever the number of workers or the shard a build resumed
from. Only the final step (mean, covariance, eigen-decomposition) is float64, on a 0..1 scale.

Eigenvector sign convention: each eigenvector (a column of `eigvec`) is flipped so that its
largest-magnitude component is positive (the first such component on a tie). PCA lighting adds
`eigvec @ (alpha * eigval)` with a zero-mean alpha, so the sign does not change the augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prep.contract import PIXEL_MAX, SCHEMA_VERSION, PixelStats

MIN_SAMPLE = 100_000  # train images a sampled split's statistics come from, at least
MAX_EVERY = 8  # the sparsest sample: 1 train image in 8
_CHUNK = 256  # pixels per float32 partial sum in PixelSums.of_planes


def sample_every(num_train: int) -> int:
    """The automatic sampling step k for a train split of `num_train` images (module docstring)."""
    return max(1, min(MAX_EVERY, num_train // MIN_SAMPLE))


@dataclass
class PixelSums:
    """Running exact sums over images: counts, per-channel sums, 3x3 sums of channel products."""

    num_images: int = 0
    num_pixels: int = 0
    sum: list[int] = field(default_factory=lambda: [0, 0, 0])  # sum of pixel values, per channel R, G, B
    prod: list[list[int]] = field(default_factory=lambda: [[0] * 3 for _ in range(3)])  # sum of x_i * x_j

    @classmethod
    def of_image(cls, pixels: np.ndarray) -> PixelSums:
        """The sums of one (H, W, 3) uint8 RGB image."""
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"expected (H, W, 3) uint8 pixels, got {pixels.dtype} {pixels.shape}")
        return cls.of_planes(np.moveaxis(pixels, 2, 0))

    @classmethod
    def of_planes(cls, planes: np.ndarray) -> PixelSums:
        """The sums of (3, H, W) uint8 channel planes (prep.image.jpeg_sums: of a JPEG's decoded pixels)."""
        n = planes.shape[1] * planes.shape[2]
        # (3, chunks, _CHUNK) float32, zero-padded (zeros add nothing). float32 is exact here: a product
        # is at most 255**2 and a chunk's sum of products at most 255**2 * _CHUNK < 2**24; the chunk
        # sums are then added in float64, exact below 2**53. No BLAS: its threads slow forked workers.
        c = np.zeros((3, -(-n // _CHUNK) * _CHUNK), np.float32)
        c[:, :n] = planes.reshape(3, n)
        c = c.reshape(3, -1, _CHUNK)
        prod = np.einsum("ikp,jkp->ijk", c, c).sum(axis=2, dtype=np.float64)  # (3, 3)
        total = c.sum(axis=2).sum(axis=1, dtype=np.float64)
        return cls(1, n, [int(v) for v in total], [[int(v) for v in row] for row in prod])

    def add(self, other: PixelSums) -> None:
        """Add `other`'s sums into these (in place)."""
        self.num_images += other.num_images
        self.num_pixels += other.num_pixels
        for i in range(3):
            self.sum[i] += other.sum[i]
            for j in range(3):
                self.prod[i][j] += other.prod[i][j]

    def to_json(self) -> dict:
        """Plain JSON (Python ints stay exact at any size)."""
        return {"num_images": self.num_images, "num_pixels": self.num_pixels, "sum": list(self.sum),
                "prod": [list(row) for row in self.prod]}

    @classmethod
    def from_json(cls, d: dict) -> PixelSums:
        return cls(int(d["num_images"]), int(d["num_pixels"]), [int(v) for v in d["sum"]],
                   [[int(v) for v in row] for row in d["prod"]])

    def stats(self, every: int = 1) -> PixelStats:
        """`stats.json`: mean, std, cov, eigval (descending), eigvec (unit columns), counts; `every`: the
        sampling step the sums come from (recorded as `sample_every`)."""
        n = self.num_pixels
        if n == 0:
            raise ValueError("no training pixels to compute statistics from")
        # Population covariance, numerator exact in integers: N * sum(x_i x_j) - sum(x_i) sum(x_j).
        scale = float(n) * n * PIXEL_MAX * PIXEL_MAX
        cov = np.array([[(n * self.prod[i][j] - self.sum[i] * self.sum[j]) / scale for j in range(3)]
                        for i in range(3)])
        mean = np.array([s / (n * PIXEL_MAX) for s in self.sum])
        eigval, eigvec = np.linalg.eigh(cov)  # ascending, unit columns
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = eigval[order], eigvec[:, order]
        lead = np.abs(eigvec).argmax(axis=0)  # row of each column's largest-magnitude component
        eigvec = eigvec * np.sign(eigvec[lead, np.arange(3)])
        return PixelStats(
            mean=tuple(mean.tolist()), std=tuple(np.sqrt(np.diag(cov)).tolist()), cov=tuple(map(tuple, cov.tolist())),
            eigval=tuple(eigval.tolist()), eigvec=tuple(map(tuple, eigvec.tolist())),
            num_images=self.num_images,  # of the sample
            num_pixels=n, schema_version=SCHEMA_VERSION, split="train",
            pixels="after JPEG encoding (the shards' images decoded)", scale="0..1",
            sample_every=every,  # every k-th train image in written order (a seeded random sample)
        )
