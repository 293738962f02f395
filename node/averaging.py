"""Replicas of one stage train one model: every `average_every` local steps each replica averages
one fragment of its parameters with the others through hivemind's DecentralizedAverager (butterfly
all-reduce among the replicas found in the DHT), in the background: training never waits for a round
(ReplicaAverager). What a round carries, in how many bytes and within which timeouts, is
swarm/averaging_plan.py's arithmetic: parts and timeouts sized to the link.

Anchored rounds (Streaming DiLoCo's shared outer parameters): every replica keeps an anchor of its
parameters, the group's last result, identical on every replica, and a round averages each replica's
change since it in 2-bit blocks (protocol/averaging_codec.py); the result (the mean change) reaches
every replica as the same bytes, so the new anchor is again identical everywhere. What the 2 bits
lost of a replica's change stays in its parameters (error feedback: they end the round at the new
anchor plus that residual), so its next round sends it; nothing a replica learned is dropped.
Members publish a digest of each fragment's anchor with their proposal; when the group's digests of
the round's fragment differ (a replica restarted from its checkpoint, a partial round, a reducer's
result out of bounds), the round is full: the parameters themselves in 8-bit blocks, whose mean
becomes the anchor.

Robustness: hivemind 1.1.12 has no CenteredClip, so `RobustAverager` swaps the plain weighted
mean of each all-reduce part for swarm.robust's coordinate-wise CenteredClip:
  * the peer that reduces a part sees every replica's copy of that part (an all-gather per part),
    drops copies with NaN/inf, and clips each copy's pull to tau per coordinate and iteration, so
    one replica sending NaN, huge or sign-flipped parameters shifts the part by at most
    2*iters*tau/n (swarm.robust.influence_bound); peers' self-declared weights are ignored;
  * every replica receives the same reduced part from its reducer, as the same bytes, so replicas
    end a round at the same anchor (full rounds: equal; anchored: each plus its own residual);
  * a reducer could itself lie: a receiver applies at most (iters+1)*tau per coordinate of any
    result and ignores non-finite values (swarm.robust.bounded_update), so even a malicious
    reducer moves a stage by a bounded amount per round;
  * parts are split evenly among the group instead of by self-declared bandwidth, so one peer
    cannot claim every part.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import threading
import time
from concurrent.futures import InvalidStateError as FutureStateError
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.control import AveragingStage
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import deserialize_torch_tensor
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import amap_in_executor, as_aiter, azip

from node.group_keys import PacedGroupKeys
from node.lifeline import watch_parent
from node.metrics import AVERAGING_KINDS
from node.settings import AveragingSettings
from protocol import PROTOCOL_VERSION
from protocol.averaging_codec import ANCHORED, FULL, BlockCodec, bytes_per_value
from swarm.averaging_plan import (MAX_PART, MIN_PART, WINDOW_PARTS, Cadence, LinkRate, RoundLimits, fragment_count, mbit, round_limits,
                                  round_wire_bytes, split_fragments)
from swarm.robust import DEFAULT_ITERS, bounded_update, default_tau, robust_mean

log = logging.getLogger(__name__)

DEFAULT_TAU = default_tau(3e-3, 10)
WINDOW_POLL_S = 0.05  # how often a sender at its window looks for returned results


class RobustPartReducer(TensorPartReducer):
    """hivemind's TensorPartReducer, but each part is the CenteredClip of the senders' copies, encoded
    once in `codec`: `wire[part]` is what every sender gets back, and the part's result is its decoding."""

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, *, own_index: Optional[int],
                 tau: float, iters: int, codec: BlockCodec, keep_leftovers: bool = False):
        self.own_index, self.tau, self.iters, self.codec = own_index, tau, iters, codec
        self.contributions: dict[int, torch.Tensor] = {}
        self.wire: list = []
        # with error feedback: per part, what its encoding left out of the mean, times its contributors
        self.leftovers: Optional[dict[int, torch.Tensor]] = {} if keep_leftovers else None
        self.dropped = 0
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        self.contributions = {}
        super().reset_accumulators()

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        """As TensorPartReducer.accumulate_part, but keeps each sender's copy (weights ignored)."""
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            waiter = asyncio.create_task(self.finished.wait())
            await asyncio.wait({self.current_part_future, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        if tuple(tensor_part.shape) != tuple(self.part_shapes[part_index]):
            raise AllreduceException(f"sender {sender_index} sent part {part_index} of shape "
                                     f"{list(tensor_part.shape)}, expected {list(self.part_shapes[part_index])}")
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self.contributions[sender_index] = tensor_part.detach().float()
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            order = sorted(self.contributions)
            if order:
                own = order.index(self.own_index) if self.own_index in self.contributions else None
                result, dropped = robust_mean(torch.stack([self.contributions[i] for i in order]), self.tau,
                                              self.iters, own=own)
                self.dropped += dropped
            else:
                result = torch.zeros(self.part_shapes[self.current_part_index])
            result = torch.nan_to_num(result)
            self.wire.append(self.codec.compress(result, None))
            decoded = self.codec.extract(self.wire[-1])
            if self.leftovers is not None:
                self.leftovers[self.current_part_index] = (result - decoded) * len(order)
            self.current_part_future.set_result(decoded)
            self.reset_accumulators()


    def finalize(self):
        if self.dropped and not self.finished.is_set():
            log.warning("averaging: dropped %d non-finite part contribution(s) this round", self.dropped)
        super().finalize()


async def paced(messages, rate_Bps: float | None, returned=None, window: int = WINDOW_PARTS):
    """All-reduce messages for one reducer, each yielded once the tensor bytes before it fit `rate_Bps`
    (None: no pace) and, if `returned()` counts the results that reducer sent back, once fewer than
    `window` parts are out without theirs: what waits in the connection stays a few parts, whatever
    the link does meanwhile, so no write of the connection has to wait for a stalled TCP."""
    start, sent, count = time.monotonic(), 0, 0
    async for message in messages:
        if rate_Bps:
            await asyncio.sleep(max(0.0, start + sent / rate_Bps - time.monotonic()))
        while returned is not None and count - returned() >= window:
            await asyncio.sleep(WINDOW_POLL_S)
        sent, count = sent + len(message.tensor_part.buffer), count + 1
        yield message


class RobustAllReduceRunner(AllReduceRunner):
    """hivemind's all-reduce with RobustPartReducer, returning each part's mean itself (the same bytes
    to every sender) instead of each sender's delta from its own copy, and yielding the averaged
    tensors, not deltas (a part whose reducer failed: the sender's own values). It sends its parts at
    `send_Bps` (all reducers together), a few parts ahead of the results, instead of as fast as the
    connection takes them: a fragment pushed at once sits in TCP's send buffer of a busy link, and a
    write blocked 5-10 s makes libp2p's yamux close the connection, every stream on it, mid-round.

    With `error_feedback` (anchored rounds) and `feed_back(residuals)` called before the round runs:
    every part sent to another reducer is set, in place, to its decoding (a part is a view of the
    round's tensors, and an int2 decoding re-encodes to the same bytes), and the residual keeps what
    that lost; for each part this peer reduces, the residual keeps what encoding the mean lost, times
    the part's contributors (each applies the encoded mean, so that much of their sum would be lost).
    The group's parameters then sum to what they would with exact rounds."""

    def __init__(self, *, tau: float, iters: int, compression: BlockCodec, send_Bps: float | None = None,
                 error_feedback: bool = False, **kwargs):
        super().__init__(compression=compression, **kwargs)
        self.tensor_part_container.return_deltas = False  # a failed reducer's parts: our own values
        plain = self.tensor_part_reducer
        plain.finished.set()  # retire it quietly (its finalize would warn that it received nothing)
        own = self.sender_peer_ids.index(self.peer_id) if self.peer_id in self.sender_peer_ids else None
        self.tensor_part_reducer = RobustPartReducer(plain.part_shapes, plain.num_senders, own_index=own,
                                                     tau=tau, iters=iters, codec=compression,
                                                     keep_leftovers=error_feedback)
        reducers = sum(1 for p, f in zip(self.ordered_peer_ids, self.peer_fractions) if f > 0 and p != self.peer_id)
        self.per_reducer_Bps = send_Bps / max(reducers, 1) if send_Bps else None
        self.residual_parts: Optional[list[torch.Tensor]] = None  # the residual's view of each own part

    @torch.no_grad()
    def feed_back(self, residuals: Sequence[torch.Tensor]) -> None:
        """Round the parts for other reducers to what the wire carries, keeping the difference in
        `residuals` (zeros shaped like the round's tensors), and keep the residual's view of each of
        our own parts for the leftovers. The container's parts follow the tensors' order, peer after
        peer (hivemind cuts them so), which pairs them with views of the residuals cut to the same
        lengths."""
        container, own_index = self.tensor_part_container, self.ordered_peer_ids.index(self.peer_id)
        flat = (r.view(-1) for r in residuals)
        tensor, offset, own = next(flat, None), 0, []
        for peer_index, parts in enumerate(container._input_parts_by_peer):
            for part, info in parts:
                while tensor is not None and offset == tensor.numel() and part.numel():
                    tensor, offset = next(flat, None), 0
                residual = tensor[offset:offset + part.numel()]
                offset += part.numel()
                if peer_index == own_index:
                    own.append(residual)
                else:
                    residual.copy_(part)
                    part.copy_(container.compression.extract(container.compression.compress(part, info)))
                    residual.sub_(part)
        self.residual_parts = own

    def _results_from(self, peer_index: int) -> int:
        """Results (averaged parts) the reducer at `peer_index` has sent back so far (read from hivemind's
        container, which counts them in order)."""
        return self.tensor_part_container._outputs_registered_by_peer[peer_index]

    async def _communicate_with_peer(self, peer_id):
        """hivemind's; our own part's result is registered as the mean itself, as a remote reducer's is."""
        if peer_id != self.peer_id:
            return await super()._communicate_with_peer(peer_id)
        peer_index, sender_index = self.ordered_peer_ids.index(peer_id), self.sender_peer_ids.index(peer_id)
        for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
            mean = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, tensor_part,
                                                                  weight=self.weight)
            if self.residual_parts is not None:
                self.residual_parts[part_index].add_(self.tensor_part_reducer.leftovers.pop(part_index))
            self.tensor_part_container.register_processed_part(peer_index, part_index, mean)

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        """hivemind's, returning each part's encoded mean (RobustPartReducer.wire) instead of
        (mean - the sender's copy) encoded anew for each sender."""
        part_index = 0
        try:
            async for tensor_part, weight in amap_in_executor(
                    lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight), stream,
                    max_prefetch=self.tensor_part_container.prefetch):
                try:
                    await self.tensor_part_reducer.accumulate_part(sender_index, part_index, tensor_part, weight=weight)
                    part_index += 1
                except BannedException:
                    break  # banned meanwhile: nothing more of its is aggregated
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART,
                                                  tensor_part=self.tensor_part_reducer.wire[part_index - 1])
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])

    def _generate_input_for_peer(self, peer_index: int):
        # a peer whose results come only after it sent everything (hivemind's client mode) has no window
        windowed = not self.should_delay_results(self.peer_id)
        return paced(super()._generate_input_for_peer(peer_index), self.per_reducer_Bps,
                     (lambda: self._results_from(peer_index)) if windowed else None)


