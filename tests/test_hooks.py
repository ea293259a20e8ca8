"""Attention-module discovery and the activation hooks (training/hooks.py), against independent computations."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ftguard.errors import FtguardError
from ftguard.training.hooks import (
    OutputCapture,
    add_gaussian_noise,
    add_to_outputs,
    find_attention_modules,
    output_gradients,
)

H = 16
COMMON = dict(
    vocab_size=64,
    hidden_size=H,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)

# (model class, config, expected attention class, path from the model to its layer list, attention attribute)
ARCHITECTURES = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(**COMMON), "LlamaAttention", "model.layers", "self_attn"),
    "mistral": (
        MistralForCausalLM,
        lambda: MistralConfig(**COMMON),
        "MistralAttention",
        "model.layers",
        "self_attn",
    ),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**COMMON), "Qwen2Attention", "model.layers", "self_attn"),
    "qwen3": (
        Qwen3ForCausalLM,
        lambda: Qwen3Config(**COMMON, head_dim=8),
        "Qwen3Attention",
        "model.layers",
        "self_attn",
    ),
    "gemma2": (
        Gemma2ForCausalLM,
        lambda: Gemma2Config(**COMMON, head_dim=8),
        "Gemma2Attention",
        "model.layers",
        "self_attn",
    ),
    "gemma3": (
        Gemma3ForCausalLM,
        lambda: Gemma3TextConfig(**COMMON, head_dim=8),
        "Gemma3Attention",
        "model.layers",
        "self_attn",
    ),
    "opt": (
        OPTForCausalLM,
        lambda: OPTConfig(
            vocab_size=64,
            hidden_size=H,
            ffn_dim=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            word_embed_proj_dim=H,
            max_position_embeddings=64,
        ),
        "OPTAttention",
        "model.decoder.layers",
        "self_attn",
    ),
    "gpt_neox": (
        GPTNeoXForCausalLM,
        lambda: GPTNeoXConfig(
            vocab_size=64,
            hidden_size=H,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
        ),
        "GPTNeoXAttention",
        "gpt_neox.layers",
        "attention",
    ),
    "phi3": (
        Phi3ForCausalLM,
        lambda: Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "Phi3Attention",
        "model.layers",
        "self_attn",
    ),
}


def _get(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _llama(layers=2, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**COMMON, "num_hidden_layers": layers})).float()


def _batch(seed=1, b=3, t=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, -2:] = 0  # some padding
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_finds_the_attention_submodule_of_each_layer_in_order(arch):
    model_cls, make_config, class_name, layers_path, attr = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = model_cls(make_config()).float()
    found = find_attention_modules(model)
    layers = _get(model, layers_path)
    assert [type(m).__name__ for m in found] == [class_name] * 2
    assert all(m is getattr(layer, attr) for m, layer in zip(found, layers, strict=True)), (
        "the layers' own modules, in order"
    )
    # The first output of each is the attention's hidden state that joins the residual stream.
    batch = _batch()
    with OutputCapture(found) as capture:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        capture.stop()
    assert [tuple(o.shape) for o in capture.outputs] == [(3, 7, H)] * 2


def test_finds_them_through_a_peft_wrapper_and_by_class_name():
    model = _llama()
    plain = find_attention_modules(model)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    )
    assert find_attention_modules(peft_model) == plain == [layer.self_attn for layer in model.model.layers]
    assert find_attention_modules(peft_model, ["LlamaAttention"]) == plain


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = nn.Linear(4, 4)
        self.ff = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.ff(self.mixer(x))


class _Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_unknown_architecture_names_the_model_and_the_config_key():
    model = _Unknown()
    with pytest.raises(FtguardError, match=r"_Unknown.*align\.args\.attention_modules"):
        find_attention_modules(model)
    assert find_attention_modules(model, ["Linear"]) == [
        m for m in model.modules() if isinstance(m, nn.Linear)
    ]
    with pytest.raises(
        FtguardError,
        match=r"align\.args\.attention_modules = \['NoSuchAttention'\] matches no module of _Unknown",
    ):
        find_attention_modules(model, ["NoSuchAttention"])
    peft_like = get_peft_model(_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(
        FtguardError, match=r"LlamaForCausalLM.*attention-like classes in the model: LlamaAttention"
    ):
        find_attention_modules(peft_like, ["OPTAttention"], config_key="align.args.attention_modules")


def test_add_to_outputs_equals_adding_to_o_proj_and_is_a_constant():
    """LlamaAttention's output is its o_proj output: adding δ there is an independent way to do the same."""
    model, batch = _llama(), _batch()
    modules = find_attention_modules(model)
    deltas = [torch.randn(3, 7, H, requires_grad=True) for _ in modules]
    with add_to_outputs(modules, deltas):
        out = model(**batch)
    out.loss.backward()
    assert all(d.grad is None for d in deltas), "no gradient flows into the perturbation"
    handles = [
        layer.self_attn.o_proj.register_forward_hook(lambda m, a, o, d=d: o + d.detach())
        for layer, d in zip(model.model.layers, deltas, strict=True)
    ]
    ref = model(**batch)
    for h in handles:
        h.remove()
    assert torch.allclose(out.logits, ref.logits, atol=1e-6)
    assert not torch.allclose(out.logits, model(**batch).logits, atol=1e-3), (
        "the hooks are gone after the block"
    )


