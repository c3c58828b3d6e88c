"""One rank of the DDP test.

``torchrun -m tests.models.deep.ddp_worker SUBJECTS.json OUT MODEL_TYPE`` (``ae`` or ``ddpm``).
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
    training = EngineOptions(epochs=2, batch_size=4, num_workers=1, seed=5,
                             checkpoint_dir=out / "checkpoints")
    model_type = sys.argv[3]
    options = OPTIONS[model_type]
    model = REGISTRY[model_type](mode="2d", training=training, cache_dir=out / "cache",
                                 **options)
    model.fit(data)
    rank = distributed.rank()
    torch.save(model.network.state_dict(), out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"world_size": distributed.world_size_now(), "report": model.fit_report}))
    distributed.teardown()


if __name__ == "__main__":
    main()