def _equal_shares(peer_fractions) -> tuple:
    """Every peer that reduces anything reduces the same share, whatever bandwidth it claimed."""
    return tuple(1.0 if f > 0 else 0.0 for f in peer_fractions)


class RobustAverager(DecentralizedAverager):
    """DecentralizedAverager whose all-reduce is CenteredClip with bounded application, over one
    fragment of its tensors per round (the fragment the group's first peer proposed), anchored when
    the group's anchors of it agree and full otherwise, with part size and timeouts the node sets
    before each round (`set_limits`), and a report of what came back."""

    def __init__(self, averaged_tensors, dht: DHT, *, tau: float, iters: int = DEFAULT_ITERS,
                 fragments: Sequence[Sequence[int]] | None = None,
                 group_poll_s: float = AveragingSettings.group_poll_s, start: bool = True, **kwargs):
        self.tau, self.iters = float(tau), int(iters)
        self._node_pid = os.getpid()
        self.update_bound = (self.iters + 1) * self.tau
        self.fragments = [list(f) for f in fragments] if fragments else [list(range(len(averaged_tensors)))]
        # shared with the averager's process: the node writes the next round's limits (NaN: the
        # constructor's), the averager writes [fragment, fraction of it received, all-reduce seconds,
        # 1 if the round was anchored else 0]
        self.limits = torch.full((6,), float("nan"), dtype=torch.float64).share_memory_()
        self.report = torch.full((4,), float("nan"), dtype=torch.float64).share_memory_()
        # the anchor starts at the parameters given: replicas that start from the run's initial
        # weights (or load them from a peer, who started from the same) agree from the first round
        self.anchors = [t.detach().clone().float().share_memory_() for t in averaged_tensors]
        self.digests = torch.tensor([_digest([self.anchors[i] for i in f]) for f in self.fragments],
                                    dtype=torch.int64).share_memory_()
        super().__init__(averaged_tensors, dht, start=False, **kwargs)
        # a quarter of the declared wait at most: a group still finds a partner who declared late
        self.group_poll_s = min(group_poll_s, self.matchmaking_kwargs["min_matchmaking_time"] / 4)
        if start:
            self.run_in_background(await_ready=True)

    def run(self):
        watch_parent(self._node_pid)  # exit with the node's main process, however it dies
        # Rebuild torch's thread pool here, once, before the all-reduce's threads run torch ops: a fork
        # leaves it to be rebuilt by its first user, and two threads doing so at once fail ("Invalid
        # thread pool!", seen in the scaling lab: a middle replica's part stream died in its first round
        # and both replicas' rounds came back partial after the senders' timeout)
        torch.set_num_threads(torch.get_num_threads())
        super().run()

    async def _shutdown(self, timeout: Optional[float]) -> None:
        """hivemind's, which calls `finalize` on its running groups: in 1.1.12 those are futures of
        all-reduce runners, so every stop mid-round ended the averager's thread with an AttributeError
        traceback (seen in the scaling lab's logs). Finalizes the runners and cancels the rest."""
        if not self.client_mode:
            await self.remove_p2p_handlers(self._p2p, namespace=self.prefix)
        for group in self._running_groups.values():
            if group.done() and not group.cancelled() and group.exception() is None:
                group.result().finalize(cancel=True)
            else:
                group.cancel()

    async def _step(self, *, step, **kwargs):
        """hivemind's, for the group the node set in the round's limits, and quiet about a round the
        node cancelled (at its shutdown) while the all-reduce ran: hivemind then sets the result of the
        cancelled future, and its task's error was logged as "Task exception was never retrieved" with
        a traceback, at every stop mid-round."""
        if not isinstance(self._matchmaking.group_key_manager, PacedGroupKeys):  # before its first search
            self._matchmaking.group_key_manager = PacedGroupKeys(self._matchmaking.group_key_manager,
                                                                 self.group_poll_s)
        group = self.limits[5].item()
        if not math.isnan(group):
            # a group that has every replica of the stage starts at once; one short of them waits for the
            # rest until its leader's declared time (min_matchmaking_time), then starts with what it has
            self._matchmaking.target_group_size = int(group)
        try:
            await super()._step(step=step, **kwargs)
        except FutureStateError:
            if not step.cancelled():
                raise

    def set_limits(self, limits: RoundLimits) -> None:
        self.limits.copy_(torch.tensor([limits.part_bytes, limits.sender_timeout_s, limits.reducer_timeout_s,
                                        limits.allreduce_timeout_s, limits.send_Bps, limits.group],
                                       dtype=torch.float64))

    def proposal(self, fragment: int) -> dict:
        """What this member proposes for the round (its gathered data): the fragment, the digests of
        its anchors, and the part size of the limits it was last given, if any."""
        part = self.limits[0].item()
        proposal = {"fragment": fragment, "anchors": self.digests.tolist()}
        return proposal if math.isnan(part) else {**proposal, "part_bytes": int(part)}

    def _agreed(self, group_info) -> tuple[int, int | None, bool]:
        """The fragment and part size the group's first peer proposed (every member reads the same peer:
        parts cut to different sizes do not match, and the round fails), falling back to fragment 0
        and our own part size where its proposal is not valid; and whether the round is anchored:
        every member's digest of that fragment's anchor is the same (each member decides alike, from
        the same gathered proposals)."""
        proposals = []
        for gathered in group_info.gathered:
            try:
                user_data = self.serializer.loads(self.serializer.loads(gathered)[2])
            except Exception:
                user_data = None
            proposals.append(user_data if isinstance(user_data, dict) else {})
        k, part = proposals[0].get("fragment", 0), proposals[0].get("part_bytes")
        k = k if isinstance(k, int) and 0 <= k < len(self.fragments) else 0
        digests = [p.get("anchors") for p in proposals]
        anchored = all(isinstance(d, list) and len(d) == len(self.fragments) and type(d[k]) is int for d in digests) \
            and len({d[k] for d in digests}) == 1  # a malformed proposal makes the round full, never fails it
        return k, part if isinstance(part, int) and MIN_PART <= part <= MAX_PART else None, anchored

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id: Optional[bytes] = None, **kwargs):
        """One round over the agreed fragment: anchored (each replica's change since the shared anchor,
        2-bit) or full (the parameters, 8-bit). Where results came back the fragment's parameters end
        as the new anchor (anchored: plus this replica's residual), and as they were where none did."""
        fragment, agreed_part, anchored = self._agreed(group_info)
        chosen = self.fragments[fragment]
        params, anchors = [tensors[i] for i in chosen], [self.anchors[i] for i in chosen]
        tensors = [p - a for p, a in zip(params, anchors)] if anchored else params
        kwargs["compression"] = ANCHORED if anchored else FULL
        if kwargs.get("tensor_infos") is not None:
            kwargs["tensor_infos"] = tuple(kwargs["tensor_infos"][i] for i in chosen)
        part_bytes, sender_s, reducer_s, total_s, send_Bps, _ = self.limits.tolist()
        if not math.isnan(part_bytes):  # timeouts and pace are our own; the part size is the group's
            kwargs.update(part_size_bytes=agreed_part or int(part_bytes), sender_timeout=sender_s,
                          reducer_timeout=reducer_s, send_Bps=send_Bps)
        kwargs["peer_fractions"] = _equal_shares(kwargs["peer_fractions"])
        group_id = group_info.group_id if group_id is None else group_id
        runner = RobustAllReduceRunner(p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors,
                                       group_id=group_id, ordered_peer_ids=group_info.peer_ids, tau=self.tau,
                                       iters=self.iters, error_feedback=anchored, **kwargs)
        if anchored:  # rounding the outgoing parts is a pass over the fragment: off this event loop
            residuals = [torch.zeros_like(t) for t in tensors]
            await asyncio.get_running_loop().run_in_executor(None, runner.feed_back, residuals)
        assert group_id in self._running_groups, f"group {group_id} was not registered"
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")
            return
        applied, started = [0], time.monotonic()
        try:
            await asyncio.wait_for(self._apply_results(tensors, runner, applied),
                                   None if math.isnan(total_s) else total_s)
        except asyncio.TimeoutError:  # what came back stays applied; the node reports the round as partial
            log.info("averaging: the all-reduce ran past its %.0f s; keeping the parts that came back", total_s)
        finally:
            with torch.no_grad():
                if anchored:  # a part that did not come back holds what we sent: the param stays as it was
                    for param, anchor, result, residual in zip(params, anchors, tensors, residuals):
                        anchor.add_(result)
                        param.copy_(anchor).add_(residual)
                else:
                    for param, anchor in zip(params, anchors):
                        anchor.copy_(param)
            self.digests[fragment] = _digest(anchors)
            total = sum(t.numel() for t in tensors)
            received = max(0, applied[0] - runner.tensor_part_container.failed_size) / max(total, 1)
            self.report.copy_(torch.tensor([fragment, received, time.monotonic() - started, anchored],
                                           dtype=torch.float64))

    async def _apply_results(self, tensors, runner, applied: list) -> None:
        """Set each tensor to its averaged result as it arrives, exactly (the same values on every
        replica), unless that moves a coordinate by more than the update bound or the result is not
        finite: then move by the bounded update (the anchor then differs from the group's, and the
        next round of the fragment is full). A part whose reducer failed comes as our own values,
        which `applied` counts and the report subtracts."""
        async for tensor, result in azip(as_aiter(*tensors), runner):
            update = result.to(tensor.dtype) - tensor
            bounded = bounded_update(update, self.update_bound).to(tensor.dtype)
            if torch.equal(bounded, update):
                tensor.copy_(result)
            else:
                tensor.add_(bounded)
            applied[0] += tensor.numel()
            self.last_updated = get_dht_time()
            self._state_updated.set()


