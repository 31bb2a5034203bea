"""The engine on its own thread, fed by asyncio request handlers.

`LLMEngine` is not thread-safe, so every call into it (add, step, abort) happens on the engine thread;
handlers talk to it through a command queue and receive their requests' events on an asyncio queue.

A request that fails inside the engine ends alone (`LLMEngine.step`). Should the loop itself ever raise,
the thread records why, ends every request it holds, wakes every waiting handler, and calls `on_death`:
the server then reports unhealthy and exits, so a supervisor restarts it, instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from swiftkv.engine.llm_engine import LLMEngine, TokenEvent
from swiftkv.engine.sampling_params import SamplingParams
from swiftkv.engine.sequence import Sequence

logger = logging.getLogger(__name__)

ENGINE_DIED = object()  # put on every listening queue when the engine thread dies


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Submit:
    token_ids: list[int]
    params: SamplingParams
    future: asyncio.Future
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_event: Optional[Callable[[TokenEvent], None]] = None,
                 on_death: Optional[Callable[[], None]] = None):
        self.engine = engine
        self.on_event, self.on_death = on_event, on_death
        self.failure: Optional[BaseException] = None
        self.commands: queue.Queue = queue.Queue()
        self.listeners: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self.thread = threading.Thread(target=self._run, name="swiftkv-engine", daemon=True)
        self.stopped = threading.Event()
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.failure is None and self.thread.is_alive()

    async def submit(self, token_ids: list[int], params: SamplingParams, events: asyncio.Queue) -> Sequence:
        """Add a request; raises ValueError (bad request) or EngineDeadError in the caller. Its events
        (`TokenEvent`s, one with `finished` last, or `ENGINE_DIED`) arrive on `events`."""
        self._raise_if_dead()
        loop = asyncio.get_running_loop()
        command = _Submit(token_ids, params, loop.create_future(), events, loop)
        self.commands.put(("submit", command))
        if not self.alive:  # it died between the check and the put: nobody will answer the command
            self._fail_pending_commands()
        return await command.future

    def abort(self, sequence: Sequence) -> None:
        self.commands.put(("abort", sequence))

    def shutdown(self) -> None:
        self.stopped.set()
        self.commands.put(("stop", None))
        self.thread.join(timeout=2)

    def _raise_if_dead(self) -> None:
        if self.failure is not None:
            raise EngineDeadError(f"the engine stopped: {type(self.failure).__name__}: {self.failure}")
        if not self.thread.is_alive():
            raise EngineDeadError("the engine is shut down")

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as error:  # noqa: BLE001 - anything that ends the loop must be reported
            self.failure = error
            logger.critical("the engine thread stopped", exc_info=error)
            self._fail_pending_commands()
            for events, loop in self.listeners.values():
                loop.call_soon_threadsafe(events.put_nowait, ENGINE_DIED)
            self.listeners.clear()
            if self.on_death is not None:
                self.on_death()

    def _loop(self) -> None:
        while not self.stopped.is_set():
            try:
                block = not self.engine.has_unfinished()
                while True:
                    kind, payload = self.commands.get(block=block, timeout=None if block else 0)
                    if kind == "stop":
                        return
                    self._handle(kind, payload)
                    block = False
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                continue
            for event in self.engine.step():
                self._publish(event)

    def _handle(self, kind: str, payload) -> None:
        if kind == "submit":
            try:
                sequence = self.engine.add_request(payload.token_ids, payload.params)
            except ValueError as error:
                payload.loop.call_soon_threadsafe(_set_exception, payload.future, error)
                return
            self.listeners[sequence.request_id] = (payload.events, payload.loop)
            payload.loop.call_soon_threadsafe(_set_result, payload.future, sequence)
        elif kind == "abort" and not payload.is_finished:
            self.engine.abort(payload)
            self._publish(TokenEvent(payload, -1, "", True))

    def _publish(self, event: TokenEvent) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a metrics hook must never stop the engine
                logger.exception("on_event failed")
        listener = (self.listeners.pop if event.finished else self.listeners.get)(event.sequence.request_id, None)
        if listener is not None:
            events, loop = listener
            loop.call_soon_threadsafe(events.put_nowait, event)

    def _fail_pending_commands(self) -> None:
        while True:
            try:
                kind, payload = self.commands.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                error = EngineDeadError("the engine stopped before this request started")
                payload.loop.call_soon_threadsafe(_set_exception, payload.future, error)


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
