"""Training: alternate-collaborative training (method §6), the model folder, checkpoints, DDP.

    from hidiff.training import train, load_model_dir

    result = train(dataset="kvasir-seg", data="../shared/data/Kvasir-SEG", preset="cpu-small",
                   out="runs/kvasir", max_steps=500)
    model = load_model_dir("runs/kvasir")    # config, dataset_info, split, networks (eval mode)

``python -m hidiff.training --help`` runs :func:`train` from the command line, also under
``torchrun --nproc_per_node=N -m hidiff.training ...``.
"""

from hidiff.model_dir import (
    FORMAT_VERSION,
    LoadedModel,
    ModelDirError,
    build_networks,
    load_model_dir,
)
from hidiff.training.loop import TrainResult, train
from hidiff.training.setup import DEFAULT_BATCH_SIZE

__all__ = [
    "DEFAULT_BATCH_SIZE", "FORMAT_VERSION", "LoadedModel", "ModelDirError", "TrainResult",
    "build_networks", "load_model_dir", "train",
]
