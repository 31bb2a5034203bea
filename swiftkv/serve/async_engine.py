"""The engine on its own thread, fed by asyncio request handlers.

`LLMEngine` is not thread-safe, so every call into it (add, step, abort) happens on the engine thread;
handlers talk to it through a command queue and receive their tokens on an asyncio queue each.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from swiftkv.engine.llm_engine import LLMEngine, TokenEvent
from swiftkv.engine.sampling_params import SamplingParams
from swiftkv.engine.sequence import Sequence


@dataclass
class _Submit:
    prompt: object
    params: SamplingParams
    future: asyncio.Future
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_event: Optional[Callable[[TokenEvent], None]] = None):
        self.engine = engine
        self.on_event = on_event
        self.commands: queue.Queue = queue.Queue()
        self.listeners: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self.thread = threading.Thread(target=self._run, name="swiftkv-engine", daemon=True)
        self.stopped = threading.Event()
        self.thread.start()

    async def submit(self, prompt, params: SamplingParams) -> tuple[Sequence, asyncio.Queue]:
        """Add a request; raises ValueError (bad request) in the caller. Events arrive on the queue."""
        loop = asyncio.get_running_loop()
        command = _Submit(prompt, params, loop.create_future(), asyncio.Queue(), loop)
        self.commands.put(("submit", command))
        sequence = await command.future
        return sequence, command.events

    def abort(self, sequence: Sequence) -> None:
        self.commands.put(("abort", sequence))

    def shutdown(self) -> None:
        self.stopped.set()
        self.commands.put(("stop", None))
        self.thread.join(timeout=10)

    def _handle(self, kind: str, payload) -> None:
        if kind == "submit":
            try:
                sequence = self.engine.add_request(payload.prompt, payload.params)
            except ValueError as error:
                payload.loop.call_soon_threadsafe(_set_exception, payload.future, error)
                return
            self.listeners[sequence.request_id] = (payload.events, payload.loop)
            payload.loop.call_soon_threadsafe(_set_result, payload.future, sequence)
        elif kind == "abort":
            self.engine.abort(payload)
            self._notify_finished(payload)

    def _notify_finished(self, sequence: Sequence) -> None:
        listener = self.listeners.pop(sequence.request_id, None)
        if listener is not None:
            events, loop = listener
            loop.call_soon_threadsafe(events.put_nowait, None)

    def _run(self) -> None:
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
                if self.on_event is not None:
                    self.on_event(event)
                listener = self.listeners.get(event.sequence.request_id)
                if listener is not None:
                    events, loop = listener
                    loop.call_soon_threadsafe(events.put_nowait, event)
                if event.finished:
                    self._notify_finished(event.sequence)


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
