"""``td3drive bench learner``: TD3 updates/s, ours against a plain reference,
and ours with each speed option on.

The reference is the same TD3 update (same networks from
:mod:`td3drive.contracts.networks`, same Adam, same feature reuse for the actor loss) as a
bare fp32 PyTorch loop with none of the learner's machinery: no batch
validation, no gradient clipping or norm measurement, no NaN checks, no
metrics. Every variant of ours runs as the learner actor runs it
(:meth:`TD3Learner.update_deferred`, metrics fetched every ``fetch_every``
updates), plus one row of the per-update path (:meth:`TD3Learner.update`,
metrics fetched after every update, the original update's way). Option rows turn on
one :class:`td3drive.contracts.config.LearnerConfig` speed option each (``OPTIONS``);
the ``all`` row turns on every selected one the device supports, and
``all_but_compile`` the same without ``torch.compile``.

All variants get the same numpy batches and copy them to the device inside
the timed loop; their timed segments are interleaved round-robin (the order
reversed every other round) so machine drift hits all alike. torch's
intra-op thread count is set as the learner actor sets it
(:func:`learner_torch_threads`), or as given.

Augmentation is off everywhere (``random_shift_pad=0``); one extra row
measures ours with DrQ random shift, to show what it costs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from td3drive.app.arguments import positive_int
from td3drive.contracts.config import LearnerConfig, RunConfig, load_config
from td3drive.contracts.spec import ACTION_DIM, IMAGE_SHAPE, VECTOR_DIM, Batch

if TYPE_CHECKING:  # torch and the learner load when a benchmark runs: --help stays instant
    import torch

    from learner.td3 import TD3Learner

Progress = Callable[[str], None]


class ReferenceTD3:
    """A minimal TD3 update loop in plain PyTorch (the benchmark's baseline).

    Same architecture and optimizers as :class:`learner.td3.TD3Learner` for
    ``encoder`` in ``{"separate", "shared"}``; hyperparameters from ``config``.
    """

    def __init__(self, config: LearnerConfig, device: torch.device) -> None:
        import torch

        from learner.td3 import frozen_copy
        from td3drive.contracts.networks import ActorHead, TwinQHead, encoder_for

        self.config = config
        self.device = device
        self.separate = config.encoder == "separate"
        torch.manual_seed(config.seed)
        self.critic_encoder = encoder_for(config).to(device)
        self.actor_encoder = (
            encoder_for(config).to(device) if self.separate else self.critic_encoder
        )
        self.actor = ActorHead(config.features_dim, config.actor_hidden).to(device)
        self.critic = TwinQHead(config.features_dim, config.critic_hidden).to(device)
        self.target_actor = frozen_copy(self.actor)
        self.target_critic = frozen_copy(self.critic)
        self.target_actor_encoder = frozen_copy(self.actor_encoder) if self.separate else None
        self.target_critic_encoder = frozen_copy(self.critic_encoder) if self.separate else None
        actor_params = list(self.actor.parameters())
        if self.separate:
            actor_params += list(self.actor_encoder.parameters())
        self.actor_params = actor_params
        self.actor_optimizer = torch.optim.Adam(actor_params, lr=config.actor_lr)
        self.critic_optimizer = torch.optim.Adam(
            [*self.critic.parameters(), *self.critic_encoder.parameters()], lr=config.critic_lr
        )
        pairs = [(self.target_actor, self.actor), (self.target_critic, self.critic)]
        if self.target_actor_encoder is not None and self.target_critic_encoder is not None:
            pairs += [
                (self.target_actor_encoder, self.actor_encoder),
                (self.target_critic_encoder, self.critic_encoder),
            ]
        self.targets: list[torch.Tensor] = [p for t, _ in pairs for p in t.parameters()]
        self.online: list[torch.Tensor] = [p for _, o in pairs for p in o.parameters()]
        self.step = 0

    def update(self, batch: Batch) -> None:
        """One TD3 update on ``batch`` (images ``uint8[B, 4, 84, 84]``): the
        critic step, and every ``policy_delay``-th call the actor step and the
        Polyak update; no validation, clipping or metrics."""
        import torch
        import torch.nn.functional as F

        cfg, dev = self.config, self.device
        obs = torch.from_numpy(batch.obs_image).to(dev, non_blocking=True)
        vec = torch.from_numpy(batch.obs_vector).to(dev, non_blocking=True)
        act = torch.from_numpy(batch.action).to(dev, non_blocking=True)
        rew = torch.from_numpy(batch.reward).to(dev, non_blocking=True)
        disc = torch.from_numpy(batch.discount).to(dev, non_blocking=True)
        next_obs = torch.from_numpy(batch.next_obs_image).to(dev, non_blocking=True)
        next_vec = torch.from_numpy(batch.next_obs_vector).to(dev, non_blocking=True)
        self.step += 1
        with torch.no_grad():
            if self.target_actor_encoder is not None and self.target_critic_encoder is not None:
                fa, fc = self.target_actor_encoder(next_obs), self.target_critic_encoder(next_obs)
            else:
                fa = fc = self.critic_encoder(next_obs)
            noise = (torch.randn(act.shape, device=dev) * cfg.policy_noise).clamp(
                -cfg.noise_clip, cfg.noise_clip
            )
            next_act = (self.target_actor(fa, next_vec) + noise).clamp(-1, 1)
            tq1, tq2 = self.target_critic(fc, next_vec, next_act)
            y = rew + disc * torch.min(tq1, tq2)
        features = self.critic_encoder(obs)
        q1, q2 = self.critic(features, vec, act)
        critic_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        self.critic_optimizer.zero_grad()
        critic_loss.backward()
        self.critic_optimizer.step()
        if self.step % cfg.policy_delay == 0:
            features = features.detach()
            actor_features = self.actor_encoder(obs) if self.separate else features
            actor_loss = -self.critic.q1_only(features, vec, self.actor(actor_features, vec)).mean()
            self.actor_optimizer.zero_grad()
            actor_loss.backward(inputs=self.actor_params)
            self.actor_optimizer.step()
            with torch.no_grad():
                torch._foreach_lerp_(self.targets, self.online, cfg.tau)


def synthetic_batches(batch_size: int, count: int, seed: int = 0) -> list[Batch]:
    """``count`` contract-valid batches of random pixels and vectors.

    Random pixels cost the encoder exactly what real ones do; the benchmark
    measures the update, not what it learns.
    """
    rng = np.random.default_rng(seed)

    def one() -> Batch:
        return Batch(
            obs_image=rng.integers(0, 256, (batch_size, *IMAGE_SHAPE), dtype=np.uint8),
            obs_vector=rng.standard_normal((batch_size, VECTOR_DIM), dtype=np.float32),
            action=rng.uniform(-1, 1, (batch_size, ACTION_DIM)).astype(np.float32),
            reward=rng.standard_normal(batch_size, dtype=np.float32),
            discount=np.full(batch_size, 0.99, dtype=np.float32),
            next_obs_image=rng.integers(0, 256, (batch_size, *IMAGE_SHAPE), dtype=np.uint8),
            next_obs_vector=rng.standard_normal((batch_size, VECTOR_DIM), dtype=np.float32),
        )

    return [one() for _ in range(count)]


# Speed options, one row each: the LearnerConfig fields they set.
OPTIONS: Mapping[str, Mapping[str, Any]] = {
    "channels_last": {"channels_last": True},
    "fused_adam": {"fused_adam": True},
    "amp_bf16": {"amp_bf16": True},
    "compile": {"compile": "default"},
    "compile_reduce_overhead": {"compile": "reduce-overhead"},
}
# Options that need CUDA (on a CPU the row is skipped, with the reason).
CUDA_ONLY = {
    "amp_bf16": "bf16 autocast is CUDA only",
    "compile_reduce_overhead": "CUDA graphs are CUDA only",
}
# What `bench learner` measures without --options: the ones that cost no
# compilation (a CPU inductor compile takes minutes on a loaded 2-core machine).
DEFAULT_OPTIONS = ("channels_last", "fused_adam", "amp_bf16")
# Untimed updates before timing a compiled variant (compile, then CUDA graph recording).
COMPILE_WARMUP = 3


def learner_torch_threads(run: RunConfig) -> int:
    """torch intra-op threads of the learner actor (:meth:`RunConfig.learner_threads`)."""
    return run.learner_threads()


HELP = (
    "TD3 updates/s (separate and shared encoders) vs a plain-PyTorch reference loop, "
    "with each speed option on and off"
)
DESCRIPTION = (
    "Measures TD3Learner throughput for the 'separate' and 'shared' encoder "
    "modes at each batch size, and in the same run a minimal TD3 loop in plain PyTorch "
    "with the same networks (the bare fp32 reference). overhead_ratio = ours / reference "
    "('separate', largest batch); 1.0 means the learner's validation, clipping and "
    "metrics cost nothing. 'variants' adds one row per speed option (learner.channels_last, "
    "fused_adam, amp_bf16, compile), one with all of them, and one of the per-update "
    "metrics path, each as updates/s, x reference and x ours; a JSON report goes to stdout "
    "and the table to stderr."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``td3drive bench learner``."""
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="cpu", help="torch device"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        nargs="+",
        default=[100, 256],
        metavar="N",
        help="batch sizes to measure",
    )
    parser.add_argument(
        "--updates", type=positive_int, default=32, help="timed updates per row and variant"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed updates before timing")
    parser.add_argument(
        "--encoder",
        nargs="+",
        choices=("separate", "shared", "frozen"),
        default=["separate", "shared"],
        help="encoder modes to measure",
    )
    parser.add_argument(
        "--options",
        nargs="+",
        metavar="OPTION",
        default=["default"],
        help="speed options with a row each: channels_last fused_adam amp_bf16 compile "
        "compile_reduce_overhead; 'default' = channels_last fused_adam amp_bf16 (no "
        "compilation), 'all' = every one, 'none' = no option rows. CUDA-only ones are listed "
        "as skipped on a CPU",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="YAML",
        help="a run config: torch threads and updates per metrics fetch are taken from its "
        "run.learner_torch_threads / learner_num_cpus and run.learner_updates_per_call "
        "(default: those of the default config)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        help="torch intra-op threads (overrides --config; default: as the learner actor "
        "would set them: run.learner_torch_threads, else learner_num_cpus rounded down)",
    )
    parser.add_argument(
        "--fetch-every",
        type=positive_int,
        help="updates between metric fetches of ours (overrides --config; default: "
        "run.learner_updates_per_call)",
    )


def expand_options(names: Sequence[str]) -> list[str]:
    """``--options`` as keys of :data:`OPTIONS`, once each, in order:
    ``default`` stands for :data:`DEFAULT_OPTIONS`, ``all`` for every one,
    ``none`` for none.

    Raises:
        ValueError: an unknown name.
    """
    options: list[str] = []
    for name in names:
        if name == "default":
            options += DEFAULT_OPTIONS
        elif name == "all":
            options += OPTIONS
        elif name != "none":
            if name not in OPTIONS:
                raise ValueError(
                    f"unknown option {name!r}; choose from {', '.join(OPTIONS)}, default, all, none"
                )
            options.append(name)
    return list(dict.fromkeys(options))


def run(args: argparse.Namespace, progress: Progress = print) -> dict[str, Any]:
    """:func:`run_learner_benchmark` with the options of :func:`add_arguments`:
    torch threads and updates per metrics fetch from ``--config`` (or the
    default config) unless given, the timed updates interleaved in
    ``min(16, --updates)`` rounds; a first progress line states the settings.

    Raises:
        ValueError: an unknown ``--options`` name; as :func:`run_learner_benchmark`.
        td3drive.contracts.config.ConfigError: an invalid ``--config`` (a ``ValueError``).
        RuntimeError: ``--device cuda`` without a GPU.
    """
    options = expand_options(args.options)
    run_config = load_config(args.config).run if args.config else RunConfig()
    threads = args.threads or learner_torch_threads(run_config)
    fetch_every = args.fetch_every or run_config.learner_updates_per_call
    rounds = min(16, args.updates)
    progress(
        f"bench learner: device={args.device} batch sizes={args.batch_size} "
        f"encoders={args.encoder} options={options or 'none'} torch threads={threads} "
        f"fetch every {fetch_every} updates; updates={args.updates} per row and variant "
        f"(interleaved in {rounds} rounds)"
    )
    return run_learner_benchmark(
        device=args.device,
        batch_sizes=args.batch_size,
        updates=args.updates,
        warmup=args.warmup,
        rounds=rounds,
        encoders=args.encoder,
        options=options,
        fetch_every=fetch_every,
        threads=threads,
        progress=progress,
    )


class _Variant:
    """One benchmarked update loop: a name, the options it sets, and a step."""

    def __init__(
        self, name: str, options: Mapping[str, Any], step: Callable[[Batch], Any], warmup: int
    ) -> None:
        self.name = name
        self.options = dict(options)
        self.step = step
        self.warmup = warmup
        self.seconds = 0.0
        self.error: str | None = None


def _deferred_step(learner: TD3Learner, fetch_every: int) -> Callable[[Batch], None]:
    """``update_deferred`` with ``fetch_metrics`` every ``fetch_every`` updates,
    as :meth:`learner.ray_actor.LearnerActor.train` runs them."""
    count = 0

    def step(batch: Batch) -> None:
        nonlocal count
        learner.update_deferred(batch)
        count += 1
        if count % fetch_every == 0:
            learner.fetch_metrics()

    return step


def _timed(
    update: Callable[[Batch], Any], batches: Sequence[Batch], n: int, device: torch.device
) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(n):
        update(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:299] + "…"


def _variants(
    config: LearnerConfig,
    device: torch.device,
    options: Sequence[str],
    fetch_every: int,
    warmup: int,
) -> tuple[list[_Variant], list[dict[str, Any]]]:
    """The variants of one (encoder, batch size) row, and the option rows
    skipped on this device (``{"variant", "options", "skipped"}``)."""
    from learner.td3 import TD3Learner

    variants = [
        _Variant("reference", {}, ReferenceTD3(config, device).update, warmup),
        _Variant("ours_fetch_every_update", {}, TD3Learner(config, device=device).update, warmup),
    ]
    skipped: list[dict[str, Any]] = []
    applicable: dict[str, Any] = {}
    named: list[tuple[str, dict[str, Any]]] = [("ours", {})]
    for option in options:
        fields = dict(OPTIONS[option])
        if option in CUDA_ONLY and device.type != "cuda":
            skipped.append({"variant": option, "options": fields, "skipped": CUDA_ONLY[option]})
            continue
        named.append((option, fields))
        if "compile" not in fields or "compile" not in applicable:
            applicable.update(fields)
        elif fields["compile"] == "reduce-overhead":  # of two compile modes, the stronger
            applicable["compile"] = "reduce-overhead"
    if len(named) > 2:
        named.append(("all", applicable))
    uncompiled = {k: v for k, v in applicable.items() if k != "compile"}
    if "compile" in applicable and len(uncompiled) > 1:  # what compile adds to the rest
        named.append(("all_but_compile", uncompiled))
    for name, fields in named:
        steps = max(warmup, COMPILE_WARMUP) if fields.get("compile", "off") != "off" else warmup
        variant = _Variant(name, fields, lambda _batch: None, steps)
        try:
            learner = TD3Learner(config.model_copy(update=fields), device=device)
            variant.step = _deferred_step(learner, fetch_every)
        except Exception as exc:  # an option this torch or device cannot do: reported
            variant.error = _short(exc)
        variants.append(variant)
    return variants, skipped


def run_learner_benchmark(
    device: str = "cpu",
    batch_sizes: Sequence[int] = (100, 256),
    updates: int = 20,
    warmup: int = 3,
    rounds: int = 4,
    encoders: Sequence[str] = ("separate", "shared"),
    options: Sequence[str] = DEFAULT_OPTIONS,
    fetch_every: int | None = None,
    threads: int | None = None,
    progress: Progress = print,
) -> dict[str, Any]:
    """Measure updates/s of :class:`ReferenceTD3`, :class:`TD3Learner` and
    :class:`TD3Learner` with each speed option.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        batch_sizes: transitions per update, one row set per size and encoder mode.
        updates: timed updates per variant (split over ``rounds`` interleaved
            segments), after ``warmup`` untimed ones (at least
            :data:`COMPILE_WARMUP` for a compiled variant).
        encoders: encoder modes to measure.
        options: keys of :data:`OPTIONS`, one row each (CUDA-only ones are
            listed as skipped on a CPU), plus ``all`` with every applicable one
            when there are two or more (of two compile modes, ``reduce-overhead``),
            and ``all_but_compile`` when a compile is among them.
        fetch_every: updates per metrics fetch of ours; ``None``: the default
            ``run.learner_updates_per_call`` (the learner actor fetches once per call).
        threads: torch intra-op threads for the run (restored afterwards);
            ``None``: :func:`learner_torch_threads` of the default ``RunConfig``.
        progress: called with one line per finished row and the final table.

    Returns:
        The JSON document: ``device``; ``results`` and ``reference_updates_per_s``
        (lists of ``{encoder, batch_size, updates_per_s}``: ours with every
        option off, and the reference); ``overhead_ratio`` (ours / reference,
        ``separate`` at the largest batch size, else the first encoder);
        ``variants`` (per encoder and batch size, each variant's
        ``updates_per_s``, ``vs_reference`` and ``vs_ours``, or ``skipped`` /
        ``error`` with the reason); ``augmentation`` (ours with random shift);
        ``settings`` and ``machine``.

    Raises:
        RuntimeError: ``device="cuda"`` without a GPU.
        ValueError: ``updates < rounds``, an unknown option, ``fetch_every < 1``.
    """
    import torch

    from learner.td3 import resolve_device

    if updates < rounds:
        raise ValueError(f"updates ({updates}) must be at least rounds ({rounds})")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; choose from {sorted(OPTIONS)}")
    defaults = RunConfig()
    fetch_every = defaults.learner_updates_per_call if fetch_every is None else fetch_every
    if fetch_every < 1:
        raise ValueError(f"fetch_every must be >= 1, got {fetch_every}")
    threads = learner_torch_threads(defaults) if threads is None else threads
    dev = resolve_device(device)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(
            dev, batch_sizes, updates, warmup, rounds, encoders, options, fetch_every, progress
        )
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    dev: torch.device,
    batch_sizes: Sequence[int],
    updates: int,
    warmup: int,
    rounds: int,
    encoders: Sequence[str],
    options: Sequence[str],
    fetch_every: int,
    progress: Progress,
) -> dict[str, Any]:
    import torch

    from learner.td3 import TD3Learner

    per_round = [updates // rounds + (1 if i < updates % rounds else 0) for i in range(rounds)]
    results: list[dict[str, Any]] = []
    reference: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    augmentation: list[dict[str, Any]] = []
    threads = torch.get_num_threads()
    for batch_size in batch_sizes:
        batches = synthetic_batches(batch_size, count=4, seed=batch_size)
        for encoder in encoders:
            config = LearnerConfig(
                encoder=encoder,
                batch_size=batch_size,
                random_shift_pad=0,
            )
            variants, skipped = _variants(config, dev, options, fetch_every, warmup)
            for variant in variants:
                if variant.error is None:
                    try:
                        _timed(variant.step, batches, variant.warmup, dev)
                    except Exception as exc:  # e.g. a compile that fails: reported
                        variant.error = _short(exc)
            for i, n in enumerate(per_round):
                # Reverse the order every other round, so none always follows another.
                for variant in variants if i % 2 == 0 else variants[::-1]:
                    if variant.error is not None:
                        continue
                    try:
                        variant.seconds += _timed(variant.step, batches, n, dev)
                    except Exception as exc:
                        variant.error = _short(exc)
            row = {"encoder": encoder, "batch_size": batch_size}
            rates = {v.name: updates / v.seconds for v in variants if v.error is None}
            ref_rate, ours_rate = rates.get("reference"), rates.get("ours")
            if ref_rate is not None and ours_rate is not None:
                results.append({**row, "updates_per_s": ours_rate})
                reference.append({**row, "updates_per_s": ref_rate})
            for variant in variants:
                entry: dict[str, Any] = {**row, "variant": variant.name, "options": variant.options}
                if variant.error is not None:
                    entry["error"] = variant.error
                else:
                    measured = rates[variant.name]
                    entry["updates_per_s"] = measured
                    entry["vs_reference"] = measured / ref_rate if ref_rate else None
                    entry["vs_ours"] = measured / ours_rate if ours_rate else None
                rows.append(entry)
            rows += [{**row, **entry} for entry in skipped]
            if ref_rate is not None and ours_rate is not None:
                progress(
                    f"{encoder:>8} batch {batch_size:>4}: ours {ours_rate:7.2f} updates/s, "
                    f"reference {ref_rate:7.2f} updates/s, ratio {ours_rate / ref_rate:.3f}"
                )
            del variants
    largest = max(batch_sizes)
    if "separate" in encoders:
        config = LearnerConfig(encoder="separate", batch_size=largest, random_shift_pad=4)
        aug = _deferred_step(TD3Learner(config, device=dev), fetch_every)
        batches = synthetic_batches(largest, count=4, seed=largest)
        _timed(aug, batches, warmup, dev)
        seconds = _timed(aug, batches, updates, dev)
        augmentation.append(
            {
                "encoder": "separate",
                "batch_size": largest,
                "random_shift_pad": 4,
                "updates_per_s": updates / seconds,
            }
        )
        progress(
            f"separate batch {largest:>4} + random shift pad 4: {updates / seconds:7.2f} updates/s"
        )

    def rate(found: list[dict[str, Any]], encoder: str) -> float | None:
        for r in found:
            if r["encoder"] == encoder and r["batch_size"] == largest:
                return float(r["updates_per_s"])
        return None

    headline = "separate" if "separate" in encoders else encoders[0]
    ours_rate, ref_rate = rate(results, headline), rate(reference, headline)
    report = {
        "benchmark": "learner",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(dev),
        "results": results,
        "reference_updates_per_s": reference,
        "overhead_ratio": (ours_rate / ref_rate) if ours_rate and ref_rate else None,
        "variants": rows,
        "augmentation": augmentation,
        "settings": {
            "updates": updates,
            "warmup": warmup,
            "rounds": rounds,
            "fetch_every": fetch_every,
            "options": list(options),
            "random_shift_pad": 0,
            "defaults": LearnerConfig().model_dump(mode="json"),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "torch_threads": threads,
            "cuda_device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if dev.type == "cuda" else None,
            "matmul_allow_tf32": (
                torch.backends.cuda.matmul.allow_tf32 if dev.type == "cuda" else None
            ),
        },
    }
    for line in format_table(report).splitlines():
        progress(line)
    return report


def format_table(report: Mapping[str, Any]) -> str:
    """The ``variants`` of a report as an aligned text table: encoder, batch,
    variant, updates/s, × reference, × ours (or why a row has no figure)."""
    rows: Sequence[Mapping[str, Any]] = report["variants"]
    lines = [
        f"{'encoder':>8} {'batch':>5}  {'variant':<24} {'updates/s':>10} "
        f"{'x reference':>11} {'x ours':>7}"
    ]
    for r in rows:
        lead = f"{r['encoder']:>8} {r['batch_size']:>5}  {r['variant']:<24}"
        if "updates_per_s" in r:
            vs_ref = "-" if r["vs_reference"] is None else f"{r['vs_reference']:.3f}"
            vs_ours = "-" if r["vs_ours"] is None else f"{r['vs_ours']:.3f}"
            lines.append(f"{lead} {r['updates_per_s']:>10.2f} {vs_ref:>11} {vs_ours:>7}")
        else:
            why = r.get("skipped") or r.get("error")
            lines.append(f"{lead} {'skipped' if 'skipped' in r else 'error'}: {why}")
    return "\n".join(lines)
