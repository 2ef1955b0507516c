"""``padding_free="loss_only"``: the packed loss computed from the hidden states in chunks (runtime/chunked_loss.py).

Each test loads one tiny checkpoint twice through the real ``from_pretrained``: plain (the reference, padded) and
through the plugin with ``padding_free="loss_only"``. The loss and every parameter gradient must agree (fp32: loss
within 1e-5 relative, gradients within 1e-4 of each tensor's scale). A chunk is set to a few tokens so that every
packed row spans several. Two spies prove the path: the decoder saw one packed row, and the output layer computed
logits for zero tokens (so the full logits never existed); the unchunked cases see the full row there instead.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
import torch.nn.functional as F
import transformers

import panovlm_flashpatch
from panovlm_flashpatch import state, tiny
from panovlm_flashpatch.runtime import chunked_loss, padding_free
from test_padding_free import LENGTHS, WIDTH, padded_batch
from test_padding_free_families import llava_batch, model_class, needs

needs_packing = pytest.mark.skipif(not padding_free.sdpa_separates_packed(),
                                reason="SDPA/eager keep packed sequences apart from transformers 4.53")
FAMILIES = ("qwen3", "qwen2", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3")
REAL_TOKENS = sum(LENGTHS)
CHUNK = 5  # tokens per chunk (small_chunks)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of ~5 tokens (tiny vocabularies of 128): a packed row of 27 tokens spans six."""
    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 4 * 128 * CHUNK)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root, built = tmp_path_factory.mktemp("chunked"), {}

    def get(family):
        if family not in built:
            path = str(root / family)
            built[family] = tiny.build_lm(path) if family == "qwen3" else tiny.build_causal_lm(path, family)
        return built[family]

    return get


class Spies:
    """Rows the decoder saw per call, and rows of every matmul with the output layer's weight (forward and backward).

    The output layer is watched through torch's function mode, not a hook: a hook on it is one of the things the
    chunked path refuses (FSDP's)."""

    def __init__(self, model):
        self.rows, self.head_rows = [], []
        self.weight = model.get_output_embeddings().weight
        model.get_decoder().register_forward_pre_hook(self._decoder, with_kwargs=True)

    def _decoder(self, module, args, kwargs):
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        self.rows.append((tokens if tokens is not None else args[0]).shape[0])

    @property
    def head_tokens(self):
        return self.head_rows[:1]  # the output layer's own call comes first

    @property
    def largest_logits(self):
        return max(self.head_rows)


class _Watch(torch.overrides.TorchFunctionMode):
    def __init__(self, spies):
        super().__init__()
        self.spies = spies

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and args[1] is self.spies.weight:
            self.spies.head_rows.append(out.shape[-2] if out.dim() > 1 else 1)
        return out


def load(path, cls=transformers.AutoModelForCausalLM, mode="loss_only", attn="sdpa", **kwargs):
    """(plain reference, plugin load with padding_free=mode), same weights, training mode."""
    panovlm_flashpatch.remove()
    reference = cls.from_pretrained(path, attn_implementation=attn, **kwargs).train()
    assert panovlm_flashpatch.apply(padding_free=mode)
    return reference, cls.from_pretrained(path, attn_implementation=attn, **kwargs).train()


def step(model, batch, spies=None, **extra):
    model.zero_grad(set_to_none=True)
    with _Watch(spies) if spies is not None else contextlib.nullcontext():
        out = model(**batch, **extra)
        loss = out[0] if isinstance(out, tuple) else out.loss
        loss.backward()
    return out, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_equal(reference, got, rtol=1e-5, gtol=1e-4):
    (_, ref_loss, ref_grads), (_, loss, grads) = reference, got
    assert abs(loss.item() - ref_loss.item()) <= rtol * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    assert grads.keys() == ref_grads.keys() and grads
    for name, ref in ref_grads.items():  # a floor: a gradient that is 0 in truth holds float noise in both runs
        assert (grads[name] - ref).abs().max() <= gtol * ref.abs().max().clamp_min(1e-5), name


