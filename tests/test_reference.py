"""The start-of-stage reference (training/reference.py): each capture path gives exactly the outputs the model had
at capture, after its weights have changed, without keeping a copy it does not need."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from ftguard.errors import FtguardError
from ftguard.training.reference import ReferenceModel
from tiny import tiny_llama, tiny_peft_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _change_trainable(model):
    """Stand-in for training: move every trainable tensor (lora_B away from zero too)."""
    g = torch.Generator().manual_seed(9)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.clone()


def test_fresh_lora_uses_the_disabled_adapter_and_keeps_the_start_outputs():
    model = tiny_peft_llama(fresh=True)
    model.train()
    start = _logits(model, _inputs())
    ref = ReferenceModel(model)
    assert ref.mode == "disable_adapter" and ref.snapshot_bytes == 0
    _change_trainable(model)
    assert not torch.allclose(_logits(model, _inputs()), start), "the weights change must change the outputs"
    out = ref(**_inputs()).logits
    assert torch.equal(out, start) and not out.requires_grad
    assert all(m.training for m in model.modules()), "train/eval flags are restored"
    assert not torch.allclose(_logits(model, _inputs()), start), "the adapters are enabled again afterwards"


def test_continued_lora_snapshots_only_the_lora_weights():
    model = tiny_peft_llama(fresh=False)  # lora_B ≠ 0: the single topology's continued alignment adapter
    start = _logits(model, _inputs())
    ref = ReferenceModel(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert ref.mode == "snapshot"
    assert ref.snapshot_bytes == sum(p.numel() * p.element_size() for p in trainable)
    assert ref.snapshot_bytes < sum(p.numel() * p.element_size() for p in model.parameters()) / 4
    _change_trainable(model)
    assert torch.equal(ref(**_inputs()).logits, start)
    # the live weights are the trained ones, not the snapshot
    assert not torch.allclose(_logits(model, _inputs()), start)


def test_full_topology_snapshots_every_trainable_weight_with_tied_embeddings():
    model = tiny_llama(tie_word_embeddings=True)
    model.requires_grad_(True)
    start = _logits(model, _inputs())
    ref = ReferenceModel(model)
    assert ref.mode == "snapshot"
    assert ref.snapshot_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    _change_trainable(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(ref(**_inputs()).logits, start)


def test_a_trainable_non_lora_tensor_or_a_nonzero_lora_b_forces_the_snapshot():
    model = tiny_peft_llama(fresh=True)
    model.get_base_model().lm_head.weight.requires_grad_(True)
    start = _logits(model, _inputs())
    ref = ReferenceModel(model)
    assert ref.mode == "snapshot"
    _change_trainable(model)
    assert torch.equal(ref(**_inputs()).logits, start)

    model = tiny_peft_llama(fresh=True)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0] = 1e-3
    assert ReferenceModel(model).mode == "snapshot"


@pytest.mark.parametrize("freeze_one", [False, True])
def test_the_trainable_set_is_the_same_after_a_reference_call(freeze_one):
    # PEFT's disable/enable cycle marks the active adapter trainable again; a frozen LoRA tensor must stay frozen.
    model = tiny_peft_llama(fresh=True)
    if freeze_one:
        next(p for n, p in model.named_parameters() if "lora_A" in n).requires_grad_(False)
    before = [n for n, p in model.named_parameters() if p.requires_grad]
    ref = ReferenceModel(model)
    assert ref.mode == ("snapshot" if freeze_one else "disable_adapter")
    ref(**_inputs())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == before


def test_reference_runs_without_dropout_and_without_gradient():
    model = tiny_peft_llama(fresh=False, dropout=0.5)
    model.train()
    ref = ReferenceModel(model)
    model.eval()
    expected = _logits(model, _inputs())
    model.train()
    first, second = ref(**_inputs()).logits, ref(**_inputs()).logits
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert model.training and all(m.training for m in model.modules())


def test_no_trainable_parameters_is_a_clear_error():
    model = tiny_llama()
    model.requires_grad_(False)
    with pytest.raises(FtguardError, match="no trainable parameters"):
        ReferenceModel(model)


@pytest.mark.parametrize("fresh", [True, False])
def test_ddp_wrapped_model_calls_the_inner_module_without_communication(tmp_path, fresh):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = tiny_peft_llama(fresh=fresh)
        start = _logits(model, _inputs())
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        reductions = []

        def hook(state, bucket):
            reductions.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, hook)
        ref = ReferenceModel(ddp)
        assert ref.module is model
        _change_trainable(model)
        assert torch.equal(ref(**_inputs()).logits, start)
        assert reductions == []
        # DDP still trains normally afterwards: one reduction of the student's backward
        ddp(**_inputs()).logits.sum().backward()
        assert reductions and all(p.grad is not None for p in model.parameters() if p.requires_grad)
        first = len(reductions)
        ref(**_inputs())
        ddp(**_inputs()).logits.sum().backward()
        assert len(reductions) == 2 * first, "the next step reduces as the first did"
    finally:
        dist.destroy_process_group()


def test_reference_is_independent_of_a_deep_copy_taken_at_capture():
    """The reference equals a separate frozen copy on fresh inputs too (not a cached result)."""
    model = tiny_peft_llama(fresh=False)
    twin = copy.deepcopy(model)
    ref = ReferenceModel(model)
    _change_trainable(model)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 64, (2, 5), generator=g)
    assert torch.equal(ref(input_ids=ids).logits, _logits(twin, {"input_ids": ids}))
