"""Gradients of every float output, fp64, against an independent plain-autograd computation."""

import pytest
import torch

from l2p_fast import reference as ref
from l2p_fast.testing import PoolCase, forward_and_grads, make_inputs, make_pool, random_cases


def _naive_pool(x_embed, cls_features, prompt, keys, case: PoolCase, prompt_mask):
    """Loop-by-loop docs/behaviour.md §4 with explicit square roots; shares no code with l2p_fast."""
    batch = x_embed.shape[0]
    queries = []
    for b in range(batch):
        tokens = x_embed[b]
        mean = tokens.sum(0) / tokens.shape[0]
        top = torch.stack([tokens[:, d].max() for d in range(tokens.shape[1])])
        queries.append({
            "mean": mean, "max": top, "mean_max": top + 2 * mean,
            "cls": cls_features[b] if cls_features is not None else top,
        }[case.embedding_key])
    def unit(v):
        return v / torch.sqrt(torch.clamp((v * v).sum(), min=1e-12))
    qn = torch.stack([unit(q) for q in queries])
    kn = torch.stack([unit(k) for k in keys])
    sim = torch.stack([torch.stack([(qn[b] * kn[m]).sum() for m in range(len(keys))]) for b in range(batch)])
    if prompt_mask is not None:
        ids = prompt_mask.tolist()
    else:
        rows = [sorted(range(len(keys)), key=lambda m, b=b: (-sim[b, m].item(), m))[: case.top_k] for b in range(batch)]
        ids = rows
        if case.batchwise:
            counts = [sum(row.count(m) for row in rows) for m in range(len(keys))]
            ids = [sorted(range(len(keys)), key=lambda m: (-counts[m], m))[: case.top_k]] * batch
    prompted = torch.stack([torch.cat([prompt[i] for i in ids[b]] + [x_embed[b]], 0) for b in range(batch)])
    selected = torch.stack([torch.stack([kn[i] for i in ids[b]]) for b in range(batch)])
    reduce_sim = sum((selected[b, k] * qn[b]).sum() for b in range(batch) for k in range(len(ids[b]))) / batch
    return {"prompt_idx": torch.tensor(ids), "prompt_norm": kn, "x_embed_norm": qn, "similarity": sim,
            "selected_key": selected, "reduce_sim": reduce_sim, "prompted_embedding": prompted}


@pytest.mark.parametrize("case", random_cases(16, seed=11, dtypes=(torch.float64,)), ids=str)
def test_reference_gradients_match_naive(case: PoolCase) -> None:
    case = PoolCase(**{**case.__dict__, "batch": min(case.batch, 4), "tokens": min(case.tokens, 7),
                       "width": min(case.width, 16), "duplicate_keys": False})
    pool = make_pool(case, seed=0)
    inputs = make_inputs(case, seed=1)
    out, grads, weights = forward_and_grads(pool, inputs)
    # the independent computation, on fresh leaves
    x = inputs["x_embed"].detach().clone().requires_grad_(True)
    cls = None if inputs["cls_features"] is None else inputs["cls_features"].detach().clone().requires_grad_(True)
    prompt = pool.prompt.detach().clone().requires_grad_(True)
    key_param = None if pool.prompt_key is None else pool.prompt_key.detach().clone().requires_grad_(True)
    keys = key_param if key_param is not None else prompt.mean(dim=1)
    naive = _naive_pool(x, cls, prompt, keys, case, inputs["prompt_mask"])
    assert torch.equal(naive["prompt_idx"], out["prompt_idx"])
    loss = sum((naive[k] * w).sum() for k, w in weights.items())
    loss.backward()
    expected = {"x_embed": x.grad, "cls_features": None if cls is None else cls.grad, "prompt": prompt.grad,
                "prompt_key": None if key_param is None else key_param.grad}
    for key, value in out.items():
        if key in naive and key != "prompt_idx":
            torch.testing.assert_close(value, naive[key], rtol=1e-10, atol=1e-12, msg=key)
    for key, grad in expected.items():
        if grad is None:
            assert grads[key] is None or key == "cls_features" and not grads[key].any()
            continue
        torch.testing.assert_close(grads[key], grad, rtol=1e-10, atol=1e-12, msg=f"grad {key}")


def test_reference_gradcheck() -> None:
    case = PoolCase(batch=2, tokens=3, width=5, pool_size=4, top_k=2, length=2, embedding_key="mean_max",
                    dtype=torch.float64, batchwise=True)
    pool = make_pool(case, seed=0)
    inputs = make_inputs(case, seed=1)

    def fn(x, prompt, key):
        out = ref.pool_forward(x, prompt, key, embedding_key="mean_max", top_k=2, batchwise=True)
        return out["prompted_embedding"], out["similarity"], out["reduce_sim"], out["selected_key"]

    args = (inputs["x_embed"].clone().requires_grad_(True), pool.prompt.detach().clone().requires_grad_(True),
            pool.prompt_key.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(fn, args)
