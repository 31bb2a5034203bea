"""The inference engine: token-for-token equal to transformers, batching, chunking, preemption, sampling."""

from __future__ import annotations

import re

import pytest
import torch

from swiftkv.convert import convert_to_swiftkv
from swiftkv.engine import EngineConfig, LLMEngine, SamplingParams
from swiftkv.engine import model_runner, paged_attention_cpu
from swiftkv.engine.block_manager import BlockManager, contiguous_start
from swiftkv.engine.llm_engine import StepStats, request_output
from swiftkv.engine.sampler import nucleus
from swiftkv.engine.sequence import Chunk, Sequence

from conftest import make_base_model, make_tiny_tokenizer, perturb_swiftkv_weights


def prompts(count=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (int(length),), generator=generator).tolist()
            for length in torch.randint(5, 40, (count,), generator=generator)]


def hf_greedy(model, prompt, max_tokens):
    input_ids = torch.tensor([prompt], device=model.device)
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
                            do_sample=False, eos_token_id=None, pad_token_id=0)
    return output[0, len(prompt):].tolist()


def engine_for(model, **options):
    options = {"dtype": "float32", "kv_cache_memory_gb": 0.01, "block_size": 4, **options}
    return LLMEngine(model, make_tiny_tokenizer(), EngineConfig(**options))


def engine_with_room_for(model, tokens: int, **options):
    """An engine whose KV budget holds exactly `tokens` tokens."""
    runner = engine_for(model).runner
    bytes_per_token = 2 * runner.num_kv_entries * runner.num_kv_heads * runner.head_dim * 4  # K and V, float32
    return engine_for(model, kv_cache_memory_gb=tokens * bytes_per_token / 2**30, **options)


def run(engine, token_prompts, params):
    sequences = [engine.add_request(p, params) for p in token_prompts]
    while engine.has_unfinished():
        engine.step()
    return [request_output(s) for s in sequences]


GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


def swiftkv_model(family="llama", group_size=1):
    model = convert_to_swiftkv(make_base_model(family), 2, group_size)
    perturb_swiftkv_weights(model)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_engine_greedy_equals_transformers_on_a_base_model(family):
    model = make_base_model(family)
    outputs = run(engine_for(model), prompts(), GREEDY)
    for prompt, output in zip(prompts(), outputs):
        assert output.token_ids == hf_greedy(model, prompt, 10)


@pytest.mark.parametrize("family, group_size", [("llama", 1), ("llama", 2), ("qwen2", 4)])
def test_engine_greedy_equals_the_swiftkv_transformers_class(family, group_size):
    model = swiftkv_model(family, group_size)
    outputs = run(engine_for(model), prompts(), GREEDY)
    for prompt, output in zip(prompts(), outputs):
        assert output.token_ids == hf_greedy(model, prompt, 10)


def test_batched_results_equal_single_request_results():
    model = swiftkv_model()
    batched = run(engine_for(model), prompts(6), GREEDY)
    for prompt, output in zip(prompts(6), batched):
        assert run(engine_for(model), [prompt], GREEDY)[0].token_ids == output.token_ids


@pytest.fixture
def without_cpu_kernel(monkeypatch):
    """The engine's PyTorch attention paths, which it takes where the CPU paged kernel cannot be built."""
    monkeypatch.setenv(paged_attention_cpu.DISABLE_VARIABLE, "0")


def test_a_lone_request_reads_its_cache_in_place_and_gets_the_tokens_of_the_gathered_path(monkeypatch,
                                                                                           without_cpu_kernel):
    model = swiftkv_model()
    engine = engine_for(model)
    in_place_calls = []
    attend_in_place = engine.runner._attend_in_place
    engine.runner._attend_in_place = lambda *args: in_place_calls.append(args) or attend_in_place(*args)
    in_place = run(engine, prompts(1), GREEDY)[0].token_ids
    assert len(in_place_calls) >= 9 * model.config.num_hidden_layers  # every decode step, every layer

    monkeypatch.setattr(model_runner, "contiguous_start", lambda *args: None)  # as if its blocks were scattered
    assert run(engine_for(model), prompts(1), GREEDY)[0].token_ids == in_place


