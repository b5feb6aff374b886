"""The batched KV-cache sampler on tiny random models (float64, so greedy ties cannot flip)."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import fastpeft
from fastpeft.reasoning.kv_cache import SharedPrefixState, shared_prefix_attention
from fastpeft.reasoning.sampler import Sampler
from fastpeft.reasoning.types import Generator, SamplingParams
from fastpeft.training.tokenizer import load_char_tokenizer

TOK = load_char_tokenizer()
VOCAB = len(TOK)
EOS, PAD = TOK.eos_token_id, TOK.pad_token_id
PROMPTS = ["the cat sat", "hi", "a b c d e f", "xyz"]  # different lengths -> left padding
MODES = ["shared", "copy"]


def _ids(text: str) -> list[int]:
    return TOK.encode(text)


def _llama(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        initializer_range=0.1,
        eos_token_id=EOS,
        pad_token_id=PAD,
        bos_token_id=1,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def _gpt2(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        initializer_range=0.1,
        eos_token_id=EOS,
        pad_token_id=PAD,
        bos_token_id=1,
    )
    return GPT2LMHeadModel(config).double().eval()


def _mistral(seed: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)  # a window of 4 is much shorter than prompt + completion: exercised
    config = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        sliding_window=4,
        initializer_range=0.1,
        eos_token_id=EOS,
        pad_token_id=PAD,
        bos_token_id=1,
    )
    return MistralForCausalLM(config).double().eval()


@pytest.fixture(scope="module")
def llama():
    return _llama()


def _hf_greedy(model, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """model.generate(do_sample=False) on left-padded prompts, each row cut after its first EOS."""
    rows = [_ids(p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )[:, width:].tolist()
    return [r[: r.index(EOS) + 1] if EOS in r else r for r in out]


@pytest.mark.parametrize("make_model", [_llama, _gpt2, _mistral], ids=["llama", "gpt2", "mistral-sliding"])
@pytest.mark.parametrize("mode", MODES)
def test_greedy_matches_hf_generate(make_model, mode):
    model = make_model()
    expected = _hf_greedy(model, PROMPTS, 10)
    got = Sampler(model, TOK, prefix_mode=mode).generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0), n=2)
    assert len(got) == len(PROMPTS) and all(len(c) == 2 for c in got)
    for i, completions in enumerate(got):
        for c in completions:
            assert c.token_ids == expected[i], (i, mode)
            assert c.finish_reason == ("eos" if expected[i][-1] == EOS else "length")
            body = c.token_ids[:-1] if c.finish_reason == "eos" else c.token_ids
            assert c.text == TOK.decode(body)
    assert len({tuple(r) for r in expected}) > 1  # the prompts really lead to different continuations


def _reference_logprobs(model, prompt: str, completion: list[int], params: SamplingParams) -> list[float]:
    """Independent reference: one full forward over prompt + completion (no cache, no padding)."""
    prompt_ids = _ids(prompt)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + completion])).logits[0].double()
    out = []
    for k, tok in enumerate(completion):
        z = logits[len(prompt_ids) - 1 + k] / params.temperature
        keep = torch.ones_like(z, dtype=torch.bool)
        if params.top_k:
            keep &= z >= torch.sort(z, descending=True).values[params.top_k - 1]
        if params.top_p < 1:
            probs, mass, allowed = torch.softmax(z.masked_fill(~keep, -torch.inf), -1), 0.0, set()
            for j in torch.argsort(probs, descending=True).tolist():
                if mass >= params.top_p:
                    break
                allowed.add(j)
                mass += probs[j].item()
            keep &= torch.tensor([j in allowed for j in range(len(z))])
        assert keep[tok], "sampled a token outside the top-k / top-p set"
        out.append((z[tok] - torch.logsumexp(z[keep], -1)).item())
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("filters", [dict(), dict(top_k=7), dict(top_p=0.8)], ids=["plain", "top_k", "top_p"])
def test_sampled_logprobs_equal_full_forward(llama, mode, filters):
    params = SamplingParams(max_new_tokens=8, temperature=0.7, seed=3, **filters)
    got = Sampler(llama, TOK, prefix_mode=mode).generate(PROMPTS[:3], params, n=3)
    for prompt, completions in zip(PROMPTS[:3], got):
        for c in completions:
            ref = _reference_logprobs(llama, prompt, c.token_ids, params)
            torch.testing.assert_close(torch.tensor(c.token_logprobs), torch.tensor(ref), atol=1e-9, rtol=0)


def test_greedy_logprobs_are_model_log_softmax(llama):
    c = Sampler(llama, TOK).generate(["hello"], SamplingParams(max_new_tokens=6, temperature=0))[0][0]
    ref = _reference_logprobs(llama, "hello", c.token_ids, SamplingParams(temperature=1.0))
    torch.testing.assert_close(torch.tensor(c.token_logprobs), torch.tensor(ref), atol=1e-9, rtol=0)


def test_stop_strings_stop_rows_independently(llama):
    sampler = Sampler(llama, TOK, eos_token_id=[])
    free = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=14, temperature=0))
    texts = [c[0].text for c in free]
    # a two-character stop taken from row 0's continuation (so it spans two tokens) that row 1 lacks
    stop = next(texts[0][i : i + 2] for i in range(2, 12) if texts[0][i : i + 2] not in texts[1])
    params = SamplingParams(max_new_tokens=14, temperature=0, stop=(stop, "@@never@@"))
    got = sampler.generate(PROMPTS, params)
    for free_c, (c,) in zip(free, got):
        full = free_c[0]
        if stop in full.text:
            end = full.text.index(stop) + len(stop)
            assert c.finish_reason == "stop" and c.text == full.text[:end] and c.text.endswith(stop)
            assert c.token_ids == full.token_ids[:end]  # one token per character
        else:
            assert c.finish_reason == "length" and c.token_ids == full.token_ids and c.text == full.text
    assert got[0][0].finish_reason == "stop" and got[1][0].finish_reason == "length"


def test_eos_and_per_row_lengths_and_early_finish(llama):
    params = SamplingParams(max_new_tokens=12, temperature=0)
    free = [c[0].token_ids for c in Sampler(llama, TOK, eos_token_id=[]).generate(PROMPTS, params)]
    eos = free[0][3]  # row 0 emits it at step 3 at the latest
    forwards = []
    handle = llama.register_forward_hook(lambda *_: forwards.append(1))
    try:
        got = [c[0] for c in Sampler(llama, TOK, eos_token_id=eos).generate(PROMPTS, params)]
    finally:
        handle.remove()
    for full, c in zip(free, got):
        expect = full[: full.index(eos) + 1] if eos in full else full
        assert c.token_ids == expect and len(c.token_logprobs) == len(expect)
        assert c.finish_reason == ("eos" if eos in full else "length")
    longest = max(len(c.token_ids) for c in got)
    assert len(forwards) == 1 + longest - 1  # one prefill, then decode only while some row is running

    # the cache bounds each row: budget = min(max_new_tokens, max_seq_len - prompt length)
    short = Sampler(llama, TOK, max_seq_len=13, eos_token_id=[])
    lens = [len(_ids(p)) for p in PROMPTS]
    for p_len, (c,) in zip(lens, short.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=0))):
        assert c.num_tokens == min(6, 13 - p_len) and c.finish_reason == "length"


def test_top_k_1_equals_greedy(llama):
    sampler = Sampler(llama, TOK)
    greedy = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0))
    top1 = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, seed=5), n=2)
    for g, t in zip(greedy, top1):
        assert all(c.token_ids == g[0].token_ids for c in t)
        assert all(lp == 0.0 for c in t for lp in c.token_logprobs)  # a one-token distribution


def test_seeded_runs_are_reproducible(llama):
    sampler = Sampler(llama, TOK)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=11)
    a, b = sampler.generate(PROMPTS, params, n=2), sampler.generate(PROMPTS, params, n=2)
    assert a == b
    c = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0, seed=12), n=2)
    assert [x.token_ids for r in a for x in r] != [x.token_ids for r in c for x in r]


def test_shared_prefix_equals_copies_and_separate_runs(llama):
    params = SamplingParams(max_new_tokens=9, temperature=0.9, seed=7)
    shared = Sampler(llama, TOK, prefix_mode="shared").generate(PROMPTS, params, n=3)
    copied = Sampler(llama, TOK, prefix_mode="copy").generate(PROMPTS, params, n=3)
    for s_row, c_row in zip(shared, copied):
        for s, c in zip(s_row, c_row):
            assert s.token_ids == c.token_ids and s.finish_reason == c.finish_reason
            torch.testing.assert_close(
                torch.tensor(s.token_logprobs), torch.tensor(c.token_logprobs), atol=1e-9, rtol=0
            )
    # greedy: n samples over a shared prompt == each prompt run alone with n=1 (no batch, no padding)
    greedy = SamplingParams(max_new_tokens=9, temperature=0)
    batched = Sampler(llama, TOK).generate(PROMPTS, greedy, n=3)
    for prompt, row in zip(PROMPTS, batched):
        alone = Sampler(llama, TOK).generate([prompt], greedy)[0][0]
        assert all(c.token_ids == alone.token_ids for c in row)


@pytest.mark.parametrize(
    "dtype,atol", [(torch.float64, 1e-12), pytest.param(torch.float32, 2e-5, marks=pytest.mark.triton)]
)
@pytest.mark.parametrize("window", [None, 3])
def test_shared_prefix_attention_matches_dense_reference(window, dtype, atol):
    """The two-segment attention against a per-row loop over explicitly gathered keys, float64; in
    float32 also with the cascade kernel (the Triton interpreter) for the prompt part."""
    torch.manual_seed(0)
    P, n, hkv, g, d, lp, gen, step = 2, 3, 2, 2, 16, 5, 4, 2
    lengths = torch.tensor([5, 3])
    mask = torch.arange(lp)[None] >= (lp - lengths)[:, None]
    pk, pv = torch.randn(P, hkv, lp, d, dtype=dtype), torch.randn(P, hkv, lp, d, dtype=dtype)
    pk[~mask[:, None, :, None].expand_as(pk)] = 1e3  # garbage in padding must be ignored
    gk, gv = torch.randn(P * n, hkv, gen, d, dtype=dtype), torch.randn(P * n, hkv, gen, d, dtype=dtype)
    gk[:, :, step + 1 :] = 1e3  # slots not written yet
    q = torch.randn(P * n, hkv * g, 1, d, dtype=dtype)
    layer = types.SimpleNamespace(keys=pk, values=pv)
    state = SharedPrefixState(types.SimpleNamespace(layers=[layer]), mask, lengths, gen)
    state.advance(torch.tensor(step), torch.promote_types(dtype, torch.float32))
    module = types.SimpleNamespace(layer_idx=0)
    out, _ = shared_prefix_attention(
        module, q, gk, gv, None, scaling=0.3, sliding_window=window, fastpeft_shared_prefix_state=state
    )
    assert out.shape == (P * n, 1, hkv * g, d)
    for b in range(P * n):
        p = b // n
        real = mask[p].nonzero().flatten()
        keys = torch.cat([pk[p][:, real], gk[b][:, : step + 1]], dim=1)  # [hkv, L, d]
        vals = torch.cat([pv[p][:, real], gv[b][:, : step + 1]], dim=1)
        key_pos = torch.cat([torch.arange(len(real)), lengths[p] + torch.arange(step + 1)])
        visible = torch.ones_like(key_pos, dtype=torch.bool)
        if window is not None:
            visible = (lengths[p] + step) - key_pos < window
        for h in range(hkv * g):
            s = (keys[h // g] @ q[b, h, 0]) * 0.3
            w = torch.softmax(s.masked_fill(~visible, -torch.inf), -1)
            torch.testing.assert_close(out[b, 0, h].double(), (w @ vals[h // g]).double(), atol=atol, rtol=0)


def test_adapters_route_rows():
    model = _llama(seed=4, dtype=torch.float32)  # the fused LoRA op takes fp32/fp16/bf16
    for name in ("a", "b"):
        config = fastpeft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        )
        fastpeft.inject(model, config, name)
    params = SamplingParams(max_new_tokens=8, temperature=0)
    routed = Sampler(model, TOK).generate(PROMPTS[:2], params, n=2, adapters=["a", "b"])
    for prompt, name, row in zip(PROMPTS[:2], ("a", "b"), routed):
        fastpeft.set_adapter(model, name)
        alone = Sampler(model, TOK).generate([prompt], params)[0][0]
        assert all(c.token_ids == alone.token_ids for c in row)
    fastpeft.set_adapter(model, "a")
    other = Sampler(model, TOK).generate(PROMPTS[1:2], params)[0][0]
    assert other.token_ids != routed[1][0].token_ids  # adapter b really differs from a here


def test_errors(llama):
    sampler = Sampler(llama, TOK, max_seq_len=8)
    params = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        sampler.generate([], params)
    with pytest.raises(ValueError, match=r"prompts\[1\] is an empty string"):
        sampler.generate(["ok", ""], params)
    with pytest.raises(TypeError, match="prompts"):
        sampler.generate("a single string", params)
    for bad_n in (0, -2):
        with pytest.raises(ValueError, match="n must be positive"):
            sampler.generate(["ok"], params, n=bad_n)
    with pytest.raises(ValueError, match=r"prompt 0 has 8 tokens.*max_seq_len=8"):
        sampler.generate(["12345678"], params)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        Sampler(llama).generate_ids([[5, 6]], SamplingParams(stop=("\n\n",)))
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        sampler.generate(["ok"], SamplingParams(stop=("",)))
    with pytest.raises(ValueError, match="adapters has 2 names for 1 prompts"):
        sampler.generate(["ok"], params, adapters=["a", "b"])
    with pytest.raises(ValueError, match="adapter"):
        sampler.generate(["ok", "no"], params, adapters=["nope", None])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sampler.generate_ids([[VOCAB]], params)
    with pytest.raises(ValueError, match="prefix_mode"):
        Sampler(llama, TOK, prefix_mode="paged")


def test_protocol_and_model_state_restored(llama):
    sampler = Sampler(llama, TOK)
    assert isinstance(sampler, Generator)
    llama.train()
    llama.model.layers[0].eval()  # a submodule's own flag must survive too
    before = llama.config._attn_implementation
    sampler.generate(["abc"], SamplingParams(max_new_tokens=3, seed=0), n=2)
    assert llama.training and not llama.model.layers[0].training and llama.model.layers[1].training
    assert llama.config._attn_implementation == before
    llama.eval()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_cuda_graph_decode_matches_eager_on_gpu(mode):
    model = _llama().float().cuda()
    params = SamplingParams(max_new_tokens=12, temperature=0.8, seed=1)
    graphed = Sampler(model, TOK, prefix_mode=mode, cuda_graph=True).generate(PROMPTS, params, n=2)
    eager = Sampler(model, TOK, prefix_mode=mode, cuda_graph=False).generate(PROMPTS, params, n=2)
    for g_row, e_row in zip(graphed, eager):
        for g, e in zip(g_row, e_row):
            assert g.token_ids == e.token_ids
            torch.testing.assert_close(
                torch.tensor(g.token_logprobs), torch.tensor(e.token_logprobs), atol=1e-4, rtol=0
            )


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_cuda_graph_decode_with_fastpeft_kernels_matches_eager_on_gpu(quantize):
    """bf16 Llama with fastpeft (Q)LoRA: the decode step's Triton kernels (NF4 decode, cascade
    attention) inside the captured graph give the eager tokens, greedy, with stop strings (batched
    host checks) and EOS in play."""
    model = _llama().to(torch.bfloat16).cuda()
    fastpeft.inject(
        model,
        fastpeft.LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", quantize=quantize, init_lora_weights=False
        ),
    )
    params = SamplingParams(max_new_tokens=20, temperature=0.0, stop=("e ",))
    graphed = Sampler(model, TOK, cuda_graph=True).generate(PROMPTS, params, n=3)
    eager = Sampler(model, TOK, cuda_graph=False).generate(PROMPTS, params, n=3)
    for g_row, e_row in zip(graphed, eager):
        for g, e in zip(g_row, e_row):
            assert (g.token_ids, g.finish_reason, g.text) == (e.token_ids, e.finish_reason, e.text)
