"""``FusedPromptPool.share_previous_task`` (docs/behaviour.md §10): the port's shared_prompt_pool / shared_prompt_key.

At the start of task t > 0, task t−1's slots (ids (t−1)·K … t·K−1) are copied into task t's (t·K … (t+1)·K−1);
keys alone work (the port's ``shared_prompt_key`` alone raised a NameError at the second task: its key branch
used slice variables only the prompt branch defined); slots past M are left alone, as in the port.
"""

from __future__ import annotations

import pytest
import torch

from l2p_fast import FusedPromptPool

M, K = 7, 2


def make_pool(prompt_key: bool = True) -> FusedPromptPool:
    torch.manual_seed(0)
    return FusedPromptPool(length=3, embed_dim=4, prompt_pool=True, prompt_key=prompt_key, pool_size=M, top_k=K)


def test_copies_the_previous_tasks_prompts_into_the_next_tasks_slots() -> None:
    pool = make_pool()
    prompt, keys = pool.prompt.detach().clone(), pool.prompt_key.detach().clone()
    pool.share_previous_task(2)
    want = prompt.clone()
    want[4:6] = prompt[2:4]
    assert torch.equal(pool.prompt, want)
    assert torch.equal(pool.prompt_key, keys)  # keys only when asked
    assert pool.prompt.is_leaf and pool.prompt.requires_grad and pool.prompt.grad_fn is None


def test_keys_alone_and_both() -> None:
    pool = make_pool()
    prompt, keys = pool.prompt.detach().clone(), pool.prompt_key.detach().clone()
    pool.share_previous_task(1, prompts=False, keys=True)  # the port's crash case
    want = keys.clone()
    want[2:4] = keys[0:2]
    assert torch.equal(pool.prompt_key, want)
    assert torch.equal(pool.prompt, prompt)
    pool.share_previous_task(2, prompts=True, keys=True)
    assert torch.equal(pool.prompt[4:6], prompt[2:4]) and torch.equal(pool.prompt_key[4:6], want[2:4])


def test_task_zero_and_slots_past_the_pool_are_left_alone() -> None:
    pool = make_pool()
    before = pool.prompt.detach().clone()
    pool.share_previous_task(0)
    pool.share_previous_task(3, keys=True)  # task 3's slots 6, 7: past M = 7 (the port's bound check)
    assert torch.equal(pool.prompt, before)


def test_training_continues_on_the_copied_slots() -> None:
    pool = make_pool()
    pool.share_previous_task(1, keys=True)
    out = pool(torch.randn(2, 5, 4), prompt_mask=torch.tensor([[2, 3], [2, 3]]))
    (out["prompted_embedding"].sum() + out["reduce_sim"]).backward()
    assert pool.prompt.grad[2:4].abs().sum() > 0 and pool.prompt.grad[0:2].abs().sum() == 0


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="keys: expected prompt_key=True"):
        make_pool(prompt_key=False).share_previous_task(1, keys=True)
    for task in (-1, 1.0, True):
        with pytest.raises(ValueError, match="task: expected an int >= 0"):
            make_pool().share_previous_task(task)
