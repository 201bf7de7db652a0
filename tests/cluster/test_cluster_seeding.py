"""Seeds of actors/seeding.py: functions of (seed, epoch, worker, batch) only, separate streams for
prompt choice, sampling noise and evaluation, and values checked against SeedSequence by hand."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from actors.seeding import batch_prompts, batch_seed, eval_seed

PROMPTS = ["a cat", "a dog", "a red car", "a tree", "a boat"]
BASE = {"seed": 42, "epoch": 3, "worker": 1, "batch": 0}


def _prompts(prompts=PROMPTS, size=6, **kw):
    return batch_prompts(prompts, size=size, **{**BASE, **kw})


def test_batch_seed_is_the_same_for_the_same_inputs():
    first = batch_seed(42, epoch=3, worker=1, batch=0)
    np.random.seed(0)  # global numpy state plays no part
    np.random.random(10)
    assert batch_seed(42, epoch=3, worker=1, batch=0) == first
    assert isinstance(first, int) and 0 <= first < 2**63  # fits a torch generator seed


def test_batch_seed_pinned_value_for_resume_across_processes():
    # A resumed run (a new process, perhaps a new machine) must sample exactly what the original would.
    assert batch_seed(42, epoch=3, worker=1, batch=0) == 6063439255882976593
    assert eval_seed(42, chunk=2) == 8816487179618171605


@pytest.mark.parametrize("field", ["seed", "epoch", "worker", "batch"])
def test_batch_seed_changes_when_any_single_input_changes(field):
    changed = {**BASE, field: BASE[field] + 1}
    assert batch_seed(changed.pop("seed"), **changed) != batch_seed(BASE["seed"], epoch=3, worker=1, batch=0)


def test_batch_seeds_distinct_over_a_grid_of_epochs_workers_batches():
    seeds = [batch_seed(7, epoch=e, worker=w, batch=b) for e, w, b in itertools.product(range(6), range(4), range(3))]
    assert len(set(seeds)) == 6 * 4 * 3
    # Positional, not summed: (epoch 1, worker 0) and (epoch 0, worker 1) differ.
    assert batch_seed(7, epoch=1, worker=0, batch=0) != batch_seed(7, epoch=0, worker=1, batch=0)


def test_batch_seed_matches_seed_sequence_by_hand():
    state = np.random.SeedSequence([42, 2, 3, 1, 0]).generate_state(1, dtype=np.uint64)[0]  # stream 2: noise
    assert batch_seed(42, epoch=3, worker=1, batch=0) == int(state) // 2


def test_eval_seed_matches_seed_sequence_by_hand_and_is_stable_per_chunk():
    state = np.random.SeedSequence([42, 3, 2]).generate_state(1, dtype=np.uint64)[0]  # stream 3: evaluation
    assert eval_seed(42, chunk=2) == int(state) // 2
    assert [eval_seed(42, chunk=c) for c in range(8)] == [eval_seed(42, chunk=c) for c in range(8)]
    assert len({eval_seed(42, chunk=c) for c in range(8)}) == 8
    assert eval_seed(43, chunk=2) != eval_seed(42, chunk=2)


def test_batch_prompts_match_seed_sequence_draws_by_hand():
    rng = np.random.default_rng(np.random.SeedSequence([42, 1, 3, 1, 0]))  # stream 1: prompts
    expected = [PROMPTS[i] for i in rng.integers(0, len(PROMPTS), size=6)]
    assert _prompts() == expected
    assert _prompts() == ["a tree", "a dog", "a red car", "a boat", "a tree", "a red car"]


def test_noise_prompt_and_eval_streams_never_share_a_generator():
    # Same (seed, epoch, worker, batch) in the prompt stream would give this noise seed: it must not.
    prompt_state = np.random.SeedSequence([42, 1, 3, 1, 0]).generate_state(1, dtype=np.uint64)[0]
    assert batch_seed(42, epoch=3, worker=1, batch=0) != int(prompt_state) // 2
    # No evaluation seed equals a training batch seed of the same run seed.
    train = {batch_seed(42, epoch=e, worker=w, batch=b) for e, w, b in itertools.product(range(4), range(4), range(4))}
    assert train.isdisjoint({eval_seed(42, chunk=c) for c in range(64)})


@pytest.mark.parametrize("field", ["seed", "epoch", "worker", "batch"])
def test_batch_prompts_change_when_any_single_input_changes(field):
    prompts = [f"prompt {i}" for i in range(100)]
    changed = {**BASE, field: BASE[field] + 1}
    assert batch_prompts(prompts, size=16, **changed) != batch_prompts(prompts, size=16, **BASE)
    assert batch_prompts(prompts, size=16, **BASE) == batch_prompts(prompts, size=16, **BASE)


def test_batch_prompts_draws_the_requested_size_from_the_list_with_replacement():
    assert _prompts(size=0) == []
    assert len(_prompts(size=1)) == 1
    many = _prompts(size=5000)
    assert len(many) == 5000 and set(many) == set(PROMPTS)  # more than the list: drawn with replacement
    counts = Counter(many)
    assert all(abs(counts[p] - 1000) < 150 for p in PROMPTS)  # uniform (fixed seed, so not flaky)
    assert _prompts(prompts=["only"], size=3) == ["only", "only", "only"]