def _reference_activation_grads(model, batch, modules):
    """Independent: a zero probe added to each output; d loss / d probe = d loss / d output."""
    probes = [None] * len(modules)

    def make(i):
        def hook(m, a, o):
            probes[i] = torch.zeros_like(o[0], requires_grad=True)
            return (o[0] + probes[i], *o[1:])

        return hook

    handles = [m.register_forward_hook(make(i)) for i, m in enumerate(modules)]
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, probes)
    for h in handles:
        h.remove()
    return loss, grads


def test_output_gradients_match_retain_grad_and_touch_no_weight_grad():
    model, batch = _llama(layers=3), _batch()
    modules = find_attention_modules(model)
    with OutputCapture(modules) as capture:
        loss = model(**batch).loss
        capture.stop()
        grads = output_gradients(loss, capture.outputs)
    assert all(p.grad is None for p in model.parameters()), "activation gradients only"
    kept = []
    handles = [
        m.register_forward_hook(lambda m, a, o: kept.append(o[0]) or o[0].retain_grad()) for m in modules
    ]
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    for g, h in zip(grads, kept, strict=True):
        assert torch.allclose(g, h.grad, atol=1e-7) and g.abs().sum() > 0


def test_output_gradients_when_the_first_layers_have_nothing_trainable():
    """LoRA on a late MLP only: early attention outputs do not require grad, yet their gradient is defined."""
    model, batch = _llama(layers=3), _batch()
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[2].mlp.down_proj.weight.requires_grad_(True)
    modules = find_attention_modules(model)
    with OutputCapture(modules) as capture:
        loss = model(**batch).loss
        capture.stop()
        grads = output_gradients(loss, capture.outputs)
    ref_loss, ref = _reference_activation_grads(model, batch, modules)
    assert torch.allclose(loss, ref_loss)
    for g, r in zip(grads, ref, strict=True):
        assert torch.allclose(g, r, atol=1e-7) and r.abs().sum() > 0


def test_output_gradients_under_gradient_checkpointing():
    model, batch = _llama(layers=3), _batch()
    model.train()
    modules = find_attention_modules(model)
    _, ref = _reference_activation_grads(model, batch, modules)
    model.activation_checkpointing_enable()  # transformers' default: non-reentrant
    with OutputCapture(modules) as capture:
        loss = model(**batch).loss
        capture.stop()
        grads = output_gradients(loss, capture.outputs)
    for g, r in zip(grads, ref, strict=True):
        assert torch.allclose(g, r, atol=1e-6)
    model.activation_checkpointing_disable()
    model.activation_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(FtguardError, match="reentrant"), OutputCapture(modules) as capture:
        model(**batch)


def test_gaussian_noise_has_std_sqrt_rho_and_fresh_draws():
    model, batch = _llama(), _batch(b=8, t=32)
    batch = {k: v for k, v in batch.items() if k != "labels"}
    modules = find_attention_modules(model)
    clean, noisy = [], []
    # prepend: sees the output before the noise; registered inside the block after it: sees it after.
    pre = [
        m.register_forward_hook(lambda m, a, o: clean.append(o[0].detach()), prepend=True) for m in modules
    ]
    rho = 4.0
    with add_gaussian_noise(modules, rho**0.5) as sq_norms:
        post = [m.register_forward_hook(lambda m, a, o: noisy.append(o[0].detach())) for m in modules]
        model(**batch)
        model(**batch)
    for h in pre + post:
        h.remove()
    diffs = [n - c for n, c in zip(noisy, clean, strict=True)]
    noise = torch.cat([d.flatten() for d in diffs])
    assert noise.numel() == 4 * 8 * 32 * H
    assert abs(noise.std().item() - rho**0.5) < 0.05 and abs(noise.mean().item()) < 0.05
    assert not torch.allclose(diffs[0], diffs[2]), "new noise on every call"
    assert torch.allclose(torch.stack(sq_norms), torch.stack([d.pow(2).sum() for d in diffs]), rtol=1e-4)


class _CastsTo(nn.Module):
    """Returns its input in another dtype, as an attention module under bf16 autocast returns bf16 for fp32 input."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, hidden_states):
        return (hidden_states.to(self.dtype), None)


@pytest.mark.parametrize(
    ("stream", "output", "expected"),
    [
        (torch.float32, torch.bfloat16, torch.float32),  # autocast over fp32 weights: ε lands unrounded
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),  # a bf16 model: the stream stays bf16
        (torch.float32, torch.float32, torch.float32),
    ],
)
def test_additions_are_made_in_the_precision_of_the_stream_the_output_joins(stream, output, expected):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8).to(stream)
    delta = torch.randn(2, 3, 8) * 1e-3  # far below bf16's spacing at |x| ~ 1: rounding would swallow it
    module = _CastsTo(output)
    with add_to_outputs([module], [delta]):
        by_keyword = module(hidden_states=x)[0]
        positional = module(x)[0]
    assert by_keyword.dtype == positional.dtype == expected
    assert torch.equal(by_keyword, positional)
    if expected == torch.float32:
        applied = by_keyword - x.to(output).float()
        torch.testing.assert_close(applied, delta, rtol=0, atol=1e-6)
    with add_gaussian_noise([module], std=1e-3) as norms:
        noisy = module(x)[0]
    assert noisy.dtype == expected and len(norms) == 1
    if expected == torch.float32:
        applied = noisy - x.to(output).float()
        assert applied.pow(2).sum().sqrt().item() == pytest.approx(norms[0].sqrt().item(), rel=1e-4)