@needs_packing
@pytest.mark.parametrize("family", FAMILIES)
def test_each_verified_family_chunked_equals_the_padded_loss(ckpt, family):
    cls = model_class(family) if family != "qwen3" else transformers.AutoModelForCausalLM
    attn = "sdpa" if getattr(cls, "_supports_sdpa", True) is not False else "eager"  # Gemma2 has no SDPA on 5.x
    if family != "qwen3":
        needs(family, attn, listed=True)
    reference, model = load(ckpt(family), cls, attn=attn)
    record = panovlm_flashpatch.report(model)[0]["padding_free"]
    assert record.endswith("the loss computed from the last hidden states a chunk at a time (the full logits never exist)")
    spies = Spies(model)
    batch = padded_batch("right")
    expected, got = step(reference, batch), step(model, batch, spies)
    assert spies.rows == [1] and spies.head_tokens == [0], (spies.rows, spies.head_rows)
    assert spies.largest_logits <= CHUNK, spies.head_rows
    assert got[0].logits is None
    assert_equal(expected, got)
    # Gemma 2/3 soft-cap their logits (30 in the tiny Gemma 2 config): the chunks apply the cap too.
    assert state.of(model)["padding_free"]["softcap"] is (family in ("gemma2", "gemma3_text"))


def test_the_soft_cap_changes_the_loss_so_the_gemma2_case_can_fail(ckpt):
    """Without the cap the reference loss moves: a chunked loss that skipped it would fail the test above."""
    needs("gemma2")
    cls, path = model_class("gemma2"), ckpt("gemma2")
    batch = padded_batch("right")
    with torch.no_grad():
        capped = cls.from_pretrained(path, final_logit_softcapping=0.5)(**batch).loss
        uncapped = cls.from_pretrained(path, final_logit_softcapping=None)(**batch).loss
    assert abs(capped - uncapped) > 1e-3


@needs_packing
@pytest.mark.parametrize("items", ["tensor", "int"])
def test_num_items_in_batch_sums_over_the_given_count(ckpt, items):
    reference, model = load(ckpt("qwen3"))
    spies = Spies(model)
    count = torch.tensor(40) if items == "tensor" else 40
    batch = padded_batch("right")
    assert_equal(step(reference, batch, num_items_in_batch=count), step(model, batch, spies, num_items_in_batch=count))
    assert spies.head_tokens == [0] and spies.largest_logits <= CHUNK


@needs_packing
def test_tuple_output_keeps_the_loss_first(ckpt):
    reference, model = load(ckpt("qwen3"))
    batch = padded_batch("right")
    expected = step(reference, batch, return_dict=False, use_cache=False)
    got = step(model, batch, return_dict=False, use_cache=False)
    assert got[0][0].dim() == 0 and got[0][1] is None  # (loss, logits=None, ...)
    assert_equal(expected, got)


@needs_packing
def test_inputs_embeds_left_padding_and_gradient_checkpointing(ckpt):
    reference, model = load(ckpt("qwen3"))
    for m in (reference, model):
        getattr(m, "activation_checkpointing_enable", m.gradient_checkpointing_enable)()
    spies = Spies(model)
    batch = padded_batch("left")
    embeds = {k: v for k, v in batch.items() if k != "input_ids"}
    results = []
    for m in (reference, model):
        call = dict(embeds, inputs_embeds=m.get_input_embeddings()(batch["input_ids"]))
        results.append(step(m, call, spies if m is model else None))
    assert spies.rows == [1] and spies.head_tokens == [0] and spies.largest_logits <= CHUNK
    assert_equal(*results)


@needs_packing
def test_a_frozen_output_layer_gets_no_gradient(ckpt):
    reference, model = load(ckpt("qwen3"))
    for m in (reference, model):
        m.get_output_embeddings().weight.requires_grad_(False)  # tied: the embeddings too
    batch = padded_batch("right")
    expected, got = step(reference, batch), step(model, batch)
    assert "lm_head.weight" not in got[2] and "model.embed_tokens.weight" not in got[2]
    assert_equal(expected, got)


@needs_packing
def test_eval_mode_with_gradients_and_labels_is_chunked(ckpt):
    """Lightning keeps a submodule in eval mode while it trains: such a forward is packed, and chunked."""
    reference, model = load(ckpt("qwen3"))
    reference.eval(), model.eval()
    spies = Spies(model)
    batch = padded_batch("right")
    assert_equal(step(reference, batch), step(model, batch, spies))
    assert spies.head_tokens == [0] and spies.largest_logits <= CHUNK


