"""The benchmark scripts' run specs: ``LABEL=METHOD:field=value`` overrides reach the right configs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import parse_method, trainer_config  # noqa: E402


def test_run_spec_overrides_reach_model_dataparser_and_pipeline(tmp_path: Path) -> None:
    label, method, overrides = parse_method(
        "aa=chorus-splat:depth_loss_weight=0.1,semantic_rasterize_mode=antialiased,"
        "dataparser.load_3D_points=false,pipeline.semantic_eval.render_scale=0.5,semantic_source.latent_dim=16"
    )
    assert (label, method) == ("aa", "chorus-splat")
    cfg = trainer_config(method, tmp_path, tmp_path / "out", 10, ["labels"], overrides=overrides)
    model = cfg.pipeline.model
    assert model.depth_loss_weight == 0.1 and model.semantic_rasterize_mode == "antialiased"
    assert model.semantic_source.latent_dim == 16
    assert cfg.pipeline.datamanager.dataparser.load_3D_points is False
    assert cfg.pipeline.semantic_eval.render_scale == 0.5
    assert cfg.pipeline.datamanager.teachers == ("labels",)
    assert parse_method("splatfacto") == ("splatfacto", "splatfacto", {})
    # Optional fields parse as their inner type, or None; Literal fields check their choices.
    cfg = trainer_config(method, tmp_path, tmp_path / "out", 10, overrides={"depth_loss_weight": "0.3"})
    assert cfg.pipeline.model.depth_loss_weight == 0.3
    cfg = trainer_config(method, tmp_path, tmp_path / "out", 10, overrides={"semantic_render_scale": "none"})
    assert cfg.pipeline.model.semantic_render_scale is None
    # Optional paths (None by default), e.g. the feed-forward seed of chorus-splat.
    cfg = trainer_config(
        method, tmp_path, tmp_path / "out", 10, overrides={"pipeline.feedforward_init": "run/config.yml"}
    )
    assert cfg.pipeline.feedforward_init == Path("run/config.yml")
    with pytest.raises(ValueError, match="choose one of"):
        trainer_config(method, tmp_path, tmp_path / "out", 10, overrides={"distill_at": "pixels"})
    with pytest.raises(ValueError, match="true or false"):
        trainer_config(
            method, tmp_path, tmp_path / "out", 10, overrides={"dataparser.load_3D_points": "maybe"}
        )


def test_merge_drops_only_the_missing_baseline_note() -> None:
    from semantic_report import merge_reports

    settings = {
        "data": "d",
        "iterations": 1,
        "eval_mode": "interval",
        "teachers": [],
        "random_weights": False,
    }
    chorus = {**settings, "device": "g", "runs": [{"method": "chorus-splat"}]}
    chorus["notes"] = ["splatfacto baseline not run.", "splatfacto shared a GPU"]
    baseline = {**settings, "device": "g", "runs": [{"method": "splatfacto"}], "notes": []}
    merged = merge_reports([chorus, baseline], note="two calls")
    assert merged["notes"] == [
        "splatfacto shared a GPU",
        "runs trained in separate processes on the same device model; two calls",
    ]
    assert merge_reports([chorus])["notes"] == chorus["notes"]  # no splatfacto run: the note stays true


def test_the_context_baseline_trains_on_the_context_views_alone(tmp_path):
    """semantic-splat's per-scene baseline: a capture whose training split is the context views, whose held-out
    split is the target views, and which has no point cloud (its seeds come from the context views' depth)."""
    from context_baseline import context_capture

    from splatsem_ns.data.dataparser import SplatsemDataParserConfig
    from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene

    scene = generate_synthetic_scene(
        tmp_path / "room", SyntheticSceneConfig(num_views=8, width=64, height=48, num_seed_points=50)
    ).parent
    capture = context_capture(scene, [2, 5], [3, 4, 7], tmp_path / "capture")
    parser = SplatsemDataParserConfig(data=capture, seed_points="depth").setup()
    train = parser.get_dataparser_outputs("train")
    held_out = parser.get_dataparser_outputs("test")
    assert [p.name for p in train.image_filenames] == ["0002.png", "0005.png"]
    assert [p.name for p in held_out.image_filenames] == ["0003.png", "0004.png", "0007.png"]
    seeds = train.metadata["points3D_xyz"]
    assert len(seeds) > 0 and not (capture / "points3D.ply").exists()


@pytest.mark.parametrize("script", ["semantic_splat.py", "chorus_encoder.py"])
def test_the_feed_forward_benchmarks_run_end_to_end(script: str, tmp_path: Path) -> None:
    """Each feed-forward benchmark trains, scores the held-out scene and keeps a checkpoint that can be restored
    from the run's own config.yml (what feed-forward init and ns-eval need), on a tiny collection."""
    import json
    import subprocess

    from support import offline_env, tiny_collection

    from splatsem_ns.models.semantic_splat import restore_network_model

    collection = tiny_collection(tmp_path / "scenes", rooms=3, test_room=2, seed_points=100)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / script),
         "--collection", str(collection), "--out", str(out), "--steps", "2", "--minutes", "5", "--tiny",
         "--size", "48", "64", "--batch-size", "1", "--loader-workers", "0", "--save-checkpoint",
         *(["--forward-repeats", "1", "--decay-steps", "2"] if script == "semantic_splat.py"
           else ["--probe-max-points", "200"])],
        capture_output=True, text=True, env=offline_env(), timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / script.replace(".py", ".json")).read_text())
    assert report["training"]["steps"] == 2
    # Two steps inside the 500-step warm-up are flagged; fitted to the run by --decay-steps they are not.
    warm_up = [
        "all 2 steps were inside the 500-step learning-rate warm-up" in note for note in report["notes"]
    ]
    assert warm_up == ([] if script == "semantic_splat.py" else [True]), report["notes"]
    assert report["evaluation"]["procedural (never seen)"]["num_scenes"] == 1
    model = restore_network_model(Path(report["run_config"]), script, "cpu")
    assert len(model.projector_heads) == 2
    if script == "chorus_encoder.py":
        assert set(report["probe"]["results"]) == {"encoder", "raw"}
        held_out = report["evaluation"]["procedural (never seen)"]
        assert "semantic_3d" in held_out and "semantic_3d_tokens_512" in held_out  # the compact tokens' score
        assert "semantic_3d_teacher_backprojected" in held_out and "semantic_3d_in_views" in held_out
        assert "through tokens" in (out / "chorus_encoder.md").read_text()


