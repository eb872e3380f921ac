"""``td3drive bench learning``: aggregation, reporting and resume, without
training (the run trainer is replaced by one that writes a run directory by
hand); the tiny real end-to-end run is in tests/test_train.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from td3drive.app.cli import build_parser, main
from td3drive.bench import learning as lb
from td3drive.contracts.config import TD3DriveConfig, config_from_dict

ENV_STEPS, EVAL_EVERY, EPISODES = 300, 100, 2


def base_config() -> TD3DriveConfig:
    return config_from_dict(
        {
            "learner": {"device": "cpu", "batch_size": 16, "features_dim": 32},
            "replay": {"num_shards": 2, "min_size_to_sample": 64, "replay_ratio": 8.0},
            "rollout": {"num_workers": 2, "env_kwargs": {"max_steering_rad": 0.5}},
            "run": {"metrics_port": None},
        }
    )


def history(routes: list[float | None], step: int = EVAL_EVERY) -> list[dict[str, Any]]:
    """Evaluation lines as the driver writes them; wall_s = env_steps / 10."""
    return [
        {
            "env_steps": step * (i + 1),
            "policy_version": i,
            "wall_s": step * (i + 1) / 10,
            "return_mean": 10.0 * (i + 1) if route is not None else None,
            "success_rate": 1.0 if route is not None and route >= 1.0 else 0.0,
            "route_completion_mean": route,
            "mean_speed_kmh": 20.0,
            "collision_rate": 0.0,
            "episodes": EPISODES,
        }
        for i, route in enumerate(routes)
    ]


def route_plan(variant: str, seed: int) -> list[float | None]:
    """Route completion per evaluation: 'good' reaches 0.5 at 200 steps
    (seed 0) / 300 (seed 1) and never with seed 2; 'bad' never does."""
    if variant == "shared":
        return [[0.2, 0.6, 0.9], [0.1, 0.3, 0.55], [0.1, 0.2, 0.3]][seed]
    return [0.0, 0.1, 0.1]


def write_run(run_dir: Path, config: TD3DriveConfig, routes: list[float | None]) -> None:
    """A completed run directory: config.yaml, eval.jsonl, summary.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    lines = history(routes)
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    final = {k: v for k, v in lines[-1].items() if k not in ("env_steps", "policy_version")}
    summary = {
        "status": "completed",
        "env_steps": ENV_STEPS,
        "learner_updates": 50,
        "wall_s": lines[-1]["wall_s"] + 1.0,
        "env_steps_per_s": 10.0,
        "updates_per_s": 2.0,
        "encoder_weight_delta": {"actor": 0.1, "critic": 0.2},
        "actor_saturation": 0.05,
        "eval": final,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))


class FakeTrainer:
    """Stands in for :func:`learning_bench.train_run`: records its calls and
    writes a completed run directory."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, config: TD3DriveConfig, run_dir: Path) -> None:
        variant, seed = run_dir.name.rsplit("-seed", 1)
        assert not run_dir.exists(), "a run must start from a fresh directory"
        self.calls.append((variant, int(seed)))
        write_run(run_dir, config, route_plan(variant, int(seed)))


@pytest.fixture
def trainer(monkeypatch: pytest.MonkeyPatch) -> FakeTrainer:
    fake = FakeTrainer()
    monkeypatch.setattr(lb, "train_run", fake)
    return fake


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip learning.png (half a second per write) where a test does not look at it."""
    monkeypatch.setattr(lb, "plot_curves", lambda _report, path: path)


def bench(out: Path, **kwargs: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "env_steps": ENV_STEPS,
        "seeds": 3,
        "eval_every": EVAL_EVERY,
        "variants": ("frozen", "shared"),
        "progress": lambda _line: None,
        "eval_episodes": EPISODES,
        "config_path": "deploy/example.yaml",
    }
    options.update(kwargs)
    return lb.run_learning_benchmark(base_config(), out, **options)


# ------------------------------------------------------------ aggregation
def test_spread_is_the_median_iqr_and_range_ignoring_missing_values() -> None:
    stats = lb.spread([4.0, None, 1.0, 3.0, 2.0, 5.0])
    assert stats == {"n": 5, "median": 3.0, "q25": 2.0, "q75": 4.0, "min": 1.0, "max": 5.0}
    three = lb.spread([0.0, 1.0, 10.0])  # numpy's linear interpolation
    assert (three["median"], three["q25"], three["q75"]) == (1.0, 0.5, 5.5)
    assert lb.spread([None])["median"] is None and lb.spread([])["n"] == 0


