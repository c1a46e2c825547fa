"""The class a job's Ray Data generation stage names: a `GenerationActor` built in the actor's own process.

Ray Data pickles the callable class of `map_batches` by reference, so the driver has to import the class's
module. `actors.generation` imports torch, transformers and the engine: about 8 s on two cores, before the
driver could even start Ray. This module imports none of them; the actor process imports the engine when Ray
Data constructs the stage there, which it had to do anyway.
"""

from __future__ import annotations

from typing import Any


class GenerationStage:
    """Ray Data's callable class for generation: `GenerationActor(*args, **kwargs)`, one per actor process, whose
    `__call__` it forwards."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from actors.generation import GenerationActor

        self.actor = GenerationActor(*args, **kwargs)

    def __call__(self, table):
        return self.actor(table)