def test_semantic_report_scores_along_training(tmp_path: Path) -> None:
    """``--eval-at``: segmentation scored before the given steps of a chorus-splat run, times exclusive of it."""
    import json
    import subprocess

    from support import offline_env

    from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene

    generate_synthetic_scene(
        tmp_path / "room", SyntheticSceneConfig(seed=0, num_views=12, width=64, height=48)
    )
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "semantic_report.py"),
         "--data", str(tmp_path / "room"), "--out", str(tmp_path / "out"), "--iterations", "20",
         "--eval-at", "0", "10", "--runs", "chorus-splat"],
        capture_output=True, text=True, env=offline_env(), timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((tmp_path / "out" / "semantic_report.json").read_text())["runs"][0]
    curve = run["curve"]
    assert [p["step"] for p in curve] == [0, 10] and not any("error" in p for p in curve)
    assert all(0.0 <= p["semantic_2d_miou"] <= 1.0 for p in curve)
    assert (
        0.0
        < run["setup_wall_s"]
        <= curve[0]["train_wall_s"]
        <= curve[1]["train_wall_s"]
        <= run["train_wall_s"]
    )
    report = (tmp_path / "out" / "semantic_report.md").read_text()
    assert "## Along training" in report and "of which set-up (s)" in report


def test_the_scaling_benchmark_times_each_gpu_count_it_can_run(tmp_path: Path) -> None:
    """ddp_scaling.py: a row for one process and one for two (here gloo processes on the CPU, so the script's
    multi-process path runs before any multi-GPU machine does), each with rank 0's step profiled, and a note for a
    count it cannot run."""
    import json
    import subprocess

    from support import offline_env, tiny_collection

    collection = tiny_collection(tmp_path / "scenes", rooms=3, test_room=2, seed_points=100)
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "ddp_scaling.py"),
         "--collection", str(collection), "--out", str(tmp_path / "out"), "--gpus", "1", "2", "3", "--global-batch", "2",
         "--steps", "9", "--warmup", "0", "--tiny", "--size", "48", "64", "--loader-workers", "0", "--device", "cpu",
         "--seed-noise-runs", "1", "--profile-at", "2", "--profile-steps", "1"],
        capture_output=True, text=True, env=offline_env(), timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "ddp_scaling.json").read_text())
    assert report["benchmark"] == "ddp_scaling" and [r["gpus"] for r in report["rows"]] == [1, 2], report[
        "notes"
    ]
    one, two = report["rows"]
    assert one["steps"] == 9 and one["scenes_per_s"] > 0 and one["speedup"] == 1.0 and one["loss_curve"]
    assert two["steps"] == 9 and two["per_gpu_batch"] == 1 and two["speedup"] > 0 and two["loss_curve"]
    # Rank 0's step profiled in each count. (Which operators its tables list first is arbitrary on the CPU, which
    # has no GPU times to sort by, so the all-reduce is not looked for here.)
    profile = (tmp_path / "out" / "gpus2" / "profile_semantic_splat_2gpus.txt").read_text()
    assert (
        profile.startswith("# semantic-splat_2gpus: 1 profiled steps after 2") and "| backward |" in profile
    )
    assert (tmp_path / "out" / "gpus1" / "profile_semantic_splat_1gpus.txt").is_file()
    assert len(two["peak_gpu_memory_gib_per_rank"]) == 2  # both ranks wrote their log
    # Each rank times its own loader: the share of its steps spent waiting for a batch.
    assert len(two["data_wait_share_per_rank"]) == 2
    assert all(0.0 <= w < 1.0 for w in one["data_wait_share_per_rank"] + two["data_wait_share_per_rank"])
    assert "waiting for data" in (tmp_path / "out" / "ddp_scaling.md").read_text()
    # A 1-GPU run with other seeds gives the seed noise that the 2-process curve is held to.
    (noise,) = report["seed_noise_runs"]
    assert noise["gpus"] == 1 and noise["seed"] == one["seed"] + 1 and noise["loss_curve"]
    assert report["seed_noise_gap"] is not None and report["seed_noise_gap"] >= 0.0
    assert one["loss_gap_to_1gpu"] is None and isinstance(two["loss_gap_to_1gpu"], float)
    assert two["loss_within_seed_noise"] == (two["loss_gap_to_1gpu"] <= report["seed_noise_gap"])
    # Three: more processes than this machine has CPUs, or not a divisor of the global batch; either way a note.
    assert (
        len(report["notes"]) == 1
        and report["notes"][0].startswith("3 GPUs")
        and "not run" in report["notes"][0]
    )


