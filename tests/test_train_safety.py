"""The training recipe (`mmscope.zoo.shapes_llava.train`) at the door: a bad `TrainConfig` value is refused by
its option name before anything is written, and `OUT/resume.pt` is read without executing anything in it (a
crafted pickle, a cut or empty file, another format are refused by name); a real saved state round-trips, and one
whose progress does not fit the run is refused by name."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mmscope.zoo.shapes_llava.train as recipe
from conftest import TINY_TRAINING_SPEC as SPEC
from mmscope.errors import MMScopeError
from mmscope.zoo.shapes_llava.config import TrainConfig, TrainConfigError
from mmscope.zoo.shapes_llava.resume import RESUME, TrainingStateError, generated_world, load_resume
from mmscope.zoo.shapes_llava.train import train



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmscope.data import synthesize

    folder = tmp_path_factory.mktemp("safety-world")
    synthesize(folder, 10, seed=3, image_size=64, workers=1, progress=False)
    return folder


def tiny_config(out, world, **changes) -> TrainConfig:
    """A run of seconds: one vision step, three answer steps, validated (and its state saved) every step."""
    settings = dict(out=str(out), data=str(world), vision_steps=1, steps=3, batch_size=2, vision_batch_size=2,
                    warmup=1, eval_every=1, eval_questions=4, grounding_layer=1, attention_layer=1, gather_layer=2,
                    bf16=False, spec=SPEC)
    return TrainConfig(**{**settings, **changes})


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def crashed(world, tmp_path_factory):
    """A run that crashed after its last saved state: its config, the states it saved (as they were in memory)
    and a copy of the file of each."""
    out = tmp_path_factory.mktemp("crashed") / "out"
    config = tiny_config(out, world)
    states, files = [], []

    def save(path, state):
        save_resume(path, state)
        states.append(copy.deepcopy(state))  # the run goes on appending to its history
        files.append(Path(shutil.copy(path, out.parent / f"state-{len(files)}.pt")))

    def crash(*args, **kwargs):
        raise Stop

    save_resume = recipe._save_resume
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipe, "_save_resume", save)
        patch.setattr(recipe, "save_llava", crash)
        with pytest.raises(Stop):
            train(config)
    assert (out / RESUME).exists() and [state["step"] for state in states] == [1, 2]
    return config, states, files


def assert_same(loaded, saved, where="state"):
    """Equal values of equal types all the way down (tensors: equal dtype, shape and values)."""
    assert type(loaded) is type(saved), where
    if isinstance(saved, dict):
        assert list(loaded) == list(saved), where
        for key in saved:
            assert_same(loaded[key], saved[key], f"{where}[{key!r}]")
    elif isinstance(saved, (list, tuple)):
        assert len(loaded) == len(saved), where
        for i, (a, b) in enumerate(zip(loaded, saved)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(saved, torch.Tensor):
        assert loaded.dtype == saved.dtype and torch.equal(loaded, saved), where
    else:
        assert loaded == saved, where


def test_a_saved_training_state_round_trips_under_weights_only_and_the_run_resumes_from_it(crashed, capsys):
    config, states, files = crashed
    for state, file in zip(states, files):
        assert_same(torch.load(file, weights_only=True), state)
        assert_same(load_resume(file, config), state)
    # Every part is there: module weights, AdamW's moments, the schedule, both random states, history, settings.
    last = states[-1]
    assert set(last["modules"]) == {"model", "auxiliary", "grounding", "gathering", "naming"}
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(next(iter(last["optimizer"]["state"].values())))
    assert last["schedule"]["last_epoch"] == 2 and isinstance(last["sampler_random"], tuple)
    assert [record.get("step") for record in last["history"]] == [None, 1, 2]  # one vision step, then answers
    assert last["settings"]["spec"]["text_layers"] == 2
    out = train(config)  # the crashed run continues from its file and finishes
    printed = capsys.readouterr()
    assert "resuming" in printed.out + printed.err
    assert not (out / RESUME).exists() and (out / "model.safetensors").exists()


class Payload:
    """Unpickled the unsafe way, creates `marker`."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_crafted_pickle_in_resume_pt_is_refused_and_never_runs(world, tmp_path, how):
    out, marker = tmp_path / "out", tmp_path / "marker"
    out.mkdir()
    state = {"settings": Payload(marker), "step": 1}
    if how == "torch.save":
        torch.save(state, out / RESUME)
    else:
        (out / RESUME).write_bytes(pickle.dumps(state))
    with pytest.raises(TrainingStateError) as error:
        train(tiny_config(out, world))
    assert str(error.value) == (f"{out / RESUME} is not an mmscope training state (it holds something other than "
                                "tensors and plain data, which mmscope never unpickles, or is corrupt); delete it "
                                "to start over")
    assert not marker.exists() and sorted(p.name for p in out.iterdir()) == [RESUME]
    pickle.loads(pickle.dumps(Payload(marker))).close()  # the payload is real: unpickled plainly, it creates the file
    assert marker.exists()


