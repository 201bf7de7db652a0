"""Contrastive selection of branch leaves for B²-DiffuRL (Hu et al., CVPR 2025, §3.3, eq. 5-6).

Branch sampling gives groups of leaves that share their prefix x_T -> x_τ (``actors/branch.py``).
Each leaf's reward is normalized per prompt (the paper's r̂, Appendix D.1) as a z-score against the
rewards of that prompt in the current sampling round and the last H rounds (``ZScoreHistory``). The
release samples once per stage, so its "last H stages" are the last H rounds; here a round is a driver
epoch, which keeps the window sliding when a stage lasts several epochs and after the schedule's last
stage (keyed by stage, the history of a run that stays in its last stage would hold every reward since
that stage began, a baseline that lags behind the policy). Within each group the paper forms
G+ = {r̂ > 0} and G- = {r̂ < 0} and trains on the best leaf of G+ and the worst of G- (eq. 5-6); the
authors' release (``run_select.py``) makes that a threshold test:

    keep the best leaf  if its z >= +threshold        (positive sample)
    keep the worst leaf if its z <  -threshold        (negative sample)

so a group contributes 0, 1 or 2 leaves. Defaults follow the released launch script
``run_process.sh``: ``PosThreshold=0.5, NegThreshold=-0.5, History_Cnt=8`` (with ``SplitTime=5``
branches); the config file ``config/stage_process.py`` ships ±0.7 and H = 8. These are the release's
values; the paper's appendix, which states them, was not consulted.

Shapes: N leaves; ``group_ids`` int [N] (leaves of one prefix share an id); rewards / z-scores [N].
Returned indices are int64 into those arrays, groups in ascending id order.
"""

from __future__ import annotations

from collections import deque

import numpy as np

DEFAULT_THRESHOLD = 0.5  # run_process.sh: PosThreshold=0.5, NegThreshold=-0.5
DEFAULT_HISTORY_EPOCHS = 8  # run_process.sh / stage_process.py: history_cnt = 8
_STD_EPS = 1e-8  # run_select.py: (s - mean) / (std + 1e-8)


def _as_1d(name: str, values, dtype) -> np.ndarray:
    array = np.asarray(values, dtype=dtype)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {array.shape}")
    return array


def _check_aligned(prompts, rewards: np.ndarray) -> None:
    if len(prompts) != rewards.shape[0]:
        raise ValueError(f"{len(prompts)} prompts but {rewards.shape[0]} rewards")


