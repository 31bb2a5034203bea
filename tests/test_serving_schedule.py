"""benchmarks/serving_schedule.py replays the engine's own scheduler: its step counts follow the schedule's rules."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from serving_schedule import replay  # noqa: E402

COSTS = (0.001, 0.01, 0.002)  # seconds per prompt token, per decode step, per decode row


def test_requests_that_fit_at_once_take_one_prompt_step_then_decode_steps():
    result = replay(capacity_tokens=4096, requests=4, input_len=100, output_len=5, prefill_tokens=1000, costs=COSTS)
    # one step prefills all four prompts (and gives each its first token); four decode steps give the other four
    assert (result["steps"], result["prompt_steps"], result["most_decode_rows"]) == (5, 1, 4)
    assert result["predicted_duration_s"] == pytest.approx(400 * 0.001 + 4 * (0.01 + 4 * 0.002))


def test_a_smaller_cache_admits_fewer_requests_and_takes_two_waves():
    # room for two requests of 105 tokens (blocks of 16: 112 each) at a time
    result = replay(capacity_tokens=224, requests=4, input_len=100, output_len=5, prefill_tokens=1000, costs=COSTS)
    assert (result["steps"], result["prompt_steps"], result["most_decode_rows"]) == (10, 2, 2)
