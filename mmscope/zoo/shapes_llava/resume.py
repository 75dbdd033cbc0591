"""Where a run is kept between crashes: the training state in `OUT/resume.pt`, and the world `train` generates.

At every validation the whole training state is written to `OUT/resume.pt` (`save_resume`, atomically); the
same command run again after a crash continues from there (`load_resume`, then `restore_modules` and
`restore_progress`) and ends with the same weights as an uninterrupted run. That file holds only tensors and
plain data and is read with `torch.load(weights_only=True)`: one swapped into a shared run folder cannot run
code. A file that is no training state, one made with other settings, or one that does not fit the run's
modules, optimizer or samplers is refused with a `TrainingStateError` naming it.

Without `--data`, `train` generates its world next to `OUT` (`generated_world`): a rerun or a resumed run reuses
it, one cut short is generated again, one of other settings is refused.
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from mmscope.errors import MMScopeError
from mmscope.zoo.shapes_llava.batches import Batcher
from mmscope.zoo.shapes_llava.config import TrainConfig, TrainConfigError
from mmscope.zoo.shapes_llava.schedule import CategorySampler

RESUME = "resume.pt"  # in the output folder while a run is under way


class TrainingStateError(MMScopeError, ValueError):
    """`OUT/resume.pt` is not a training state this run can continue."""


def _settings(config: TrainConfig) -> dict:
    """What a resumed run must share with the one that wrote the state (everything but where and how it logs)."""
    return {k: v for k, v in asdict(config).items() if k not in ("out", "wandb")}


# What `OUT/resume.pt` holds, with the type of each entry: tensors and plain data only.
_STATE = {"settings": dict, "step": int, "history": list, "minutes": float, "modules": dict, "optimizer": dict,
          "schedule": dict, "sampler_weights": list, "sampler_random": tuple, "turn_random": tuple,
          "torch_rng": torch.Tensor}


def training_state(config: TrainConfig, step: int, history: list[dict], minutes: float,
                   modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                   schedule: torch.optim.lr_scheduler.LRScheduler, sampler: CategorySampler, batcher: Batcher) -> dict:
    """Everything a run needs to continue after stage-2 step `step` as if it had never stopped (`_STATE`)."""
    return {
        "settings": _settings(config), "step": step, "history": history, "minutes": minutes,
        "modules": {name: module.state_dict() for name, module in modules.items()},
        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
        "sampler_weights": sampler.weights, "sampler_random": sampler.random.getstate(),
        "turn_random": batcher.random.getstate(),
        "torch_rng": torch.get_rng_state(),
    }


def save_resume(path: Path, state: dict) -> None:
    """Write atomically: a crash while saving leaves the previous state intact."""
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)


def load_resume(path: Path, config: TrainConfig) -> dict | None:
    """The training state a crashed run left in `path`, or None; a `TrainingStateError` if the file is not one
    (it is read with `weights_only=True`: nothing in it is executed) or was made with other settings."""
    if not path.exists():
        return None
    state = _read_state(path)
    wrong = [f"{key} missing" if key not in state else f"{key} is a {type(state[key]).__name__}"
             for key, kind in _STATE.items() if not isinstance(state.get(key), kind)]
    if wrong:
        raise _refused(path, ", ".join(wrong))
    different = _differences(state["settings"], _settings(config))
    if different:
        raise TrainingStateError(f"{path} holds an unfinished run with other settings ({'; '.join(different)}); "
                                 "rerun with those, or delete the file to start over")
    return state


def _refused(path: Path, reason: str) -> TrainingStateError:
    return TrainingStateError(f"{path} is not an mmscope training state ({reason}); delete it to start over")


def _read_state(path: Path) -> dict:
    """The dict in `path`, read without unpickling anything but tensors and plain data."""
    if not path.is_file():
        raise _refused(path, "not a file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, weights_only=True)
    except OSError as error:
        raise _refused(path, f"unreadable: {error.strerror or error}") from error
    except pickle.UnpicklingError as error:
        raise _refused(path, "it holds something other than tensors and plain data, which mmscope never "
                             "unpickles, or is corrupt") from error
    except EOFError as error:
        raise _refused(path, "empty or cut short") from error
    except Exception as error:  # torch's zip reader and unpickler raise many kinds
        raise _refused(path, f"corrupt or cut short: {_gist(error)}") from error
    if not isinstance(state, dict):
        raise _refused(path, f"it holds a {type(state).__name__}, not a training state")
    return state


def _differences(there: dict, now: dict, prefix: str = "") -> list[str]:
    """`steps: 3000 there, 2000 now` for each setting that differs (nested ones as `spec.text_layers`)."""
    unset = object()
    lines = []
    for key in [*now, *(key for key in there if key not in now)]:
        old, new = there.get(key, unset), now.get(key, unset)
        if isinstance(old, dict) and isinstance(new, dict):
            lines += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            shown = ["not set" if value is unset else repr(value) for value in (old, new)]
            lines.append(f"{prefix}{key}: {shown[0]} there, {shown[1]} now")
    return lines


def _gist(error: BaseException) -> str:
    """An error's message on one line: its first sentence, at most 160 characters (or the error's type)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = text.split(". ")[0] if text else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _unfit(path: Path, reason: str) -> TrainingStateError:
    return TrainingStateError(f"{path} is not an mmscope training state this run can continue ({reason}); "
                              "delete it to start over")


