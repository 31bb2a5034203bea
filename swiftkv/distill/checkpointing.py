"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A run folder can come from anywhere (a shared drive, a colleague, a download), and loading it must never run
code. accelerate's `save_state` pickles the optimizer, the scheduler and registered objects, and loading
them unpickles; so the trainer writes its own checkpoint:

  trainable.safetensors        the parameters being trained, by name
  optimizer.safetensors        every per-parameter optimizer tensor, keyed "<parameter index>.<name>"
  state.json                   optimizer groups and non-tensor values, LR scheduler, TrainerState
  rng-<process>.safetensors    torch's CPU (and CUDA) random states of each process

A checkpoint folder that holds pickle files (an older swiftkv's) is refused, not loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TRAINABLE, OPTIMIZER, STATE = "trainable.safetensors", "optimizer.safetensors", "state.json"
PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth")
SHARDED_TRAINING = ("DEEPSPEED", "FSDP", "MEGATRON_LM")


class CheckpointError(ValueError):
    pass


def check_supported(distributed_type) -> None:
    """Single-process and data-parallel (DDP) runs keep whole parameters and optimizer state in every process,
    which is what these checkpoints hold; sharded runs would need their shards gathered."""
    if distributed_type.name in SHARDED_TRAINING:
        raise CheckpointError(f"distillation checkpoints support single-process and data-parallel (DDP) runs, "
                              f"not {distributed_type.name}: only the SwiftKV projections train, so the optimizer "
                              f"state is small; use `accelerate launch --multi_gpu` instead")


def save_training_state(folder: Path, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                        scheduler, trainer_state: dict, process_index: int, is_main_process: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_random_states(), str(folder / f"rng-{process_index}.safetensors"))
    if not is_main_process:
        return
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in trainable.items()}, str(folder / TRAINABLE))
    optimizer_state = optimizer.state_dict()
    tensors, values = {}, {}
    for index, parameter_state in optimizer_state["state"].items():
        for name, value in parameter_state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                values[f"{index}.{name}"] = value
    save_file(tensors, str(folder / OPTIMIZER))
    state = {"optimizer": {"param_groups": optimizer_state["param_groups"], "values": values},
             "scheduler": scheduler.state_dict(), "trainer": trainer_state}
    (folder / STATE).write_text(json.dumps(state))


def load_training_state(folder: Path, trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                        scheduler, process_index: int) -> dict:
    """Restore everything `save_training_state` wrote into the live objects; returns the TrainerState dict."""
    refuse_pickles(folder)
    missing = [name for name in (TRAINABLE, OPTIMIZER, STATE) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not a complete distillation checkpoint: {', '.join(missing)} missing")
    try:
        weights = load_file(str(folder / TRAINABLE))
        optimizer_tensors = load_file(str(folder / OPTIMIZER))
        state = json.loads((folder / STATE).read_text())
    except Exception as error:  # a truncated or corrupt file: name it
        raise CheckpointError(f"{folder} cannot be read: {error}") from error
    if set(weights) != set(trainable):
        raise CheckpointError(f"{folder} trains other parameters than this model: "
                              f"{sorted(set(weights) ^ set(trainable))[:4]} ...")
    with torch.no_grad():
        for name, parameter in trainable.items():
            if weights[name].shape != parameter.shape:
                raise CheckpointError(f"{folder}: {name} has shape {tuple(weights[name].shape)}, the model "
                                      f"{tuple(parameter.shape)}")
            parameter.copy_(weights[name])
    per_parameter: dict[int, dict] = {}
    for key, value in [*optimizer_tensors.items(), *state["optimizer"]["values"].items()]:
        index, name = key.split(".", 1)
        per_parameter.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_parameter, "param_groups": state["optimizer"]["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    random_states = folder / f"rng-{process_index}.safetensors"
    if random_states.is_file():
        _set_random_states(load_file(str(random_states)))
    return state["trainer"]


def refuse_pickles(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{folder} holds pickle files ({', '.join(pickles)}); swiftkv never loads pickles, "
                              "since unpickling can run any code. Checkpoints of older swiftkv versions cannot be "
                              "resumed: start the run again without --resume, in a new --out folder")


def _random_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _set_random_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in states]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
