"""Linear contextual bandit (disjoint linear Thompson sampling / LinUCB) over a discrete action set.

Why a contextual bandit and not full RL. The reward of a draft/verify step — tokens gained per second of step
time — is observed right after the step, and the tree choice barely changes the future context distribution:
the generated text is identical whatever tree is used (verification is lossless), so the next contexts do not
depend on the action. Only the acceptance history features depend on it, weakly. The credit-assignment problem
that full RL (value bootstrapping over trajectories) solves is therefore absent; a bandit that regresses the
immediate reward on the context is the correct and far more sample-efficient formulation.

Model. For each action a, ridge regression of the reward on the features x [d]:
    A_a = lambda I + sum x x^T  [d, d],   b_a = sum r x  [d],   theta_a = A_a^-1 b_a.
A_a^-1 is kept up to date with the Sherman–Morrison identity, so an update costs O(d^2) and no inversion.

Selection. Greedy: argmax_a theta_a . x, one [K, d] @ [d] product (a few microseconds for K=14, d=14).
Exploration (Thompson sampling): theta_a ~ N(theta_a, v^2 A_a^-1) implies theta_a . x ~ N(theta_a . x,
v^2 x^T A_a^-1 x), and the actions' posteriors are independent, so sampling one score per action from that
normal is exact Thompson sampling at LinUCB's cost. `algorithm="ucb"` uses mean + v * sd instead.

This module knows nothing about TreeParams or the engine: actions are indices 0..K-1.
"""

from __future__ import annotations

import numpy as np

ALGORITHMS = ("thompson", "ucb")


class LinearBandit:
    """Disjoint linear bandit with K actions and d features. Rewards should be O(1) (normalise them)."""

    def __init__(
        self,
        num_actions: int,
        num_features: int,
        ridge_lambda: float = 1.0,
        exploration: float = 0.5,
        algorithm: str = "thompson",
        seed: int = 0,
    ) -> None:
        if num_actions < 1 or num_features < 1:
            raise ValueError(
                f"need num_actions >= 1 and num_features >= 1, got {num_actions}, {num_features}"
            )
        if ridge_lambda <= 0:
            raise ValueError(f"ridge_lambda must be > 0, got {ridge_lambda}")
        if exploration < 0:
            raise ValueError(f"exploration must be >= 0, got {exploration}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        self.num_actions = num_actions
        self.num_features = num_features
        self.ridge_lambda = float(ridge_lambda)
        self.exploration = float(exploration)
        self.algorithm = algorithm
        self.rng = np.random.default_rng(seed)
        eye = np.eye(num_features) / self.ridge_lambda
        self.A_inv = np.repeat(eye[None], num_actions, axis=0)  # [K, d, d]
        self.b = np.zeros((num_actions, num_features))  # [K, d]
        self.theta = np.zeros((num_actions, num_features))  # [K, d]
        self.counts = np.zeros(num_actions, dtype=np.int64)  # [K] updates per action

    def expected_rewards(self, features: np.ndarray) -> np.ndarray:
        """Posterior mean reward of every action [K] for features [d]."""
        return self.theta @ features

    def select(self, features: np.ndarray, explore: bool) -> int:
        """Action index: greedy on the posterior mean, or a Thompson/UCB draw when `explore`."""
        scores = self.theta @ features  # [K]
        if explore and self.exploration > 0:
            x = features.astype(np.float64, copy=False)
            variance = np.einsum("i,kij,j->k", x, self.A_inv, x)  # [K] x^T A_a^-1 x
            spread = self.exploration * np.sqrt(np.maximum(variance, 0.0))
            if self.algorithm == "thompson":
                scores = scores + spread * self.rng.standard_normal(self.num_actions)
            else:
                scores = scores + spread
        return int(np.argmax(scores))

    def update(self, features: np.ndarray, action: int, reward: float) -> None:
        """Add one (features, action, reward) observation: Sherman–Morrison on A_a^-1, then theta_a."""
        if not 0 <= action < self.num_actions:
            raise ValueError(f"action {action} out of range 0..{self.num_actions - 1}")
        x = features.astype(np.float64, copy=False)
        a_inv = self.A_inv[action]
        a_inv_x = a_inv @ x  # [d]
        a_inv -= np.outer(a_inv_x, a_inv_x) / (1.0 + x @ a_inv_x)
        self.b[action] += reward * x
        self.theta[action] = a_inv @ self.b[action]
        self.counts[action] += 1

    # ---- persistence: plain arrays only (safetensors-ready), no pickle -------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        return {
            "A_inv": self.A_inv.copy(),
            "b": self.b.copy(),
            "theta": self.theta.copy(),
            "counts": self.counts.copy(),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore arrays from `state_dict`; ValueError naming the first missing or mis-shaped array."""
        k, d = self.num_actions, self.num_features
        shapes = {"A_inv": (k, d, d), "b": (k, d), "theta": (k, d), "counts": (k,)}
        for name, shape in shapes.items():
            if name not in state:
                raise ValueError(f"bandit state is missing {name!r}")
            got = tuple(np.shape(state[name]))
            if got != shape:
                raise ValueError(f"bandit state {name!r} has shape {got}, expected {shape} (K={k}, d={d})")
        self.A_inv = np.array(state["A_inv"], dtype=np.float64)
        self.b = np.array(state["b"], dtype=np.float64)
        self.theta = np.array(state["theta"], dtype=np.float64)
        self.counts = np.array(state["counts"], dtype=np.int64)

    def hyper_parameters(self) -> dict:
        return {
            "num_actions": self.num_actions,
            "num_features": self.num_features,
            "ridge_lambda": self.ridge_lambda,
            "exploration": self.exploration,
            "algorithm": self.algorithm,
        }