def reserved_sequences(engine, token_prompts):
    sequences = [Sequence(list(p), GREEDY) for p in token_prompts]
    for sequence in sequences:
        engine.blocks.reserve(sequence, len(sequence) + 10)
    return sequences


@pytest.mark.parametrize("family, group_size", [("llama", None), ("llama", 1), ("qwen2", 2)])
def test_a_mixed_batch_gives_every_chunk_the_logits_it_gets_alone(family, group_size):
    """One forward of a decode token, a prompt's last chunk, a whole prompt and a mid-prompt chunk equals the
    four run one by one: same logits, same cache."""
    model = make_base_model(family) if group_size is None else swiftkv_model(family, group_size)
    alone, mixed = engine_for(model), engine_for(model)
    for engine in (alone, mixed):
        decoding, resumed, whole, started = reserved_sequences(engine, prompts(4, seed=3))
        engine.runner.run([Chunk(decoding, 0, len(decoding))])
        decoding.token_ids.append(7)
        engine.runner.run([Chunk(resumed, 0, 3)])
        engine.chunks = [Chunk(decoding, len(decoding) - 1, len(decoding)), Chunk(resumed, 3, len(resumed)),
                         Chunk(whole, 0, len(whole)), Chunk(started, 0, 4)]
    separately = [alone.runner.run([chunk])[0] for chunk in alone.chunks]
    together = mixed.runner.run(mixed.chunks)
    assert together[3] is None and separately[3] is None  # mid-prompt: no logits
    for one, packed in zip(separately[:3], together[:3]):
        torch.testing.assert_close(packed, one, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed.runner.k_cache, alone.runner.k_cache, rtol=1e-4, atol=1e-4)


def test_a_prompt_arriving_while_others_decode_runs_in_their_step_and_changes_no_token():
    model = swiftkv_model()
    engine, batches = engine_for(model), []
    forward = engine.runner.forward
    engine.runner.forward = lambda batch: batches.append((len(batch.rows), len(batch.spans))) or forward(batch)
    first, second, third = prompts(3)
    early, ran = [engine.add_request(p, GREEDY) for p in (first, second)], []
    for _ in range(3):
        engine.step()
        ran.append(engine.last_step)
    late = engine.add_request(third, GREEDY)
    while engine.has_unfinished():
        engine.step()
        ran.append(engine.last_step)
    assert batches[:2] == [(0, 2), (2, 0)] and batches[3] == (2, 1)  # two prompts in one step; then mixed
    assert ran[:2] == [StepStats(0, len(first) + len(second)), StepStats(2, 0)] and ran[3] == StepStats(2, len(third))
    expected = run(engine_for(model), prompts(3), GREEDY)
    assert [s.output_token_ids for s in (*early, late)] == [o.token_ids for o in expected]


@pytest.mark.parametrize("in_place", [True, False])
def test_decode_rows_read_in_place_one_by_one_or_gathered_give_the_same_tokens(monkeypatch, in_place,
                                                                              without_cpu_kernel):
    model = swiftkv_model()
    expected = [run(engine_for(model), [p], GREEDY)[0].token_ids for p in prompts(4)]
    monkeypatch.setattr(model_runner, "GATHERED_ROWS_MAX_MEAN_KEYS", 0 if in_place else 10**9)
    engine = engine_for(model)
    attend_in_place = engine.runner._attend_in_place
    calls = []
    engine.runner._attend_in_place = lambda *args: calls.append(args) or attend_in_place(*args)
    assert [o.token_ids for o in run(engine, prompts(4), GREEDY)] == expected
    assert bool(calls) == in_place


def test_a_new_sequence_gets_the_first_run_of_free_blocks_long_enough_for_it():
    blocks = BlockManager(num_blocks=8, block_size=4)
    a, b, c = (Sequence(list(range(4)), GREEDY) for _ in range(3))
    for sequence in (a, b, c):
        blocks.reserve(sequence, 4)  # blocks 0, 1, 2
    blocks.free(b)                   # free: 1, 3..7
    long = Sequence(list(range(12)), GREEDY)
    blocks.reserve(long, 12)         # block 1 alone is too short: 3, 4, 5
    assert long.block_table == [3, 4, 5] and contiguous_start(long.block_table, 4, 12) == 12
    short = Sequence(list(range(4)), GREEDY)
    blocks.reserve(short, 4)
    assert short.block_table == [1]


