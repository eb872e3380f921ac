"""Typed, validated run configuration (DESIGN.md §6).

One frozen pydantic model per component, one field per knob, each with a
description that gives its unit or range. Unknown keys and wrong types are
errors that name the field. The YAML files in ``deploy/`` carry the evidence
for their values in comments.

The learner and replay sections exist so far; the rollout and driver
sections join them as those services land.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

EncoderMode = Literal["separate", "shared", "frozen"]
CnnVariant = Literal["nature", "pooled"]
EncoderOutput = Literal["relu", "layernorm_tanh"]
ObservationVector = Literal["full", "speed_only"]
WarmupPolicy = Literal["uniform", "lane_follower"]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LearnerConfig(_Section):
    """TD3 learner hyperparameters (Fujimoto et al. 2018, "Addressing Function
    Approximation Error in Actor-Critic Methods", Algorithm 1).

    Pixel-specific defaults follow DrQ-v2 (Yarats et al. 2021): lr 1e-4,
    batch 256, random-shift augmentation with pad 4; ``deploy/local.yaml``
    overrides several of them with the values the learning comparison in
    ``docs/benchmarks.md`` chose for the embedded simulator.
    """

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Torch device; 'auto' takes CUDA when available, else the CPU."
    )
    # Default 'shared' (with random_shift_pad 4, DrQ-v2's design) on the
    # reduced CPU comparison (docs/benchmarks.md, 14k env steps, 1 seed):
    # shared+shift drove first (eval return 30 from 6k steps) and ended best
    # (mean of the last 3 evaluations 37.6; frozen 31.4, shared without
    # shift 5.4, separate -1.8, which never drove). 'shared' is also
    # 1.4-1.8x cheaper per update than 'separate'. One seed is thin evidence:
    # the GPU-sized comparison (>= 100k steps, 3 seeds) should confirm it.
    encoder: EncoderMode = Field(
        "shared",
        description=(
            "'separate': actor and critic each own a CNN trained by their own loss; "
            "'shared': one CNN trained by the critic loss only, the actor sees detached "
            "features; 'frozen': the CNN never trains (ablation baseline)."
        ),
    )
    cnn: CnnVariant = Field(
        "nature",
        description="'nature': NatureCNN (Mnih et al. 2015); 'pooled': the same with a 2x2 "
        "stride-1 max-pool after each conv (the reference notes' variant).",
    )
    # Default 'layernorm_tanh' on evidence (docs/benchmarks.md, "Actor
    # saturation"): with NatureCNN's unbounded ReLU output, trained encoders
    # grow their features until the actor's tanh saturates at +-1 on every
    # sample within ~250 updates on the driving task (frozen did not). A
    # bounded trunk, as in SAC-AE and DrQ-v2, prevents it.
    encoder_output: EncoderOutput = Field(
        "layernorm_tanh",
        description="The encoder's last layer after its linear projection: 'relu' (NatureCNN "
        "as in Mnih et al. 2015 / SB3; unbounded features) or 'layernorm_tanh' (LayerNorm "
        "then tanh, features in [-1, 1], as the trunk of SAC-AE, Yarats et al. 2019, and "
        "DrQ-v2, Yarats et al. 2021).",
    )
    features_dim: int = Field(512, ge=1, description="Encoder output width.")
    actor_hidden: tuple[int, ...] = Field(
        (256, 256), min_length=1, description="Hidden widths of the actor MLP head."
    )
    critic_hidden: tuple[int, ...] = Field(
        (256, 256), min_length=1, description="Hidden widths of each critic Q head."
    )
    actor_lr: float = Field(1e-4, ge=0, description="Adam learning rate of the actor head.")
    critic_lr: float = Field(1e-4, ge=0, description="Adam learning rate of the critic heads.")
    encoder_lr: float | None = Field(
        None,
        ge=0,
        description="Adam learning rate of the encoder(s); null = the lr of the network "
        "that owns the encoder. Not allowed with encoder='frozen'.",
    )
    batch_size: int = Field(256, ge=1, description="Transitions per update.")
    tau: float = Field(
        0.005, gt=0, le=1, description="Polyak averaging rate of the target networks, (0, 1]."
    )
    policy_noise: float = Field(
        0.2, ge=0, description="Std of the target policy smoothing noise, action units."
    )
    noise_clip: float = Field(
        0.5, ge=0, description="Clip of the target policy smoothing noise, action units."
    )
    policy_delay: int = Field(
        2, ge=1, description="Critic updates per actor and target update (TD3's d)."
    )
    # Default 0.01 on evidence (docs/benchmarks.md, "Actor saturation"): on the
    # driving task the 'separate' actor pinned both actions at +-1 within 250
    # updates without it (with either encoder output, and with encoder_lr
    # 1e-5); with 0.01 no action saturated. Not in the TD3 paper.
    action_preactivation_penalty: float = Field(
        0.01,
        ge=0,
        description="Weight lambda of lambda * mean(u^2) added to the actor loss, where "
        "u is the actor's action before tanh; keeps the tanh out of saturation "
        "(0 = the TD3 paper's loss).",
    )
    actor_max_grad_norm: float | None = Field(
        10.0,
        gt=0,
        description="Clip of the actor's (incl. its encoder) gradient L2 norm; "
        "null disables clipping.",
    )
    critic_max_grad_norm: float | None = Field(
        10.0,
        gt=0,
        description="Clip of the critic's (incl. its encoder) gradient L2 norm; "
        "null disables clipping.",
    )
    random_shift_pad: int = Field(
        4,
        ge=0,
        le=16,
        description="DrQ random-shift augmentation of obs and next_obs "
        "images by up to this many pixels (edge-replicated); 0 disables it.",
    )
    seed: int = Field(0, ge=0, description="Seed of network init, target noise and augmentation.")
    # Speed options. Off = the exact fp32 update; `td3drive bench
    # learner` measures each against it on the device at hand.
    channels_last: bool = Field(
        False,
        description="Encoder conv weights and images in channels_last (NHWC) memory format; "
        "the same math, float rounding may differ.",
    )
    compile: Literal["off", "default", "reduce-overhead"] = Field(
        "off",
        description="torch.compile (inductor) of the encoders and MLP heads: 'off', 'default', "
        "or 'reduce-overhead' (adds CUDA graphs; on a CPU learner the same as 'default'). The "
        "first updates compile, which takes tens of seconds.",
    )
    amp_bf16: bool = Field(
        False,
        description="CUDA only: forward passes under bf16 autocast; weights, gradients, Adam "
        "state and losses stay fp32. A CPU learner refuses it.",
    )
    fused_adam: bool = Field(
        False,
        description="torch.optim.Adam(fused=True) (CUDA and CPU). Also moves the NaN/inf "
        "check onto the device: a non-finite step is skipped there and the error raised "
        "when the metrics are fetched, instead of one host sync per optimizer step.",
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> LearnerConfig:
        if self.encoder == "frozen" and self.encoder_lr is not None:
            raise ValueError("encoder_lr has no effect with encoder='frozen'; remove it")
        if self.amp_bf16 and self.device == "cpu":
            raise ValueError("amp_bf16 needs a CUDA learner (device 'cuda' or 'auto')")
        return self


class ReplayConfig(_Section):
    """The sharded replay service (DESIGN.md §4). Sizes are totals over all
    shards; each shard gets ``ceil(total / num_shards)``."""

    num_shards: int = Field(2, ge=1, description="Replay shards (Ray actors).")
    capacity_transitions: int = Field(
        200_000, ge=1, description="Most transitions held, all shards together."
    )
    capacity_bytes: int = Field(
        2_000_000_000,
        ge=1,
        description="Most bytes held, all shards together (~1.2 KB per transition "
        "on simulator frames, see `td3drive bench replay`).",
    )
    chunk_steps: int = Field(
        64, ge=1, le=4096, description="Steps per chunk a rollout worker pushes (K)."
    )
    n_step: int = Field(1, ge=1, description="n of the n-step return.")
    gamma: float = Field(0.99, ge=0, le=1, description="Discount factor in [0, 1].")
    min_size_to_sample: int = Field(
        2_000, ge=1, description="Transitions inserted (all shards) before the first sample."
    )
    replay_ratio: float | None = Field(
        64.0,
        gt=0,
        description="Target sampled transitions per inserted transition (e.g. 64 = one "
        "update of batch 256 per 4 env steps); the side that is ahead waits. null = "
        "no ratio, only min_size_to_sample.",
    )
    replay_ratio_tolerance: float | None = Field(
        None,
        gt=0,
        description="Allowed deviation from the ratio per shard, in sampled transitions; "
        "null = learner.batch_size + replay_ratio x chunk_steps (twice the least that "
        "cannot deadlock).",
    )
    rate_limit_timeout_s: float = Field(
        600.0, gt=0, description="Seconds a blocked insert or sample waits before it fails."
    )
    max_pushes_in_flight: int = Field(
        4, ge=1, description="Pushes a worker may have outstanding before it waits."
    )
    prefetch_batches: int = Field(
        2,
        ge=1,
        description="Sampled batches the learner keeps requested or ready; each shard "
        "serves up to prefetch_batches + 1 samples at once.",
    )
    sample_transport: Literal["decoded", "compressed"] = Field(
        "decoded",
        description="How a sample travels from a shard to the learner. decoded: the shard "
        "decompresses its sample's frames and sends uint8 image stacks (~14.5 MB per "
        "batch of 256). compressed: the shard sends each distinct frame of its sample "
        "once, LZ4-compressed (~1.1 MB per batch of 256 on simulator frames), and the "
        "learner's sampler decompresses them; a shard then serves several times more "
        "batches per core, at the cost of decoding on the learner's CPUs "
        "(docs/benchmarks.md, bench replay and bench pipeline).",
    )
    sample_decode_threads: int = Field(
        1,
        ge=1,
        description="Threads that decompress a sample's frames (lz4 releases the GIL): in "
        "each shard when sample_transport is decoded, in the learner's sampler when it "
        "is compressed. 1 decodes in the calling thread.",
    )
    prioritized: bool = Field(
        False,
        description="Proportional prioritized replay (Schaul et al. 2016): shards sample "
        "transitions with probability ~ (|TD error| + eps)^alpha and return importance "
        "weights; the learner sends each update's max(|Q1 - y|, |Q2 - y|) back as the "
        "samples' new priorities.",
    )
    priority_alpha: float = Field(0.6, ge=0, description="PER exponent alpha.")
    priority_beta: float = Field(0.4, ge=0, description="PER importance exponent beta.")
    priority_eps: float = Field(1e-6, gt=0, description="Added to |TD error|.")

    def per_shard(self, total: int) -> int:
        """``ceil(total / num_shards)``."""
        return -(-total // self.num_shards)

    def tolerance_for(self, batch_size: int) -> float:
        """Per-shard tolerance, resolving ``null`` to its documented default."""
        if self.replay_ratio_tolerance is not None:
            return self.replay_ratio_tolerance
        ratio = self.replay_ratio or 0.0
        return batch_size + ratio * self.chunk_steps


class DrivingTaskConfig(_Section):
    """The driving task shared by every simulator: reward weights, limits and
    observation scaling (see ``rollout_workers/driving_task.py``)."""

    target_speed_mps: float = Field(
        8.0, gt=0, description="Speed the progress reward saturates at, m/s."
    )
    lane_half_width_m: float = Field(
        2.5, gt=0, description="Half a lane's width, m: scales lane keeping and the vector."
    )
    waypoint_spacing_m: float = Field(
        5.0, gt=0, description="Distance between look-ahead waypoints, m."
    )
    route_length_m: float = Field(
        300.0, gt=0, description="Route length, m; driving it all is success."
    )
    max_episode_steps: int = Field(
        1000, ge=1, description="Time limit in steps (ends the episode as truncated)."
    )
    stuck_seconds: float = Field(
        10.0, gt=0, description="Seconds below stuck_speed_mps that end the episode."
    )
    stuck_speed_mps: float = Field(0.5, ge=0, description="Speed below which the car is stuck.")
    w_progress: float = Field(1.0, ge=0, description="Weight of progress along the route.")
    w_overspeed: float = Field(0.2, ge=0, description="Weight of the overspeed penalty.")
    w_lane: float = Field(0.2, ge=0, description="Weight of the lateral-deviation penalty.")
    w_heading: float = Field(0.1, ge=0, description="Weight of the heading-error penalty.")
    w_comfort: float = Field(0.1, ge=0, description="Weight of the action-change penalty.")
    collision_penalty: float = Field(
        10.0, ge=0, description="Subtracted on a collision (terminal)."
    )
    off_road_penalty: float = Field(
        10.0, ge=0, description="Subtracted when leaving the road (terminal)."
    )
    stuck_penalty: float = Field(
        10.0,
        ge=0,
        description="Subtracted when the episode ends stuck (terminal); without it "
        "stopping is a free way out of a risky episode.",
    )
    observation_vector: ObservationVector = Field(
        "full",
        description="What the observation vector carries: 'full' = speed, lateral "
        "deviation, heading error and 10 waypoints; 'speed_only' = speed, the other 22 "
        "values zero, so steering must come from the image (the pixels-matter test).",
    )


class CarlaConfig(_Section):
    """One CARLA server per rollout worker (``td3drive/Carla-v0``)."""

    host: str = Field("localhost", description="CARLA server host.")
    port: int = Field(2000, ge=1, le=65535, description="RPC port of the server.")
    tm_port: int = Field(8000, ge=1, le=65535, description="Traffic Manager port.")
    town: str = Field("Town03", description="Map to load, e.g. Town03.")
    seed: int = Field(0, ge=0, description="Seed of spawn points, NPCs and the route.")
    fixed_delta_seconds: float = Field(
        0.05, gt=0, le=0.1, description="Synchronous-mode step, s (CARLA advises <= 0.1)."
    )
    timeout_s: float = Field(10.0, gt=0, description="Client and tick timeout, s.")
    camera_width: int = Field(160, ge=16, description="Front camera width, px.")
    camera_height: int = Field(120, ge=16, description="Front camera height, px.")
    camera_fov: float = Field(90.0, gt=0, lt=180, description="Camera field of view, deg.")
    npc_vehicles: int = Field(0, ge=0, description="Traffic Manager NPC vehicles.")
    reconnect_attempts: int = Field(5, ge=0, description="Reconnection tries after a failure.")
    reconnect_backoff_s: float = Field(
        2.0, gt=0, description="First back-off between tries, s (doubles each try)."
    )


def carla_for_worker(carla: dict[str, Any], index: int) -> dict[str, Any]:
    """The CARLA settings of worker ``index`` from the base ones: RPC port
    ``port + 3·index`` (a server also uses the next two ports), Traffic
    Manager port ``tm_port + index``, seed ``seed + index``
    (``deploy/carla/README.md``; ``start_carla_servers.sh`` uses the same plan).

    Raises:
        pydantic.ValidationError: invalid settings, or ports beyond 65535.
    """
    base = CarlaConfig.model_validate(carla)
    return CarlaConfig.model_validate(
        {
            **base.model_dump(),
            "port": base.port + 3 * index,
            "tm_port": base.tm_port + index,
            "seed": base.seed + index,
        }
    ).model_dump()


class RolloutConfig(_Section):
    """Rollout workers: the environment, exploration and chunking."""

    num_workers: int = Field(2, ge=1, description="Rollout workers (Ray actors).")
    env_id: str = Field(
        "td3drive/Racetrack-v0",
        description="gymnasium id of the environment each worker runs, 'EnvId' or gymnasium's "
        "'module:EnvId' (gymnasium.make imports the module, which registers EnvId, in the "
        "driver and in every worker; it must be importable on every node: installed, on "
        "PYTHONPATH, or shipped with the job's working_dir/py_modules). Its spaces must be "
        "td3drive.contracts.spec's; rollout_workers.adapters.PixelEnvAdapter turns an RGB "
        "pixel env into them (td3drive/CarRacingPixels-v0 is CarRacing-v3 through it).",
    )
    env_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for gymnasium.make. td3drive's own environments also "
        "receive the task (and carla) sections, which may not be repeated here.",
    )
    warmup_steps: int = Field(
        1000, ge=0, description="Uniform-random steps per worker before the policy acts."
    )
    warmup_policy: WarmupPolicy = Field(
        "uniform",
        description="What acts during warm-up: 'uniform' = uniform random actions; "
        "'lane_follower' = the scripted lane follower (rollout_workers/scripted.py, on the "
        "environment's privileged lane geometry) plus N(0, warmup_action_noise) noise. "
        "Either way the data only fills the replay; the trained policy is TD3's actor.",
    )
    warmup_action_noise: float = Field(
        0.3,
        ge=0,
        description="Std of the Gaussian noise on the lane follower's warm-up actions, "
        "action units (both steer and throttle_brake).",
    )
    warmup_throttle_min: float = Field(
        0.0,
        ge=-1,
        le=1,
        description="Lower bound of throttle_brake during warm-up (0 = never brake: "
        "biased forward, so random driving still moves).",
    )
    exploration_noise: float = Field(
        0.1, ge=0, description="Std of Gaussian noise on the policy's action."
    )
    weights_poll_steps: int = Field(
        64, ge=1, description="Steps between checks for newer policy weights."
    )
    seed: int = Field(0, ge=0, description="Base seed; worker i uses seed + 1000 i.")

    @model_validator(mode="after")
    def _check_env_id(self) -> RolloutConfig:
        module, name = split_env_id(self.env_id)
        bad_module = module is not None and not all(
            part.isidentifier() for part in module.split(".")
        )
        bad_name = not name or any(not (c.isalnum() or c in "_-./") for c in name)
        if bad_module or bad_name or name.count("/") > 1:
            raise ValueError(
                f"env_id={self.env_id!r} is not a gymnasium id 'EnvId' or 'module:EnvId' "
                "(module: a dotted Python module path; EnvId: [namespace/]Name[-vN])"
            )
        return self


def split_env_id(env_id: str) -> tuple[str | None, str]:
    """``"module:EnvId"`` → ``("module", "EnvId")``; ``"EnvId"`` → ``(None, "EnvId")``.

    gymnasium's own reading of an id (``gymnasium.make`` imports ``module``,
    which registers ``EnvId``, then makes ``EnvId``); :class:`RolloutConfig`
    allows at most one ``:``.
    """
    module, sep, name = env_id.partition(":")
    return (module, name) if sep else (None, env_id)


class RunConfig(_Section):
    """The driver: budget, resources, cadences, monitoring."""

    total_env_steps: int = Field(20_000, ge=1, description="Env-step budget of the run.")
    storage_path: str | None = Field(
        None,
        min_length=1,
        description="Where runs are stored, Ray Train/Tune's storage_path convention: a path "
        "every node mounts at the same place (NFS, a Kubernetes PVC) or a pyarrow.fs URI "
        "(s3://bucket/prefix, gs://bucket/prefix, file:///abs/path). The driver, the learner "
        "(checkpoints) and every replay shard (snapshots) write under <storage_path>/<UTC "
        "timestamp>. null = ./runs; a relative path is resolved against the driver's working "
        "directory to an absolute one before any actor sees it (under `ray job submit "
        "--working-dir` that directory is Ray's disposable cache: set this). Precedence: "
        "`td3drive train --resume RUN` and `--run-dir RUN` name the run location itself "
        "(path or URI) and ignore this field.",
    )
    learner_num_gpus: float = Field(
        0.0, ge=0, description="GPUs reserved for the learner actor (0 = CPU learner)."
    )
    worker_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per rollout worker.")
    shard_num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per replay shard.")
    learner_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved for the learner.")
    # Threads deliberately: on 2 cores a NatureCNN forward+backward at batch
    # 64 took 268 ms with 1 torch thread and 896 ms with 2 while a rollout
    # worker held the other core (oversubscription). Ray sets OMP_NUM_THREADS
    # to an actor's whole CPUs (at least 1); these make it explicit.
    learner_torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads of the learner; null = learner_num_cpus "
        "rounded down, at least 1.",
    )
    worker_torch_threads: int = Field(
        1,
        ge=1,
        description="torch intra-op threads of each rollout worker and the evaluator "
        "(batch-1 inference gains nothing from more).",
    )
    worker_steps_per_call: int = Field(
        128, ge=1, description="Env steps a worker takes per driver call (progress granularity)."
    )
    learner_updates_per_call: int = Field(
        10, ge=1, description="Updates the learner runs per driver call."
    )
    publish_every_updates: int = Field(
        10, ge=1, description="Learner updates between published policy versions (M)."
    )
    checkpoint_every_updates: int = Field(
        500, ge=1, description="Learner updates between checkpoints (learner + replay)."
    )
    eval_episodes: int = Field(3, ge=0, description="Deterministic episodes per evaluation.")
    eval_seed: int = Field(
        0,
        ge=0,
        description="Base seed of the evaluation episodes: episode i resets with "
        "eval_seed + 10,000,000 + i, whatever the training seed, so every run and "
        "evaluation point with the same eval_seed drives the same episodes.",
    )
    eval_every_env_steps: int = Field(
        0,
        ge=0,
        description="Env steps between evaluations during the run (eval.jsonl); 0 = only at "
        "the end.",
    )
    eval_video_every_env_steps: int = Field(
        0,
        ge=0,
        description="Env steps between evaluation clips (videos/eval-<env_steps>.mp4: the "
        "first evaluation episode, simulator view beside the policy's 84x84 input); taken "
        "at the first periodic evaluation at or after each multiple, and of the final "
        "evaluation. 0 = never (no rendering cost).",
    )
    report_interval_s: float = Field(
        10.0, gt=0, description="Seconds between metrics.jsonl lines and log lines."
    )
    # Not 8080: KubeRay gives Ray's own metrics export port 8080 on every pod
    # (deploy/README.md, "Metrics"), and Ray holds 6379, 8000, 8265, 10001,
    # 52365 and, under `ray start`, worker ports 10002-19999.
    metrics_port: int | None = Field(
        9810,
        ge=0,
        le=65535,
        description="Prometheus endpoint port on the driver (0 = any free, null = off). "
        "Bound before Ray starts; a taken port stops the run at once. Default 9810: in the "
        "range Prometheus reserves for exporters (9100-9999) and clear of every port Ray "
        "uses (6379 GCS, 8000 Serve, 8265 dashboard, 10001 client, 52365 dashboard agent, "
        "10002-19999 workers under `ray start`) and of 8080, which KubeRay gives Ray's own "
        "metrics export on every pod.",
    )
    metrics_linger_s: float = Field(
        30.0,
        ge=0,
        allow_inf_nan=False,
        description="Seconds the endpoint keeps serving after the run ends (completed, "
        "stopped or failed), so that Prometheus scrapes the final td3drive_run_status and "
        "a NaN gauge: 30 s = two scrapes at deploy/prometheus/prometheus.yml's "
        "scrape_interval (10 s) plus its scrape_timeout (5 s) and slack. 0 = close at once.",
    )
    recent_episodes: int = Field(
        20, ge=1, description="Episodes averaged for the 'recent' return/success figures."
    )
    start_timeout_s: float = Field(
        600.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds the driver waits for every actor's constructor before it stops "
        "the run naming the ones still pending (reservations the cluster cannot place, an "
        "autoscaler that does not scale, a CARLA server that does not answer). 10 min covers "
        "an autoscaler adding a node and pulling the image.",
    )

    def learner_threads(self) -> int:
        """torch intra-op threads the learner actor sets: ``learner_torch_threads``,
        else ``learner_num_cpus`` rounded down, at least 1."""
        return self.learner_torch_threads or max(1, int(self.learner_num_cpus))


class TD3DriveConfig(_Section):
    """The whole run configuration, as one YAML file describes it."""

    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    task: DrivingTaskConfig = Field(default_factory=DrivingTaskConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    carla: CarlaConfig = Field(default_factory=CarlaConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _check_combinations(self) -> TD3DriveConfig:
        if self.learner.batch_size > self.replay.min_size_to_sample:
            raise ValueError(
                f"learner.batch_size ({self.learner.batch_size}) exceeds "
                f"replay.min_size_to_sample ({self.replay.min_size_to_sample})"
            )
        replay = self.replay
        if replay.replay_ratio is not None and replay.max_pushes_in_flight < replay.num_shards:
            raise ValueError(
                f"replay.max_pushes_in_flight ({replay.max_pushes_in_flight}) must be at least "
                f"replay.num_shards ({replay.num_shards}) with a replay ratio: a worker whose "
                "only push waits on one shard could starve the shard the learner waits on"
            )
        repeated = sorted({"task", "carla"} & set(self.rollout.env_kwargs))
        if repeated:
            raise ValueError(
                f"rollout.env_kwargs repeats the {' and '.join(repeated)} section(s); set "
                f"{repeated[0]}.* instead (td3drive's environments receive those sections "
                "directly, so the section is the one source of truth)"
            )
        if self.replay.chunk_steps > self.replay.per_shard(self.replay.capacity_transitions):
            raise ValueError("replay.chunk_steps exceeds one shard's capacity_transitions")
        return self


class ConfigError(ValueError):
    """A configuration file that cannot be read or does not validate."""


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TD3DriveConfig:
    """Read, override and validate a YAML run configuration.

    Args:
        path: YAML file with the sections of :class:`TD3DriveConfig`.
        overrides: ``section.key=value`` strings applied after reading; the
            value is parsed as YAML (``learner.tau=0.01``,
            ``learner.actor_hidden=[64,64]``).

    Raises:
        ConfigError: unreadable file, YAML syntax error (with line), an
            unknown key, a wrong type or an impossible combination; the message
            names the file and the field.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    apply_overrides(raw, overrides)
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> TD3DriveConfig:
    """Validate a configuration mapping.

    Raises:
        ConfigError: naming ``source`` and every invalid field as ``section.key``.
    """
    try:
        return TD3DriveConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            problems.append(f"  {where}: {err['msg']}")
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(problems)) from exc


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    """Apply ``section.key=value`` strings to a raw config mapping in place;
    values are parsed as YAML.

    Raises:
        ConfigError: an item without ``=``, a path through a non-section, or
            a value that is not valid YAML.
    """
    for item in overrides:
        _apply_override(raw, item)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
