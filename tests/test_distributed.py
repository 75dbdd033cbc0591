"""Sharded runs: `torchrun --nproc-per-node 2 -m mmscope knockout …` on CPU (gloo) writes the table one process
writes, exactly; a sharded run whose rank 0 is SIGKILLed mid-way continues at another world size (one process)
and ends with that same table."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from mmscope.experiments.distributed import RankError, World

# One thread everywhere: torchrun gives each rank one, and the reference must compute in the same shapes.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1"}
ENV = {key: value for key, value in ENV.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sweep(world, out) -> list[str]:
    return ["knockout", "--data", str(world), "--split", "test", "--limit", "6", "--window", "3", "--out", str(out)]


def launched(ranks: int, arguments: list[str]) -> list[str]:
    """`torchrun --nproc-per-node RANKS -m mmscope ARGUMENTS`, or the plain command for one process."""
    if ranks == 1:
        return [sys.executable, "-m", "mmscope", *arguments]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), "-m", "mmscope", *arguments]


def run(ranks: int, arguments: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(launched(ranks, arguments), env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> pd.DataFrame:
    """The table of an uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("one-process") / "run"
    run(1, sweep(world, out))
    return pd.read_parquet(out / "results.parquet")


def test_two_ranks_write_the_table_one_process_writes(world, reference, tmp_path):
    out = tmp_path / "run"
    result = run(2, sweep(world, out))
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), reference, check_exact=True)
    assert result.stdout.count("knockout: Model(") == 1, "rank 0 alone reports"
    assert "rank 0 of 2" in result.stdout
    assert (out / "summary.csv").exists() and (out / "knockout.png").exists()


def test_a_sharded_run_killed_mid_way_continues_in_one_process_to_the_same_table(world, reference, tmp_path):
    out = tmp_path / "run"
    total = len(reference.drop_duplicates("example")) + 2  # two questions are answered wrongly (skipped)
    launch = subprocess.Popen(launched(2, sweep(world, out)), env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    parts = out / "parts"
    deadline = time.monotonic() + 300
    while not (parts.is_dir() and len(list(parts.iterdir())) >= 3):
        assert launch.poll() is None and time.monotonic() < deadline, "the sharded run ended before any kill"
        time.sleep(0.02)
    holder = json.loads((out / "run.lock.json").read_text())["pid"]  # rank 0, which holds the folder
    os.kill(holder, signal.SIGKILL)
    assert launch.wait(timeout=120) != 0
    written = len(list(parts.glob("*.parquet"))) + len(list(parts.glob("*.skipped")))
    assert 0 < written < total, "the kill must land mid-run"
    result = run(1, sweep(world, out))
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), reference, check_exact=True)
    assert "rank" not in result.stdout


def test_the_world_is_read_from_the_launcher_environment_and_shares_units_disjointly(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    world = World.from_environment()
    assert (world.rank, world.size, world.local_rank, world.main) == (2, 3, 0, False)
    shares = [World(rank, 3).share(range(10)) for rank in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(RankError, match="RANK=3 is outside WORLD_SIZE=3"):
        World.from_environment()
    monkeypatch.setenv("RANK", "first")
    with pytest.raises(RankError, match="RANK='first': a launcher sets these to whole numbers"):
        World.from_environment()
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    assert World.from_environment() == World(0, 1, 0)


def test_a_model_spread_over_the_cpu_and_the_disk_gives_the_one_device_results(tmp_path):
    """accelerate's hooks under nnsight: some layers and the lm_head offloaded to disk (loaded to the CPU at each
    forward). Knockouts through both engines and patches from a clean cache equal the unmapped model's."""
    from PIL import Image

    import mmscope
    from mmscope.experiments.engine import Variant, run_variants
    from mmscope.interventions import CachedPatch, Knockout

    plain = mmscope.load("shapes-llava")
    layers = {f"model.language_model.layers.{layer}": "disk" if layer % 3 == 1 else "cpu"
              for layer in range(plain.n_layers)}
    placement = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
                 "model.language_model.embed_tokens": "cpu", **layers, "model.language_model.norm": "cpu",
                 "model.language_model.rotary_emb": "cpu", "lm_head": "disk"}
    mapped = mmscope.load("shapes-llava", device_map=placement, offload_folder=tmp_path)
    assert mapped.hf.lm_head.weight.device.type == "meta" and hasattr(mapped.hf.lm_head, "_hf_hook")
    with pytest.raises(mmscope.errors.ModelLoadError, match="not both"):
        mmscope.load("shapes-llava", device="cpu", device_map="auto")

    def pair(model):
        return [model.prepare(Image.new("RGB", (64, 64), colour), "What color is the cube?", boxes=[(16, 16, 32, 32)])
                for colour in ((200, 30, 30), (30, 30, 200))]

    knockouts = [Variant((flow, layer), (Knockout(*flow.split("->"), (layer, layer + 1)),))
                 for flow in ("image->last", "image->question", "object->question") for layer in range(7)]
    patches = [Variant((group, layer), (CachedPatch("residual", (layer,), group),))
               for group in ("image", "object", "last") for layer in range(8)]
    (clean, corrupted), (mapped_clean, mapped_corrupted) = pair(plain), pair(mapped)
    for engine in ("prefix", "naive"):
        expected = run_variants(plain, clean, knockouts, engine=engine)[1]
        assert torch.allclose(run_variants(mapped, mapped_clean, knockouts, engine=engine)[1], expected, atol=1e-6)
    expected = run_variants(plain, corrupted, patches, source=clean)[1]
    assert torch.allclose(run_variants(mapped, mapped_corrupted, patches, source=mapped_clean)[1], expected, atol=1e-6)
    assert (expected - plain.next_token_probs(corrupted)).abs().max() > 0.01, "the patches must matter"
    assert mapped.generate_answer(mapped_clean) == plain.generate_answer(clean)
