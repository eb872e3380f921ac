"""Metric names, defined once (STYLE.md §8).

Keys are namespaced ``area/name``; the Prometheus exporter maps ``area/name``
to ``td3drive_area_name`` and appends units where the name carries one. Every
producer and consumer of a metric imports its name from here.
"""

from __future__ import annotations

# Learner: losses and values, per update.
CRITIC_LOSS = "losses/critic"
"""Sum of the two critics' mean squared TD errors (importance-weighted under PER)."""
ACTOR_LOSS = "losses/actor"
"""-mean Q1(critic features, actor action); present only on actor-update steps."""
Q1_MEAN = "values/q1_mean"
Q2_MEAN = "values/q2_mean"
TARGET_Q_MEAN = "values/target_q_mean"
"""Mean TD target r + discount · min(Q1', Q2')."""

ACTOR_SATURATION = "policy/actor_saturation"
"""Share of the actor step's action components with ``|a| > 0.99``: the tanh
output is saturated there and passes almost no gradient. Near 1 the actor is
stuck at the action bounds (docs/benchmarks.md, "Actor saturation")."""
ACTOR_SATURATION_THRESHOLD = 0.99

# Gradient norms (global L2 over the network incl. its encoder).
ACTOR_GRAD_NORM_PRECLIP = "grads/actor_norm_preclip"
"""The value clip_grad_norm_ returns: the norm before clipping."""
ACTOR_GRAD_NORM_POSTCLIP = "grads/actor_norm_postclip"
CRITIC_GRAD_NORM_PRECLIP = "grads/critic_norm_preclip"
CRITIC_GRAD_NORM_POSTCLIP = "grads/critic_norm_postclip"

# Encoder learning: ||w - w0|| / ||w0|| over all encoder parameters.
ACTOR_ENCODER_WEIGHT_DELTA = "encoders/actor_weight_delta"
CRITIC_ENCODER_WEIGHT_DELTA = "encoders/critic_weight_delta"

# Optimiser state.
ACTOR_LR = "optim/actor_lr"
CRITIC_LR = "optim/critic_lr"
ENCODER_LR = "optim/encoder_lr"

# Counters.
LEARNER_UPDATES = "learner/updates"
ACTOR_UPDATED = "learner/actor_updated"
"""1.0 on updates that stepped the actor and the targets (every policy_delay-th), else 0.0."""
PRIORITY_UPDATES = "replay/priority_updates"
"""Batches whose per-sample TD errors the learner sent to the replay shards as new
priorities (prioritized replay only; absent otherwise)."""