@needs_packing
def test_autocast_matches_the_padded_run_under_the_same_autocast(ckpt):
    reference, model = load(ckpt("qwen3"))
    spies = Spies(model)
    batch = padded_batch("right")
    results = []
    for m in (reference, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(step(m, batch, spies if m is model else None))
    assert spies.head_tokens == [0] and spies.largest_logits <= CHUNK
    assert all(g.dtype == torch.float32 for g in results[1][2].values())
    assert_equal(*results, rtol=2e-3, gtol=3e-2)  # bf16 matmuls over different row blocks


@needs_packing
def test_without_labels_the_logits_are_computed(ckpt):
    _, model = load(ckpt("qwen3"))
    spies = Spies(model)
    batch = {k: v for k, v in padded_batch("right").items() if k != "labels"}
    with _Watch(spies):
        out = model(**batch)
    assert out.logits.shape == (len(LENGTHS), WIDTH, 128)
    assert spies.head_tokens == [REAL_TOKENS]


class OwnForward(transformers.Qwen3ForCausalLM if hasattr(transformers, "Qwen3ForCausalLM") else object):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                **kwargs):  # a user's own forward: its loss is left to it
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, labels=labels, **kwargs)


@needs_packing
@pytest.mark.parametrize("case", ["own_forward", "hooked_head"])
def test_what_cannot_be_chunked_keeps_the_models_loss_and_says_why(ckpt, caplog, case):
    path = ckpt("qwen3")
    if case == "own_forward":
        reference, model = load(path, OwnForward)
        assert "forward is not transformers' own" in panovlm_flashpatch.report(model)[0]["padding_free"]
    else:
        reference, model = load(path)
        model.get_output_embeddings().register_forward_hook(lambda m, a, out: None)  # e.g. FSDP's, a user's probe
    spies = Spies(model)
    batch = padded_batch("right")
    with caplog.at_level(logging.INFO, logger="panovlm_flashpatch"):
        expected, got = step(reference, batch), step(model, batch, spies)
    assert spies.rows == [1] and spies.head_tokens == [REAL_TOKENS], "packed, and unchunked"
    assert got[0].logits is None  # loss_only still drops them
    assert_equal(expected, got)
    if case == "hooked_head":
        assert any("computed by the model, unchunked: its output layer has hooks" in r.getMessage()
                   for r in caplog.records)


@needs_packing
def test_padding_free_true_is_not_chunked(ckpt):
    _, model = load(ckpt("qwen3"), mode=True)
    spies = Spies(model)
    with _Watch(spies):
        out = model(**padded_batch("right"))
    assert out.logits is not None and spies.head_tokens == [REAL_TOKENS]
    assert "chunk" not in panovlm_flashpatch.report(model)[0]["padding_free"]


@needs_packing
def test_a_llava_with_a_qwen3_lm_is_chunked(tmp_path):
    path = tiny.build_llava(str(tmp_path / "llava"), vision="siglip")
    reference, model = load(path, transformers.LlavaForConditionalGeneration)
    records = {r["component"]: r for r in panovlm_flashpatch.report(model)}
    assert records["text_config"]["padding_free"].endswith("(the full logits never exist)")
    spies = Spies(model)
    batch = llava_batch("right")
    expected, got = step(reference, batch, use_cache=False), step(model, batch, spies, use_cache=False)
    assert spies.rows == [1] and spies.head_tokens == [0] and spies.largest_logits <= CHUNK
    assert any("vision" in name for name in got[2])
    assert_equal(expected, got)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("bias", [False, True])