def test_loss_curves_are_compared_over_the_steps_both_logged() -> None:
    from ddp_scaling import curve_gap, global_batch_curve

    # The ranks' curves averaged where every rank logged: the global batch's loss.
    ranks = [[{"step": 0, "loss": 2.0}, {"step": 50, "loss": 1.0}], [{"step": 0, "loss": 3.0}]]
    assert global_batch_curve(ranks) == [{"step": 0, "loss": 2.5}]

    reference = [{"step": 0, "loss": 2.0}, {"step": 50, "loss": 1.0}, {"step": 100, "loss": 1.0}]
    curve = [{"step": 0, "loss": 2.5}, {"step": 50, "loss": 0.5}, {"step": 150, "loss": 9.0}]
    # |0.5| and |0.5| over steps 0 and 50, relative to the reference's mean loss there (1.5).
    assert curve_gap(curve, reference) == round(0.5 / 1.5, 4)
    assert curve_gap(reference, reference) == 0.0
    assert curve_gap([{"step": 7, "loss": 1.0}], reference) is None


def test_the_training_budget_starts_after_the_first_step(monkeypatch) -> None:
    """``--minutes`` counts from the first step's end: a slow first step (a CUDA compilation) does not use it up,
    and training stops at the first step that ends past the budget."""
    import types

    import feedforward_training

    now = [0.0]
    monkeypatch.setattr(feedforward_training.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(feedforward_training, "sync", lambda: None)

    def next_train(step: int):
        now[0] += waits[step]  # the loader's batch is not ready yet
        return {}, {}

    waits = [3.0, 1.0, 0.0, 0.5]
    datamanager = types.SimpleNamespace(next_train=next_train)
    trainer = types.SimpleNamespace(
        train_iteration=lambda step: (0.0, {}, {}),
        callbacks=[],
        stop_training=False,
        pipeline=types.SimpleNamespace(datamanager=datamanager),
    )
    clock = feedforward_training.StepClock(trainer, budget_s=10.0)
    record = trainer.callbacks[-1].func
    ends = [100.0, 104.0, 109.0, 111.0]  # the first step took 100 s
    for step, end in enumerate(ends):
        datamanager.next_train(step)  # as the pipeline asks for each step's batch
        now[0] = end
        record(step=step)
        assert trainer.stop_training == (end > 110.0), (step, end)
    assert clock.step_seconds() == [4.0, 5.0, 2.0]
    # What each step waited for its batch: 1 + 0 + 0.5 s of the 11 s after the first step; 2.5 s past one more.
    assert clock.data_wait() == {"data_wait_ms_median": 500.0, "data_wait_share": round(1.5 / 11.0, 4)}
    assert clock.data_wait(1) == {"data_wait_ms_median": 250.0, "data_wait_share": round(0.5 / 7.0, 4)}


@pytest.mark.parametrize("method", ["chorus-pretrain", "semantic-splat"])
def test_a_short_decay_also_shortens_the_warm_up(method: str, tmp_path: Path) -> None:
    """``--decay-steps N`` fits the whole schedule into N steps: the method's 500-step warm-up would otherwise
    take all of a run of a few hundred steps."""
    import feedforward_training

    parser = feedforward_training.training_parser("test")
    args = parser.parse_args(["--collection", "c.json", "--out", str(tmp_path), "--decay-steps", "300"])
    for group in feedforward_training.train_config(args, tmp_path, method).optimizers.values():
        assert (group["scheduler"].max_steps, group["scheduler"].warm_up_end) == (300, 30)
    args = parser.parse_args(["--collection", "c.json", "--out", str(tmp_path)])
    for group in feedforward_training.train_config(args, tmp_path, method).optimizers.values():
        assert group["scheduler"].warm_up_end == 500  # the method's own schedule


def test_the_real_share_and_a_shared_feature_cache_reach_the_datamanager(tmp_path: Path) -> None:
    import feedforward_training

    parser = feedforward_training.training_parser("test")
    plain = parser.parse_args(["--collection", "c.json", "--out", str(tmp_path)])
    dm = feedforward_training.train_config(plain, tmp_path, "semantic-splat").pipeline.datamanager
    assert dm.real_share is None and dm.feature_cache_dir == tmp_path / "feature_cache"
    given = ["--real-share", "0.2", "--feature-cache", str(tmp_path / "shared")]
    args = parser.parse_args(["--collection", "c.json", "--out", str(tmp_path), *given])
    dm = feedforward_training.train_config(args, tmp_path, "semantic-splat").pipeline.datamanager
    assert dm.real_share == 0.2 and dm.feature_cache_dir == tmp_path / "shared"


def test_model_settings_reach_nested_configs_and_the_tiny_encoder_keeps_them(tmp_path: Path) -> None:
    """``--model-set encoder.input_variant=point`` sets the encoder's own config, and ``--tiny`` shrinks the
    encoder's sizes without undoing its inputs."""
    import feedforward_training

    from splatsem_ns.models.chorus_pretrain import ChorusPretrainModel

    parser = feedforward_training.training_parser("test")
    args = parser.parse_args(
        ["--collection", "c.json", "--out", str(tmp_path), "--tiny"]
        + ["--model-set", "encoder.input_variant=point", "--model-set", "encoder.position_reference=scene"]
    )
    model_config = feedforward_training.train_config(args, tmp_path, "chorus-pretrain").pipeline.model
    assert (model_config.encoder.input_variant, model_config.encoder.position_reference) == ("point", "scene")
    model = ChorusPretrainModel(model_config, scene_box=None, num_train_data=1, metadata={})
    encoder = model.encoder.config
    assert (encoder.input_variant, encoder.position_reference, encoder.backbone_preset) == (
        "point",
        "scene",
        "tiny",
    )
    assert model.encoder.in_channels == 9
    with pytest.raises(ValueError, match="choose one of"):
        feedforward_training.train_config(
            parser.parse_args(
                [
                    "--collection",
                    "c.json",
                    "--out",
                    str(tmp_path),
                    "--model-set",
                    "encoder.input_variant=mesh",
                ]
            ),
            tmp_path,
            "chorus-pretrain",
        )


def _speed_row(method: str, ms: float, gib: float, round_index=None) -> dict:
    row = {
        "method": method,
        "model_overrides": {},
        "ms_per_iter_median": ms,
        "ms_per_iter_mean": ms,
        "ms_per_iter_p90": ms,
        "peak_gpu_mem_gib_train": gib,
        "num_gaussians_final": 1000,
        "setup_s": 1.0,
    }
    return row if round_index is None else {**row, "round": round_index}


def test_repeated_speed_rounds_pair_each_run_with_its_own_rounds_baseline(tmp_path: Path) -> None:
    """``train_speed.py --repeats``: every ratio divides by the splatfacto run of the same round (the machine drifted
    between rounds here: both methods are 20% slower in round 1), and the report gives the median and range."""
    import train_speed

    results = [
        _speed_row("splatfacto", 10.0, 2.0, 0),
        _speed_row("chorus-splat", 15.0, 3.0, 0),
        _speed_row("splatfacto", 12.0, 2.0, 1),
        _speed_row("chorus-splat", 18.0, 3.0, 1),
        _speed_row("splatfacto", 11.0, 2.0, 2),
        _speed_row("chorus-splat", 15.4, 3.2, 2),
    ]
    ratios = train_speed.ratios_over_baseline(results)["chorus-splat"]
    assert ratios["rounds"]["time_per_iter"] == [1.5, 1.5, 1.4]
    assert ratios["time_per_iter"] == 1.5  # pooling the runs' medians instead would give 15.4 / 11 = 1.4
    assert ratios["peak_gpu_memory"] == 1.5 and ratios["rounds"]["peak_gpu_memory"] == [1.5, 1.5, 1.6]
    report = {
        "data": "scene",
        "device": "cpu",
        "torch": "x",
        "iterations": 10,
        "warmup_excluded": 2,
        "settings": "s",
        "teachers": ["labels"],
        "random_teacher_weights": True,
        "results": results,
    }
    train_speed.write_report(report, tmp_path)
    text = (tmp_path / "train_speed.md").read_text()
    assert "Over 3 interleaved rounds" in text and "| chorus-splat | 1.5 (1.4-1.5) |" in text
    assert (
        "| chorus-splat (round 0) |" in text and "| 1.5 | 1.5 | 1.5 |" in text
    )  # a row shows its round's ratio
    # Reports saved before the counts existed, and runs that compiled nothing, have no compile table.
    assert "torch.compile in each run" not in text
    counts = {
        "frames_compiled": 2,
        "frames_failed": 0,
        "graph_breaks": 0,
        "unique_graphs": 4,
        "cudagraph_skips": 1,
    }
    results[1]["compile"] = counts
    train_speed.write_report(report, tmp_path)
    assert "| chorus-splat (round 0) | 2 | 0 | 4 | 1 |" in (tmp_path / "train_speed.md").read_text()
    # A single-round report (and one saved before rounds existed) reads as before: no round in the names.
    single = {
        **report,
        "results": [_speed_row("splatfacto", 10.0, 2.0), _speed_row("chorus-splat", 13.0, 3.0)],
    }
    train_speed.write_report(single, tmp_path, stem="single")
    assert train_speed.ratios_over_baseline(single["results"]) == {
        "chorus-splat": {"time_per_iter": 1.3, "mean_time_per_iter": 1.3, "peak_gpu_memory": 1.5}
    }
    assert "round" not in (tmp_path / "single.md").read_text()


def test_the_speed_report_shows_what_compiles_added_to_a_run(tmp_path: Path) -> None:
    """The steady statistics leave the compiles out; the report also gives the first step's seconds and the loop's
    seconds beyond its steps at the steady mean, the latter also for reports saved before the first was kept."""
    import train_speed

    compiled = {
        **_speed_row("chorus-splat", 10.0, 3.0),
        "iterations": 1000,
        "train_s": 62.0,
        "first_step_s": 48.5,
    }
    older = {**_speed_row("splatfacto", 8.0, 2.0), "iterations": 1000, "train_s": 8.5}
    assert train_speed.beyond_steady_s(compiled) == 52.0  # 62 s less 1000 steps of 10 ms
    assert train_speed.beyond_steady_s(older) == 0.5
    report = {
        "data": "scene",
        "device": "cpu",
        "torch": "x",
        "iterations": 1000,
        "warmup_excluded": 2,
        "settings": "s",
        "teachers": ["labels"],
        "random_teacher_weights": True,
        "results": [older, compiled],
    }
    train_speed.write_report(report, tmp_path)
    text = (tmp_path / "train_speed.md").read_text()
    assert "| first step (s) | beyond steady steps (s) |" in text
    assert "| 1.0 | 48.5 | 52.0 |" in text and "| 1.0 | - | 0.5 |" in text


def test_the_baton_lets_one_thread_run_at_a_time_in_turns() -> None:
    """``train_speed.Baton``: three threads doing blocks of work take strict turns, and one that finishes early
    leaves the turns to the others."""
    import threading

    import train_speed

    baton = train_speed.Baton(3)
    order: list = []
    blocks = {0: 3, 1: 1, 2: 2}

    def work(index: int) -> None:
        baton.wait_turn(index)
        for b in range(blocks[index]):
            order.append((index, b))
            if b + 1 < blocks[index]:
                baton.pass_on(index)
        baton.finish(index)

    threads = [threading.Thread(target=work, args=(i,)) for i in (2, 0, 1)]  # started out of order
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert order == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2)]


