"""Batch in, batch out: batched speculative decoding with continuous batching.

`generate_batch` takes a list of `GenerationRequest`s and returns one `RequestResult` per request, in order. Up
to `max_batch_size` rows decode together: every step drafts their trees in one batched pass of the draft head
(`engine.batch_draft`) and verifies them in one target forward [B, N+1] with per-row tree masks and positions.
Rows accept different lengths; the shared KV cache keeps each row exact with a per-slot validity mask
(`engine.slots`). Finished rows leave and queued requests join at step boundaries: a newcomer is prefilled on
its own, then merged, so a long row never leaves the batch idle.

One tree shape serves a step. A `BatchPlanner` chooses it for the load, and may choose plain decoding (no
draft). Without a planner the first row's controller chooses for everyone (a static tree, say), as in
`engine.generate`; a controller may also return None for a plain step.

Retrieved branches: a request with `proposals` (`engine.suffix.RowProposals`) offers, before each step, what
followed its context's suffix in text seen before (its prompt, earlier outputs). A `BranchPlanner` decides how
many of those tokens a row may verify (without one, up to DEFAULT_BRANCH_TOKENS) and scores them; the step
verifies 1 + max(tree nodes, branch tokens) nodes per row, each row's best by score from its draft tree and
its branch together (`engine.tree.merge_branch`), so a row whose branch looks wrong spends the width on its
EAGLE nodes and one whose branch looks right on the branch.

Exactness: greedy rows equal plain greedy decoding token for token. Sampled rows draw with keyed noise
(`engine.verify.keyed_choices`): each token is an exact sample of the target distribution, fixed by the row's
seed and position, so a row's text never depends on its batch neighbours or on the trees chosen, and equals
`generate_plain(..., noise_seed=seed)`.

A request that fails (a prompt too long for the context, a bad parameter, a stop check that raises, a deadline)
gets its error in its own result and the others go on. Token ids only: no text here.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.batch_draft import BatchDraftCache, BatchDrafter
from engine.draft import PendingDraftInput
from engine.draft_head import DraftHead
from engine.generate import (
    StopCheck,
    StopRules,
    append_tokens,
    apply_stop_check,
    prepare,
)
from engine.slots import SlotCache
from engine.step import step_timer
from engine.suffix import Match, RowProposals
from engine.target import TargetModel
from engine.tree import DraftTree, chain_tree, merge_branch
from engine.types import (
    BatchPlanner,
    BatchState,
    BatchStepStats,
    Controller,
    DecodingState,
    DraftConfidence,
    GenerationOutput,
    SamplingParams,
    StepStats,
    TreeParams,
)
from engine.verify import VerifyResult, keyed_choices, verify_choices

DEFAULT_MAX_BATCH_SIZE = 16
# Compact a cache once compaction would cut this share of its length: holes cost attention work and every
# forward's cache copy, a compaction costs one copy.
COMPACT_SHARE = 0.2
NO_CONFIDENCE = DraftConfidence(0.0, 0.0, 0.0, 0.0)
MAX_BRANCH_TOKENS = 16  # the longest retrieved branch a row offers
DEFAULT_BRANCH_TOKENS = 8  # branch tokens per row without a BranchPlanner
DEFAULT_BRANCH_ALPHA = 0.5  # without a BranchPlanner: the chance each branch token is right given the last


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to continue.

    controller: the tree policy for this request (wrap a fixed TreeParams in `StaticController`); without a
        planner, the first row's controller decides each step (see the module docstring).
    seed: keys the row's sampling noise (ignored when greedy), so a row's sample depends on its seed and
        nothing else. Noise is drawn on the target's device: a seed's text is reproducible per device type.
    timeout_s: if given, the request fails with a GenerationTimeout once it has run this long since it joined
        the batch (checked between steps; the time its neighbours' prefills take counts too).
    time_steps: whether the steps' StepStats carry draft and verify seconds (None: on the CPU only).
    eos_token_ids: the tokens that end this generation; None: the target config's eos_token_id.
    stop_check: the caller's own stop rule on the new tokens (`engine.generate.StopCheck`), e.g. stop strings.
    proposals: retrieved branches for this row (`engine.suffix.RowProposals`); told the row's full sequence
        when it finishes. None: EAGLE drafts only.
    """

    prompt_ids: list[int]
    max_new_tokens: int
    controller: Controller
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    timeout_s: float | None = None
    time_steps: bool | None = None
    eos_token_ids: tuple[int, ...] | None = None
    stop_check: StopCheck | None = None
    proposals: RowProposals | None = None