def test_a_growing_sequence_takes_the_block_after_its_last_so_its_slots_stay_contiguous():
    blocks = BlockManager(num_blocks=8, block_size=4)
    first, second = Sequence(list(range(8)), GREEDY), Sequence(list(range(4)), GREEDY)
    blocks.reserve(first, 8)   # blocks 0, 1
    blocks.reserve(second, 4)  # block 2
    blocks.reserve(first, 12)  # 2 is taken: the oldest free block, 3
    assert first.block_table == [0, 1, 3] and contiguous_start(first.block_table, 4, 12) is None
    assert contiguous_start(first.block_table, 4, 8) == 0
    blocks.free(second)        # free list: 4, 5, 6, 7, 2
    blocks.reserve(first, 16)  # 4 follows 3
    third = Sequence(list(range(4)), GREEDY)
    blocks.reserve(third, 8)   # 5, then 6 (after 5)
    assert first.block_table == [0, 1, 3, 4] and third.block_table == [5, 6]
    assert contiguous_start(third.block_table, 4, 8) == 20


def test_chunked_prefill_gives_the_same_tokens():
    model = swiftkv_model()
    whole = run(engine_for(model), prompts(), GREEDY)
    chunked = run(engine_for(model, max_prefill_tokens=7), prompts(), GREEDY)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in whole]


def test_preemption_under_memory_pressure_loses_no_request():
    model = swiftkv_model()
    reference = run(engine_for(model), prompts(6), GREEDY)
    small = engine_with_room_for(model, 64, reserve_output_tokens=False)
    assert small.capacity_tokens == 64 < sum(len(p) + 10 for p in prompts(6))
    outputs = run(small, prompts(6), GREEDY)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in reference]
    assert sum(o.num_preemptions for o in outputs) > 0
    assert small.blocks.usage == 0


def test_reserving_output_room_avoids_preemption_under_the_same_pressure():
    model = swiftkv_model()
    reference = run(engine_for(model), prompts(6), GREEDY)
    small = engine_with_room_for(model, 64)  # reserve_output_tokens=True by default
    outputs = run(small, prompts(6), GREEDY)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in reference]
    assert sum(o.num_preemptions for o in outputs) == 0
    assert small.blocks.usage == 0


def test_across_kv_admits_more_tokens_in_the_same_budget():
    base = make_base_model("llama")
    grouped = convert_to_swiftkv(base, 2, 4)
    base_engine, grouped_engine = engine_for(base), engine_for(grouped)
    assert grouped_engine.runner.num_kv_entries == 3 and base_engine.runner.num_kv_entries == 6
    assert grouped_engine.capacity_tokens == pytest.approx(2 * base_engine.capacity_tokens, rel=0.01)


def test_seeded_sampling_is_reproducible_and_differs_from_greedy():
    model = swiftkv_model()
    params = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, top_k=40, seed=7, ignore_eos=True)
    first = run(engine_for(model), prompts(1), params)[0].token_ids
    assert first == run(engine_for(model), prompts(1), params)[0].token_ids
    assert first != run(engine_for(model), prompts(1), SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids


def test_a_top_p_below_float32_range_keeps_the_most_likely_token():
    scores = torch.tensor([0.5, 2.0, 1.0])
    assert nucleus(scores, 1e-320).tolist() == [1]  # 1e-320 is 0 in float32: "< top_p" alone keeps none


@pytest.mark.parametrize("spread", [0.3, 3.0, 30.0])  # flat logits: the nucleus holds more than the candidates
@pytest.mark.parametrize("top_p", [0.5, 0.95])
def test_top_p_drops_exactly_the_tokens_outside_the_smallest_set_reaching_p(spread, top_p):
    scores = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * spread
    probabilities = scores.softmax(-1)
    ranked = probabilities.argsort(descending=True).tolist()
    kept, mass = set(), 0.0
    for token in ranked:  # the definition, one token at a time
        kept.add(token)
        mass += probabilities[token].item()
        if mass >= top_p:
            break
    assert set(nucleus(scores, top_p).tolist()) == kept


def test_stop_token_and_stop_string_end_a_request():
    model = swiftkv_model()
    greedy = run(engine_for(model), prompts(1), GREEDY)[0].token_ids
    stopped = run(engine_for(model), prompts(1), SamplingParams(max_tokens=10, stop_token_ids=[greedy[3]],
                                                                ignore_eos=True))[0]
    assert stopped.token_ids == greedy[:greedy.index(greedy[3]) + 1] and stopped.finish_reason == "stop"
    word = make_tiny_tokenizer().decode([greedy[2]])
    text = run(engine_for(model), prompts(1), SamplingParams(max_tokens=10, stop=[word], ignore_eos=True))[0]
    assert word not in text.text and text.finish_reason == "stop"


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(max_tokens=-1), dict(temperature=-1), dict(top_p=0),
                                    dict(top_k=-2), dict(temperature=float("nan")), dict(temperature=float("inf")),
                                    dict(top_p=float("nan")), dict(seed=2**64), dict(seed=-2**63 - 1),
                                    dict(stop=[""]), dict(logprobs=21), dict(max_tokens=True)])