def test_interleaved_ratios_pair_each_block_with_its_neighbour() -> None:
    import train_speed

    interleaved = {
        "block": 10,
        "warmup_excluded": 10,
        "block_ms": {
            "splatfacto": [None, 10.0, 20.0, 10.0, None],
            "chorus-splat": [None, 12.0, 24.0, 13.0, None],
        },
    }
    ratios = train_speed.interleaved_ratios(interleaved)
    # The machine halved its speed in block 2: both slowed, the pair's ratio did not.
    assert ratios["chorus-splat"]["time_per_iter"] == 1.2 and ratios["chorus-splat"]["blocks"] == 3
    assert ratios["chorus-splat"]["ms_per_iter_median_of_blocks"] == 13.0
    assert ratios["splatfacto"] == {"ms_per_iter_median_of_blocks": 10.0}


def test_train_speed_interleaves_the_methods_trainers_on_the_cpu(tmp_path: Path) -> None:
    """``train_speed.py --repeats 0 --interleave 4``: two chorus-splat variants built at once train in turns of 4
    steps; each gets a mean per block past the warm-up, and the report has the interleaved table."""
    import json
    import subprocess

    from support import offline_env

    from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene

    scene = generate_synthetic_scene(
        tmp_path / "scene", SyntheticSceneConfig(num_views=6, width=40, height=30)
    )
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "train_speed.py"),
         "--data", str(scene.parent), "--out", str(tmp_path / "out"), "--teachers", "labels",
         "--iterations", "12", "--warmup", "4", "--repeats", "0", "--interleave", "4",
         "--methods", "a=chorus-splat", "b=chorus-splat:semantic_every=2"],
        capture_output=True, text=True, env=offline_env(), timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "train_speed.json").read_text())
    interleaved = report["interleaved"]
    assert interleaved["failed"] == {}
    for label in ("a", "b"):
        means = interleaved["block_ms"][label]
        assert means[0] is None and all(m is not None and m > 0 for m in means[1:3]), means
    # The turns: each block of a's ends before b's block of the same index begins, which ends before a's next.
    a, b = (interleaved["block_bounds_s"][label] for label in ("a", "b"))
    for index in range(3):
        assert a[index][1] <= b[index][0] <= b[index][1] <= a[index + 1][0], (index, a, b)
    assert "Interleaved: every trainer built at once" in (tmp_path / "out" / "train_speed.md").read_text()


