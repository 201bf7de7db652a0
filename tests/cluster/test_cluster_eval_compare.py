"""`gard compare`: runs' paired gold gains side by side, split by trained / other prompts, with the mean and
spread over runs, against hand-derived values (pure: no Ray)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from cluster.cli import main
from cluster.eval_compare import CompareError, compare_runs, comparison_table, load_eval_output, load_run

# One set "s" of 4 images: prompts p0, p0, p1, p1; and a set "t" of 2 images of prompt p2.
PROMPTS = [("s", "p0"), ("s", "p0"), ("s", "p1"), ("s", "p1"), ("t", "p2"), ("t", "p2")]
BASE = [0, 1, 0, 0, 1, 0]


def _items(verdicts):
    return [{"set": s, "prompt": p, "reward": 0.5, "gold": {"judge": v}} for (s, p), v in zip(PROMPTS, verdicts, strict=True)]


def _run(root, name, evaluations, *, train=("p0",), gold="judge"):
    run = root / name
    (run / "samples").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"prompts": {"train": list(train)}, "evaluation": {"gold": gold}}))
    for updates, verdicts in evaluations.items():
        (run / "samples" / f"eval_epoch{updates:04d}.json").write_text(json.dumps(_items(verdicts)))
    return run


def _row(rows, label):
    return next(r for r in rows if r.label == label)


def test_gains_per_set_and_per_trained_part_with_the_spread_over_runs(tmp_path):
    a = _run(tmp_path, "a", {0: BASE, 5: [0, 0, 0, 0, 0, 0], 10: [1, 1, 1, 0, 1, 1]})
    b = _run(tmp_path, "b", {0: BASE, 10: [1, 1, 0, 0, 0, 0]})
    runs = [load_run(a), load_run(b)]
    assert [r.updates for r in runs] == [10, 10]  # the newest evaluation by default
    rows, same_base = compare_runs(runs, by_prompt=True)
    assert same_base
    # Labels: each set, its trained and other parts (s mixes p0 and p1), each prompt; t has no trained prompt.
    assert [r.label for r in rows] == ["s", "s [trained]", "s [other]", "s / p0 (trained)", "s / p1", "t", "t / p2"]
    s = _row(rows, "s")
    # Run a, set s: differences 1, 0, 1, 0 -> gain 1/2, s.e. sqrt(1/3)/2. Run b: 1, 0, 0, 0 -> 1/4, s.e. 1/4.
    assert (s.n, s.base) == ((4, 4), (0.25, 0.25))
    assert s.gains[0].gain == 0.5 and s.gains[0].gain_se == pytest.approx(math.sqrt(1 / 3) / 2)
    assert s.gains[1].gain == 0.25 and s.gains[1].gain_se == pytest.approx(0.25)
    assert s.mean_gain == pytest.approx(0.375) and s.std_gain == pytest.approx(0.125 * math.sqrt(2))
    trained, other = _row(rows, "s [trained]"), _row(rows, "s [other]")
    assert (trained.n, trained.base) == ((2, 2), (0.5, 0.5))
    assert [g.gain for g in trained.gains] == [0.5, 0.5] and trained.std_gain == 0.0
    assert [g.gain for g in other.gains] == [0.5, 0.0]  # a: 0,0 -> 1,0; b: 0,0 -> 0,0
    # Set t: a 1,0 -> 1,1 (+1/2); b 1,0 -> 0,0 (-1/2).
    assert [g.gain for g in _row(rows, "t").gains] == [0.5, -0.5] and _row(rows, "t").mean_gain == 0.0
    table = comparison_table(runs, rows, same_base=same_base)
    assert "| s | 4 | 0.250 | +0.500 ± 0.289 | +0.250 ± 0.250 | +0.375 ± 0.177 |" in table
    assert "same images with the same verdicts" in table


def test_an_earlier_evaluation_and_runs_with_other_base_images(tmp_path):
    a = _run(tmp_path, "a", {0: BASE, 5: [0, 0, 0, 0, 0, 0], 10: [1, 1, 1, 1, 1, 1]})
    b = _run(tmp_path, "b", {0: [1, 1, 0, 0, 1, 0], 5: [1, 1, 1, 1, 1, 1]}, train=())
    runs = [load_run(a, updates=5), load_run(b, updates=5)]
    rows, same_base = compare_runs(runs)
    assert not same_base  # b's base verdicts differ: each gain is paired within its run
    s = _row(rows, "s")
    assert [g.gain for g in s.gains] == [-0.25, 0.5]
    assert (s.n, s.base) == ((4, 4), (0.25, 0.5))
    # b trained on nothing, so for it "[other]" is all of s; a's split keeps the parts shown.
    assert [g is None for g in _row(rows, "s [trained]").gains] == [False, True]
    assert _row(rows, "s [other]").n == (2, 4)
    table = comparison_table(runs, rows, same_base=same_base)
    assert "| s [other] | 2-4 | 0.000-0.500 |" in table and "each gain is paired within its run" in table
    assert "(after 5)" in table
    # Per prompt, one row for both runs: p0 was trained by a only, p1 by neither.
    labels = [r.label for r in compare_runs(runs, by_prompt=True)[0]]
    assert "s / p0 (trained by some)" in labels and "s / p1" in labels and "t / p2" in labels
    assert len(labels) == len(set(labels)) == 7


def test_runs_that_cannot_be_compared_are_named(tmp_path):
    with pytest.raises(CompareError, match="'.*missing' is not a run directory: it has no config.yaml"):
        load_run(tmp_path / "missing")
    with pytest.raises(CompareError, match="names no evaluation.gold"):
        load_run(_run(tmp_path, "nogold", {0: BASE, 5: BASE}, gold=None))
    with pytest.raises(CompareError, match=r"holds evaluations after \[0\] updates"):
        load_run(_run(tmp_path, "base_only", {0: BASE}))
    with pytest.raises(CompareError, match=r"has no evaluation after 7 updates; it has \[5\]"):
        load_run(_run(tmp_path, "five", {0: BASE, 5: BASE}), updates=7)
    short = _run(tmp_path, "short", {0: BASE, 5: BASE})
    (short / "samples" / "eval_epoch0005.json").write_text(json.dumps(_items(BASE)[:5]))
    with pytest.raises(CompareError, match="evaluations after 0 and 5 updates: the two evaluations hold 6 and 5"):
        load_run(short)
    other_gold = _run(tmp_path, "other_gold", {0: BASE, 5: BASE}, gold="clip")
    with pytest.raises(CompareError, match=r"gold rewards differ \(\['clip', 'judge'\]\)"):
        compare_runs([load_run(other_gold), load_run(tmp_path / "five")])


def test_the_command_prints_the_table_and_refuses_a_bad_run_with_exit_2(tmp_path, capsys):
    a = _run(tmp_path, "a", {0: BASE, 10: [1, 1, 1, 0, 1, 1]})
    out = tmp_path / "cmp.json"
    assert main(["compare", str(a), "--by-prompt", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| s / p0 (trained) | 2 | 0.500 | +0.500 ± 0.500 | +0.500 |" in printed
    written = json.loads(out.read_text())
    assert written["runs"] == [{"name": "a", "updates": 10}] and written["rows"][0]["mean_gain"] == 0.5
    assert written["rows"][0]["std_gain"] is None  # one run: no spread
    assert main(["compare", str(a), str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gard: error: ") and "nope' is not a run directory" in err and "Traceback" not in err


def test_split_by_a_prompt_file_gives_runs_with_other_training_prompts_the_same_parts(tmp_path, capsys):
    a = _run(tmp_path, "a", {0: BASE, 10: [1, 1, 1, 0, 1, 1]}, train=("p0",))
    b = _run(tmp_path, "b", {0: BASE, 10: [1, 1, 0, 0, 1, 1]}, train=())
    split = tmp_path / "split.txt"
    split.write_text("# comment\np1\n\n")
    assert main(["compare", str(a), str(b), "--split-by", str(split)]) == 0
    printed = capsys.readouterr().out
    assert "listed in" in printed and "split.txt / the others" in printed
    # p1 counts as "trained" for both runs now: a 0,0 -> 1,0 (+1/2), b 0,0 -> 0,0 (0).
    assert "| s [trained] | 2 | 0.000 | +0.500 ± 0.500 | +0.000 ± 0.000 | +0.250 ± 0.354 |" in printed
    # p0: a 0,1 -> 1,1 (+1/2), b the same.
    assert "| s [other] | 2 | 0.500 | +0.500 ± 0.500 | +0.500 ± 0.500 | +0.500 ± 0.000 |" in printed
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert main(["compare", str(a), "--split-by", str(empty)]) == 2
    assert "empty.txt' holds no prompts" in capsys.readouterr().err
    assert main(["compare", str(a), "--split-by", str(tmp_path / "absent.txt")]) == 2
    assert "absent.txt': cannot be read as a UTF-8 prompt file" in capsys.readouterr().err


EVALUATION = {"gold": "judge", "seed": 1234, "images_per_prompt": 2, "batch_size": 2,
              "prompts": {"s": ["p0", "p1"], "t": ["p2"]}}


def _based_run(root, name, evaluations):
    """A run whose config.yaml records the evaluation that draws its images, as gard train writes it."""
    run = _run(root, name, evaluations)
    (run / "config.yaml").write_text(yaml.safe_dump({"prompts": {"train": ["p0"]}, "evaluation": EVALUATION,
                                                     "policy": {"pretrained": "tiny:shapes"}}))
    return run


def _eval_output(root, name, verdicts, *, evaluation=EVALUATION, pretrained="tiny:shapes"):
    """The --output-dir of `gard eval`: eval_metrics.json (its evaluation section) and eval.json (the items)."""
    out = root / name / "eval"
    out.mkdir(parents=True)
    (out / "eval_metrics.json").write_text(json.dumps({"pretrained": pretrained, "evaluation": evaluation,
                                                       "metrics": {}}))
    (out / "eval.json").write_text(json.dumps(_items(verdicts)))
    return out


def test_a_gard_eval_output_is_paired_against_the_base_run_it_names(tmp_path, capsys):
    base = _based_run(tmp_path, "base", {0: BASE, 10: [1, 1, 1, 0, 1, 1]})
    fused = _eval_output(tmp_path, "fused", [1, 1, 0, 1, 0, 0])
    run = load_eval_output(fused, base_run=base)
    assert (run.name, run.updates, run.gold, run.train_prompts) == ("fused", None, "judge", frozenset({"p0"}))
    rows, same_base = compare_runs([run, load_run(base)])
    assert same_base
    # Set s: 0,1,0,0 -> 1,1,0,1: differences 1,0,0,1, gain 1/2, s.e. sqrt(1/3)/2; set t: 1,0 -> 0,0, gain -1/2.
    s, t = _row(rows, "s"), _row(rows, "t")
    assert s.gains[0].gain == 0.5 and s.gains[0].gain_se == pytest.approx(math.sqrt(1 / 3) / 2)
    assert t.gains[0].gain == -0.5 and t.gains[0].gain_se == pytest.approx(0.5)
    assert main(["compare", str(fused), str(base), "--base", str(base)]) == 0
    printed = capsys.readouterr().out
    assert "| fused (gard eval) | base (after 10) |" in printed
    assert "| s | 4 | 0.250 | +0.500 ± 0.289 | +0.500 ± 0.289 | +0.500 ± 0.000 |" in printed


def test_a_gard_eval_output_without_a_matching_base_is_refused_with_exit_2(tmp_path, capsys):
    base = _based_run(tmp_path, "base", {0: BASE, 10: BASE})
    fused = _eval_output(tmp_path, "fused", BASE)
    assert main(["compare", str(fused)]) == 2
    err = capsys.readouterr().err
    assert "is not a run directory" in err and "It is a gard eval output: name, with --base" in err
    other_seed = _eval_output(tmp_path, "other_seed", BASE, evaluation={**EVALUATION, "seed": 7})
    with pytest.raises(CompareError, match=r"differ in evaluation.seed 7 against 1234\. Name as --base"):
        load_eval_output(other_seed, base_run=base)
    other_model = _eval_output(tmp_path, "other_model", BASE, pretrained="tiny:sd")
    with pytest.raises(CompareError, match=r"differ in pretrained 'tiny:sd' against 'tiny:shapes'"):
        load_eval_output(other_model, base_run=base)
    other_prompts = _eval_output(tmp_path, "other_prompts", BASE,
                                 evaluation={**EVALUATION, "prompts": {"s": ["p0"], "t": ["p2"]}})
    with pytest.raises(CompareError, match="differ in the evaluation prompts"):
        load_eval_output(other_prompts, base_run=base)
    short = _eval_output(tmp_path, "short", BASE)
    (short / "eval.json").write_text(json.dumps(_items(BASE)[:5]))
    with pytest.raises(CompareError, match="the two evaluations hold 6 and 5 images"):
        load_eval_output(short, base_run=base)
    (short / "eval.json").unlink()
    assert main(["compare", str(short), "--base", str(base)]) == 2
    assert "not a readable gard eval output (FileNotFoundError" in capsys.readouterr().err
    assert main(["compare", str(fused), "--base", str(tmp_path / "absent")]) == 2
    assert "absent' is not a run directory" in capsys.readouterr().err
