"""Typed, validated run configuration (DESIGN.md §6).

One frozen pydantic model per component, one field per knob, each with a
description that gives its unit or range. Unknown keys and wrong types are
errors that name the field. The YAML files in ``deploy/`` carry the evidence
for their values in comments.

Only the learner section exists so far; the replay, rollout and driver
sections join it as those services land.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

EncoderMode = Literal["separate", "shared", "frozen"]
CnnVariant = Literal["nature", "pooled"]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LearnerConfig(_Section):
    """TD3 learner hyperparameters (Fujimoto et al. 2018, "Addressing Function
    Approximation Error in Actor-Critic Methods", Algorithm 1).

    Pixel-specific defaults follow DrQ-v2 (Yarats et al. 2021): lr 1e-4,
    batch 256, random-shift augmentation with pad 4. They are provisional until
    the learning benchmark chooses them.
    """

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Torch device; 'auto' takes CUDA when available, else the CPU."
    )
    encoder: EncoderMode = Field(
        "separate",
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

    @model_validator(mode="after")
    def _check_combinations(self) -> LearnerConfig:
        if self.encoder == "frozen" and self.encoder_lr is not None:
            raise ValueError("encoder_lr has no effect with encoder='frozen'; remove it")
        return self


class TD3DriveConfig(_Section):
    """The whole run configuration, as one YAML file describes it."""

    learner: LearnerConfig = Field(default_factory=LearnerConfig)


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
    for item in overrides:
        _apply_override(raw, item)
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