def test_an_earlier_runs_cyclic_garbage_is_freed_before_the_next_run_is_measured() -> None:
    """A trainer holds reference cycles, so ``del`` alone leaves its tensors allocated until the cyclic collector
    runs; a run measured after it would count them as its own peak. ``release_earlier_runs`` frees them first."""
    import gc
    import weakref

    import torch
    from common import release_earlier_runs

    class Run:
        pass

    gc.disable()  # as when the collector has not happened to run between two runs
    try:
        run = Run()
        run.self_reference = run  # a cycle, as a trainer's callbacks bound to its pipeline make
        run.weights = torch.zeros(1000)
        weights = weakref.ref(run.weights)
        del run
        assert weights() is not None  # not freed by del
        assert release_earlier_runs() == (torch.cuda.memory_allocated() if torch.cuda.is_available() else 0)
        assert weights() is None
    finally:
        gc.enable()


def test_the_adaptation_modes_report_reads_each_runs_ns_eval(tmp_path: Path) -> None:
    """``adapt_modes_cpu.py --from``: one row per run whose ns-eval JSON is there, in the script's order."""
    import json

    import adapt_modes_cpu

    def results(miou: float) -> dict:
        return {
            "results": {
                "semantic_2d": {"miou": miou},
                "semantic_3d": {"fg_miou": miou / 2},
                "semantic_2d_teacher_per_view": {"miou": 0.9},
                "psnr": 17.0,
            }
        }

    (tmp_path / "scratch.json").write_text(json.dumps(results(0.7)))
    (tmp_path / "head__lr_x10.json").write_text(json.dumps(results(0.2)))
    adapt_modes_cpu.report(tmp_path, tmp_path, 300, ["a note"])
    text = (tmp_path / "adapt_modes_cpu.md").read_text()
    assert "| scratch | 70.0 | 35.0 | 17.00 |" in text and "| head, lr x10 | 20.0 | 10.0 | 17.00 |" in text
    assert text.index("| scratch") < text.index("| head, lr x10") and "- note: a note" in text
    saved = json.loads((tmp_path / "adapt_modes_cpu.json").read_text())
    assert set(saved["runs"]) == {"scratch", "head, lr x10"}


