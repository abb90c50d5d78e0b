"""The trainer under interruption and failure: Ctrl-C and SIGTERM keep the work, a crash costs minutes, checkpoints
are whole, a run that never started leaves no folder, and a typo in a teacher name fails before any data loads."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from support import command, offline_env

from splatsem_ns.data.datamanager import ChorusDataManagerConfig
from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene
from splatsem_ns.engine.trainer import ChorusTrainer, ChorusTrainerConfig, resume_command
from splatsem_ns.teachers.registry import UnknownTeacherError

STEP_LINE = re.compile(r"^\s*(\d+) \(\d+\.\d+%\)")
"""A row of nerfstudio's step table in a redirected log: "930 (46.50%)   78.6 ms ..."."""


def _ns_train(scene: Path, out: Path, cache: Path, *extra: str) -> list:
    return [
        command("ns-train"), "chorus-splat", "--data", str(scene),
        "--output-dir", str(out), "--experiment-name", "t", "--timestamp", "run",
        "--vis", "tensorboard", "--machine.device-type", "cpu", "--viewer.quit-on-train-completion", "True",
        "--steps-per-eval-image", "100000", "--steps-per-eval-all-images", "100000",
        "--pipeline.datamanager.teachers", "labels",
        "--pipeline.datamanager.feature-cache-dir", str(cache),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupt")
    return generate_synthetic_scene(
        root / "scene", SyntheticSceneConfig(num_views=12, width=48, height=36)
    ).parent


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_says_how_to_resume_and_the_resumed_run_ends_on_time(scene, tmp_path):
    """Ctrl-C in the middle of a run (checkpoints every 2000 steps, none due) saves the step it stopped at, prints
    the resume command and exits non-zero; that command resumes there and stops at the run's total step count."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    total = 100000  # never reached: the run is interrupted
    proc = subprocess.Popen(
        _ns_train(scene, out, cache, "--max-num-iterations", str(total)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=offline_env(),
    )  # fmt: skip
    lines: list = []
    reached = threading.Event()

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            match = STEP_LINE.match(line)
            if match and int(match.group(1)) >= 20:
                reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert reached.wait(300), "training did not reach step 20:\n" + "".join(lines[-40:])
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
    finally:
        proc.kill()
    reader.join(10)
    log = "".join(lines)
    assert proc.returncode == 128 + signal.SIGINT, log[-3000:]
    checkpoints = sorted((out / "t" / "chorus-splat" / "run" / "nerfstudio_models").glob("step-*.ckpt"))
    assert len(checkpoints) == 1, log[-3000:]
    stopped = int(checkpoints[0].stem.split("-")[1])
    assert stopped >= 20
    assert f"Training stopped by SIGINT after step {stopped}" in log
    assert str(checkpoints[0]) in log
    resume = next(line for line in log.splitlines() if "--load-dir" in line).split()
    assert resume[0] == "ns-train" and resume[-2] == "--load-dir"
    assert Path(resume[-1]) == checkpoints[0].parent
    assert not list(checkpoints[0].parent.parent.glob(".*partial*")), "a temporary checkpoint was left behind"

    # Resume with the printed command (only the total shortened): it continues from the checkpoint and ends at
    # the total step count, not that many steps after the checkpoint.
    resume[resume.index("--max-num-iterations") + 1] = str(stopped + 11)
    resumed = subprocess.run(
        [command("ns-train"), *resume[1:]], capture_output=True, text=True, env=offline_env(), timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    unwrapped = "".join(resumed.stdout.split())  # rich folds long lines, paths included
    assert f"DoneloadingNerfstudiocheckpointfrom{checkpoints[0]}" in unwrapped, resumed.stdout[-3000:]
    final = sorted(checkpoints[0].parent.glob("step-*.ckpt"))
    assert [p.name for p in final] == [f"step-{stopped + 10:09d}.ckpt"]


def test_a_resumed_run_trains_its_gaussians(scene, tmp_path):
    """After ``--load-dir`` each per-Gaussian optimizer steps the model's own parameter, with the Adam state the
    checkpoint saved: nerfstudio builds the optimizers before splatfacto's loading replaces the parameters, which
    left a resumed run's Gaussians frozen until densification rebound them."""
    import yaml
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    from splatsem_ns.checkpoints import allow_numpy_scalars_in_checkpoints

    out, cache = tmp_path / "out", tmp_path / "cache"
    first = subprocess.run(
        _ns_train(scene, out, cache, "--max-num-iterations", "4", "--steps-per-save", "4"),
        capture_output=True, text=True, env=offline_env(), timeout=600,
    )  # fmt: skip
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = out / "t" / "chorus-splat" / "run"
    saved = torch.load(
        next((run / "nerfstudio_models").glob("step-*.ckpt")), map_location="cpu", weights_only=False
    )
    config = yaml.load((run / "config.yml").read_text(), Loader=yaml.Loader)
    config.load_dir = run / "nerfstudio_models"
    config.max_num_iterations = 8
    allow_numpy_scalars_in_checkpoints()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    model = trainer.pipeline.model
    for name in ("means", "opacities", "semantic_latent"):
        optimizer = trainer.optimizers.optimizers[name]
        param = model.gauss_params[name]
        assert optimizer.param_groups[0]["params"] == [param] and trainer.optimizers.parameters[name] == [
            param
        ]
        state = optimizer.state[param]
        assert state["exp_avg"].shape == param.shape
        assert int(state["step"]) == int(saved["optimizers"][name]["state"][0]["step"]) > 0
    before = model.gauss_params["means"].detach().clone()
    step = trainer._start_step
    for callback in trainer.callbacks:  # as Trainer.train does before each iteration (splatfacto's step_cb)
        callback.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    trainer.train_iteration(step)
    assert not torch.equal(model.gauss_params["means"].detach(), before), (
        "the resumed run did not move its Gaussians"
    )


def _bare_trainer(tmp_path: Path, **config) -> ChorusTrainer:
    """A ChorusTrainer without a pipeline: enough for its signal handling and checkpoint writing."""
    trainer = ChorusTrainer.__new__(ChorusTrainer)
    trainer.config = ChorusTrainerConfig(output_dir=tmp_path / "outputs", **config)
    trainer.checkpoint_dir = tmp_path / "run" / "nerfstudio_models"
    trainer.base_dir = tmp_path / "run"
    trainer._stop_signal, trainer._last_save, trainer._start_step = None, time.monotonic(), 0
    trainer.training_state, trainer.step, trainer.local_rank, trainer.world_size = "training", 0, 0, 1
    trainer.pipeline = torch.nn.Module()
    trainer.pipeline.model = torch.nn.Linear(2, 2)
    adam = torch.optim.Adam(trainer.pipeline.parameters())
    trainer.optimizers = SimpleNamespace(optimizers={"m": adam}, schedulers={})
    trainer.grad_scaler = torch.amp.GradScaler("cpu", enabled=False)
    return trainer


def test_sigterm_stops_after_the_step_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's time limit, ``kill``) during a step: the step finishes, a checkpoint of it is written
    and the process exits with 128 + 15."""
    trainer = _bare_trainer(tmp_path, max_num_iterations=1000)
    steps = []

    def loop(self) -> None:  # nerfstudio's loop, reduced to what matters: a step, then the callbacks
        for step in range(1000):
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 3
            steps.append(step)
            self._after_iteration(step)

    monkeypatch.setattr("nerfstudio.engine.trainer.Trainer.train", loop)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        trainer.train()
    assert stop.value.code == 128 + signal.SIGTERM
    assert steps == [0, 1, 2, 3]
    assert [p.name for p in trainer.checkpoint_dir.iterdir()] == ["step-000000003.ckpt"]
    assert "Training stopped by SIGTERM after step 3" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is before, "the handler is not restored"


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """A save that fails half-way (disk full, a kill) leaves the previous checkpoint in place and no partial file
    where ``--load-dir`` would parse it."""
    trainer = _bare_trainer(tmp_path)
    trainer.save_checkpoint(10)
    good = trainer.checkpoint_dir / "step-000000010.ckpt"
    content = good.read_bytes()

    def broken_save(obj, stream, *args, **kwargs):
        stream.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        trainer.save_checkpoint(20)
    assert [p.name for p in trainer.checkpoint_dir.iterdir()] == [good.name]
    assert good.read_bytes() == content
    assert sorted(p.name for p in trainer.base_dir.iterdir()) == ["nerfstudio_models"]


def test_checkpoints_also_follow_the_clock(tmp_path, monkeypatch):
    """Between ``steps_per_save`` checkpoints, one is written whenever ``save_every_minutes`` have passed."""
    trainer = _bare_trainer(tmp_path, save_every_minutes=5.0)
    now = [1000.0]
    monkeypatch.setattr("splatsem_ns.engine.trainer.time.monotonic", lambda: now[0])
    trainer._last_save = now[0]
    trainer._after_iteration(1)
    assert not trainer.checkpoint_dir.exists()
    now[0] += 299.0
    trainer._after_iteration(2)
    assert not trainer.checkpoint_dir.exists()
    now[0] += 2.0
    trainer._after_iteration(3)
    assert [p.name for p in trainer.checkpoint_dir.iterdir()] == ["step-000000003.ckpt"]
    now[0] += 100.0
    trainer._after_iteration(4)  # the clock restarted at the last save
    assert [p.name for p in trainer.checkpoint_dir.iterdir()] == ["step-000000003.ckpt"]
    assert ChorusTrainerConfig().save_every_minutes > 0, "on by default"


def test_resume_command_repeats_the_run_with_load_dir():
    argv = [
        "/venv/bin/ns-train",
        "chorus-splat",
        "--data",
        "my scene",
        "--load-dir",
        "old",
        "--vis",
        "viewer",
    ]
    assert resume_command(Path("out/run/nerfstudio_models"), argv) == (
        "ns-train chorus-splat --data 'my scene' --vis viewer --load-dir out/run/nerfstudio_models"
    )
    # nerfstudio replaces the whole config, --load-dir included, with a --load-config file: say what to pass.
    generic = resume_command(Path("m"), ["ns-train", "chorus-splat", "--load-config", "c.yml"])
    assert "<same options>" in generic and generic.endswith("--load-dir m")


@pytest.mark.slow
def test_failed_setup_leaves_no_config_only_run_folder(tmp_path):
    out = tmp_path / "outputs"
    proc = subprocess.run(
        _ns_train(tmp_path / "missing-scene", out, tmp_path / "cache"),
        capture_output=True, text=True, env=offline_env(), timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "data path" in proc.stderr and "does not exist" in proc.stderr
    assert "which held only its config.yml" in proc.stdout
    assert not out.exists(), sorted(out.rglob("*"))


def test_unknown_teacher_fails_when_the_command_line_is_parsed():
    with pytest.raises(UnknownTeacherError, match="'siglip-b16'.*Available: .*siglip2-b16"):
        ChorusDataManagerConfig(teachers=("siglip-b16", "dinov2-s14"))


@pytest.mark.slow
def test_unknown_teacher_is_a_usage_error_of_ns_train(tmp_path):
    proc = subprocess.run(
        _ns_train(tmp_path / "missing-scene", tmp_path / "out", tmp_path / "cache")
        + ["--pipeline.datamanager.teachers", "labls"],
        capture_output=True, text=True, env=offline_env(), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]  # tyro's usage error, before the (missing) data is read
    assert "labls" in proc.stderr and "Available" in proc.stderr
    assert "does not exist" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()


def _agree(rank: int, world_size: int, result: str, global_rank: int) -> None:
    trainer = ChorusTrainer.__new__(ChorusTrainer)
    trainer.world_size, trainer.device = 2, "cpu"
    trainer._stop_signal = signal.SIGTERM if rank == 1 else None  # only rank 1 was signalled
    agreed = trainer._agreed_stop_signal()
    Path(result).with_suffix(f".{rank}").write_text(str(agreed))


def test_ranks_agree_on_a_stop_so_they_stop_after_the_same_step(tmp_path):
    """A signal that reaches one rank stops every rank after the same step; otherwise the others would wait forever
    in the next step's gradient all-reduce."""
    from splatsem_ns.engine.distributed import spawn_on_gloo

    spawn_on_gloo(_agree, 2, str(tmp_path / "agreed"))
    assert [(tmp_path / f"agreed.{r}").read_text() for r in (0, 1)] == [str(int(signal.SIGTERM))] * 2


def _abort_on_rank_one(rank: int, world_size: int, config: str, global_rank: int) -> None:
    if rank == 1:
        print(f"rank one about to abort ({config})", file=sys.stderr, flush=True)
        os.abort()  # what a C++ std::terminate does: no Python traceback, no error file


def test_a_rank_killed_by_a_signal_is_reported_with_its_stderr():
    """A rank that dies by a signal (a C++ abort in gloo, say) leaves torch's spawn no traceback: the error quotes
    the end of that rank's stderr, with faulthandler's Python stack of the aborting thread."""
    from splatsem_ns.engine.distributed import spawn_on_gloo

    with pytest.raises(RuntimeError, match="SIGABRT") as raised:
        spawn_on_gloo(_abort_on_rank_one, 2, "marker-8231")
    message = str(raised.value)
    assert "rank one about to abort (marker-8231)" in message
    assert "Fatal Python error: Aborted" in message and "_abort_on_rank_one" in message


def test_a_rank_waits_for_the_others_only_after_its_group_is_destroyed():
    """Rank 0 hosts the rendezvous store, so no rank may exit while another still tears its group down: each waits
    at the spawn barrier after ``destroy_process_group``. A rank whose body failed does not wait there."""
    import torch.distributed as dist

    from splatsem_ns.engine.distributed import gloo_process_group, local_init_url

    class Barrier:
        def __init__(self) -> None:
            self.group_alive_at_wait: list = []

        def wait(self) -> None:
            self.group_alive_at_wait.append(dist.is_initialized())

    threads = torch.get_num_threads()
    try:
        barrier = Barrier()
        with gloo_process_group(0, 1, local_init_url(), all_destroyed=barrier):
            assert dist.is_initialized()
        assert barrier.group_alive_at_wait == [False]
        failed = Barrier()
        with pytest.raises(ValueError):
            with gloo_process_group(0, 1, local_init_url(), all_destroyed=failed):
                raise ValueError("the body failed")
        assert failed.group_alive_at_wait == [] and not dist.is_initialized()
    finally:
        torch.set_num_threads(threads)


def test_event_writers_set_up_inside_own_event_writers_end_with_it(tmp_path, monkeypatch):
    """splatsem-fit-collection trains one scene after another in one process, each run in a temporary folder:
    nerfstudio's process-global event writers must not outlive a run, or the next run writes its scalars into the
    earlier run's event file, and fails once that folder is gone."""
    import shutil

    from nerfstudio.utils import writer

    from splatsem_ns.engine.one_scene import own_event_writers

    for name, empty in (("EVENT_WRITERS", []), ("EVENT_STORAGE", []), ("GLOBAL_BUFFER", {})):
        monkeypatch.setattr(writer, name, empty)  # nothing of other tests' runs
    with own_event_writers():
        writer.setup_event_writer(False, True, False, tmp_path / "run", "run")
        assert len(writer.EVENT_WRITERS) == 1
        writer.put_scalar("loss", 1.0, 0)
        writer.write_out_storage()
    assert writer.EVENT_WRITERS == [] and writer.EVENT_STORAGE == []
    shutil.rmtree(tmp_path / "run")  # as fit_collection's temporary folder, once the fit is over
    writer.setup_event_writer(False, True, False, tmp_path / "next", "next")
    writer.put_scalar("loss", 2.0, 1)
    writer.write_out_storage()  # the next run writes its own events only
    writer.EVENT_WRITERS[0].tb_writer.close()
    assert not (tmp_path / "run").exists() and any((tmp_path / "next").iterdir())
