"""``gard`` command line: ``gard train CONFIG [--output-dir DIR] [key=value ...]``, ``gard eval``, ``gard
compare``, ``gard dpo``, ``gard serve``, ``gard fuse-lora`` and ``gard testbed``.

The same entry point runs locally (a local Ray bound to 127.0.0.1) and on a cluster as
``ray job submit --working-dir . -- python -m cluster train CONFIG`` (it connects to the job's Ray).
User errors print one paragraph and no traceback: exit code 2 for config errors, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

EXIT_USER_ERROR = 1
EXIT_CONFIG_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gard",
        description="Online RL fine-tuning of text-to-image diffusion models on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(
            """\
            examples:
              gard train configs/jpeg_demo.yaml
              gard train configs/jpeg_demo.yaml epochs=2 seed=3 --output-dir runs/try
              gard train configs/jpeg_demo.yaml epochs=60 --output-dir runs/try --resume auto
              gard eval runs/try --config configs/jpeg_demo.yaml
              gard eval --config configs/jpeg_demo.yaml evaluation.images_per_prompt=8
              gard compare runs/demo_s0 runs/demo_s1 runs/demo_s2 --by-prompt
              ray job submit --working-dir . -- python -m cluster train configs/sd15_aesthetic.yaml
              gard fuse-lora --out runs/fused runs/aesthetic/lora:0.7 runs/texforce/lora:0.3
              gard plan configs/sd15_aesthetic.yaml --gpus 8 --costs benchmarks/costs/sd15_h200.json
              gard testbed build --out build/shapes --eval
            """
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser("train", help="run an online RL training job", description="Run an online RL training job.")
    train.add_argument("config", help="YAML config file (see configs/)")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, e.g. epochs=2 train.learning_rate=1e-3")
    train.add_argument("--output-dir", default=None, help="run directory (default: output_dir or runs/NAME-TIME)")
    train.add_argument("--resume", default=None, metavar="auto|never|PATH",
                       help="auto: continue from the newest valid checkpoint of the run directory (a new run "
                            "when it has none); never: start over (an earlier run's checkpoints there are "
                            "removed); PATH: continue from that checkpoint or run directory. Without the flag, "
                            "a run directory that already has checkpoints is refused")
    evaluate = sub.add_parser(
        "eval", help="evaluate an adapter (or the base model) as a run's evaluation would",
        usage="gard eval [ADAPTER] --config CONFIG [--output-dir DIR] [--overwrite] [key=value ...]",
        description="Sample CONFIG's evaluation set (its prompt sets, images_per_prompt and fixed seeds) with "
                    "the adapter on the run's samplers and score it with the run's training and gold rewards: "
                    "the final adapter of a run, with that run's config, gives the run's last eval/ metrics. "
                    "Writes eval_metrics.json, eval.png and eval.json to --output-dir and prints each metric.")
    evaluate.add_argument("items", nargs="*", metavar="ADAPTER, key=value",
                          help="ADAPTER: a run directory (its lora/, or its newest checkpoint's), a checkpoint "
                               "directory or a LoRA directory; omitted: the base model. Then config overrides")
    evaluate.add_argument("--config", required=True, help="YAML config file (the run's config.yaml or a preset)")
    evaluate.add_argument("--output-dir", default=None, metavar="DIR",
                          help="where to write (default: RUN/eval for a run directory, else runs/eval-NAME-TIME)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an earlier eval_metrics.json there")
    compare = sub.add_parser(
        "compare", help="runs' gold gains side by side, with their mean and spread over the runs",
        description="Per evaluation set (split into the prompts each run trained on and the others where a "
                    "set mixes them): each run's gold gain from its first evaluation to its newest, paired "
                    "image by image ± its s.e., then the mean and standard deviation over the runs "
                    "(cluster/eval_compare.py). Prints a markdown table; reads the runs, starts nothing.")
    compare.add_argument("runs", nargs="+", metavar="RUN",
                         help="run directories written by gard train (or gard eval output directories, with --base)")
    compare.add_argument("--updates", type=int, default=None,
                         help="compare the evaluations after this many updates (default: each run's newest)")
    compare.add_argument("--by-prompt", action="store_true", help="add a row per prompt")
    compare.add_argument("--split-by", default=None, metavar="PROMPT_FILE",
                         help="split the sets by this file's prompts (one per line) instead of each run's "
                              "training prompts, so runs trained on different prompts get the same parts")
    compare.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    compare.add_argument("--base", default=None, metavar="RUN",
                         help="for a RUN that is a gard eval output (a fused or exported adapter): the run "
                              "directory whose evaluation before training it is paired against (same images)")
    serve_cmd = sub.add_parser(
        "serve", help="serve a config's rewards as Ray Serve applications until interrupted",
        description="Start one Serve application per reward of CONFIG (HTTP: POST /<reward>) on local Ray "
                    "(or cluster.address) and keep them up until Ctrl-C / SIGTERM, then remove them.")
    serve_cmd.add_argument("config", help="YAML config file whose rewards to serve")
    serve_cmd.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    serve_cmd.add_argument("--port", type=int, default=None, help="HTTP port (default: reward_service.http_port)")
    serve_cmd.add_argument("--host", default=None, help="HTTP host (default: reward_service.http_host, 127.0.0.1)")
    dpo = sub.add_parser("dpo", help="offline Diffusion-DPO from a preference dataset (dpo.dataset JSONL)",
                         description="Train the policy's LoRA with Diffusion-DPO on (prompt, chosen, rejected) "
                                     "image pairs listed in dpo.dataset (one JSON object per line).")
    dpo.add_argument("config", help="YAML config file (policy, dpo, train.learning_rate, seed)")
    dpo.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    dpo.add_argument("--output-dir", default=None, help="run directory (default: output_dir or runs/NAME-TIME)")
    fuse = sub.add_parser(
        "fuse-lora", help="combine LoRA adapters into one (weighted sum of their weight deltas)",
        description="Write one adapter whose weight deltas are the weighted sums of the inputs' deltas "
                    "(any ranks; a text-encoder adapter and a UNet adapter combine into one). Exact by "
                    "default (rank = sum of the inputs' ranks); --rank R compresses each layer by SVD.")
    fuse.add_argument("inputs", nargs="+", metavar="IN[:W]",
                      help="adapter directory, optional weight (default 1)")
    fuse.add_argument("--out", required=True, help="output adapter directory")
    fuse.add_argument("--rank", type=int, default=None,
                      help="compress every layer to this rank (truncated SVD)")
    fuse.add_argument("--overwrite", action="store_true", help="replace an existing adapter in --out")
    plan_cmd = sub.add_parser(
        "plan", help="predict the epoch time of every sampler/learner split of G devices for a config",
        description="Predict, from per-device unit costs (--costs JSON), the epoch time and utilisation of "
                    "every colocated and disaggregated layout of --gpus devices for CONFIG's epoch, and "
                    "recommend the fastest (cluster/cost_model.py).")
    plan_cmd.add_argument("config", help="YAML config file")
    plan_cmd.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    plan_cmd.add_argument("--gpus", type=int, required=True, help="devices to split")
    plan_cmd.add_argument("--costs", required=True, help="JSON unit costs (e.g. benchmarks/costs/sd15_h200.json)")
    plan_cmd.add_argument("--reward-gpus", type=int, default=0, help="devices of the reward models (default 0)")
    testbed = sub.add_parser(
        "testbed", help="the shapes world: `gard testbed build --out DIR` trains its pretrained models",
        description="`gard testbed build ARGS` is `python -m testbed.build ARGS` (see its --help).")
    testbed.add_argument("action", choices=["build"])
    testbed.add_argument("args", nargs=argparse.REMAINDER, help="arguments of python -m testbed.build")
    return parser


def _fuse_lora(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> int:
    """``gard fuse-lora``: no config and no Ray; bad inputs print one line and exit 2."""
    stray = [item for item in extra if item.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    from actors.lora_fusion import LoraFusionError, fuse_lora_dirs

    try:
        result = fuse_lora_dirs(list(args.inputs) + extra, out_dir=args.out, rank=args.rank,
                                overwrite=args.overwrite)
    except LoraFusionError as err:
        print(f"gard: error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    for component, layers in result.components.items():
        ranks = sorted({layer.rank for layer in layers.values()})
        print(f"gard: {component}: {len(layers)} layers, rank {'/'.join(map(str, ranks))}")
    if args.rank is not None:
        print(f"gard: max relative error of the rank-{args.rank} compression: {result.max_rel_error():.3g}")
    print(f"gard: fused adapter written to {args.out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    """``gard compare``: no config and no Ray; an unreadable run prints one paragraph and exits 2."""
    import json
    from pathlib import Path

    from cluster.eval_compare import (
        CompareError,
        compare_runs,
        comparison_json,
        comparison_table,
        load_eval_output,
        load_run,
        read_prompt_list,
    )

    try:
        split = None if args.split_by is None else read_prompt_list(Path(args.split_by))
        runs = [load_eval_output(Path(run), base_run=Path(args.base), split_prompts=split)
                if args.base is not None and not (Path(run) / "config.yaml").is_file()
                else load_run(Path(run), updates=args.updates, split_prompts=split) for run in args.runs]
        rows, same_base = compare_runs(runs, by_prompt=args.by_prompt)
    except CompareError as err:
        print(f"gard: error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(comparison_table(runs, rows, same_base=same_base, split_by=args.split_by))
    if args.json:
        Path(args.json).write_text(json.dumps(comparison_json(runs, rows, same_base=same_base), indent=1))
    return 0


def _user_error(err: BaseException) -> BaseException | None:
    """The user-facing error inside ``err`` (Ray wraps actor exceptions), or None for a real bug."""
    from actors.policy import AdapterBindingError
    from actors.weights import AdapterMismatchError, ChecksumError, NonFiniteWeightsError
    from cluster.config import ConfigError
    from cluster.errors import RewardDownError, RewardHackingError, RewardStageFailedError, cause_chain
    from cluster.learner_handle import LearnerFailedError
    from cluster.metrics import MetricsWriteError
    from cluster.samplers import SamplerFailedError
    from learner.distributed import LearnerDivergedError
    from learner.precision import TrainingStalledError

    user_types = (ConfigError, AdapterMismatchError, ChecksumError, FileNotFoundError, RewardDownError,
                  SamplerFailedError, TrainingStalledError, AdapterBindingError, NonFiniteWeightsError,
                  MetricsWriteError, LearnerFailedError, RewardStageFailedError, RewardHackingError,
                  LearnerDivergedError)
    return next((e for e in cause_chain(err) if isinstance(e, user_types)), None)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = _parser()
    # Overrides may come before or after options (`gard train C --output-dir D epochs=2`).
    args, extra = parser.parse_known_args(argv)
    if args.command == "fuse-lora":
        return _fuse_lora(parser, args, extra)
    if args.command == "compare":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return _compare(args)
    if args.command == "testbed":
        from testbed.build.cli import main as build_main

        return build_main(list(args.args) + extra)
    from cluster.config import ConfigError, load_config

    if args.command == "eval":  # [ADAPTER] and overrides, before or after the options
        from cluster.eval_adapter import split_items

        stray = [item for item in extra if item.startswith("-")]
        try:
            args.adapter, args.overrides = split_items([*args.items, *(e for e in extra if e not in stray)])
        except ConfigError as err:
            parser.error(str(err))
        extra = stray
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = list(getattr(args, "overrides", [])) + extra

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"gard: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.command == "plan":
        from cluster.plan import run_plan

        try:
            print(run_plan(config, devices=args.gpus, costs_path=args.costs, reward_devices=args.reward_gpus))
        except ConfigError as err:
            print(f"gard: error: {err}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        return 0
    if args.command == "serve":
        if args.port is not None:
            config.reward_service.http_port = args.port
        if args.host is not None:
            config.reward_service.http_host = args.host
        from cluster.service import serve_forever

        return serve_forever(config)
    from cluster.run import train
    from cluster.stop import RunInterrupted

    try:
        if args.command == "dpo":
            from cluster.offline_dpo import run_offline_dpo

            run_dir = run_offline_dpo(config, output_dir=args.output_dir)
        elif args.command == "eval":
            from cluster.eval_adapter import evaluate_adapter

            out = evaluate_adapter(config, adapter=args.adapter, output_dir=args.output_dir, overwrite=args.overwrite)
            print(f"gard: evaluation written to {out}")
            return 0
        else:
            run_dir = train(config, output_dir=args.output_dir, resume=args.resume)
    except RunInterrupted as err:
        print(f"gard: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("gard: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - user errors get one paragraph, bugs keep their traceback
        user = _user_error(err)
        if user is None:
            raise
        code = EXIT_CONFIG_ERROR if isinstance(user, ConfigError) else EXIT_USER_ERROR
        print(f"gard: error: {user}", file=sys.stderr)
        return code
    print(f"gard: run finished: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