def _digest(tensors: Sequence[torch.Tensor]) -> int:
    """8 bytes of BLAKE2b over the tensors' values: equal anchors give equal digests on any replica."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.detach().contiguous().float().numpy().tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def _stage(control):
    """Where a round is in the averager process (shared memory), or None if it cannot be read."""
    try:
        return control.stage
    except Exception:
        return None


async def _nothing(_dht, _node) -> None:
    """A DHT call that does nothing (ReplicaAverager.shutdown's barrier)."""


def _cancel(control) -> None:
    """Cancel an averaging round (StepControl) that may already be finished or cancelled."""
    try:
        if control is not None:
            control.cancel()
    except Exception:
        pass


@dataclass
class RoundOutcome:
    """What one round did, as the node saw it."""
    group: int              # replicas in the round (0: no group formed)
    fragment: int = -1
    received: float = 0.0   # fraction of the fragment whose averaged values came back
    seconds: float = 0.0    # the all-reduce's duration (after the group formed)
    anchored: bool = False  # changes since the shared anchor in 2-bit blocks, else parameters in 8-bit

    @property
    def kind(self) -> str:
        anchored, full = AVERAGING_KINDS  # the metrics' label values, spelled once
        return anchored if self.anchored else full

    @property
    def codec(self) -> BlockCodec:
        return ANCHORED if self.anchored else FULL

    @property
    def complete(self) -> bool:
        return self.group >= 2 and self.received >= 1.0


class ReplicaAverager:
    """Background averaging of one replica's parameters with the other replicas of its stage.

    `every` local steps after the last round started (or at once after it, if it ran longer;
    swarm.averaging_plan.Cadence) a round starts in the background: the parameters are snapshotted
    between two microbatches, the all-reduce of one fragment (swarm/averaging_plan.py) runs in its
    own thread while training goes on, and the result is applied as a delta (averaged - snapshot), so
    the updates this replica made during the round are kept. A round that finds no partner or fails
    costs that round, nothing else; one that gets back only part of its fragment is counted as
    partial, with the fraction received, never as a success."""

    def __init__(self, dht: DHT, run_id: str, stage: int, worker, every: int, count_replicas, metrics,
                 settings: AveragingSettings = AveragingSettings(), tau: float | None = None,
                 iters: int = DEFAULT_ITERS):
        self.worker, self.cadence, self.count_replicas, self.metrics = worker, Cadence(every), count_replicas, metrics
        self.dht, self.settings = dht, settings
        self.closing, self._control, self._round = False, None, None
        self._idle = threading.Event()  # no all-reduce thread is running (shutdown waits for it)
        self._idle.set()
        numels = [p.numel() for p in worker.params]
        self.fragments = split_fragments(numels, fragment_count(sum(numels)))
        self.fragment_params = [sum(numels[i] for i in f) for f in self.fragments]
        self.next_fragment = 0
        self.link = LinkRate(mbit(settings.link_mbit), settings.link_share)
        self.distance: float | None = None   # at the last round that brought anything back
        self.groups: dict[int, int] = {}      # rounds that formed a group, by its size
        self.distance_max = 0.0
        self.tau = tau if tau is not None else DEFAULT_TAU
        # replicas reach their rounds at different moments (each steps on its own microbatches): a
        # round waits for partners in the background, up to gather_s; a faster replica whose next
        # round comes due meanwhile skips it, so it averages at the pace of the slowest partner
        self.averager = RobustAverager(
            [p.detach().cpu().clone() for p in worker.params], dht=dht, prefix=f"{run_id}_avg_v{PROTOCOL_VERSION}_stage{stage}",
            tau=self.tau, iters=iters, fragments=self.fragments, compression=FULL,
            min_group_size=2, min_matchmaking_time=settings.matchmaking_s, group_poll_s=settings.group_poll_s,
            request_timeout=0.5 * settings.matchmaking_s, allreduce_timeout=None,
            allow_state_sharing=False, start=True)  # state transfer is our own `state` RPC (node/state_sync.py)

    @property
    def running(self) -> bool:
        """A round is under way (matchmaking, all-reduce or applying its result)."""
        return self._round is not None and not self._round.done()

    def after_step(self, step: int, in_worker) -> None:
        """Called after each local step (on the event loop); `in_worker(fn)` runs fn between two
        microbatches of the worker. Starts a background round when one is due (Cadence) and none is
        running."""
        if self.closing or not self.cadence.due(step) or self.running:
            return
        self.cadence.started(step)
        self._round = asyncio.create_task(self.average(step, in_worker))

    async def average(self, step: int, in_worker) -> bool | None:
        """One round: None if no other replica exists, else whether it completed."""
        n = await self.count_replicas()
        if n < 2:
            return None
        proposal = self.next_fragment
        self.averager.set_limits(round_limits(self.fragment_params[proposal], n, self.link.Bps))
        snapshot = await in_worker(self._snapshot)
        outcome = await asyncio.get_running_loop().run_in_executor(None, lambda: self._all_reduce(proposal, n))
        if outcome.group >= 2 and outcome.received > 0:
            await in_worker(lambda: self._apply(snapshot, outcome))
        self._account(step, n, outcome)
        return outcome.complete

    def _snapshot(self) -> list[torch.Tensor]:
        snapshot = [p.detach().cpu().clone() for p in self.worker.params]
        with torch.no_grad(), self.averager.get_tensors() as shared:
            for dst, src in zip(shared, snapshot):
                dst.copy_(src)
        return snapshot

    def _all_reduce(self, proposal: int, replicas: int) -> RoundOutcome:
        """The all-reduce, in its own thread, proposing `proposal` as the fragment (with the part size of
        the limits set for the round; the group takes its first peer's); a round that ran but
        returned no group (it ended in an error) is taken to have had every replica we counted."""
        if self.closing:
            return RoundOutcome(0)
        control = self._control = None
        self._idle.clear()
        self.averager.report.fill_(float("nan"))
        try:
            # the wait for the result is bounded, so a shutdown mid-round cannot leave this thread
            # (and the process's exit) waiting forever on a helper that is gone
            control = self._control = self.averager.step(gather=self.averager.proposal(proposal),
                                                         timeout=self.settings.gather_s, allow_retries=True,
                                                         wait=False)
            group = control.result(timeout=self.settings.gather_s + self.averager.limits[3].item() + 5.0)
        except Exception as e:
            _cancel(control)
            if not self.closing:
                log.warning("averaging error: %s", str(e) or type(e).__name__)
            group = None
        finally:
            self._idle.set()
        fragment, received, seconds, anchored = self.averager.report.tolist()
        if math.isnan(fragment):  # no all-reduce ran
            return RoundOutcome(0)
        return RoundOutcome(len(group) if group else replicas, int(fragment), received, seconds, anchored == 1)

    def _apply(self, snapshot: list[torch.Tensor], outcome: RoundOutcome) -> None:
        """Move each parameter of the averaged fragment by (averaged - snapshot): the round's
        correction, on top of whatever this replica learned while the round ran."""
        chosen = self.fragments[outcome.fragment]
        with torch.no_grad(), self.averager.get_tensors() as shared:
            deltas = [torch.nan_to_num(shared[i] - snapshot[i], nan=0.0, posinf=0.0, neginf=0.0) for i in chosen]
        change = max((float(d.abs().max()) for d in deltas if d.numel()), default=0.0)
        # how far this replica was from its group's average: relative L2 over the fragment
        norm = math.sqrt(sum(float(snapshot[i].float().square().sum()) for i in chosen))
        distance = math.sqrt(sum(float(d.float().square().sum()) for d in deltas)) / max(norm, 1e-12)
        self.worker.change_weights(lambda params: [params[i].add_(d.to(params[i].device))
                                                   for i, d in zip(chosen, deltas)])
        self.metrics.replica_distance.set(distance)
        self.metrics.avg_change.set(change)
        self.distance, self.distance_max = distance, max(self.distance_max, distance)

    def _rounds(self, metric: str, kind: str) -> float:
        return self.metrics.registry.get_sample_value(metric, {"kind": kind})

    @property
    def kinds(self) -> dict[str, int]:
        """Rounds that brought anything back (complete or partial), by kind."""
        return {k: int(self._rounds("resbm_averaging_rounds_total", k) +
                       self._rounds("resbm_averaging_partial_rounds_total", k)) for k in AVERAGING_KINDS}

    def figures(self) -> dict:
        """This replica's averaging so far, for `info` (run summaries, benches)."""
        sample = self.metrics.registry.get_sample_value
        return {"rounds": sum(self._rounds("resbm_averaging_rounds_total", k) for k in AVERAGING_KINDS),
                "partial": sum(self._rounds("resbm_averaging_partial_rounds_total", k) for k in AVERAGING_KINDS),
                "failures": sample("resbm_averaging_failures_total"), "bytes": sample("resbm_averaging_bytes_total"),
                "distance": self.distance, "distance_max": self.distance_max, "fragments": len(self.fragments),
                "link_estimate_Bps": self.link.Bps, "groups": {str(g): c for g, c in sorted(self.groups.items())},
                "kinds": {k: n for k, n in self.kinds.items() if n},
                "in_flight": self.running}

    def _account(self, step: int, replicas: int, outcome: RoundOutcome) -> None:
        """Metrics, the link estimate and the next fragment, from what the round did."""
        m = self.metrics
        if outcome.group < 2:  # no group formed (partners busy or gone): says nothing about the link
            m.avg_failures.inc()
            log.warning("averaging after step %d with %d replicas failed; continuing with local parameters",
                        step, replicas)
            return
        whole = round_wire_bytes(self.fragment_params[outcome.fragment], outcome.group,
                                 bytes_per_value(outcome.codec.kind))
        self.groups[outcome.group] = self.groups.get(outcome.group, 0) + 1
        m.avg_group_size.set(outcome.group)
        m.avg_received.set(outcome.received)
        m.avg_bytes.inc(whole * outcome.received)
        m.avg_seconds.set(outcome.seconds)
        if outcome.complete:
            m.avg_rounds.labels(outcome.kind).inc()
            self.link.complete()
            log.info("averaging after step %d: fragment %d averaged (%s) with %d replicas in %.1f s", step,
                     outcome.fragment, outcome.kind, outcome.group, outcome.seconds)
        else:
            m.avg_partial.labels(outcome.kind).inc()
            self.link.incomplete(whole * outcome.received, outcome.seconds)
            log.warning("averaging after step %d was partial: %.1f%% of fragment %d came back in %.1f s (the rest "
                        "keeps local values); next round's timeouts assume %.0f kB/s", step, 100 * outcome.received,
                        outcome.fragment, outcome.seconds, self.link.Bps / 1e3)
        self.next_fragment = (outcome.fragment + 1) % len(self.fragments)

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Cancel a round in flight and let its thread and the averager's matchmaking end before the
        averager process goes: killed mid-request, it leaves the DHT process a message it cannot read
        (a traceback in the node's log at every stop)."""
        self.closing = True
        control = self._control
        _cancel(control)  # a round in flight: let its waiting thread go now
        if self._round is not None:
            self._round.cancel()
        self._idle.wait(grace_s)
        deadline = time.monotonic() + grace_s
        while control is not None and _stage(control) not in (None, AveragingStage.FINISHED) \
                and time.monotonic() < deadline:
            time.sleep(0.05)  # the averager process leaves matchmaking (its DHT requests) on its own
        # A request the averager process sent may still wait, unread, in the DHT process's pipe (a busy
        # machine): one call of ours through the same pipe returns only after it was read.
        try:
            self.dht.run_coroutine(_nothing, return_future=True).result(timeout=grace_s)
        except Exception:
            pass
        self.averager.shutdown()