class PlainController:
    """A controller for `generate_batch` that asks for plain decoding (no draft) on every step."""

    def decide(self, state: DecodingState) -> None:
        return None

    def observe(self, stats: StepStats) -> None:
        return None

    def finish(self, num_new_tokens: int, wall_seconds: float) -> None:
        return None


@dataclass(frozen=True)
class RequestResult:
    """Exactly one of `output` and `error` is set. `error` reads 'ErrorType: message'."""

    output: GenerationOutput | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        assert (self.output is None) != (self.error is None), "a result holds an output or an error, not both"


@dataclass
class _Row:
    """One request while it decodes: its sequence so far, what the draft head has not read, its steps."""

    index: int
    request: GenerationRequest
    rules: StopRules
    output: list[int]
    prompt_length: int
    pending: PendingDraftInput
    started: float
    deadline: float | None
    steps: list[StepStats] = field(default_factory=list)
    finish: str | None = None

    @property
    def context_length(self) -> int:
        return len(self.output)

    def tokens_left(self) -> int:
        return self.rules.tokens_left(len(self.output), self.prompt_length)

    def result(self) -> RequestResult:
        output = GenerationOutput(
            output_ids=torch.tensor([self.output]),
            num_prompt_tokens=self.prompt_length,
            num_new_tokens=len(self.output) - self.prompt_length,
            steps=self.steps,
            finish_reason=self.finish or "length",
            wall_seconds=time.perf_counter() - self.started,
        )
        self.request.controller.finish(output.num_new_tokens, output.wall_seconds)
        if self.request.proposals is not None:
            try:
                self.request.proposals.finish(self.output)
            except Exception:  # sharing an output is an optimisation: a failure costs only later speed
                pass
        return RequestResult(output=output)


@dataclass
class _Batch:
    """The rows decoding together, their target KV cache and their draft cache, row for row."""

    rows: list[_Row]
    cache: object  # the target's DynamicCache, batch dimension = rows
    slots: SlotCache
    draft: BatchDraftCache


