"""Distillation losses vs a brute-force float64 reference; lean path parity; normalisation."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from self_distillation.losses import (
    KL_TYPES,
    Divergence,
    compute_token_divergence,
    compute_token_divergence_stats,
    distillation_loss,
    lean_distillation_loss,
)


def brute_force(
    student, teacher, mask, kl_type, w=0.5, beta=0.5, top_k=None, entry=None, token=None, temp=1.0
):
    """Loop-based float64 reference written from the definitions, token by token."""
    B, T, V = student.shape
    total = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            s, q = student[b, t].double() / temp, teacher[b, t].double().detach() / temp
            if top_k is not None and top_k < V:
                idx = torch.argsort(q, descending=True)[:top_k]
                s, q = s[idx], q[idx]
            ps, pt = torch.softmax(s, 0), torch.softmax(q, 0)
            fwd_terms = [pt[i] * (torch.log(pt[i]) - torch.log(ps[i])) for i in range(len(ps))]
            rev_terms = [ps[i] * (torch.log(ps[i]) - torch.log(pt[i])) for i in range(len(ps))]
            if entry is not None:
                fwd_terms = [torch.clamp(x, max=entry) for x in fwd_terms]
                rev_terms = [torch.clamp(x, max=entry) for x in rev_terms]
            fwd, rev = sum(fwd_terms), sum(rev_terms)
            if kl_type == "forward":
                kl = fwd
            elif kl_type == "reverse":
                kl = rev
            elif kl_type == "mixed":
                kl = w * fwd + (1 - w) * rev
            else:
                m = beta * pt + (1 - beta) * ps
                kl = beta * (pt * (pt / m).log()).sum() + (1 - beta) * (ps * (ps / m).log()).sum()
            if token is not None:
                kl = torch.clamp(kl, max=token)
            total = total + mask[b, t].double() * kl
    return total / mask.double().sum().clamp(min=1)


def make(B=2, T=5, V=11, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, T, V, generator=g, dtype=dtype) * 2).requires_grad_(True)
    teacher = (torch.randn(B, T, V, generator=g, dtype=dtype) * 2).requires_grad_(True)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[1] = 0  # an all-masked row
    return student, teacher, mask


CASES = [
    c for c in itertools.product(KL_TYPES, [None, 4], [None, "entry", "token"]) if c[::2] != ("jsd", "entry")
]


@pytest.mark.parametrize(("kl_type", "top_k", "clip"), CASES)
def test_matches_brute_force_values_and_gradients(kl_type, top_k, clip):
    student, teacher, mask = make(seed=hash((kl_type, top_k, clip)) % 1000)
    kwargs = (
        {"clip_per_entry": 0.05} if clip == "entry" else {"clip_per_token": 0.3} if clip == "token" else {}
    )
    div = Divergence(kl_type=kl_type, top_k=top_k, mixed_kl_weight=0.3, jsd_beta=0.4, **kwargs)
    loss, _ = distillation_loss(student, teacher, mask, div)
    ref = brute_force(
        student,
        teacher,
        mask,
        kl_type,
        w=0.3,
        beta=0.4,
        top_k=top_k,
        entry=kwargs.get("clip_per_entry"),
        token=kwargs.get("clip_per_token"),
    )
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-12)  # float64 in, float64 math
    (grad,) = torch.autograd.grad(loss, student)
    (ref_grad,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)


def test_low_precision_logits_are_upcast():
    student, teacher, mask = make(seed=4)
    div = compute_token_divergence(student.bfloat16(), teacher.bfloat16(), Divergence("reverse"))
    assert div.dtype == torch.float32
    ref = compute_token_divergence(
        student.bfloat16().double(), teacher.bfloat16().double(), Divergence("reverse")
    )
    torch.testing.assert_close(div.double(), ref, rtol=1e-5, atol=1e-6)


def test_properties():
    student, teacher, mask = make()
    for kl_type in KL_TYPES:  # zero when the distributions are equal
        loss, _ = distillation_loss(student, student.detach().clone(), mask, Divergence(kl_type))
        assert abs(float(loss.detach())) < 1e-6
    loss, _ = distillation_loss(student, teacher, torch.zeros_like(mask), Divergence("reverse"))
    assert float(loss) == 0.0 and not torch.isnan(loss)  # all masked: 0, not NaN
    loss.backward()
    assert teacher.grad is None  # gradients reach only the student
    # a masked position has no effect on loss or gradient
    other = student.detach().clone()
    other[mask == 0] += 100.0
    a, _ = distillation_loss(student, teacher, mask, Divergence("mixed"))
    b, _ = distillation_loss(other, teacher, mask, Divergence("mixed"))
    torch.testing.assert_close(a, b)


def test_micro_batch_split_invariance():
    student, teacher, mask = make(B=4, T=6, seed=5)
    div = Divergence("mixed", top_k=4)
    full, _ = distillation_loss(student, teacher, mask, div)
    (full_grad,) = torch.autograd.grad(full, student)
    count = sum(m.sum() for m in (mask[:1], mask[1:3], mask[3:]))  # the step's global token count
    parts = [
        distillation_loss(student[s], teacher[s], mask[s], div, num_tokens=count)[0]
        for s in (slice(0, 1), slice(1, 3), slice(3, 4))
    ]
    total = sum(parts)
    (split_grad,) = torch.autograd.grad(total, student)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(split_grad, full_grad)


@pytest.mark.parametrize(
    ("kl_type", "top_k", "clip"),
    [
        ("reverse", None, None),
        ("forward", 8, None),
        ("mixed", 8, "token"),
        ("jsd", None, "token"),
        ("mixed", None, "entry"),
    ],
)
def test_lean_path_matches_plain(kl_type, top_k, clip):
    g = torch.Generator().manual_seed(1)
    N, H, V = 37, 16, 50
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    t_hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    t_weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    mask = (torch.rand(N, generator=g) > 0.2).float()
    kwargs = {"kl_type": kl_type, "top_k": top_k}
    if clip == "entry":
        kwargs["clip_per_entry"] = 0.05
    elif clip == "token":
        kwargs["clip_per_token"] = 0.5
    div = Divergence(**kwargs)
    plain, _ = distillation_loss(
        (hidden @ weight.T)[None], (t_hidden @ t_weight.T)[None], mask[None], div, num_tokens=30.0
    )
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    lean, metrics = lean_distillation_loss(
        hidden, weight, t_hidden, t_weight, mask, div, num_tokens=30.0, chunk_size=8
    )
    lean_grads = torch.autograd.grad(lean, (hidden, weight))
    torch.testing.assert_close(lean, plain, rtol=1e-6, atol=1e-12)
    for a, b in zip(lean_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    assert metrics["num_tokens"] == float(mask.sum())


def test_lean_path_errors_and_no_grad():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="misaligned"):
        lean_distillation_loss(h, w, torch.randn(3, 8), w)
    with pytest.raises(ValueError, match="vocabulary sizes"):
        lean_distillation_loss(h, w, h, torch.randn(9, 8))
    loss, _ = lean_distillation_loss(h, w, h, w)  # no grad needed: no gradient work either
    assert abs(float(loss)) < 1e-6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kl_type": "kl"}, "kl_type"),
        ({"top_k": 0}, "top_k"),
        ({"mixed_kl_weight": 2.0}, "mixed_kl_weight"),
        ({"jsd_beta": 0.0}, "jsd_beta"),
        ({"clip_per_token": 0.0}, "clip_per_token"),
        ({"kl_type": "jsd", "clip_per_entry": 0.1}, "clip_per_entry"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Divergence(**kwargs)


def _rank_main(rank, world, port, student, teacher, mask, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = slice(rank * 2, rank * 2 + 2)
    local = student[rows].detach().clone().requires_grad_(True)
    count = mask[rows].sum()
    dist.all_reduce(count)  # the step's global token count
    loss, _ = distillation_loss(local, teacher[rows], mask[rows], Divergence("reverse"), num_tokens=count)
    loss.backward()
    out[rank] = local.grad
    dist.destroy_process_group()


def test_data_parallel_normalisation_across_ranks():
    """Two gloo ranks with the global token count give the single-process gradient of the whole batch."""
    import socket

    import torch.multiprocessing as mp

    student, teacher, mask = make(B=4, T=6, seed=9)
    mask[0, :] = 1
    full, _ = distillation_loss(student, teacher, mask, Divergence("reverse"))
    (full_grad,) = torch.autograd.grad(full, student)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_rank_main, args=(2, port, student.detach(), teacher.detach(), mask, out), nprocs=2, join=True)
    torch.testing.assert_close(torch.cat([out[0], out[1]]), full_grad)


@pytest.mark.parametrize("kl_type", KL_TYPES)
def test_temperature_scales_both_distributions(kl_type):
    student, teacher, mask = make(seed=11)
    loss, _ = distillation_loss(student, teacher, mask, Divergence(kl_type, top_k=4, temperature=0.7))
    ref = brute_force(student, teacher, mask, kl_type, top_k=4, temp=0.7)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-12)


def test_clip_counts():
    """The clip statistics the learner logs: entries above clip_per_entry, tokens above clip_per_token."""
    student, teacher, mask = make(seed=3)
    div = Divergence("forward", clip_per_entry=0.05)
    stats = compute_token_divergence_stats(student, teacher, div)
    with torch.no_grad():
        ps = torch.log_softmax(student.double(), -1)
        pt = torch.log_softmax(teacher.double(), -1)
        terms = pt.exp() * (pt - ps)
    assert torch.equal(stats.clipped_entries, (terms > 0.05).sum(-1).to(stats.clipped_entries.dtype))
    assert stats.entries_per_token == student.shape[-1] and not stats.clipped_token.any()
    plain = compute_token_divergence(student, teacher, Divergence("reverse"))
    tok = compute_token_divergence_stats(student, teacher, Divergence("reverse", clip_per_token=0.3))
    assert torch.equal(tok.clipped_token.bool(), plain > 0.3)
    assert torch.equal(tok.values, plain.clamp(max=0.3))