def test_memory_peak_replays_the_allocator_trace_to_the_tensors_alive_at_the_peak() -> None:
    """memory_peak.py (GPU only) charges each block alive at the largest net growth to its first own-code frame."""
    from memory_peak import peak_breakdown

    def frames(*names: str):
        return [{"filename": f, "line": 7, "name": "fn"} for f in names]

    render = frames("/x/torch/nn/functional.py", "/venv/site-packages/gsplat/rendering.py")
    loss = frames("/work/splatsem_ns/models/chorus_splat.py")
    mib = 2**20
    events = [
        {"action": "alloc", "addr": 1, "size": 4 * mib, "frames": render},
        {"action": "alloc", "addr": 2, "size": 2 * mib, "frames": loss},
        {"action": "free_requested", "addr": 2, "size": 2 * mib},
        {"action": "free_completed", "addr": 2, "size": 2 * mib},  # before the peak: not charged
        {"action": "alloc", "addr": 3, "size": 1 * mib, "frames": loss},
        {"action": "alloc", "addr": 4, "size": 2 * mib, "frames": []},  # the peak: 7 MiB (6 MiB before)
        {"action": "free_completed", "addr": 1, "size": 4 * mib},
        {"action": "free_completed", "addr": 99, "size": 8 * mib},  # allocated before the recording: ignored
        {"action": "alloc", "addr": 5, "size": 3 * mib, "frames": loss},
    ]
    found = peak_breakdown(events)
    assert found["transient_peak_mib"] == 7.0
    assert dict(found["sites_mib"]) == {
        "gsplat/rendering.py:7 fn": 4.0, "splatsem_ns/models/chorus_splat.py:7 fn": 1.0, "(no stack)": 2.0,
    }  # fmt: skip


def test_memory_peak_counts_per_gaussian_state_by_kind_once_per_storage() -> None:
    from memory_peak import persistent_inventory

    model = torch.nn.Module()
    model.means = torch.nn.Parameter(torch.zeros(10, 3))
    model.latent = torch.nn.Parameter(torch.zeros(10, 8))
    model.head = torch.nn.Linear(8, 4)
    model.num_points = 10
    optimizer = torch.optim.Adam(model.parameters())
    (model.means.sum() + model.latent.sum() + model.head(model.latent).sum()).backward()
    optimizer.step()
    found = persistent_inventory(model, [optimizer], {"grad2d": torch.zeros(10), "alias": model.means.data})
    per = found["per_gaussian_bytes"]
    assert per == {
        "parameters": 44.0,
        "gradients": 44.0,
        "optimizer states": 88.0,
        "densification statistics": 4.0,
    }
    assert found["other_mib"]["parameters"] == round((8 * 4 + 4) * 4 / 2**20, 2)


def test_live_bytes_counts_each_storage_while_it_lives() -> None:
    from live_bytes import LiveBytes

    counter = LiveBytes()
    with counter:
        a = torch.ones(1000, 32)
        b = a * 2
        view = b[:10]  # a view: no new storage
        del b
        assert counter.live == 2 * 128_000  # b's storage lives on in its view
        del view, a
        assert counter.live == 0
    assert counter.peak == 2 * 128_000


def test_the_voxel_prior_holds_at_most_two_latent_sized_temporaries() -> None:
    """The prior runs over every Gaussian each semantic step: its forward may hold at most two [N, D] tensors at
    once besides small per-Gaussian vectors, and keeps one for backward (the first version peaked at 980 bytes per
    Gaussian for 32 channels: benchmarks/results/voxel_prior_memory_cpu.md)."""
    from live_bytes import load_loss, measure_voxel_prior

    dim = 32
    found = measure_voxel_prior(load_loss(None), 20_000, dim)
    latent_sized = 4 * dim  # bytes per Gaussian of one float32 [N, D] tensor
    assert found["forward_peak_bytes_per_gaussian"] <= 2 * latent_sized + 32, found
    assert found["held_for_backward_bytes_per_gaussian"] <= latent_sized + 32, found


@pytest.mark.slow
def test_memory_peak_runs_through_the_real_trainer_on_the_cpu(tmp_path: Path) -> None:
    """memory_peak.py's whole path (trainer, callbacks, inventory, replay, report), with the CPU recorder standing in
    for the CUDA allocator's history: chorus-splat holds 59 floats of splatfacto's parameters and its latent per
    Gaussian, as many in gradients and twice as many in Adam's moments."""
    import json
    import subprocess

    from support import offline_env

    from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene

    scene = generate_synthetic_scene(
        tmp_path / "scene", SyntheticSceneConfig(num_views=8, width=64, height=48)
    )
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "memory_peak.py"),
         "--data", str(scene.parent), "--out", str(tmp_path / "out"), "--method", "chorus-splat",
         "--teachers", "labels", "labels-instance", "--start", "6", "--steps", "2", "--device", "cpu"],
        capture_output=True, text=True, env=offline_env(), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (run,) = json.loads((tmp_path / "out" / "memory_peak.json").read_text())["runs"]
    latent = 32  # chorus-splat's default latent width
    per = run["persistent"]["per_gaussian_bytes"]
    assert per["parameters"] == per["gradients"] == 4 * (59 + latent), per
    assert per["optimizer states"] == 2 * per["parameters"], per
    sites = dict(run["transient"]["sites_mib"])
    assert run["transient"]["transient_peak_mib"] > 0 and any(s.startswith("splatsem_ns/") for s in sites), (
        sites
    )
    assert "## chorus-splat" in (tmp_path / "out" / "memory_peak.md").read_text()