@contextmanager
def _restoring(path: Path) -> Iterator[None]:
    """Turn a loaded state that does not fit the run's modules, optimizer or samplers into a
    `TrainingStateError` naming the file."""
    try:
        yield
    except TrainingStateError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        raise _unfit(path, _gist(error)) from error


def restore_modules(path: Path, state: dict, modules: dict[str, torch.nn.Module]) -> None:
    """Load the model's and the auxiliary heads' weights from the `state` read from `path`."""
    with _restoring(path):
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])


def restore_progress(path: Path, state: dict, config: TrainConfig, optimizer: torch.optim.Optimizer,
                     schedule: torch.optim.lr_scheduler.LRScheduler, sampler: CategorySampler,
                     batcher: Batcher) -> tuple[int, float]:
    """Put stage 2's optimizer, schedule, samplers and torch's random state where the `state` read from `path`
    left them; returns the stage-2 steps and the minutes already done."""
    with _restoring(path):
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if not 0 < state["step"] < config.steps:
            raise _unfit(path, f"it stopped at step {state['step']} of {config.steps}")
        if len(state["sampler_weights"]) != len(sampler.names):
            raise _unfit(path, f"{len(state['sampler_weights'])} sampling weights for {len(sampler.names)} "
                               "categories")
        sampler.weights = state["sampler_weights"]
        sampler.random.setstate(state["sampler_random"])
        batcher.random.setstate(state["turn_random"])
        torch.set_rng_state(state["torch_rng"])
    return state["step"], state["minutes"]


def generated_world(world: Path, config: TrainConfig) -> None:
    """The world `train` generates next to `out` when no `--data` is given: reused when a complete one of the
    same settings is there (a rerun, or a resumed run), regenerated when one was cut short (world.json, written
    last, is missing), refused when it was made with other settings."""
    from mmscope.data.synthetic import synthesize

    wanted = {"seed": config.seed, "n_scenes": config.n_scenes, "image_size": config.spec.image_size}
    try:
        recorded = json.loads((world / "world.json").read_text())
    except FileNotFoundError:
        synthesize(world, config.n_scenes, seed=config.seed, image_size=config.spec.image_size, overwrite=True)
        return
    except (OSError, ValueError):
        recorded = {}
    recorded = {key: recorded.get(key) for key in wanted} if isinstance(recorded, dict) else {}
    if recorded != wanted:
        different = "; ".join(f"{key}: {recorded.get(key)!r} there, {value!r} now" for key, value in wanted.items()
                              if recorded.get(key) != value)
        raise TrainConfigError(f"{world} holds a generated world of other settings ({different}); delete it to "
                               "generate this one, or pass it as --data to train on it")
