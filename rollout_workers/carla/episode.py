"""Reward and termination of one CARLA episode, step by step.

* :class:`EpisodeScorer`: counts steps and stuck steps, applies the driving
  task's end rules and reward, and keeps the episode's metrics.

The rules themselves live in :mod:`rollout_workers.driving_task`, shared with
every simulator; this is only the per-episode state they need.
"""

from __future__ import annotations

import numpy as np

from rollout_workers import driving_task
from td3drive.contracts import spec
from td3drive.contracts.config import DrivingTaskConfig


class EpisodeScorer:
    """The bookkeeping of one episode: a new one per episode.

    Args:
        task_config: the driving task (stuck speed, time limit, reward weights).

    Attributes:
        steps: steps taken so far.
        stuck_steps: consecutive steps below ``stuck_speed_mps`` so far.
        previous_action: ``float32[2]``, the last action (zeros at the start;
            the comfort term compares against it).
        tracker: the episode's :class:`driving_task.EpisodeTracker`.
    """

    def __init__(self, task_config: DrivingTaskConfig) -> None:
        self.task_config = task_config
        self.tracker = driving_task.EpisodeTracker()
        self.previous_action = np.zeros(spec.ACTION_SHAPE, np.float32)
        self.steps = 0
        self.stuck_steps = 0

    def score(
        self, state: driving_task.DrivingState, action: np.ndarray
    ) -> tuple[driving_task.RewardBreakdown, driving_task.EpisodeEnd]:
        """Count one step with ``state`` reached by ``action`` (``float32[2]``, in
        ``[−1, 1]``): :func:`driving_task.check_episode_end`, then
        :func:`driving_task.step_reward`, recorded in :attr:`tracker`.

        Returns:
            ``(reward, end)``.
        """
        self.steps += 1
        self.stuck_steps = (
            self.stuck_steps + 1 if state.speed < self.task_config.stuck_speed_mps else 0
        )
        end = driving_task.check_episode_end(state, self.steps, self.stuck_steps, self.task_config)
        reward = driving_task.step_reward(
            state, action, self.previous_action, self.task_config, end
        )
        self.previous_action = action
        self.tracker.record(state, reward, end)
        return reward, end