def test_the_chunked_function_against_cross_entropy(softcap, bias):
    """The function alone, several chunks, against the unchunked formula: loss and the three gradients."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(1, 23, 16, requires_grad=True)
    labels = torch.randint(0, 50, (1, 23))
    labels[0, [0, 5, 6]] = -100
    logits = head(hidden)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    want = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    want_grads = torch.autograd.grad(want, [hidden, *head.parameters()])
    got = chunked_loss.loss(hidden, head, labels, softcap=softcap)
    got_grads = torch.autograd.grad(got, [hidden, *head.parameters()])
    assert torch.allclose(got, want, rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-7)
    assert chunked_loss.chunk_rows(50) < 23  # several chunks (the fixture's size)


# --- what the model may change after its load, and what training code does around the loss ------------------------


@needs_packing
def test_a_loss_function_set_after_the_load_is_the_one_used(ckpt):
    if not isinstance(getattr(transformers.PreTrainedModel, "loss_function", None), property) or \
            transformers.PreTrainedModel.loss_function.fset is None:
        pytest.skip(f"transformers {transformers.__version__} cannot set a model's loss function")
    from transformers.loss.loss_utils import ForCausalLMLoss

    def smoothed(logits, labels, vocab_size, **kwargs):  # label smoothing, as a user would set it
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
        return F.cross_entropy(logits.float().view(-1, vocab_size), shifted, label_smoothing=0.1)

    reference, model = load(ckpt("qwen3"))
    for m in (reference, model):
        m.loss_function = smoothed
    spies = Spies(model)
    batch = padded_batch("right")
    assert_equal(step(reference, batch), step(model, batch, spies))
    assert spies.head_tokens == [REAL_TOKENS]
    assert smoothed is not ForCausalLMLoss


@needs_packing
def test_a_changed_soft_cap_is_the_one_used(ckpt):
    needs("gemma2")
    cls = model_class("gemma2")
    reference, model = load(ckpt("gemma2"), cls, attn="eager")
    for m in (reference, model):
        m.config.final_logit_softcapping = 0.7
    spies = Spies(model)
    batch = padded_batch("right")
    assert_equal(step(reference, batch), step(model, batch, spies))
    assert spies.head_tokens == [0]


@needs_packing
@pytest.mark.parametrize("items", [None, 0], ids=["mean", "num_items_0"])
def test_no_counted_label_gives_the_padded_runs_zero_gradients_not_nan(ckpt, items):
    """Completion-only training whose answers were truncated away: nothing counted. Plain transformers: a NaN loss
    (0/0) and zero gradients; a NaN in a gradient would destroy the model at the optimizer step."""
    reference, model = load(ckpt("qwen3"))
    batch = padded_batch("right")
    batch["labels"] = torch.full_like(batch["labels"], -100)
    extra = {} if items is None else {"num_items_in_batch": items}
    expected, got = step(reference, batch, **extra), step(model, batch, **extra)
    assert torch.isnan(got[1]) and torch.isnan(expected[1])
    assert expected[2].keys() == got[2].keys()
    for name, ref in expected[2].items():
        assert torch.equal(got[2][name], ref), name


@needs_packing
def test_a_backward_hook_on_the_output_layer_still_fires(ckpt):
    reference, model = load(ckpt("qwen3"))
    seen = []
    for m in (reference, model):
        m.get_output_embeddings().register_full_backward_hook(lambda mod, gin, gout: seen.append(gout[0].shape) or None)
    batch = padded_batch("right")
    assert_equal(step(reference, batch), step(model, batch))
    assert len(seen) == 2 and seen[1][-2] == REAL_TOKENS  # the packed row's logits, computed in full


@needs_packing
def test_a_probe_calling_the_head_inside_the_decoder_gets_real_logits(ckpt):
    """A logit lens: a hook on a decoder layer reads the head's logits of that layer. It must see them, and the
    decoder must run once; only the model's own call of the head, after the decoder, is chunked."""
    reference, model = load(ckpt("qwen3"))
    lens = []
    layer = model.get_decoder().layers[0]
    layer.register_forward_hook(lambda mod, args, out: lens.append(
        model.get_output_embeddings()(out[0] if isinstance(out, tuple) else out).shape[-2]))
    spies = Spies(model)
    batch = padded_batch("right")
    assert_equal(step(reference, batch), step(model, batch, spies))
    assert lens == [REAL_TOKENS] and spies.rows == [1]
    assert spies.head_rows[:2] == [REAL_TOKENS, 0]  # the probe's call, then the model's own (chunked)