class ZScoreHistory:
    """Per-prompt reward statistics over the current epoch and the last ``history_epochs`` epochs.

    ``add(epoch, prompts, rewards)`` records a batch (several batches of one epoch accumulate);
    ``zscores(prompts, rewards)`` returns ``(r - mean_p) / (std_p + 1e-8)`` where mean_p / std_p are
    taken over every recorded reward of prompt p in the retained epochs: the most recent epoch and
    the ``history_epochs`` recorded before it (``run_select.py``: the stored history plus the current
    scores, one sampling round per stage). std is the sample standard deviation (ddof = 1, as
    ``torch.std``); a prompt with a single retained reward gets z = 0. Non-finite rewards are never
    recorded (dropped, never trained on); their z-score, and that of a prompt with no finite retained reward, is NaN
    (``select_contrastive`` never selects those). A prompt absent from every retained epoch is an error.
    """

    def __init__(self, history_epochs: int = DEFAULT_HISTORY_EPOCHS):
        if isinstance(history_epochs, bool) or not isinstance(history_epochs, int) or history_epochs < 0:
            raise ValueError(f"history_epochs={history_epochs!r} is invalid: expected an int >= 0")
        self.history_epochs = history_epochs
        # (epoch, {prompt: [rewards]}), oldest first; the current epoch plus H previous ones.
        self._epochs: deque[tuple[int, dict[str, list[float]]]] = deque(maxlen=history_epochs + 1)

    @property
    def epochs(self) -> list[int]:
        """The retained epochs, oldest first."""
        return [epoch for epoch, _ in self._epochs]

    def add(self, epoch: int, prompts: list[str], rewards) -> None:
        """Records one batch of rewards [N] for ``epoch`` (epochs must not decrease)."""
        rewards = _as_1d("rewards", rewards, np.float64)
        _check_aligned(prompts, rewards)
        if self._epochs and epoch < self._epochs[-1][0]:
            raise ValueError(
                f"epoch={epoch} is older than the latest recorded epoch {self._epochs[-1][0]}; "
                "epochs must be added in non-decreasing order"
            )
        if not self._epochs or epoch != self._epochs[-1][0]:
            self._epochs.append((int(epoch), {}))
        table = self._epochs[-1][1]
        for prompt, reward in zip(prompts, rewards.tolist(), strict=True):
            values = table.setdefault(prompt, [])  # the prompt is known even if its reward is dropped
            if np.isfinite(reward):
                values.append(reward)

    def values(self, prompt: str) -> np.ndarray:
        """Every retained reward of ``prompt``, oldest epoch first."""
        return np.asarray([r for _, table in self._epochs for r in table.get(prompt, [])], dtype=np.float64)

    def zscores(self, prompts: list[str], rewards) -> np.ndarray:
        """z-scores float32 [N] of ``rewards`` against each prompt's retained history."""
        rewards = _as_1d("rewards", rewards, np.float64)
        _check_aligned(prompts, rewards)
        out = np.empty_like(rewards)
        stats: dict[str, tuple[float, float]] = {}
        for i, prompt in enumerate(prompts):
            if prompt not in stats:
                if not any(prompt in table for _, table in self._epochs):
                    raise ValueError(
                        f"prompt {prompt!r} has no recorded rewards in the retained epochs {self.epochs}; "
                        "call add(epoch, prompts, rewards) for its batch first"
                    )
                history = self.values(prompt)
                if history.size == 0:  # every retained reward of the prompt was non-finite
                    stats[prompt] = (float("nan"), float("nan"))
                elif history.size == 1:
                    stats[prompt] = (float(history[0]), float("inf"))  # z = 0
                else:
                    stats[prompt] = (float(history.mean()), float(history.std(ddof=1)))
            mean, std = stats[prompt]
            out[i] = (rewards[i] - mean) / (std + _STD_EPS)
        return out.astype(np.float32)

    def update(self, epoch: int, prompts: list[str], rewards) -> np.ndarray:
        """``add`` then ``zscores`` of the same batch (the per-round flow of ``run_select.py``)."""
        self.add(epoch, prompts, rewards)
        return self.zscores(prompts, rewards)

    def state_dict(self) -> dict:
        return {
            "history_epochs": self.history_epochs,
            "epochs": [(epoch, {k: list(v) for k, v in table.items()}) for epoch, table in self._epochs],
        }

    def load_state_dict(self, state: dict) -> None:
        # Checkpoints written before the history was keyed by epoch hold stage keys; a stage index never
        # exceeds its epoch, so they load as (older) epochs and the window rolls on from the next epoch.
        self.history_epochs = int(state["history_epochs"] if "history_epochs" in state else state["history_stages"])
        entries = state["epochs"] if "epochs" in state else state["stages"]
        self._epochs = deque(
            ((int(epoch), {k: list(v) for k, v in table.items()}) for epoch, table in entries),
            maxlen=self.history_epochs + 1,
        )


def _groups(group_ids: np.ndarray) -> list[np.ndarray]:
    """Leaf indices of each group, groups in ascending id order, leaves in their original order."""
    order = np.argsort(group_ids, kind="stable")
    _, starts = np.unique(group_ids[order], return_index=True)
    return np.split(order, starts[1:])


