"""Tree-parameter controllers (static, heuristic, learned), their observations, the RL update, caches, adaptive
decision frequency, and stats. Never imports ray; from the engine only engine.types."""