def test_bad_sampling_params_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompt", [[96], [-1], [5, 10**20], [True], ["w1"]])
def test_prompt_token_ids_outside_the_vocabulary_are_rejected(prompt):
    engine = engine_for(swiftkv_model())
    with pytest.raises(ValueError, match=r"is not in the model's vocabulary \[0, 96\)"):
        engine.add_request(prompt, SamplingParams())
    assert not engine.has_unfinished()


def test_a_vanishing_temperature_samples_greedily():
    model = swiftkv_model()
    tiny = run(engine_for(model), prompts(2), SamplingParams(max_tokens=8, temperature=1e-300, ignore_eos=True))
    greedy = run(engine_for(model), prompts(2), GREEDY)
    assert [o.token_ids for o in tiny] == [o.token_ids[:8] for o in greedy]


def test_a_request_that_fails_in_a_batch_ends_alone_and_the_others_finish_unchanged():
    model = swiftkv_model()
    expected = run(engine_for(model), prompts(3), GREEDY)
    engine = engine_for(model)
    forward = engine.runner.forward
    poisoned, position = prompts(3)[1][-1], len(prompts(3)[1]) - 1  # request 1's last prompt token

    def fails_on_request_1(batch):  # all three prompts are prefilled in one batch, then rerun one by one
        if ((batch.input_ids == poisoned) & (batch.positions == position)).any():
            raise RuntimeError("planted")
        return forward(batch)

    engine.runner.forward = fails_on_request_1
    outputs = run(engine, prompts(3), GREEDY)
    assert outputs[1].finish_reason == "error" and outputs[1].token_ids == []
    assert [outputs[0].token_ids, outputs[2].token_ids] == [expected[0].token_ids, expected[2].token_ids]
    assert engine.blocks.usage == 0


def test_a_failing_decode_batch_is_rerun_one_request_at_a_time():
    model = swiftkv_model()
    expected = run(engine_for(model), prompts(3), GREEDY)
    engine = engine_for(model)
    sequences = [engine.add_request(p, GREEDY) for p in prompts(3)]
    forward = engine.runner.forward

    def fails_with_request_2_after_its_third_token(batch):
        blocks_of_2 = torch.tensor(sequences[2].block_table)
        if len(sequences[2].output_token_ids) >= 3 and (batch.write_slots // 4 == blocks_of_2[:, None]).any():
            raise RuntimeError("planted")
        return forward(batch)

    engine.runner.forward = fails_with_request_2_after_its_third_token
    while engine.has_unfinished():
        engine.step()
    assert sequences[2].finish_reason == "error" and "planted" in sequences[2].error
    assert sequences[2].output_token_ids == expected[2].token_ids[:3]
    assert [s.output_token_ids for s in sequences[:2]] == [o.token_ids for o in expected[:2]]


def test_a_sampling_failure_ends_only_its_request():
    engine = engine_for(swiftkv_model())
    good = engine.add_request(prompts(1)[0], GREEDY)
    bad = engine.add_request(prompts(1)[0], SamplingParams(max_tokens=10, temperature=1.0, seed=1))
    bad.generator = "not a generator"  # torch.multinomial raises on it
    while engine.has_unfinished():
        engine.step()
    assert bad.finish_reason == "error" and good.finish_reason == "length" and len(good.output_token_ids) == 10


def test_logprobs_are_the_model_distribution_of_each_sampled_token():
    model = swiftkv_model()
    output = run(engine_for(model), prompts(1), SamplingParams(max_tokens=4, logprobs=3, ignore_eos=True))[0]
    sequence_logits = model(torch.tensor([prompts(1)[0] + output.token_ids])).logits[0].float()
    for step, (token, entry) in enumerate(zip(output.token_ids, output.logprobs)):
        logprobs = torch.log_softmax(sequence_logits[len(prompts(1)[0]) - 1 + step], -1)
        assert entry.logprob == pytest.approx(logprobs[token].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == logprobs.topk(3).indices.tolist()


@pytest.mark.parametrize("family, fields, named", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=2), "sliding_window=16"),
    ("mistral", dict(sliding_window=32), "sliding_window=32"),
    ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_type='dynamic'"),
])
def test_models_the_engine_would_not_compute_exactly_are_refused_naming_the_field(family, fields, named):
    model = make_base_model(family)
    for name, value in fields.items():
        setattr(model.config, name, value)
    if family == "qwen2":
        model.config.layer_types = ["full_attention"] * 2 + ["sliding_attention"] * 4  # as Qwen2Config derives
    with pytest.raises(ValueError, match=re.escape(named)):
        engine_for(model)


