"""The discrete action set of tree-shape controllers: an immutable, validated list of TreeParams.

Validated once at construction (each entry a TreeParams, at least one, no duplicates), so that controllers can
return `actions[i]` on the hot path without checks. It does not decide anything; see `controllers.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from engine.types import TreeParams


class ActionSet:
    """An ordered tuple of distinct TreeParams. `actions[i]` is action i; `actions.index(params)` its inverse.

    Example: ActionSet.parse(["3/2/1", "8/4/2"]).index(TreeParams(8, 4, 2)) == 1
    """

    __slots__ = ("_params", "_index")

    def __init__(self, params: Iterable[TreeParams]) -> None:
        items = tuple(params)
        if not items:
            raise ValueError("an ActionSet needs at least one TreeParams")
        for item in items:
            if not isinstance(item, TreeParams):
                raise ValueError(f"ActionSet entries must be TreeParams, got {item!r}")
        index = {p: i for i, p in enumerate(items)}
        if len(index) != len(items):
            duplicates = sorted({p.compact for p in items if items.count(p) > 1})
            raise ValueError(f"ActionSet has duplicate TreeParams: {duplicates}")
        object.__setattr__(self, "_params", items)
        object.__setattr__(self, "_index", index)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("ActionSet is immutable")

    @classmethod
    def parse(cls, texts: Iterable[str]) -> ActionSet:
        """From compact strings such as '8/4/2' (total_tokens/depth/top_k)."""
        return cls(TreeParams.parse(t) for t in texts)

    def index(self, params: TreeParams) -> int:
        """Position of `params`; ValueError if it is not an action."""
        try:
            return self._index[params]
        except KeyError:
            raise ValueError(
                f"{params.compact if isinstance(params, TreeParams) else params!r} is not in the action set "
                f"{self.compact}"
            ) from None

    def __contains__(self, params: object) -> bool:
        return params in self._index

    def __len__(self) -> int:
        return len(self._params)

    def __getitem__(self, i: int) -> TreeParams:
        return self._params[i]

    def __iter__(self) -> Iterator[TreeParams]:
        return iter(self._params)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActionSet) and self._params == other._params

    def __hash__(self) -> int:
        return hash(self._params)

    def __repr__(self) -> str:
        return f"ActionSet({self.compact})"

    @property
    def compact(self) -> list[str]:
        return [p.compact for p in self._params]


# Chains (top_k=1) and small trees suit CPUs, where verify cost grows with width (SmolLM2-135M on 2 cores: one
# target forward of 1, 8, 16, 32 tokens takes 39, 56, 69, 96 ms); the last three are GPU-sized (a GPU verifies
# ~60 tokens for the price of one), and the official EAGLE-2 default 60/5/10 is among them. 16/15/1 serves the
# steps where the answer copies a long stretch of the prompt, which a small chat model often does.
DEFAULT_ACTIONS = ActionSet.parse(
    [
        "2/1/1",
        "3/2/1",
        "4/3/1",
        "5/4/1",
        "6/5/1",
        "8/7/1",
        "10/9/1",
        "16/15/1",
        "6/3/2",
        "8/4/2",
        "10/5/2",
        "12/5/3",
        "16/5/4",
        "24/6/4",
        "32/6/8",
        "60/5/10",
    ]
)
