"""Model-agnostic access to the attention sub-modules of a decoder: find them, read their outputs and the
loss gradient with respect to those outputs, and add a constant (or random) tensor to those outputs.

Used by Vaccine and its variants (docs/methods.md, Vaccine); ``decoder_parts`` finds the
MLP sub-modules, final norm and LM head for the methods that read MLP outputs (RepNoise, LDIFS). Everything works through
PEFT wrappers (LoRA replaces the projections *inside* an attention module, never the module itself) and under
non-reentrant gradient checkpointing (the hooks stay registered until the backward pass is over, so the
recomputed forward sees the same modification as the first one).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ftguard.errors import FtguardError

ATTENTION_SUFFIX = "Attention"


def _model_class_name(model: nn.Module) -> str:
    """The class of the transformers model inside any PEFT / DDP wrapping, for error messages."""
    inner = model
    for _ in range(4):
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "module", None), nn.Module):
            inner = inner.module
        else:
            break
    return type(inner).__name__


def _unwrap_causal_lm(model: nn.Module) -> nn.Module:
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, nn.Module):  # DDP and similar wrappers
        inner = inner.module
    if hasattr(inner, "get_base_model"):  # PEFT
        inner = inner.get_base_model()
    return inner


def decoder_parts(
    model: nn.Module, method: str = "this method"
) -> tuple[list[nn.Module], nn.Module, nn.Module]:
    """(MLP sub-module of every decoder layer, final norm, LM head) of a Llama-like causal LM.

    ``method`` names the caller in the errors, which say the model layout is not supported.
    """
    lm = _unwrap_causal_lm(model)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    name = type(lm).__name__
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise FtguardError(
            f"{method}: cannot find the decoder layers of {name} (expected a Llama-like `model.layers`)"
        )
    if not isinstance(norm, nn.Module) or not isinstance(head, nn.Module):
        raise FtguardError(f"{method}: cannot find the final norm (`model.norm`) and LM head of {name}")
    mlps = [getattr(layer, "mlp", None) for layer in layers]
    if not all(isinstance(m, nn.Module) for m in mlps):
        raise FtguardError(
            f"{method}: the decoder layers of {name} ({type(layers[0]).__name__}) have no `mlp` sub-module; "
            f"{method} reads the MLP outputs and supports Llama-like layouts only"
        )
    return mlps, norm, head


def _attention_children(layer: nn.Module) -> list[nn.Module]:
    return [child for child in layer.children() if type(child).__name__.endswith(ATTENTION_SUFFIX)]


def find_attention_modules(
    model: nn.Module,
    class_names: Sequence[str] | None = None,
    config_key: str = "align.args.attention_modules",
) -> list[nn.Module]:
    """The attention sub-module of every decoder layer, in layer order.

    Without ``class_names``: the model must have exactly one ``nn.ModuleList`` of layers each of which has exactly
    one direct child whose class name ends with "Attention" (LlamaAttention, MistralAttention, Qwen2Attention,
    Qwen3Attention, Gemma2Attention, Gemma3Attention, OPTAttention, GPTNeoXAttention, Phi3Attention, ...).
    With ``class_names``: every module whose class name is one of them, in module order. Anything else raises
    FtguardError naming the model class and ``config_key``, the setting where the user gives the class names.
    """
    model_name = _model_class_name(model)
    if class_names:
        wanted = set(class_names)
        found = [m for m in model.modules() if type(m).__name__ in wanted]
        if not found:
            present = sorted({type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__})
            raise FtguardError(
                f"{config_key} = {list(class_names)} matches no module of {model_name} "
                f"(attention-like classes in the model: {', '.join(present) or 'none'})"
            )
        return found

    candidates: list[tuple[str, list[nn.Module]]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            per_layer = [_attention_children(layer) for layer in module]
            if all(len(children) == 1 for children in per_layer):
                candidates.append((name, [children[0] for children in per_layer]))
    if len(candidates) == 1:
        return candidates[0][1]
    if not candidates:
        raise FtguardError(
            f"cannot find the attention sub-modules of {model_name}: no layer list whose layers each hold exactly one "
            f"module named '*{ATTENTION_SUFFIX}'. Set {config_key} to the class name(s) of its attention modules "
            f"(e.g. [LlamaAttention])"
        )
    found = "; ".join(f"{name} ({type(mods[0]).__name__})" for name, mods in candidates)
    raise FtguardError(
        f"{model_name} has several layer lists with attention modules ({found}); set {config_key} to the class "
        f"name(s) of the decoder's attention modules"
    )


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, tensor: torch.Tensor) -> Any:
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


def _add_in_stream_precision(output: Any, args: tuple, kwargs: dict, delta: torch.Tensor) -> Any:
    """``output``'s first tensor plus ``delta``, in the precision of the residual stream the output joins.

    Under bf16 autocast an attention module returns bf16 while the stream (its input, the weights' dtype) is fp32:
    adding there keeps ``delta`` exact instead of rounding it to bf16 (2⁻⁸ relative), so a perturbation of norm ρ
    arrives with norm ρ. A bf16 model's stream is bf16 and stays so (a wider output would break its next layer).
    """
    out = _first(output)
    # The module's input is the (normalised) stream; Llama-style decoders pass it as hidden_states=.
    first = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
    stream = first.dtype if isinstance(first, torch.Tensor) and first.is_floating_point() else out.dtype
    dtype = torch.promote_types(out.dtype, stream)
    return _replace_first(output, out.to(dtype) + delta.to(dtype))


@contextmanager
def add_to_outputs(modules: Sequence[nn.Module], tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Add ``tensors[i]`` to the first output of ``modules[i]`` on every call inside the block.

    The tensors are detached: for autograd they are constants, so no gradient flows into them (the original adds
    them in place on ``.data`` for the same effect). They are added in the precision of the residual stream
    (``_add_in_stream_precision``): exact under bf16 autocast with fp32 weights. Keep the block open over the
    backward pass when using gradient checkpointing: the recomputed forward must add them again.
    """
    if len(modules) != len(tensors):
        raise ValueError(f"{len(modules)} modules but {len(tensors)} tensors")
    handles = []

    def make_hook(delta: torch.Tensor):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            out = _first(output)
            if out.shape != delta.shape:
                raise RuntimeError(
                    f"{type(module).__name__} output has shape {tuple(out.shape)}, the perturbation {tuple(delta.shape)}"
                )
            return _add_in_stream_precision(output, args, kwargs, delta)

        return hook

    try:
        for module, tensor in zip(modules, tensors, strict=True):
            handles.append(module.register_forward_hook(make_hook(tensor.detach()), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def add_gaussian_noise(modules: Sequence[nn.Module], std: float) -> Iterator[list[torch.Tensor]]:
    """Add fresh N(0, std²) noise (a constant for autograd) to the first output of each module on each call.

    Yields a list that receives the squared L2 norm of each noise tensor drawn (0-dim tensors, so no device sync),
    for logging. Under gradient checkpointing the recomputed forward draws the same noise again, because
    ``torch.utils.checkpoint`` restores the RNG state (``preserve_rng_state``, the default); the list then also
    holds the recomputation's entries, so read it before the backward pass.
    """
    sq_norms: list[torch.Tensor] = []
    handles = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        out = _first(output)
        noise = torch.randn(out.shape, device=out.device, dtype=torch.float32) * std
        sq_norms.append(noise.pow(2).sum())
        return _add_in_stream_precision(output, args, kwargs, noise)

    try:
        for module in modules:
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield sq_norms
    finally:
        for handle in handles:
            handle.remove()


class OutputCapture:
    """Context manager recording the first output of each module during one forward pass.

    ``outputs[i]`` is the tensor that module i passed on, so ``torch.autograd.grad(loss, capture.outputs)`` gives
    ∂loss/∂output without computing any weight gradient. An output that does not require grad (nothing trainable
    upstream, e.g. the first layers with LoRA on the MLPs only) is passed on as a fresh leaf that does: nothing
    upstream of it needs a gradient, so no path to another captured output is cut.

    Recording stops at ``stop()`` (call it after the forward); the hooks themselves stay until the block exits, so
    that the forward recomputed by gradient checkpointing during the backward behaves exactly as the first one.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = list(modules)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self._recording = False
        self._handles: list[Any] = []

    def _hook(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            out = _first(output)
            if not self._recording:
                # A recomputation (gradient checkpointing): repeat what the first forward did.
                if not out.requires_grad and torch.is_grad_enabled():
                    return _replace_first(output, out.detach().requires_grad_(True))
                return None
            if not torch.is_grad_enabled():
                raise FtguardError(
                    f"{type(module).__name__} ran without autograd while its output gradient was needed: reentrant "
                    "gradient checkpointing (use_reentrant=True) cannot give activation gradients; use the default "
                    "non-reentrant checkpointing (activation_checkpointing_kwargs={'use_reentrant': False})"
                )
            if self.outputs[index] is not None:
                raise FtguardError(
                    f"{type(module).__name__} (attention module {index}) ran twice in one forward pass; per-layer "
                    "output gradients are ambiguous for a module shared between layers"
                )
            if not out.requires_grad:
                out = out.detach().requires_grad_(True)
                self.outputs[index] = out
                return _replace_first(output, out)
            self.outputs[index] = out
            return None

        return hook

    def __enter__(self) -> OutputCapture:
        self._recording = True
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def stop(self) -> None:
        self._recording = False
        missing = [i for i, out in enumerate(self.outputs) if out is None]
        if missing:
            raise FtguardError(
                f"attention modules {missing} did not run in the forward pass; check the attention_modules setting"
            )

    def __exit__(self, *exc: Any) -> None:
        self._recording = False
        for handle in self._handles:
            handle.remove()
        self._handles = []


def output_gradients(loss: torch.Tensor, outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """∂loss/∂output for each captured output: activation gradients only, no parameter ``.grad`` is touched.

    The autograd engine runs only the nodes on paths from ``loss`` to ``outputs``, and skips the weight-gradient
    half of each of them, so this costs about one forward (docs/methods.md, Cost per step).
    """
    return list(torch.autograd.grad(loss, list(outputs)))