def test_prompt_longer_than_the_context_is_rejected():
    engine = engine_for(make_base_model("llama"))
    with pytest.raises(ValueError, match="exceeds the model's context of 256 tokens"):
        engine.add_request(list(range(3, 90)) * 3, SamplingParams(max_tokens=10))


def test_aborted_request_frees_its_blocks():
    engine = engine_for(swiftkv_model())
    sequence = engine.add_request(prompts(1)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.blocks.usage > 0
    engine.abort(sequence)
    assert engine.blocks.usage == 0 and not engine.has_unfinished()


@pytest.mark.parametrize("kv_cache_dtype, tolerance", [("int8", 0.05), ("fp8", 0.1)])  # e4m3: 3 mantissa bits
def test_an_8_bit_kv_cache_doubles_capacity_and_keeps_logits_close(kv_cache_dtype, tolerance):
    model = swiftkv_model().to(torch.bfloat16)
    exact, quantized = engine_for(model), engine_for(model, kv_cache_dtype=kv_cache_dtype)
    head_dim = exact.runner.head_dim  # bf16: 2 bytes per value; int8: 1 byte per value + a 2-byte scale per head
    assert quantized.capacity_tokens / exact.capacity_tokens == pytest.approx(2 * head_dim / (head_dim + 2), rel=0.02)
    prompt = prompts(1)[0]
    logits = []
    for engine in (exact, quantized):
        sequence = engine.add_request(prompt, SamplingParams(max_tokens=1))
        engine.blocks.reserve(sequence, len(prompt))
        logits.append(engine.runner.run([Chunk(sequence, 0, len(prompt))])[0])
    assert (logits[1] - logits[0]).abs().max() < tolerance * logits[0].std()
    assert logits[1].argmax() == logits[0].argmax()


@pytest.mark.parametrize("model_kind, cpu_kernel", [("base", True), ("swiftkv-g2", True), ("swiftkv-g2", False)])
def test_compiled_one_stream_decode_equals_eager_decode_and_transformers(model_kind, cpu_kernel, monkeypatch):
    if not cpu_kernel:  # in place through SDPA, as where the CPU paged kernel cannot be built
        monkeypatch.setenv(paged_attention_cpu.DISABLE_VARIABLE, "0")
    model = make_base_model("llama") if model_kind == "base" else swiftkv_model("llama", 2)
    compiled = engine_for(model, compile_decode=True)
    assert compiled.runner.compile_seconds > 0  # compiled at start, on a dummy step
    graph, calls = compiled.runner.compiled_decode, []
    compiled.runner.compiled_decode = lambda batch: calls.append(batch) or graph(batch)
    for checked, prompt in zip((True, False), prompts(2)):  # one request at a time: lone in-place rows
        with pytest.MonkeyPatch.context() as patch, torch._dynamo.config.patch(error_on_recompile=True):
            patch.setattr(model_runner, "SKIP_COMPILED_GUARDS", not checked)  # checked: every length passes
            output = run(compiled, [prompt], GREEDY)[0]                       # the start-up graph's guards
        assert output.token_ids == run(engine_for(model), [prompt], GREEDY)[0].token_ids
        assert output.token_ids == hf_greedy(model, prompt, 10)
    assert len(calls) == 2 * 9  # the 9 decode steps of each request (the first token comes from prefill)


@pytest.mark.skipif(not paged_attention_cpu.available(), reason="batched compiled decode needs the CPU paged kernel")
@pytest.mark.parametrize("model_kind", ["base", "swiftkv-g2", "swiftkv-g2-tiled"])
def test_compiled_decode_of_several_streams_uses_the_start_up_graph_and_equals_eager_decode(model_kind):
    model = make_base_model("llama") if model_kind == "base" else swiftkv_model("llama", 2)
    options = {}
    if model_kind.endswith("tiled"):  # bf16, 32-wide heads, blocks of 16: a tiled cache where the CPU has AVX512-BF16
        model = convert_to_swiftkv(make_base_model("llama", hidden_size=128), 2, 2).bfloat16()
        options = dict(dtype="bfloat16", block_size=16)

    def tokens(engine):  # streams finishing at different steps: batches of 5, 4, 3, 2 rows, then a lone row
        sequences = [engine.add_request(prompt, SamplingParams(max_tokens=3 + 2 * index, ignore_eos=True))
                     for index, prompt in enumerate(prompts(5))]
        while engine.has_unfinished():
            engine.step()
        return [sequence.output_token_ids for sequence in sequences]

    compiled = engine_for(model, compile_decode=True, **options)
    assert compiled.runner.tiled_cache == (bool(options) and paged_attention_cpu.tiled_cache_is_supported(
        torch.bfloat16, 32, 16))
    graph, rows_per_call = compiled.runner.compiled_decode, []

    def recorded(batch):  # after the call: a step that raised (and ran row by row instead) is not counted
        logits = graph(batch)
        rows_per_call.append(len(batch.rows))
        return logits

    compiled.runner.compiled_decode = recorded
    with torch._dynamo.config.patch(error_on_recompile=True), pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_runner, "SKIP_COMPILED_GUARDS", False)  # every batch size passes the graphs' guards
        compiled_tokens = tokens(compiled)
    assert compiled_tokens == tokens(engine_for(model, **options))
    assert sorted(set(rows_per_call)) == [1, 2, 3, 4, 5] and compiled.runner.compiled_batches