class BatchEngine:
    """Continuous batching over one target and draft head: `submit` requests, `step` until `idle`.

    The engine is single-threaded; callers that feed it from several threads serialise their calls."""

    def __init__(
        self,
        target: TargetModel,
        head: DraftHead,
        max_length: int | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        planner: BatchPlanner | None = None,
        before_request: Callable[[int, GenerationRequest], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.target, self.head = target.for_head(head), head
        self.drafter = BatchDrafter(head, target.lm_head)
        self.max_length, self.max_batch_size = max_length, max_batch_size
        self.planner, self.before_request = planner, before_request
        self.queue: deque[tuple[int, GenerationRequest]] = deque()
        self.batch: _Batch | None = None
        self.results: dict[int, RequestResult] = {}
        self.num_steps = 0
        self.planner_failures = 0
        self.proposal_failures = 0  # look-ups of retrieved branches that raised (the row drafted without one)

    @property
    def idle(self) -> bool:
        return not self.queue and self.batch is None

    @property
    def num_active(self) -> int:
        return 0 if self.batch is None else len(self.batch.rows)

    def submit(self, index: int, request: GenerationRequest) -> None:
        """Queue a request; its result appears in `results[index]` once it finishes or fails."""
        self.queue.append((index, request))

    def run(self) -> None:
        """Step until every submitted request has a result (an exception inside a step fails the rows then in
        flight, with its message, and the rest go on)."""
        while not self.idle:
            try:
                self.step()
            except Exception as error:
                self.fail_all(f"{type(error).__name__}: {error}")

    def fail_all(self, error: str) -> None:
        """Give every row in flight `error` as its result and drop the batch (after an exception inside a step,
        when the caches can no longer be trusted); queued requests start afresh at the next step."""
        for row in [] if self.batch is None else self.batch.rows:
            self.results.setdefault(row.index, RequestResult(error=error))
        self.batch = None

    # ---- one step boundary: admit, step, retire -------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        self._admit()
        if self.batch is None:
            return
        self._expire()
        if self.batch is None:
            return
        rows = self.batch.rows
        offers = self._offers(rows)
        params, budget, decided_by = self._decide(rows, offers)
        capped = None if params is None else params.capped(max(row.tokens_left() for row in rows))
        branches = [
            () if offer is None else offer.tokens[: min(budget, row.tokens_left() - 1)]
            for row, offer in zip(rows, offers, strict=True)
        ]
        budget = max(len(branch) for branch in branches)
        wanted = {row.request.time_steps for row in rows}  # time when a row asks, or leaves it to the device
        timer = step_timer(self.target.device, True if True in wanted else None if None in wanted else False)
        started = timer.mark() if timer else 0.0
        branch_nodes: list[list[int]] = [[] for _ in rows]
        tree_nodes = 1 if capped is None else capped.total_tokens + 1
        from_tree = [[True] * tree_nodes for _ in rows]
        if capped is None and budget == 0:
            verified, confidences, drafted_at = self._plain_step(), [NO_CONFIDENCE] * len(rows), started
        else:
            if capped is None:  # only the retrieved branches: nothing to draft
                trees, confidences = [chain_tree(row.pending.token_ids[0, -1].item()) for row in rows], None
            else:
                drafts = self.drafter.draft(self.batch.draft, [row.pending for row in rows], capped)
                trees, confidences = [draft.tree for draft in drafts], [draft.confidence for draft in drafts]
            drafted_at = timer.mark() if timer else 0.0
            if budget:
                size = max(tree_nodes, budget + 1)
                merged = [
                    merge_branch(tree, list(branch), self._branch_scores(offer, len(branch)), size)
                    for tree, branch, offer in zip(trees, branches, offers, strict=True)
                ]
                trees = [tree for tree, _, _ in merged]
                branch_nodes = [nodes for _, nodes, _ in merged]
                from_tree = [origins for _, _, origins in merged]
            verified = self._verify(trees, drafted=capped is not None)
            confidences = confidences or [NO_CONFIDENCE] * len(rows)
        finished = timer.mark() if timer else 0.0
        draft_seconds = timer.seconds(started, drafted_at) if timer else 0.0
        verify_seconds = timer.seconds(drafted_at, finished) if timer else 0.0
        emitted, tree_accepted, branch_results = [], [], []
        for b, (row, result, confidence) in enumerate(zip(rows, verified, confidences, strict=True)):
            before = len(row.output)
            retrieved = _leading_matches(branch_nodes[b], result.accepted_nodes[1:])
            path = result.accepted_nodes[1:]
            tree_accepted.append(_leading_matches([n for n in path if from_tree[b][n]], path))
            offer, verified_branch = offers[b], len(branch_nodes[b])  # the branch tokens the merge kept
            branch_results.append(
                (verified_branch, offer.match_length, retrieved, offer.source)
                if offer is not None and verified_branch
                else None
            )
            try:
                finish = append_tokens(
                    row.output,
                    [*result.accepted_token_ids, result.bonus_token_id],
                    row.rules,
                    row.prompt_length,
                )
                row.finish = apply_stop_check(row.output, row.prompt_length, finish, row.request.stop_check)
            except Exception as error:  # a stop check that raises fails its row alone
                self.results[row.index] = RequestResult(error=f"{type(error).__name__}: {error}")
                row.finish = "error"
            stats = StepStats(
                step_index=len(row.steps),
                tree_params=params,
                accepted_length=result.accepted_length,
                num_emitted=len(row.output) - before,
                draft_seconds=draft_seconds,
                verify_seconds=verify_seconds,
                confidence=confidence,
                context_length=before,
                retrieved_proposed=verified_branch,
                retrieved_accepted=retrieved,
                retrieved_source=offer.source if offer is not None and verified_branch else None,
            )
            row.steps.append(stats)
            emitted.append(stats.num_emitted)
            if row is decided_by:
                row.request.controller.observe(stats)
        if self.planner is not None and decided_by is self.planner:
            self.planner.observe(
                BatchStepStats(
                    step_index=self.num_steps,
                    tree_params=capped,
                    accepted_lengths=tuple(tree_accepted),
                    num_emitted=tuple(emitted),
                    draft_seconds=draft_seconds,
                    verify_seconds=verify_seconds,
                    context_lengths=tuple(len(row.output) - n for row, n in zip(rows, emitted, strict=True)),
                    branch_tokens=budget,
                    branches=tuple(branch_results),
                )
            )
        self.num_steps += 1
        self._retire()

    def _offers(self, rows: list[_Row]) -> list[Match | None]:
        """Each row's retrieved branch on offer (None: the row has no proposals, no match, or no room)."""
        offers: list[Match | None] = []
        for row in rows:
            offer = None
            if row.request.proposals is not None and row.tokens_left() > 1:
                try:
                    offer = row.request.proposals.match(row.output, MAX_BRANCH_TOKENS)
                except Exception:  # a failing look-up costs this step's branch, never the row
                    self.proposal_failures += 1
            offers.append(offer)
        return offers

    def _branch_scores(self, offer: Match | None, length: int) -> list[float]:
        """Estimated log chance that a branch is right up to each of its tokens: the planner's, or a fixed
        DEFAULT_BRANCH_ALPHA per token."""
        if offer is None or not length:
            return []
        if self.planner is not None and hasattr(self.planner, "branch_scores"):
            return self.planner.branch_scores(offer.match_length, length, offer.source)
        return [math.log(DEFAULT_BRANCH_ALPHA) * (i + 1) for i in range(length)]

    def _decide(
        self, rows: list[_Row], offers: list[Match | None]
    ) -> tuple[TreeParams | None, int, _Row | BatchPlanner | None]:
        """The step's tree, its branch tokens per row, and who chose: the planner, a row (its own controller),
        or None (a plain step after the planner failed)."""
        has_offers = any(offer is not None for offer in offers)
        if self.planner is not None:
            state = BatchState(
                self.num_steps,
                len(rows),
                tuple(row.context_length for row in rows),
                len(self.queue),
                tuple(
                    None if offer is None else (len(offer.tokens), offer.match_length, offer.source)
                    for offer in offers
                ),
            )
            try:
                if has_offers and hasattr(self.planner, "plan"):
                    params, budget = self.planner.plan(state)  # a BranchPlanner
                    return params, budget, self.planner
                return self.planner.decide(state), 0, self.planner
            except Exception:  # a planner that fails costs speed, never rows: this step decodes plainly
                self.planner_failures += 1
                return None, 0, None
        row = rows[0]
        state = DecodingState(
            len(row.steps),
            row.prompt_length,
            len(row.output) - row.prompt_length,
            len(row.output),
            row.steps[-1] if row.steps else None,
            row.output,
        )
        return row.request.controller.decide(state), DEFAULT_BRANCH_TOKENS if has_offers else 0, row

    # ---- joining and leaving -----------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Prefill queued requests while the batch has room, then merge them into it in one copy."""
        newcomers: list[tuple[_Row, object, SlotCache, BatchDraftCache]] = []
        while self.queue and self.num_active + len(newcomers) < self.max_batch_size:
            index, request = self.queue.popleft()
            try:
                joined = self._prefill(index, request)
            except Exception as error:  # one request's failure is that request's result; the batch goes on
                self.results[index] = RequestResult(error=f"{type(error).__name__}: {error}")
                continue
            if joined is not None:
                newcomers.append(joined)
        if not newcomers:
            return
        if self.batch is None:
            row, cache, slots, draft = newcomers.pop(0)
            self.batch = _Batch([row], cache, slots, draft)
        if newcomers:
            self.batch.slots.append_rows([slots for _, _, slots, _ in newcomers])
            self.batch.draft.slots.append_rows([draft.slots for _, _, _, draft in newcomers])
            self.batch.rows.extend(row for row, _, _, _ in newcomers)

    def _prefill(self, index: int, request: GenerationRequest):
        """Run one prompt alone; None when its first token already ends it (its result is then recorded)."""
        started = time.perf_counter()
        deadline = None if request.timeout_s is None else started + request.timeout_s
        if self.before_request is not None:
            self.before_request(index, request)
        ids, rules = prepare(
            self.target,
            request.prompt_ids,
            request.max_new_tokens,
            self.max_length,
            None if request.eos_token_ids is None else list(request.eos_token_ids),
            None,
        )
        prompt_length = ids.shape[1]
        output = ids[0].tolist()
        row = _Row(index, request, rules, output, prompt_length, None, started, deadline)  # type: ignore[arg-type]
        if request.max_new_tokens == 0:
            self.results[index] = row.result()
            return None
        cache = self.target.new_cache()
        prefill = self.target.prefill(ids, cache)
        first = int(keyed_choices(prefill.logits[0], request.sampling, request.seed, [prompt_length])[0])
        finish = append_tokens(output, [first], rules, prompt_length)
        row.finish = apply_stop_check(output, prompt_length, finish, request.stop_check)
        if row.finish is not None:
            self.results[index] = row.result()
            return None
        device = self.target.device
        draft = BatchDraftCache.empty(self.head, device)
        if (
            prompt_length > 1
        ):  # the prompt's pairs now; the last (feature, first token) pair starts the first tree
            self.drafter.read(
                draft,
                [
                    PendingDraftInput(
                        prefill.features[:, :-1], torch.tensor([output[1:prompt_length]], device=device)
                    )
                ],
            )
        row.pending = PendingDraftInput(prefill.features[:, -1:], torch.tensor([[first]], device=device))
        slots = SlotCache(cache.layers, torch.ones(1, prompt_length, dtype=torch.bool, device=device))
        return row, cache, slots, draft

    def _expire(self) -> None:
        """Fail the rows past their deadline."""
        now = time.perf_counter()
        for row in self.batch.rows:
            if row.deadline is not None and now > row.deadline:
                self.results[row.index] = RequestResult(
                    error=f"GenerationTimeout: over the {row.request.timeout_s:g} s limit: stopped after "
                    f"{now - row.started:.1f} s and {len(row.output) - row.prompt_length} new tokens, past the "
                    "deadline"
                )
                row.finish = "error"
        self._retire()

    def _retire(self) -> None:
        """Record finished rows' results, drop them from the batch, and compact caches full of holes."""
        batch = self.batch
        keep = [i for i, row in enumerate(batch.rows) if row.finish is None]
        for row in batch.rows:
            if row.finish is not None and row.index not in self.results:
                self.results[row.index] = row.result()
        if not keep:
            self.batch = None
            return
        if len(keep) < len(batch.rows):
            batch.rows = [batch.rows[i] for i in keep]
            batch.slots.select_rows(keep)
            batch.draft.slots.select_rows(keep)
        for slots in (batch.slots, batch.draft.slots):
            if slots.removable_share > COMPACT_SHARE:
                slots.compact()

    # ---- the two kinds of step ------------------------------------------------------------------------------

    def _plain_step(self) -> list[VerifyResult]:
        """No draft: the target decodes one token per row. The draft head reads the new pairs later."""
        batch, device = self.batch, self.target.device
        roots = torch.stack([row.pending.token_ids[0, -1] for row in batch.rows])[:, None]  # [B, 1]
        offsets = torch.zeros(len(batch.rows), 1, dtype=torch.long, device=device)
        scored = self._forward(
            roots, offsets, torch.ones(len(batch.rows), 1, 1, dtype=torch.bool, device=device)
        )
        choices = self._choices(scored.logits, [[0]] * len(batch.rows))
        results = []
        for b, row in enumerate(batch.rows):
            bonus = int(choices[b, 0])
            row.pending = PendingDraftInput(
                torch.cat((row.pending.features, scored.features[b : b + 1, :1]), dim=1),
                torch.cat((row.pending.token_ids, torch.tensor([[bonus]], device=device)), dim=1),
            )
            results.append(VerifyResult([0], [], bonus))
        batch.slots.extend(torch.ones(len(batch.rows), 1, dtype=torch.bool, device=device))
        return results

    def _verify(self, trees: list[DraftTree], drafted: bool = True) -> list[VerifyResult]:
        """Score every row's tree in one forward, accept each row's longest agreeing path, keep it in the cache.
        drafted: the draft head read the rows' pending pairs for these trees (else the new pairs join them)."""
        batch, device = self.batch, self.target.device
        start = batch.slots.length
        tokens = torch.cat([tree.token_ids for tree in trees]).to(device)  # [B, N+1]
        depths = torch.stack([tree.depths for tree in trees]).to(device)
        ancestors = torch.stack([tree.ancestor_mask for tree in trees]).to(device)
        scored = self._forward(tokens, depths, ancestors)
        choices = self._choices(scored.logits, [tree.depths.tolist() for tree in trees])
        batch.slots.extend(torch.ones(tokens.shape, dtype=torch.bool, device=device))
        results = [verify_choices(tree, choices[b]) for b, tree in enumerate(trees)]
        batch.slots.keep_tree(start, [result.accepted_nodes for result in results])
        for b, (row, result) in enumerate(zip(batch.rows, results, strict=True)):
            accepted = torch.tensor(result.accepted_nodes, device=device)
            features = scored.features[b : b + 1, accepted]
            tokens = torch.tensor([[*result.accepted_token_ids, result.bonus_token_id]], device=device)
            if not drafted:
                features = torch.cat((row.pending.features, features), dim=1)
                tokens = torch.cat((row.pending.token_ids, tokens), dim=1)
            row.pending = PendingDraftInput(features, tokens)
        return results

    def _forward(self, tokens: torch.Tensor, depths: torch.Tensor, ancestors: torch.Tensor):
        """The target on new tokens [B, Q] at depth offsets [B, Q] with visibility [B, Q, Q] among them."""
        slots, dtype = self.batch.slots, self.target.dtype
        prefix = slots.prefix_mask(dtype).expand(-1, -1, tokens.shape[1], -1)
        new = torch.zeros(ancestors.shape, dtype=dtype, device=tokens.device)
        new.masked_fill_(~ancestors, torch.finfo(dtype).min)
        mask = torch.cat((prefix, new[:, None]), dim=-1)  # [B, 1, Q, L + Q]
        return self.target.forward_tree(tokens, slots.positions(depths), mask, self.batch.cache)

    def _choices(self, logits: torch.Tensor, depths: list[list[int]]) -> torch.Tensor:
        """The target's token after every node [B, Q], on the host: argmax for greedy rows, keyed samples else."""
        choices = logits.argmax(-1)  # [B, Q]
        for b, row in enumerate(self.batch.rows):
            sampling = row.request.sampling
            if not sampling.is_greedy:
                positions = [len(row.output) + d for d in depths[b]]
                choices[b] = keyed_choices(logits[b], sampling, row.request.seed, positions)
        return choices.cpu()


def _leading_matches(branch_nodes: list[int], accepted_nodes: list[int]) -> int:
    """How many of a branch's nodes (root first excluded) begin the accepted path."""
    count = 0
    for branch_node, accepted_node in zip(branch_nodes, accepted_nodes, strict=False):
        if branch_node != accepted_node:
            break
        count += 1
    return count


def generate_batch(
    target: TargetModel,
    head: DraftHead,
    requests: list[GenerationRequest],
    max_length: int | None = None,
    before_request: Callable[[int, GenerationRequest], None] | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    planner: BatchPlanner | None = None,
) -> list[RequestResult]:
    """Generate every request, up to `max_batch_size` rows at a time; a failing request yields a RequestResult
    with its error, never an exception.

    before_request(index, request) runs as each request joins (a hook for callers and tests; it may raise, and
    that request then fails alone). planner: chooses every step's tree (None: the first row's controller)."""
    engine = BatchEngine(target, head, max_length, max_batch_size, planner, before_request)
    for index, request in enumerate(requests):
        engine.submit(index, request)
    engine.run()
    return [engine.results[index] for index in range(len(requests))]