def test_aggregate_aligns_runs_by_evaluation_index() -> None:
    runs = [history([0.1, 0.5, 0.9]), history([0.3, 0.7]), history([0.2, 0.6, 1.0])]
    runs[1][0]["env_steps"] = 120  # evaluation points differ by a chunk or so
    curve = lb.aggregate(runs)
    assert len(curve) == 2  # cut to the shortest history
    assert curve[0]["env_steps"] == 100.0 and curve[0]["n"] == 3
    route = curve[1]["route_completion_mean"]
    assert route["median"] == pytest.approx(0.6)
    assert (route["min"], route["max"]) == (pytest.approx(0.5), pytest.approx(0.7))


def test_time_to_threshold_is_the_first_evaluation_reaching_it() -> None:
    lines = history([0.2, None, 0.55, 0.4, 0.85])
    assert lb.time_to_threshold(lines, 0.5) == {"env_steps": 300, "wall_s": 30.0}
    assert lb.time_to_threshold(lines, 0.8) == {"env_steps": 500, "wall_s": 50.0}
    assert lb.time_to_threshold(lines, 0.95) == {"env_steps": None, "wall_s": None}
    assert lb.time_to_threshold([], 0.5)["env_steps"] is None


def fake_records(config: TD3DriveConfig, tmp_path: Path, variant: str) -> list[dict[str, Any]]:
    records = []
    for seed in range(3):
        run_dir = tmp_path / f"{variant}-seed{seed}"
        write_run(run_dir, config, route_plan(variant, seed))
        records.append(lb.read_run(run_dir, seed))
    return records


def test_summary_counts_the_seeds_that_reached_each_threshold(tmp_path: Path) -> None:
    records = fake_records(base_config(), tmp_path, "shared")
    summary = lb.summarize_variant(records)
    half, most = summary["time_to_threshold"]["0.5"], summary["time_to_threshold"]["0.8"]
    assert (half["reached"], half["seeds"]) == (2, 3)
    assert half["env_steps"]["median"] == 250.0  # 200 and 300, over the seeds that got there
    assert half["wall_s"]["median"] == 25.0
    assert (most["reached"], most["env_steps"]["median"]) == (1, 300.0)
    final_route = summary["final"]["route_completion_mean"]
    assert (final_route["median"], final_route["min"], final_route["max"]) == (0.55, 0.3, 0.9)
    # each run's mean return over its last three evaluations: 20 for all three
    assert summary["return_last3"]["median"] == pytest.approx(20.0)
    episodes = base_config().run.eval_episodes  # rollout.seed 0: seeds from 10_000_000
    assert records[0]["eval_seeds"] == list(range(10_000_000, 10_000_000 + episodes))


def test_markdown_names_commit_config_machine_and_threshold_counts(tmp_path: Path) -> None:
    base = base_config()
    records = {"shared": dict(enumerate(fake_records(base, tmp_path, "shared")))}
    provenance = {
        "git": {"commit": "abc123def", "dirty": True, "changed_paths": 2, "error": None},
        "machine": {
            "platform": "Linux-test",
            "processor": "x86_64",
            "cpu_count": 2,
            "cpus_usable": 2,
            "torch": "2.9.9",
            "torch_threads": 2,
            "hostname": "box",
        },
        "config_path": "deploy/example.yaml",
    }
    settings = lb.fingerprint(base, ENV_STEPS, EVAL_EVERY, EPISODES, "cpu")
    report = lb.build_report(base, records, settings, 3, ["shared"], provenance)
    table = lb.markdown_table(report)
    assert "- commit: abc123def (dirty: 2 uncommitted or untracked path(s))" in table
    assert "deploy/example.yaml" in table and lb.config_sha256(base)[:16] in table
    assert "Linux-test" in table and "torch 2.9.9 with 2 thread(s)" in table
    assert "250 steps, 25 s (2/3 reached)" in table and "300 steps, 30 s (1/3 reached)" in table
    route = report["variants"]["shared"]["final"]["route_completion_mean"]
    cell = f"55 [{route['q25'] * 100:.0f}, {route['q75'] * 100:.0f}] (30–90)"
    assert cell in table  # route completion %: median [q25, q75] (min–max)
    assert "BELOW THE STANDARD" in table and "2 episode(s) per evaluation (< 10)" in table
    assert report["complete"] is True and report["evidence"]["meets_standard"] is False
    # no provenance for these hand-made runs: the table says the commit is unknown for them
    assert "WARNING: runs trained at other or several commits" in table

    unknown = lb.build_report(base, records, {**settings, "eval_episodes": 10}, 4, ["shared"], {})
    text = lb.markdown_table(unknown)
    assert "- commit: unknown (not recorded)" in text and "meets the standard" in text
    assert unknown["complete"] is False and "INCOMPLETE: 3 of 4 runs" in text