def not_a_state(crashed, tmp_path) -> dict:
    """Files that are no training state, by name: each writes itself to a path."""
    real = crashed[2][-1].read_bytes()

    def write(content):
        return lambda path: path.write_bytes(content)

    return {
        "truncated": write(real[: len(real) // 2]),
        "empty": write(b""),
        "json": write(b'{"step": 1}'),
        "tensor": lambda path: torch.save(torch.zeros(3), path),
        "state_dict": lambda path: torch.save(torch.nn.Linear(2, 2).state_dict(), path),
        "incomplete": lambda path: torch.save({**torch.load(crashed[2][-1], weights_only=True), "step": "2",
                                               "history": None}, path),
        "folder": lambda path: path.mkdir(),
    }


REFUSALS = {
    "truncated": "corrupt or cut short: PytorchStreamReader failed reading zip archive: failed finding central "
                 "directory)",
    "empty": "empty or cut short",
    "json": "it holds something other than tensors and plain data, which mmscope never unpickles, or is corrupt",
    "tensor": "it holds a Tensor, not a training state",
    "state_dict": "settings missing, step missing, history missing, minutes missing, modules missing, optimizer "
                  "missing, schedule missing, sampler_weights missing, sampler_random missing, turn_random missing, "
                  "torch_rng missing",
    "incomplete": "step is a str, history is a NoneType",
    "folder": "not a file",
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_a_resume_file_that_is_no_training_state_is_refused_by_name(crashed, tmp_path, kind):
    path = tmp_path / RESUME
    not_a_state(crashed, tmp_path)[kind](path)
    with pytest.raises(TrainingStateError) as error:
        load_resume(path, crashed[0])
    assert str(error.value).startswith(f"{path} is not an mmscope training state ({REFUSALS[kind]}")
    assert str(error.value).endswith("; delete it to start over") and "\n" not in str(error.value)
    assert isinstance(error.value, MMScopeError)


def test_a_state_that_does_not_fit_the_run_is_refused_when_restored(crashed, tmp_path):
    config, states, _ = crashed
    out = tmp_path / "out"
    out.mkdir()
    model = dict(states[-1]["modules"]["model"])
    model.pop(next(iter(model)))
    torch.save({**states[-1], "modules": {**states[-1]["modules"], "model": model}}, out / RESUME)
    with pytest.raises(TrainingStateError, match=rf"^{out / RESUME} is not an mmscope training state this run can "
                                                 r"continue \(Error\(s\) in loading state_dict .*\); delete it"):
        train(dataclasses.replace(config, out=str(out)))
    assert sorted(p.name for p in out.iterdir()) == [RESUME]


@pytest.mark.parametrize("kind", ["finished", "sampler"])
def test_a_state_whose_progress_does_not_fit_the_run_is_refused_by_name(crashed, tmp_path, kind):
    config, states, _ = crashed
    out = tmp_path / "out"
    out.mkdir()
    n = len(states[-1]["sampler_weights"])  # the world's categories
    changes, reason = {"finished": ({"step": 3}, "it stopped at step 3 of 3"),
                       "sampler": ({"sampler_weights": [1 / (n + 1)] * (n + 1)},
                                   f"{n + 1} sampling weights for {n} categories")}[kind]
    torch.save({**states[-1], **changes}, out / RESUME)
    with pytest.raises(TrainingStateError) as error:
        train(dataclasses.replace(config, out=str(out)))
    assert str(error.value) == (f"{out / RESUME} is not an mmscope training state this run can continue ({reason}); "
                                "delete it to start over")
    assert isinstance(error.value, MMScopeError) and sorted(p.name for p in out.iterdir()) == [RESUME]


def test_a_state_of_other_settings_names_each_one_with_both_values(crashed):
    config, _, files = crashed
    spec = dataclasses.replace(SPEC, text_layers=3)
    with pytest.raises(TrainingStateError) as error:
        load_resume(files[-1], dataclasses.replace(config, steps=4, lr=0.01, spec=spec))
    assert str(error.value) == (f"{files[-1]} holds an unfinished run with other settings (steps: 3 there, 4 now; "
                                "lr: 0.0015 there, 0.01 now; spec.text_layers: 2 there, 3 now); rerun with those, or "
                                "delete the file to start over")


BAD_VALUES = [
    ({"steps": -1}, "steps -1 (--steps): must be at least 1"),
    ({"steps": 0}, "steps 0 (--steps): must be at least 1"),
    ({"steps": 2.5}, "steps 2.5 (--steps): must be a whole number, at least 1"),
    ({"steps": True}, "steps True (--steps): must be a whole number, at least 1"),
    ({"vision_steps": -1}, "vision_steps -1 (--vision-steps): must be at least 0 (0 skips stage 1, vision "
                           "pre-training)"),
    ({"batch_size": 0}, "batch_size 0 (--batch-size): must be at least 1"),
    ({"vision_batch_size": 0}, "vision_batch_size 0 (--vision-batch-size): must be at least 1"),
    ({"n_scenes": 9}, "n_scenes 9 (--n-scenes): must be at least 10 (every split, 80/10/10 train/val/test, needs a "
                      "scene)"),
    ({"eval_every": 0}, "eval_every 0 (--eval-every): must be at least 1"),
    ({"eval_questions": 0}, "eval_questions 0 (--eval-questions): must be at least 1"),
    ({"warmup": 0}, "warmup 0 (--warmup): must be at least 1"),
    ({"seed": -1}, "seed -1 (--seed): must be a whole number from 0 to 2**63 - 1"),
    ({"lr": 0.0}, "lr 0.0 (--lr): must be a finite number above 0"),
    ({"lr": -0.001}, "lr -0.001 (--lr): must be a finite number above 0"),
    ({"lr": float("nan")}, "lr nan (--lr): must be a finite number above 0"),
    ({"lr": float("inf")}, "lr inf (--lr): must be a finite number above 0"),
    ({"lr": "0.1"}, "lr '0.1' (--lr): must be a finite number above 0"),
    ({"weight_decay": -0.1}, "weight_decay -0.1 (--weight-decay): must be a finite number, at least 0"),
    ({"patch_loss_weight": -1.0}, "patch_loss_weight -1.0 (--patch-loss-weight): must be a finite number, at least "
                                  "0 (0 turns that loss off)"),
    ({"grounding_loss_weight": float("nan")}, "grounding_loss_weight nan (--grounding-loss-weight): must be a finite "
                                              "number, at least 0 (0 turns that loss off)"),
    ({"attention_loss_weight": float("inf")}, "attention_loss_weight inf (--attention-loss-weight): must be a finite "
                                              "number, at least 0 (0 turns that loss off)"),
    ({"gather_loss_weight": -0.5}, "gather_loss_weight -0.5 (--gather-loss-weight): must be a finite number, at "
                                   "least 0 (0 turns that loss off)"),
    ({"named_loss_weight": -2}, "named_loss_weight -2 (--named-loss-weight): must be a finite number, at least 0 "
                                "(0 turns that loss off)"),
    ({"focus": 1.5}, "focus 1.5 (--focus): must lie in [0, 1] (0: uniform over categories)"),
    ({"focus": -0.1}, "focus -0.1 (--focus): must lie in [0, 1] (0: uniform over categories)"),
    ({"focus": float("nan")}, "focus nan (--focus): must lie in [0, 1] (0: uniform over categories)"),
    ({"turns": 0}, "turns 0 (--turns): must be at least 1"),
    ({"caption_steps": -1}, "caption_steps -1 (--caption-steps): must be at least 0 (0: no caption-only steps)"),
    ({"caption_steps": 3}, "caption_steps 3 (--caption-steps): must be below --steps 3: they are its first steps"),
    ({"spec": dataclasses.replace(SPEC, text_layers=0)}, "text_layers 0 (--text-layers): must be a whole number, at "
                                                         "least 1 (the spec's decoder layers)"),
    ({"turns": 3, "caption_share": 1.2}, "caption_share 1.2 (--caption-share): must lie in [0, 1]"),
    ({"turns": 1, "statement_share": 0.0, "caption_share": 0.2}, "caption_share 0.2 (--caption-share): needs --turns "
                                                                 "above 1: it is the share of the "
                             "turns after the first"),
    ({"turns": 3, "caption_share": 0.6, "statement_share": 0.5}, "statement_share 0.5 (--statement-share): plus "
                                                                 "--caption-share 0.6 must be at most 1"),
    ({"turns": 3, "caption_share": 0.5, "statement_share": 0.3, "description_share": 0.4},
     "description_share 0.4 (--description-share): plus --caption-share 0.5 and --statement-share 0.3 must be at "
     "most 1"),
    ({"turns": 3, "description_share": -0.1}, "description_share -0.1 (--description-share): must lie in [0, 1]"),
    ({"turns": 1, "statement_share": 0.0, "description_share": 0.3}, "description_share 0.3 (--description-share): "
                                                                     "needs --turns above 1: it is the "
                                 "share of the turns after the first"),
    ({"blank_share": 1.5}, "blank_share 1.5 (--blank-share): must lie in [0, 1]"),
    ({"blank_share": float("nan")}, "blank_share nan (--blank-share): must lie in [0, 1]"),
    ({"bf16": "yes"}, "bf16 'yes' (--bf16): must be True or False (or None: where the CPU has bf16 instructions)"),
    ({"freeze_vision": 1}, "freeze_vision 1 (--freeze-vision): must be True or False"),
    ({"caption_positions": "no"}, "caption_positions 'no' (--caption-positions): must be True or False"),
    ({"spec": {"text_layers": 2}}, "spec {'text_layers': 2} (--spec): must be a TinyLlavaSpec"),
    ({"grounding_layer": 0}, "grounding_layer 0 (--grounding-layer): must be 1..2: the output of that many decoder "
                             "layers (the spec has 2)"),
    ({"grounding_layer": 3}, "grounding_layer 3 (--grounding-layer): must be 1..2: the output of that many decoder "
                             "layers (the spec has 2)"),
    ({"gather_layer": -1}, "gather_layer -1 (--gather-layer): must be 1..2: the output of that many decoder layers "
                           "(the spec has 2)"),
    ({"attention_layer": 2}, "attention_layer 2 (--attention-layer): must be 0..1: a 0-based decoder layer (the "
                             "spec has 2)"),
    ({"attention_head": 2}, "attention_head 2 (--attention-head): must be 0..1: the spec's decoder layers have 2 "
                            "heads"),
]


@pytest.mark.parametrize("changes, message", BAD_VALUES, ids=[message.split(" (")[0] for _, message in BAD_VALUES])
def test_a_bad_config_value_is_refused_by_option_name_before_anything_is_written(world, tmp_path, changes, message):
    out = tmp_path / "out"
    with pytest.raises(TrainConfigError) as error:
        train(tiny_config(out, world, **changes))
    assert str(error.value) == message and isinstance(error.value, MMScopeError)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_folders_are_refused_by_option_name_before_anything_is_written(world, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    empty = tmp_path / "empty"
    empty.mkdir()
    before = sorted(tmp_path.rglob("*"))
    for out, data, message in [
        ("", world, "out '' (--out): must name a folder (it is created if missing)"),
        (a_file, world, f"out {str(a_file)!r} (--out): is a file, not a folder; give a folder (it is created if "
                        "missing)"),
        (a_file / "out", world, f"out {str(a_file / 'out')!r} (--out): lies under {str(a_file)!r}, which is a file, "
                                "not a folder; give a folder (it is created if missing)"),
        (tmp_path / "out", empty, f"data {str(empty)!r} (--data): is not a synthetic-world folder (it has no "
                                  "world.json); make one with `mmscope data synth`, or omit --data to generate one "
                                  "next to --out"),
        (tmp_path / "out", tmp_path / "nowhere", f"data {str(tmp_path / 'nowhere')!r} (--data): is not a "
                                                 "synthetic-world folder (it has no world.json); make one with "
                                                 "`mmscope data synth`, or omit --data to generate one next to --out"),
        (world, world, f"out {str(world)!r} (--out): is the --data folder; give another folder for the trained model"),
    ]:
        with pytest.raises(TrainConfigError) as error:
            train(tiny_config(out, data))
        assert str(error.value) == message
    assert sorted(tmp_path.rglob("*")) == before and a_file.read_text() == "mine"
    assert sorted(p.name for p in world.iterdir()) == ["images", "questions", "sceneGraphs", "world.json"]


def test_train_command_with_negative_steps_writes_nothing(world, tmp_path):
    from mmscope.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--data", str(world), "--steps", "-1"])
    assert result.exit_code == 2
    assert result.stderr == "error: steps -1 (--steps): must be at least 1\n"
    assert not out.exists()


def test_a_path_is_kept_as_a_string_and_vision_steps_zero_skips_stage_one(world, tmp_path):
    config = tiny_config(tmp_path / "out", world, vision_steps=0, steps=1)
    config.out, config.data = tmp_path / "out", world  # set after construction: the check refuses them
    with pytest.raises(TrainConfigError, match=r"^out PosixPath\(.*\) \(--out\): must be a string: the folder's path$"):
        train(config)
    config = dataclasses.replace(config, out=tmp_path / "out", data=world)
    assert (config.out, config.data) == (str(tmp_path / "out"), str(world))
    history = json.loads((train(config) / "training.json").read_text())["history"]
    assert [record.get("step") for record in history] == [1]  # no vision steps


def test_the_generated_world_is_reused_when_it_matches_regenerated_when_cut_short_refused_otherwise(tmp_path):
    world = tmp_path / "out-world"
    config = dataclasses.replace(tiny_config(tmp_path / "out", world), data=None, n_scenes=10, seed=5)
    generated_world(world, config)  # generated
    recorded = json.loads((world / "world.json").read_text())
    assert (recorded["seed"], recorded["n_scenes"], recorded["image_size"]) == (5, 10, 64)
    stamp = (world / "world.json").stat().st_mtime_ns
    generated_world(world, config)  # a rerun reuses it
    assert (world / "world.json").stat().st_mtime_ns == stamp
    with pytest.raises(TrainConfigError, match=r"holds a generated world of other settings \(seed: 5 there, 6 now\)"):
        generated_world(world, dataclasses.replace(config, seed=6))
    (world / "world.json").unlink()  # as a crash during generation leaves it
    generated_world(world, config)
    assert json.loads((world / "world.json").read_text())["splits"] == recorded["splits"]