def test_encoder_capacity_scores_and_fits_a_room(tmp_path: Path) -> None:
    """encoder_capacity.py's mIoU counts only the classes present, and its per-point fit of the tiny encoder on
    one room raises accuracy on that room's points well above where it starts (a report per scoring point)."""
    import json

    import encoder_capacity
    from support import tiny_collection

    from splatsem_ns.evaluation.metrics import ConfusionMatrix

    # class 1: IoU 3/4, class 2: 4/5; class 3 absent, and class 0 (unlabelled) not scored
    confusion = ConfusionMatrix(4, ignore_index=0).update(
        [1, 1, 1, 2, 2, 2, 2, 2, 3], [1, 1, 1, 1, 2, 2, 2, 2, 0]
    )
    assert encoder_capacity.scores(confusion) == {"miou": 77.5, "accuracy": 87.5, "classes": 2}

    collection = tiny_collection(tmp_path / "scenes", rooms=2, test_room=1, seed_points=100)
    out = tmp_path / "out"
    encoder_capacity.main(["--collection", str(collection), "--out", str(out), "--preset", "tiny", "--steps", "40",
                           "--score-every", "20", "--max-points", "3000", "--test-scenes", "1", "--lr", "3e-3",
                           "--device", "cpu"])  # fmt: skip
    report = json.loads((out / "encoder_capacity.json").read_text())
    curve = report["curve"]
    assert report["benchmark"] == "encoder_capacity" and [row["step"] for row in curve] == [0, 20, 40]
    assert curve[-1]["train"]["accuracy"] > curve[0]["train"]["accuracy"] + 20, curve
    assert "held_out" in curve[-1] and "| 40 |" in (out / "encoder_capacity.md").read_text()
    # The distillation's loss on clean per-point targets (decoded features against the labels proxy's class
    # embeddings) runs end to end too.
    encoder_capacity.main(["--collection", str(collection), "--out", str(out / "centred"), "--preset", "tiny",
                           "--steps", "2", "--score-every", "2", "--max-points", "500", "--test-scenes", "0",
                           "--loss", "centred", "--device", "cpu"])  # fmt: skip
    report = json.loads((out / "centred" / "encoder_capacity.json").read_text())
    assert report["settings"]["loss"] == "centred" and len(report["curve"]) == 2
    assert "held_out" not in report["curve"][0] and report["curve"][-1]["train"]["classes"] > 1
    # Rooms by split (room_1 is the test split's, though listed second), augmented training rooms, and a "real"
    # room scored on all its labelled points beside them.
    real = collection.parent / "room_0"
    encoder_capacity.main(["--collection", str(collection), "--out", str(out / "splits"), "--preset", "tiny",
                           "--steps", "2", "--score-every", "2", "--max-points", "500", "--test-scenes", "1",
                           "--use-splits", "--augment", "--real-scenes", str(real), "--crop", "200",
                           "--note", "a line", "--device", "cpu"])  # fmt: skip
    report = json.loads((out / "splits" / "encoder_capacity.json").read_text())
    assert report["train_scenes"] == ["room_0"] and report["test_scenes"] == ["room_1"]
    assert report["points_per_room"] == [500, 500] and report["points_per_real_room"][0] > 500
    assert all("real" in row and "held_out" in row for row in report["curve"])
    assert "real rooms mIoU / acc" in (out / "splits" / "encoder_capacity.md").read_text()
    per_class = report["latest_per_class"]["real"]
    assert set(per_class) >= {"miou", "fg_miou", "per_class"} and "wall" in per_class["per_class"]
    assert all(row["gt_count"] > 0 for row in per_class["per_class"].values())
    assert "## Per class at step 2: real rooms" in (out / "splits" / "encoder_capacity.md").read_text()
    assert (
        report["notes"] == ["a line"]
        and "- note: a line" in (out / "splits" / "encoder_capacity.md").read_text()
    )
    # One half of the real room trained on (alone: --train-scenes 0), the other scored.
    encoder_capacity.main(["--collection", str(collection), "--out", str(out / "halves"), "--preset", "tiny",
                           "--steps", "2", "--score-every", "2", "--train-scenes", "0", "--test-scenes", "0",
                           "--real-scenes", str(real), "--real-train-half", "--device", "cpu"])  # fmt: skip
    report = json.loads((out / "halves" / "encoder_capacity.json").read_text())
    whole = encoder_capacity.load_room(real, 10**9, np.random.default_rng(0), torch.device("cpu"))
    assert report["points_per_real_training_half"][0] + report["points_per_real_room"][0] == len(whole[1])
    assert min(report["points_per_real_training_half"][0], report["points_per_real_room"][0]) > 0.45 * len(
        whole[1]
    )
    assert report["curve"][0]["train"] is None and {"real", "real_train_half"} <= set(report["curve"][-1])
    assert "the other scored" in (out / "halves" / "encoder_capacity.md").read_text()
    lower, upper = encoder_capacity.split_room(whole)
    axis = int((whole[0]["means"].amax(0) - whole[0]["means"].amin(0))[:2].argmax())
    assert lower[0]["means"][:, axis].max() <= upper[0]["means"][:, axis].min()
    # A crop is the points nearest one of the room's (itself kept), untouched: for some kept point, every kept point
    # is nearer to it than every dropped one.
    means = torch.rand(500, 3)
    room = ({"means": means, "opacities": torch.rand(500, 1)}, torch.arange(500))
    gaussians, labels = encoder_capacity.sphere_crop(room, 50, torch.Generator().manual_seed(0))
    assert len(labels) == 50 and torch.equal(gaussians["means"], means[labels])
    kept = torch.zeros(500, dtype=torch.bool)
    kept[labels] = True
    distance = torch.cdist(means[kept], means)  # [kept, all]
    assert bool((distance[:, kept].amax(1) <= distance[:, ~kept].amin(1)).any())


def test_query_speed_profiles_the_rows_it_is_asked_for(tmp_path: Path) -> None:
    # query_speed.py --profile-rows: each row run again under torch.profiler, its tables written beside the report.
    import query_speed

    calls = []
    profiles = query_speed.profile_rows(
        [("matmul", lambda: calls.append(1) or torch.ones(64, 64) @ torch.ones(64, 64))], tmp_path, frames=3
    )
    assert len(calls) == 4  # one warm-up, then the profiled frames
    assert profiles["matmul"]["file"] == "profile_0.txt" and profiles["matmul"]["host_ms_per_frame"] > 0
    text = (tmp_path / "profile_0.txt").read_text()
    assert text.startswith("# matmul: 3 frames") and "aten::mm" in text