def test_git_state_outside_a_checkout_is_unknown_not_an_error(tmp_path: Path) -> None:
    state = lb.git_state(tmp_path)
    assert state["commit"] is None and state["dirty"] is None and state["error"]
    here = lb.git_state()
    assert here["commit"] is None or len(here["commit"]) == 40


# ---------------------------------------------------------------- variants
def test_variants_override_any_section_and_keep_the_run_seed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = base_config()
    default = lb.variant_config(base, "default", 2, 500, 100, "cpu", 10)
    raw, expected = default.model_dump(mode="json"), base.model_dump(mode="json")
    expected["learner"]["seed"] = expected["rollout"]["seed"] = 2
    expected["run"].update(total_env_steps=500, eval_every_env_steps=100, eval_episodes=10)
    assert raw == expected  # default: the base config with only the bench's settings

    frozen = lb.variant_config(base, "frozen", 1, 500, 100, "cpu")
    assert (frozen.learner.encoder, frozen.learner.encoder_lr) == ("frozen", None)
    assert frozen.run.eval_episodes == base.run.eval_episodes  # None: keep the base's

    monkeypatch.setitem(
        lb.VARIANTS,
        "short-route",
        {"task": {"route_length_m": 100.0}, "rollout": {"env_kwargs": {"extra": 1}}},
    )
    other = lb.variant_config(base, "short-route", 3, 500, 100, "cpu")
    assert other.task.route_length_m == 100.0
    assert other.rollout.env_kwargs == {"max_steering_rad": 0.5, "extra": 1}  # merged
    assert (other.learner.seed, other.rollout.seed) == (3, 3)

    monkeypatch.setitem(lb.VARIANTS, "typo", {"lerner": {"tau": 0.1}})
    with pytest.raises(ValueError, match="unknown config sections"):
        lb.variant_config(base, "typo", 0, 500, 100, "cpu")
    with pytest.raises(ValueError, match="unknown variant"):
        lb.variant_config(base, "nope", 0, 500, 100, "cpu")


