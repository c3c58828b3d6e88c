"""Gaussian mixture of multi-channel brain intensities; anomaly = negative log-likelihood."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bids_anomaly.models.base import TrainingData, read_weights, register, write_weights


@register
class GaussianMixtureModel:
    """Full-covariance Gaussian mixture of the channel intensities of healthy brain voxels.

    The mixture is fitted with scikit-learn's EM on voxels sampled evenly from every training
    subject; scores are computed in torch (so on the GPU when there is one).

    Parameters
    ----------
    n_components : int
        Number of Gaussian components.
    max_samples : int
        Voxels sampled for the fit, spread evenly over subjects.
    random_seed : int
        Seed of the sampling and of the EM initialisation.
    """

    model_type = "gmm"
    score_definition = ("negative log-likelihood of the voxel's channel intensities under the "
                        "mixture")

    def __init__(self, n_components: int = 5, max_samples: int = 200_000,
                 random_seed: int = 0) -> None:
        self.n_components = n_components
        self.max_samples = max_samples
        self.random_seed = random_seed
        self.weights: torch.Tensor | None = None
        self.means: torch.Tensor | None = None
        self.covariances: torch.Tensor | None = None

    @property
    def hyperparameters(self) -> dict:
        """Settings needed to rebuild the model."""
        return {"n_components": self.n_components, "max_samples": self.max_samples,
                "random_seed": self.random_seed}

    def fit(self, data: TrainingData) -> None:
        """Fit the mixture on brain voxels sampled from every subject of ``data``."""
        from sklearn.mixture import GaussianMixture

        generator = np.random.default_rng(self.random_seed)
        per_subject = max(1, self.max_samples // len(data))
        samples = []
        for image, mask in data:
            voxels = image[:, mask].T.cpu().numpy()
            take = min(per_subject, len(voxels))
            samples.append(voxels[generator.choice(len(voxels), take, replace=False)])
        mixture = GaussianMixture(n_components=self.n_components, covariance_type="full",
                                  reg_covar=1e-4, random_state=self.random_seed)
        mixture.fit(np.concatenate(samples).astype(np.float64))
        self.weights = torch.from_numpy(mixture.weights_)
        self.means = torch.from_numpy(mixture.means_)
        self.covariances = torch.from_numpy(mixture.covariances_)

    def distribution(self, device: torch.device | str = "cpu"):
        """The fitted mixture as a ``torch.distributions`` object (float64)."""
        from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

        if self.weights is None:
            raise RuntimeError("the model is not fitted")
        return MixtureSameFamily(
            Categorical(probs=self.weights.to(device)),
            MultivariateNormal(self.means.to(device),
                               covariance_matrix=self.covariances.to(device)),
        )

    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each brain voxel, 0 outside ``mask``."""
        mixture = self.distribution(image.device)
        voxels = image[:, mask].T.to(torch.float64)
        score = torch.zeros(mask.shape, dtype=torch.float32, device=image.device)
        score[mask] = (-mixture.log_prob(voxels)).to(torch.float32)
        return score

    def save(self, directory: Path) -> None:
        """Write the mixture parameters to ``weights.safetensors``."""
        write_weights(directory, {"weights": self.weights, "means": self.means,
                                  "covariances": self.covariances}, self.hyperparameters)

    @classmethod
    def load(cls, directory: Path) -> GaussianMixtureModel:
        """Read a model written by :meth:`save`."""
        tensors, hyperparameters = read_weights(directory)
        model = cls(**hyperparameters)
        model.weights = tensors["weights"]
        model.means = tensors["means"]
        model.covariances = tensors["covariances"]
        return model