@needs_packing
def test_a_penalty_on_the_gradients_differentiates_through_the_chunks(ckpt):
    """create_graph=True (a gradient penalty): second-order gradients as in the padded run."""
    reference, model = load(ckpt("qwen3"), attn="eager")  # SDPA's math kernel has no double backward on every torch
    batch = padded_batch("right")
    results = []
    for m in (reference, model):
        m.zero_grad(set_to_none=True)
        embeds = m.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        call = {k: v for k, v in batch.items() if k != "input_ids"}
        loss = m(inputs_embeds=embeds, **call).loss
        (first,) = torch.autograd.grad(loss, embeds, create_graph=True)
        penalty = first.pow(2).sum()
        penalty.backward()
        results.append((penalty.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (ref_penalty, ref_grads), (penalty, grads) = results
    assert torch.allclose(penalty, ref_penalty, rtol=1e-4)
    for name, ref in ref_grads.items():
        assert (grads[name] - ref).abs().max() <= 1e-3 * ref.abs().max().clamp_min(1e-5), name


@needs_packing
def test_a_label_out_of_range_fails_as_in_the_padded_run(ckpt):
    reference, model = load(ckpt("qwen3"))
    batch = padded_batch("right")
    batch["labels"][0, 3] = -1
    for m in (reference, model):
        with pytest.raises((IndexError, RuntimeError)):
            m(**batch).loss.backward()


@needs_packing
def test_torch_func_grad_runs_unchunked_as_the_padded_run(ckpt):
    """torch.func transforms cannot run an autograd.Function without setup_context: the model's own loss there."""
    from torch.func import functional_call, grad

    reference, model = load(ckpt("qwen3"))
    batch = padded_batch("right")
    got = {}
    for name, m in (("reference", reference), ("model", model)):
        params = {k: v.detach() for k, v in m.named_parameters()}
        got[name] = grad(lambda p, m=m: functional_call(m, p, args=(), kwargs=batch).loss)(params)
    for name, ref in got["reference"].items():
        assert (got["model"][name] - ref).abs().max() <= 1e-4 * ref.abs().max().clamp_min(1e-5), name


@needs_packing
def test_two_threads_training_one_model_are_both_chunked(ckpt, caplog):
    import threading

    reference, model = load(ckpt("qwen3"))
    batch = padded_batch("right")
    with torch.no_grad():
        want = reference(**batch).loss
    losses, barrier = [], threading.Barrier(2)

    def train():
        barrier.wait()
        for _ in range(10):
            losses.append(model(**batch).loss.detach())

    with caplog.at_level(logging.INFO, logger="panovlm_flashpatch"):
        threads = [threading.Thread(target=train) for _ in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    assert len(losses) == 20 and all(torch.allclose(loss, want, rtol=1e-5) for loss in losses)
    assert not any("unchunked" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert not model.get_output_embeddings()._forward_pre_hooks and not chunked_loss._OURS


def test_an_ignored_rows_infinite_logits_do_not_reach_the_loss():
    """torch's loss skips ignored rows; inf - inf times 0 would be NaN."""
    head = torch.nn.Linear(4, 10)
    hidden = torch.randn(1, 6, 4)
    hidden[0, 2] = float("inf")  # its logits are +-inf (or NaN); row 2 predicts label 3, ignored
    labels = torch.randint(0, 10, (1, 6))
    labels[0, 3] = -100
    want = F.cross_entropy(head(hidden)[0, :-1], labels[0, 1:], ignore_index=-100)
    got = chunked_loss.loss(hidden, head, labels)
    assert torch.isfinite(want) and torch.allclose(got, want)


@needs_packing
def test_no_autocast_context_is_entered_where_autocast_is_off(ckpt, monkeypatch):
    """torch < 2.5 refuses an autocast context for some devices (mps) even to disable it: this machine cannot be one,
    so a refusing ``torch.autocast`` stands in for it; outside autocast the chunked loss must not touch it."""
    reference, model = load(ckpt("qwen3"))
    batch = padded_batch("right")
    expected = step(reference, batch)

    real = torch.autocast

    def refusing(device_type, *args, **kwargs):  # refuses the chunked loss only (transformers' own code runs as usual)
        import sys

        if sys._getframe(1).f_code.co_filename == chunked_loss.__file__:
            raise RuntimeError(f"unsupported autocast device_type '{device_type}'")
        return real(device_type, *args, **kwargs)

    monkeypatch.setattr(chunked_loss.torch, "autocast", refusing)
    spies = Spies(model)
    assert_equal(expected, step(model, batch, spies))
    assert spies.head_tokens == [0]


@needs_packing
def test_a_bug_in_the_chunking_check_costs_the_chunking_not_the_step(ckpt, monkeypatch):
    from panovlm_flashpatch import _safety

    reference, model = load(ckpt("qwen3"))

    def broken(model):
        raise AttributeError("a bug of ours")

    monkeypatch.setattr(chunked_loss, "call_reason", broken)
    spies = Spies(model)
    batch = padded_batch("right")
    assert_equal(step(reference, batch), step(model, batch, spies))
    assert spies.rows == [1] and spies.head_tokens == [REAL_TOKENS]  # packed, unchunked
    assert _safety.internal_errors == ["checking the chunked loss: AttributeError: a bug of ours"]
    _safety.internal_errors.clear()  # expected here; every other test asserts there are none
