"""Optional vLLM backend for greedy generation, with the contract of :func:`ftguard.evaluation.generate.generate`.

vLLM is not a dependency: it is imported only when used, and only offered where a CUDA GPU is present.
Nothing in the evaluation pipeline calls this module yet; ``ftguard bench --generation`` measures it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ftguard.errors import FtguardError

if TYPE_CHECKING:
    from vllm import LLM

INSTALL = "pip install vllm (needs a CUDA GPU)"


def available() -> bool:
    """True only when a CUDA device is present and ``vllm`` imports."""
    import torch

    # CUDA first: importing vllm takes seconds, and is pointless on a CPU-only machine.
    if not torch.cuda.is_available():
        return False
    try:
        import vllm  # noqa: F401
    except Exception:  # a vllm wheel built for another torch fails with more than ImportError
        return False
    return True


def load(model: str, *, dtype: str = "auto", trust_remote_code: bool = False, **kwargs: Any) -> LLM:
    """A ``vllm.LLM`` for a model folder or hub id; ``kwargs`` go to ``LLM`` (e.g. gpu_memory_utilization)."""
    try:
        from vllm import LLM
    except ImportError as err:
        raise FtguardError(f"the vllm backend needs the vllm package: {INSTALL}") from err
    return LLM(model=model, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)


def generate(
    llm: LLM,
    prompts: list[str],
    *,
    max_new_tokens: int,
    add_special_tokens: bool = True,
    token_counts: list[int] | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (new text only, stripped), in the order of ``prompts``.

    Prompts are tokenized here, with ``add_special_tokens`` as in the HF path, so that both backends see
    exactly the same token ids whatever vLLM's text handling does. vLLM batches and schedules all prompts
    itself and returns them in input order. ``token_counts`` is filled as by the HF path: new tokens including the EOS that
    ended a sequence (vLLM keeps it in ``token_ids`` while dropping it from the text).
    """
    if token_counts is not None:
        token_counts[:] = [0] * len(prompts)
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise FtguardError(f"generation needs max_new_tokens >= 1 (got {max_new_tokens})")
    from vllm import SamplingParams

    ids = llm.get_tokenizer()(prompts, add_special_tokens=add_special_tokens)["input_ids"]
    params = SamplingParams(temperature=0, max_tokens=max_new_tokens)
    results = llm.generate([{"prompt_token_ids": list(row)} for row in ids], params, use_tqdm=False)
    if len(results) != len(prompts):
        raise FtguardError(f"vllm returned {len(results)} outputs for {len(prompts)} prompts")
    texts = []
    for i, result in enumerate(results):
        completion = result.outputs[0]
        texts.append(completion.text.strip())
        if token_counts is not None:
            token_counts[i] = len(completion.token_ids)
    return texts
