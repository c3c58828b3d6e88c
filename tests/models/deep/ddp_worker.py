"""One rank of the DDP test.

``torchrun -m tests.models.deep.ddp_worker SUBJECTS.json OUT MODEL_TYPE...`` (``ae``, ``ddpm``):
each model type is trained in turn in the same process group, with its own checkpoints.
"""

import json
import sys
from pathlib import Path

import torch

from bids_anomaly.models import REGISTRY, SubjectImages, TrainingData
from bids_anomaly.models.deep import distributed
from bids_anomaly.models.deep.engine import EngineOptions

OPTIONS = {"ae": {"width": 4, "latent": 4},
           # simplex noise: the family's own random draws (timesteps, noise) on every rank
           "ddpm": {"width": 8, "noise": "simplex", "simplex_scale": 8, "ddim_steps": 2}}


def main() -> None:
    subjects_file, out = Path(sys.argv[1]), Path(sys.argv[2])
    device = distributed.setup(torch.device("cpu"))
    subjects = [SubjectImages(s["name"], [Path(p) for p in s["channels"]], Path(s["mask"]))
                for s in json.loads(subjects_file.read_text())]
    data = TrainingData(subjects, ["T1w", "FLAIR"], device)
    rank = distributed.rank()
    for model_type in sys.argv[3:]:
        training = EngineOptions(epochs=2, batch_size=4, num_workers=1, seed=5,
                                 checkpoint_dir=out / model_type / "checkpoints")
        model = REGISTRY[model_type](mode="2d", training=training, cache_dir=out / "cache",
                                     **OPTIONS[model_type])
        model.fit(data)
        torch.save(model.network.state_dict(), out / model_type / f"rank{rank}.pt")
        (out / model_type / f"rank{rank}.json").write_text(json.dumps(
            {"world_size": distributed.world_size_now(), "report": model.fit_report}))
    distributed.teardown()


if __name__ == "__main__":
    main()