def select_contrastive(
    group_ids,
    zscores,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    neg_threshold: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Best-positive / worst-negative leaf of each branch group (§3.3, eq. 5-6; ``run_select.py``).

    Args:
        group_ids: int [N], the branch group of each leaf.
        zscores: float [N], normalized rewards r̂ (``ZScoreHistory.zscores``).
        threshold: keep a group's best leaf when its z >= threshold (>= 0).
        neg_threshold: keep a group's worst leaf when its z < neg_threshold (<= 0); default -threshold.

    Returns:
        ``(positive_idx, negative_idx)``, int64 arrays, at most one entry per group each. Ties pick
        the first leaf in input order. Leaves with a non-finite z are never selected.
    """
    group_ids = _as_1d("group_ids", group_ids, np.int64)
    zscores = _as_1d("zscores", zscores, np.float64)
    if group_ids.shape != zscores.shape:
        raise ValueError(f"group_ids has shape {group_ids.shape} but zscores has {zscores.shape}")
    if not threshold >= 0:
        raise ValueError(f"threshold={threshold!r} is invalid: expected >= 0")
    neg = -threshold if neg_threshold is None else neg_threshold
    if not neg <= 0:
        raise ValueError(f"neg_threshold={neg_threshold!r} is invalid: expected <= 0")
    positive, negative = [], []
    for members in _groups(group_ids):
        members = members[np.isfinite(zscores[members])]
        if members.size == 0:
            continue
        z = zscores[members]
        best, worst = members[np.argmax(z)], members[np.argmin(z)]
        if zscores[best] >= threshold:
            positive.append(best)
        if zscores[worst] < neg:
            negative.append(worst)
    return np.asarray(positive, dtype=np.int64), np.asarray(negative, dtype=np.int64)


def preference_pairs(group_ids, rewards, *, min_margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(winner, loser) index pairs for DPO: the best and the worst leaf of each group.

    A group yields a pair when ``max - min > min_margin`` (so never for equal rewards). Both leaves
    share the group's prefix, so the pair isolates the actions of the branched interval (§3.3).
    Non-finite rewards are ignored. Returns two int64 arrays [P], groups in ascending id order.
    """
    group_ids = _as_1d("group_ids", group_ids, np.int64)
    rewards = _as_1d("rewards", rewards, np.float64)
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids has shape {group_ids.shape} but rewards has {rewards.shape}")
    if not min_margin >= 0:
        raise ValueError(f"min_margin={min_margin!r} is invalid: expected >= 0")
    winners, losers = [], []
    for members in _groups(group_ids):
        members = members[np.isfinite(rewards[members])]
        if members.size < 2:
            continue
        r = rewards[members]
        best, worst = members[np.argmax(r)], members[np.argmin(r)]
        if rewards[best] - rewards[worst] > min_margin:
            winners.append(best)
            losers.append(worst)
    return np.asarray(winners, dtype=np.int64), np.asarray(losers, dtype=np.int64)


def ranked_pairs(group_ids, rewards) -> tuple[np.ndarray, np.ndarray]:
    """(winner, loser) pairs that use every sample of a group once: sorted by reward, the k-th best is
    paired with the k-th worst for k < n/2 (the middle sample of an odd group is left out), and pairs
    of equal reward are dropped. Non-finite rewards are ignored. Returns two int64 arrays [P]."""
    group_ids = _as_1d("group_ids", group_ids, np.int64)
    rewards = _as_1d("rewards", rewards, np.float64)
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids has shape {group_ids.shape} but rewards has {rewards.shape}")
    winners, losers = [], []
    for members in _groups(group_ids):
        members = members[np.isfinite(rewards[members])]
        ranked = members[np.argsort(-rewards[members], kind="stable")]  # best first
        for k in range(ranked.size // 2):
            best, worst = ranked[k], ranked[ranked.size - 1 - k]
            if rewards[best] > rewards[worst]:
                winners.append(best)
                losers.append(worst)
    return np.asarray(winners, dtype=np.int64), np.asarray(losers, dtype=np.int64)
