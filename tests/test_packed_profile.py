"""The packed step, counted (engine/packed_profile.py): few operators, no host reads between checks.

Operator counts are deterministic (the same code dispatches the same aten calls), so these are not
timed tests; bench/packed_step_profile.py prints the same numbers for MiniLM."""

from __future__ import annotations

import math

import numpy as np
import torch

from llrd_search.engine.model import fresh_model
from llrd_search.engine.packed import PackJob
from llrd_search.engine.packed_batches import padding_profile
from llrd_search.engine.packed_profile import HostReads, loop_reads, optimizer_step_ops
from llrd_search.engine.param_groups import build_param_groups
from llrd_search.spec import TrainSection


def test_a_packed_optimizer_step_dispatches_at_most_1_5x_the_ops_of_k_fused_adamw_steps(tiny_template_and_task):
    template = tiny_template_and_task[0]
    counts = optimizer_step_ops(lambda seed: fresh_model(template, seed), 8)
    assert counts["unpacked_ops"] >= 8 * counts["groups"]  # the baseline does run: one fused kernel per group and step at least
    assert counts["packed_ops"] <= 1.5 * counts["unpacked_ops"], counts
    assert counts["packed_by_op"]["aten._fused_adamw_.tensor_lr"] == 8 * counts["groups"]  # one kernel per (copy, group)
    # nothing in the step reads the device back
    assert "aten._local_scalar_dense.default" not in counts["packed_by_op"]


def test_host_reads_per_100_packed_steps_stay_within_the_checks_and_evaluations(tiny_template_and_task):
    template, task = tiny_template_and_task
    cfg = TrainSection(epochs=30, batch_size=16, evals_per_epoch=1, precision="fp32", device="cpu", fast_path=False)
    jobs = []
    for seed in range(4):
        model = fresh_model(template, seed)
        jobs.append(PackJob(model=model, groups=build_param_groups(model, base_lr=1e-3, decay=0.9, head_lr=1e-3), seed=seed))
    check_every = 8
    seen = loop_reads(jobs, task, cfg, check_every=check_every)
    assert seen["steps"] >= 100 and seen["evaluations"] == seen["eval_steps"] == cfg.epochs, seen
    per_100 = 100 / seen["steps"]
    assert seen["scalar_syncs"] * per_100 <= 100 / check_every + seen["evaluations"] * per_100, seen
    # Every read of any kind: one per check (every check_every steps, and before each evaluation
    # step) and one per evaluation pass (its predictions).
    checks = math.ceil(seen["steps"] / check_every) + seen["eval_steps"]
    assert seen["reads"] <= checks + seen["evaluations"], seen
    assert seen["reads"] >= seen["evaluations"]  # the counter does see the reads


def test_host_reads_counts_what_it_should():
    t = torch.ones(3)
    with HostReads() as reads:
        t.tolist()
        float(t.sum())
        t.cpu().numpy()
    assert reads.scalar_syncs == 1 and reads.reads == 3 and reads.calls["tolist"] == 1


def test_a_shared_length_profile_pads_little_at_k_8():
    # SST-2-like sentence lengths (the quickstart slice's are 4 to 78 tokens, mean 25)
    lengths = np.random.default_rng(0).gamma(4.0, 6.3, size=2000).astype(int).clip(4, 78)
    alone = padding_profile(lengths, 32, 8, shared=False, epochs=2)
    shared = padding_profile(lengths, 32, 8, epochs=2)
    assert alone > 1.5  # each slot bucketing on its own: the widest of 8 unrelated buckets
    assert shared <= 1.15
    assert padding_profile(lengths, 32, 1, epochs=2) <= 1.15


def test_slots_sharing_length_bins_each_see_every_example_once_an_epoch_in_their_own_order():
    from llrd_search.engine.packed_batches import LengthBins, SlotBatches

    lengths = np.random.default_rng(1).integers(3, 60, size=300)
    bins = LengthBins(lengths, 16, seed=0)
    slots = [SlotBatches(seed, lengths, 16, bucketing=True) for seed in (3, 4, 5)]
    per_epoch = math.ceil(300 / 16)
    seen = [[] for _ in slots]
    for _ in range(per_epoch):
        b = bins.next_bin()
        for k, slot in enumerate(slots):
            batch = slot.draw(bins, b)
            assert set(batch) <= set(bins.bins[b])  # every slot draws from the step's bin
            seen[k].append(batch)
    for batches in seen:
        assert sorted(np.concatenate(batches).tolist()) == list(range(300))  # each example once an epoch
    assert not np.array_equal(np.concatenate(seen[0]), np.concatenate(seen[1]))  # each seed its own order
    again = SlotBatches(3, lengths, 16, bucketing=True)
    replay = LengthBins(lengths, 16, seed=0)
    assert all(np.array_equal(again.draw(replay, replay.next_bin()), batch) for batch in seen[0])  # a seed's draws repeat
