"""runner = "service": featurize here, run the model in the shared inference service.

A runner (classifier/service.py) for a front-end worker, awaited on its event
loop by the loop batcher (classifier/loop_batcher.py), one batch at a time:
it featurizes the batch with the FeatureSpec the service announced
(classifier/inference.featurize, the code every runner uses) right on the
loop, sends the arrays over one connection that the loop reads
(classifier/framing.FrameConnection), and applies the auth
adjustment and the header-rule overrides to the answers
(classifier/inference.finish_one). No thread: a batch costs the worker no
GIL hand-offs between a batcher thread and its SMTP loop.

Why the overrides run here and not in the service: they read the message's
header block, which only the worker has (the service gets arrays, not mail),
and trusted_authserv_ids are the front end's site policy. The service tells
us what of the model they need (labels, spam threshold) in its Info frames.

Failures never lose a message: an unreachable, killed or hung service fails
the batch in flight with ClassifierError (the service gives those messages
the header rules' verdict, FALLBACK_MODEL, and counts them); the next batch
reconnects, with a backoff after a failed attempt so a dead service costs
no connect per batch. Overloaded (the service's queue is full) comes back
per message at once and is raised as Overloaded, as a full local queue is.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy.typing as npt
import structlog

from classifier.config import ClassifierSettings
from classifier.inference import BatchTiming, Postprocess, featurize, finish_one
from classifier.providers import ProviderChoice
from classifier.serving import service_wire as wire
from classifier.serving.endpoints import Endpoint, parse_endpoint
from classifier.serving.feature_spec import featurizer_for
from classifier.types import Classification, ClassifierError, Overloaded

log = structlog.get_logger("triaged.classifier")

CONNECT_TIMEOUT_S = 5.0
# Backoff between connection attempts after a failed one, doubling.
RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 2.0
# An answer not here in this many request timeouts (at least HANG_MIN_S):
# the service is hung; drop the connection (its supervisor restarts it).
HANG_TIMEOUTS = 4
HANG_MIN_S = 10.0
_KEEP_GENERATIONS = 4  # Infos kept for answers that straddle hot swaps


class RemoteRunner:
    """The model in the inference service at `endpoint`, seen from a worker."""

    def __init__(self, settings: ClassifierSettings, endpoint: Endpoint, *, client: str) -> None:
        self._settings = settings
        self.endpoint = endpoint
        self._client = client
        self._lock = asyncio.Lock()  # one batch (or refresh) on the connection at a time
        self._conn: wire.ClientConnection | None = None
        self._info: wire.Info | None = None
        self._infos: dict[int, wire.Info] = {}
        self._posts: dict[int, Postprocess] = {}
        self._trusted = frozenset(a.lower() for a in settings.trusted_authserv_ids)
        self._retry_at = 0.0
        self._backoff = RECONNECT_MIN_S
        self._down_since: float | None = None  # monotonic; for one log line per outage
        self._next_id = 0
        self._closed = False
        self._hang_s = max(HANG_MIN_S, HANG_TIMEOUTS * settings.timeout_ms / 1000.0)

    @classmethod
    async def open(cls, settings: ClassifierSettings, *, client: str | None = None) -> RemoteRunner:
        """A runner for settings.endpoint, connected if the service answers.

        An unreachable service is not an error here (a worker must start and
        serve, with the header rules' verdicts, while its service restarts or
        its GPU host is down): it is logged, and every batch tries again.
        A missing or malformed endpoint is (ClassifierError).
        """
        if not settings.endpoint:
            raise ClassifierError('runner = "service" needs classifier.endpoint')
        try:
            endpoint = parse_endpoint(settings.endpoint)
        except ValueError as exc:
            raise ClassifierError(f"classifier.endpoint: {exc}") from None
        runner = cls(settings, endpoint, client=client or f"worker {os.getpid()}")
        async with runner._lock:
            try:
                await runner._connection()
            except ClassifierError:
                pass  # logged by _connection; batches fall back until it answers
        return runner

    # -- what the service reads (the Runner protocol) ---------------------------------

    @property
    def name_version(self) -> str:
        return self._info.name_version if self._info is not None else ""

    @property
    def choice(self) -> ProviderChoice:
        info = self._info
        if info is None:
            return ProviderChoice("cpu", [], f"inference service {self.endpoint} not reached yet")
        return ProviderChoice(info.provider, [],
                              f"inference service {self.endpoint}: {info.provider_reason}",
                              info.device_id)

    @property
    def prefix_bytes(self) -> int | None:
        return self._info.prefix_bytes if self._info is not None else None

    @property
    def pid(self) -> int | None:
        """The service's pid (it may run on another host)."""
        return self._info.pid if self._info is not None else None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def classify_batch(
        self, raws: Sequence[bytes | memoryview]
    ) -> tuple[list[Classification | ClassifierError], BatchTiming]:
        async with self._lock:
            conn = await self._connection()
            try:
                async with asyncio.timeout(self._hang_s):
                    return await self._classify(conn, raws)
            except TimeoutError:
                self._drop(f"no answer in {self._hang_s:.0f} s")
                raise ClassifierError("inference service did not answer; reconnecting") from None
            except (OSError, wire.ChannelClosed, ValueError) as exc:
                # ValueError: msgspec's DecodeError, a corrupted stream.
                self._drop(f"{type(exc).__name__}: {exc}")
                raise ClassifierError(f"inference service connection lost: {exc}") from None

    async def refresh(self) -> str:
        """Ask the service what it serves now (model name, feature spec) and
        return the name. For a worker's reload: the model itself is reloaded
        in the service, by whoever runs it, not by each of its clients."""
        async with self._lock:
            conn = await self._connection()
            try:
                async with asyncio.timeout(self._hang_s):
                    return (await self._fetch_info(conn)).name_version
            except TimeoutError:
                self._drop(f"no answer in {self._hang_s:.0f} s")
                raise ClassifierError("inference service did not answer; reconnecting") from None
            except (OSError, wire.ChannelClosed, ValueError) as exc:
                self._drop(f"{type(exc).__name__}: {exc}")
                raise ClassifierError(f"inference service connection lost: {exc}") from None

    async def close(self) -> None:
        self._closed = True
        async with self._lock:  # after the batch in flight
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- internals (lock held) -------------------------------------------------------

    async def _classify(
        self, conn: wire.ClientConnection, raws: Sequence[bytes | memoryview]
    ) -> tuple[list[Classification | ClassifierError], BatchTiming]:
        for frame in conn.poll():  # Infos pushed since the last batch (a hot swap)
            self._note(frame)
        info = self._info
        assert info is not None  # set by _connect
        batch = featurize(featurizer_for(info.spec), raws)
        t0, c0 = time.perf_counter(), time.thread_time()
        verdicts, generations = await self._ask(conn, info.spec.id, batch.features)
        stale = [k for k, v in enumerate(verdicts)
                 if isinstance(v, str) and wire.failure_kind(v) == "stale"]
        if stale and self._info is not None and self._info.spec.id == info.spec.id:
            # The service pushes its new Info before any stale answer; ask
            # anyway rather than trust that ordering.
            await self._fetch_info(conn)
        if stale and self._info is not None and self._info.spec.id != info.spec.id:
            # The service swapped to a model with other features while these
            # were on the way: featurize them once more, for the new spec.
            again = featurize(featurizer_for(self._info.spec),
                              [batch.raws[batch.slots[k]] for k in stale])
            v2, g2 = await self._ask(conn, self._info.spec.id, again.features)
            for j, k in enumerate(stale):
                err = again.errors[j]
                verdicts[k] = wire.failure("error", str(err)) if err is not None else ""
            for j, v, g in zip(again.slots, v2, g2, strict=True):
                verdicts[stale[j]], generations[stale[j]] = v, g
        results: list[Classification | ClassifierError] = [
            e if e is not None else ClassifierError("no result") for e in batch.errors
        ]
        for k, (verdict, generation) in enumerate(zip(verdicts, generations, strict=True)):
            i = batch.slots[k]
            if isinstance(verdict, Classification):
                results[i] = finish_one(batch.raws[i], verdict, self._post(generation))
            elif wire.failure_kind(verdict) == "overloaded":
                results[i] = Overloaded(f"inference service: {verdict}")
            else:
                results[i] = ClassifierError(f"inference service: {verdict}")
        model_s, model_cpu = time.perf_counter() - t0, time.thread_time() - c0
        return results, BatchTiming(batch.seconds, batch.cpu_seconds, model_s, model_cpu)

    async def _fetch_info(self, conn: wire.ClientConnection) -> wire.Info:
        request = self._new_id()
        conn.write(wire.encode(wire.GetInfo(request)))
        while True:
            frame = await conn.receive()
            if isinstance(frame, wire.Info):
                self._note(frame)
                if frame.id == request:
                    return frame

    async def _ask(self, conn: wire.ClientConnection, spec_id: str,
             features: Sequence[npt.NDArray[Any]]) -> tuple[list[Classification | str], list[int]]:
        if not features:
            return [], []
        request = self._new_id()
        conn.write(wire.encode(wire.Classify(request, spec_id, self._settings.timeout_ms,
                                             wire.arrays_of(features))))
        while True:
            frame = await conn.receive()
            if isinstance(frame, wire.Info):
                self._note(frame)
            elif isinstance(frame, wire.Results) and frame.id == request:
                if len(frame.verdicts) != len(features) or len(frame.generations) != len(features):
                    raise wire.ChannelClosed(
                        f"{len(frame.verdicts)} verdicts for {len(features)} messages")
                return list(frame.verdicts), list(frame.generations)
            elif isinstance(frame, wire.Refused):
                raise wire.ChannelClosed(f"service refused: {frame.error}")
            # Anything else: a late answer to a request we gave up on.

    def _post(self, generation: int) -> Postprocess:
        post = self._posts.get(generation)
        if post is None:
            info = self._infos.get(generation) or self._info
            assert info is not None
            post = Postprocess(
                self._settings.rule_overrides,
                frozenset(info.labels) if info.labels is not None else None,
                info.spam_threshold, self._trusted,
            )
            self._posts[generation] = post
            while len(self._posts) > _KEEP_GENERATIONS:
                del self._posts[min(self._posts)]
        return post

    def _note(self, frame: wire.ToClient) -> None:
        if not isinstance(frame, wire.Info):
            return
        if self._info is not None and frame.pid != self._info.pid:
            # A restarted (or another) service: its generations count anew.
            self._infos.clear()
            self._posts.clear()
            self._info = None
        if self._info is None or frame.generation >= self._info.generation:
            if self._info is not None and frame.name_version != self._info.name_version:
                log.info("classifier.service_model", model=frame.name_version,
                         generation=frame.generation, endpoint=str(self.endpoint))
            self._info = frame
        self._infos[frame.generation] = frame
        self._posts.pop(frame.generation, None)
        while len(self._infos) > _KEEP_GENERATIONS:
            del self._infos[min(self._infos)]

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def _connection(self) -> wire.ClientConnection:
        if self._closed:
            raise ClassifierError("classifier is shut down")
        if self._conn is not None:
            return self._conn
        now = time.monotonic()
        if now < self._retry_at:
            raise ClassifierError(
                f"inference service {self.endpoint} unreachable; next try in "
                f"{self._retry_at - now:.2f} s")
        try:
            self._conn = await self._connect()
        except (OSError, TimeoutError, wire.ChannelClosed, ValueError) as exc:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, RECONNECT_MAX_S)
            if self._down_since is None:
                self._down_since = now
                log.error("classifier.service_unreachable", endpoint=str(self.endpoint),
                          error=f"{type(exc).__name__}: {exc}",
                          effect="messages get the header rules' verdict until it answers")
            raise ClassifierError(f"inference service {self.endpoint} unreachable: {exc}") from None
        self._backoff = RECONNECT_MIN_S
        if self._down_since is not None:
            log.info("classifier.service_reconnected", endpoint=str(self.endpoint),
                     down_s=round(now - self._down_since, 3), model=self.name_version)
            self._down_since = None
        return self._conn

    async def _connect(self) -> wire.ClientConnection:
        ep = self.endpoint
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            conn = await (wire.open_client(ep.path) if ep.is_unix
                          else wire.open_client(None, ep.host, ep.port))
            try:
                first = await conn.receive()  # the service speaks first: Info
                if not isinstance(first, wire.Info):
                    raise wire.ChannelClosed(f"expected Info, got {type(first).__name__}")
                self._note(first)
                conn.write(wire.encode(wire.Hello(self._client)))
            except BaseException:
                conn.close()
                raise
        return conn

    def _drop(self, why: str) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        log.warning("classifier.service_connection_lost", endpoint=str(self.endpoint), error=why)


__all__ = ["RemoteRunner"]