# ------------------------------------------------------------------ resume
def test_a_comparison_writes_partial_results_then_the_complete_report(
    tmp_path: Path, trainer: FakeTrainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    write_report = lb.write_report

    def spy(out_dir: Path, report: dict[str, Any]) -> None:
        seen.append(report["complete"])
        write_report(out_dir, report)

    monkeypatch.setattr(lb, "write_report", spy)
    report = bench(tmp_path / "out")
    # seeds outside, variants inside
    assert trainer.calls == [(v, s) for s in range(3) for v in ("frozen", "shared")]
    assert seen == [False] * 6 + [True, True]  # before any run, after each, at the end
    assert report["complete"] and report["runs_done"] == 6
    assert report["variants"]["shared"]["time_to_threshold"]["0.5"]["reached"] == 2
    assert report["git"] is not None and report["machine"]["torch_threads"] >= 1
    provenance = json.loads((tmp_path / "out/runs/shared-seed0" / lb.PROVENANCE_FILE).read_text())
    assert provenance["git"] == report["git"]
    table = (tmp_path / "out/learning.md").read_text()
    assert "| shared | 3 |" in table and "(2/3 reached)" in table
    assert "never (0/3 reached)" in table and "status: complete" in table
    assert (tmp_path / "out/learning.png").stat().st_size > 10_000


@pytest.mark.usefixtures("no_plots")
def test_an_existing_comparison_is_never_silently_mixed_with_a_new_one(
    tmp_path: Path, trainer: FakeTrainer
) -> None:
    out = tmp_path / "out"
    bench(out, seeds=1)
    with pytest.raises(lb.ComparisonMismatchError, match=r"--resume.*--fresh"):
        bench(out, seeds=1)
    with pytest.raises(lb.ComparisonMismatchError, match="env_steps: 300 there, 400 now"):
        bench(out, env_steps=400, resume=True)
    with pytest.raises(lb.ComparisonMismatchError, match="eval_episodes: 2 there, 10 now"):
        bench(out, eval_episodes=10, resume=True)
    other_base = config_from_dict(
        {**base_config().model_dump(mode="json"), "task": {"route_length_m": 50.0}}
    )
    with pytest.raises(lb.ComparisonMismatchError, match="base_config_sha256"):
        lb.run_learning_benchmark(
            other_base,
            out,
            ENV_STEPS,
            1,
            EVAL_EVERY,
            variants=("frozen", "shared"),
            progress=lambda _line: None,
            eval_episodes=EPISODES,
            resume=True,
        )
    assert len(trainer.calls) == 2  # nothing was retrained by the refused attempts

    report = bench(out, seeds=1, fresh=True)  # --fresh discards and retrains
    assert len(trainer.calls) == 4 and report["complete"]


@pytest.mark.usefixtures("no_plots")
def test_resume_reuses_completed_runs_and_retrains_unfinished_ones(
    tmp_path: Path, trainer: FakeTrainer
) -> None:
    out = tmp_path / "out"
    base = base_config()

    def config(variant: str, seed: int) -> TD3DriveConfig:
        return lb.variant_config(base, variant, seed, ENV_STEPS, EVAL_EVERY, "cpu", EPISODES)

    # An interrupted comparison: seed 0 done for both variants, frozen seed 1
    # crashed (summary says failed), shared seed 1 died before any summary.
    for variant in ("frozen", "shared"):
        write_run(out / "runs" / f"{variant}-seed0", config(variant, 0), route_plan(variant, 0))
    crashed = out / "runs" / "frozen-seed1"
    write_run(crashed, config("frozen", 1), [0.1])
    summary = json.loads((crashed / "summary.json").read_text())
    (crashed / "summary.json").write_text(json.dumps({**summary, "status": "failed: nan"}))
    started = out / "runs" / "shared-seed1"
    started.mkdir(parents=True)
    (started / "config.yaml").write_text(
        yaml.safe_dump(config("shared", 1).model_dump(mode="json"))
    )
    (started / "eval.jsonl").write_text(json.dumps(history([0.9])[0]) + "\n")

    report = bench(out, resume=True)
    assert trainer.calls == [("frozen", 1), ("shared", 1), ("frozen", 2), ("shared", 2)]
    shared = report["variants"]["shared"]
    assert [run["reused"] for run in shared["runs"]] == [True, False, False]
    # the half-written run was retrained from scratch: its early 0.9 is gone
    assert [p["route_completion_mean"] for p in shared["runs"][1]["history"]] == [0.1, 0.3, 0.55]
    assert shared["runs"][0]["final_eval"]["route_completion_mean"] == 0.9  # read back
    assert report["complete"] and report["runs_done"] == 6

    # A second resume retrains nothing.
    trainer.calls.clear()
    again = bench(out, resume=True)
    assert trainer.calls == [] and again["complete"]
    assert all(run["reused"] for v in again["variants"].values() for run in v["runs"])


@pytest.mark.usefixtures("no_plots")
def test_resume_refuses_a_completed_run_trained_with_another_config(
    tmp_path: Path, trainer: FakeTrainer
) -> None:
    out = tmp_path / "out"
    bench(out, seeds=1)
    # e.g. the variant's definition changed since that run was trained
    run_dir = out / "runs" / "shared-seed0"
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    raw["learner"]["random_shift_pad"] = 2
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(lb.ComparisonMismatchError, match=r"learner\.random_shift_pad: 2 -> 0"):
        bench(out, seeds=2, resume=True)
    assert len(trainer.calls) == 2  # refused before training seed 1


@pytest.mark.usefixtures("no_plots")
def test_cli_flags_and_the_clear_error(
    tmp_path: Path, trainer: FakeTrainer, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["bench", "learning"])
    assert (args.seeds, args.eval_episodes, args.resume, args.fresh) == (3, 10, False, False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "learning", "--resume", "--fresh"])

    config_path = tmp_path / "base.yaml"
    config_path.write_text(yaml.safe_dump(base_config().model_dump(mode="json")))
    argv = [
        "bench",
        "learning",
        "--config",
        str(config_path),
        "--env-steps",
        str(ENV_STEPS),
        "--seeds",
        "1",
        "--eval-every",
        str(EVAL_EVERY),
        "--eval-episodes",
        str(EPISODES),
        "--variants",
        "default,shared",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out/learning.json").read_text())
    assert report["config_path"] == str(config_path)
    assert list(report["variants"]) == ["default", "shared"]
    assert report["variants"]["default"]["runs"][0]["eval_seeds"] == [10_000_000, 10_000_001]
    capsys.readouterr()
    assert main([*argv[:-4], "--eval-episodes", "3", *argv[-4:], "--resume"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0 and len(trainer.calls) == 2