def test_sync_traces_keep_only_the_syncs_and_time_them(tmp_path: Path, monkeypatch) -> None:
    # step_regions.watched_syncs (behind step_speed's per-line counts and query_speed's sync traces): each warning of
    # torch.cuda.set_sync_debug_mode("warn") that reports a sync, not its other notices. The GPU is faked here: the
    # debug mode is set, and the warnings below stand in for the ones PyTorch raises at each sync.
    import warnings
    from collections import Counter

    import query_speed
    import step_regions

    modes = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: modes.append(mode))
    monkeypatch.setattr(query_speed, "sync", lambda: None)

    def frame() -> None:
        warnings.warn(
            "Synchronization debug mode is a prototype feature and does not yet detect all synchronizing",
            stacklevel=1,
        )
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)

    counts = Counter()
    with step_regions.sync_locations(counts):
        frame()
    assert sum(counts.values()) == 2 and modes == ["warn", 0]
    points = query_speed.sync_points(frame)
    assert len(points) == 3 and points[-1][1] == ["end (after the final synchronise)"]
    assert points[0][0] <= points[1][0] <= points[2][0]
    assert points[0][1][-1].startswith("benchmarks/query_speed.py")  # the innermost watched frame: the call
    traces = query_speed.trace_sync_rows([("frame", frame)], tmp_path)
    assert traces["frame"]["syncs"] == 2
    assert (tmp_path / "syncs_0.txt").read_text().count(" ms  ") == 3


def test_query_speed_reads_the_camera_as_before_only_inside_its_rows() -> None:
    # query_speed.py's "camera read as before" rows: inside them the model builds the intrinsics on the host and
    # copies the eval background from the host each frame, with the same render; afterwards the model is as it was.
    import query_speed
    from nerfstudio.cameras.cameras import Cameras
    from support import tiny_camera, tiny_chorus_model

    model = tiny_chorus_model()
    model.eval()
    camera = tiny_camera()
    with torch.no_grad():
        expected = model.get_outputs(camera)
    background, reads = model.background_color, model._eval_camera_reads
    built = []
    original = Cameras.get_intrinsics_matrices

    def counted(self):
        built.append(1)
        return original(self)

    Cameras.get_intrinsics_matrices = counted
    try:
        with query_speed.camera_read_as_before(model), torch.no_grad():
            before = model.get_outputs(camera)
        assert built and model.background_color is background and "_get_background_color" not in vars(model)
        assert model._eval_camera_reads is reads
        built.clear()
        with torch.no_grad():
            model.get_outputs(camera)
        assert not built
    finally:
        Cameras.get_intrinsics_matrices = original
    for key in ("rgb", "depth", "semantic_latent"):
        torch.testing.assert_close(before[key], expected[key], rtol=0, atol=0)


def test_each_run_compiles_afresh_and_counts_only_its_own_compiles() -> None:
    """``release_earlier_runs`` forgets earlier runs' compiled code, so a run compiles as in a process of its own
    (Dynamo keeps code per function: a later run reused it, and past 8 variants ran the function eagerly), and
    ``compile_counts`` counts that run's frames, graphs and graph breaks only."""
    import torch
    from common import compile_counts, release_earlier_runs

    built = []

    def backend(graph, example_inputs):
        built.append(graph)
        return graph.forward

    def loss(x):
        return (x * 2).sum()

    def broken(x):
        y = x * 2
        torch._dynamo.graph_break()
        return y.sum()

    release_earlier_runs()
    compiled = torch.compile(loss, backend=backend)
    compiled(torch.ones(3))
    compiled(torch.ones(3))
    assert compile_counts() == {
        "frames_compiled": 1,
        "frames_failed": 0,
        "graph_breaks": 0,
        "unique_graphs": 1,
        "cudagraph_skips": 0,
    }
    release_earlier_runs()
    assert compile_counts()["frames_compiled"] == 0
    torch.compile(loss, backend=backend)(torch.ones(3))
    assert len(built) == 2, "the second run was served the first run's compiled code"
    release_earlier_runs()
    torch.compile(broken, backend=backend)(torch.ones(3))
    counts = compile_counts()
    assert counts["graph_breaks"] >= 1 and counts["unique_graphs"] == 2


def test_startup_benchmark_reports_which_runs_loaded_a_teacher_network(tmp_path):
    """``benchmarks/startup.py``: the first set-up with an empty feature cache builds every teacher and runs the
    consistency check of each, the next one builds only the label proxy (it reads the scene) and reads the stored
    weights; both rows are in the report."""
    import json
    import subprocess

    from support import offline_env

    from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene

    scene = generate_synthetic_scene(
        tmp_path / "scene", SyntheticSceneConfig(num_views=6, width=40, height=30)
    )
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "startup.py"),
         "--data", str(scene.parent), "--out", str(tmp_path / "out"), "--runs", "2", "--cpu",
         "--teachers", "labels", "tiny-dinov2"],
        capture_output=True, text=True, env=offline_env(), timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "startup.json").read_text())
    assert report["benchmark"] == "startup"
    assert [sorted(r["teachers_built"]) for r in report["runs"]] == [["dinov2", "labels"], ["labels"]]
    assert [r["consistency_checks_run"] for r in report["runs"]] == [2, 0]
    assert "| 1 |" in (tmp_path / "out" / "startup.md").read_text()