@pytest.mark.skipif(not paged_attention_cpu.available(), reason="batched compiled decode needs the CPU paged kernel")
def test_a_batch_the_compiled_graph_cannot_run_decodes_eagerly_from_then_on():
    model = swiftkv_model()
    compiled = engine_for(model, compile_decode=True)
    graph = compiled.runner.compiled_decode

    def lone_rows_only(batch):
        if len(batch.rows) > 1:
            raise RuntimeError("Recompilation triggered with skip_guard_eval_unsafe stance")
        return graph(batch)

    compiled.runner.compiled_decode = lone_rows_only
    outputs = run(compiled, prompts(3), GREEDY)
    assert not compiled.runner.compiled_batches
    assert [o.token_ids for o in outputs] == [o.token_ids for o in run(engine_for(model), prompts(3), GREEDY)]


def test_the_serving_measurement_accounts_for_every_prompt_token_and_decode_row():
    from swiftkv.engine.measure import serve_engine

    token_prompts = prompts(5, seed=4)
    result = serve_engine(engine_for(swiftkv_model()), token_prompts, [0.0, 0.0, 0.01, 0.02, 0.02], output_len=6)
    steps = result["steps"]
    assert result["completed"] == 5
    assert steps["prompt"]["prompt_tokens"] == sum(map(len, token_prompts)) and steps["decode"]["prompt_tokens"] == 0
    assert steps["prompt"]["decode_rows"] + steps["decode"]["decode_rows"] == 5 * 5  # the first token is prefill's
    assert steps["prompt"]["count"] > 0 and steps["decode"]["count"] > 0 and steps["decode"]["seconds"] > 0
