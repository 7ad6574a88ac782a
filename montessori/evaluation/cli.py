"""Sub-commands `montessori eval` and `montessori compare` (registered by montessori.cli)."""

from __future__ import annotations

from pathlib import Path

from montessori.errors import InputError

EXIT_OK = 0


def _entry_text(entry: dict | None) -> str:
    from montessori.evaluation.compare import fmt
    return fmt(entry)


def _eval_config(args):
    from pydantic import ValidationError
    from montessori.config import EvalConfig, load_config
    base = load_config(args.config).eval if args.config else EvalConfig()
    values = base.model_dump()
    for key in ("prompts", "max_examples", "batch_size", "max_length", "bootstrap_samples", "temperature",
                "max_new_tokens", "questions", "task_path", "ifeval", "ifeval_max_prompts", "ifeval_max_new_tokens"):
        given = getattr(args, key)
        if given is not None:
            values[key] = given
    for flag, key in (("judge", "model"), ("judge_url", "base_url"), ("judge_api_key_env", "api_key_env")):
        if getattr(args, flag) is not None:
            values["judge"][key] = getattr(args, flag)
    if args.tasks is not None:
        values["tasks"] = [t for t in args.tasks.split(",") if t]
    try:
        return EvalConfig.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        flag = "-".join(str(p) for p in first["loc"])
        raise InputError(f"--{flag}: {first['msg'].removeprefix('Value error, ')}") from None


def cmd_eval(args) -> int:
    from rich.console import Console
    from rich.table import Table
    from montessori.logs import setup_logging
    from montessori.evaluation.answers import read_questions
    from montessori.evaluation.evaluate import evaluate, make_configured_judge
    from montessori.evaluation.stage import answers_dir
    from montessori.readers import read_pairs
    from montessori.store import atomic_write_json
    cfg = _eval_config(args)
    out = Path(args.out)
    setup_logging(None, args.verbose)
    # Every input file is read before any model loads: a bad line fails in a second (exit 2).
    read_pairs(cfg.prompts, lenient=args.lenient, limit=cfg.max_examples)
    if cfg.questions:
        read_questions(cfg.questions)
    if cfg.ifeval:
        from montessori.evaluation.ifeval import read_prompts
        read_prompts(cfg.ifeval, limit=cfg.ifeval_max_prompts)
    if cfg.questions and not cfg.judge.model:
        raise InputError("--questions needs a judge (--judge SPEC, or --judge NAME --judge-url URL)")
    judge = make_configured_judge(cfg, args.device, args.dtype)
    results = evaluate(args.students, cfg, out, judge=judge, device=args.device, dtype=args.dtype,
                       lenient=args.lenient, run_answers=answers_dir, progress=not args.no_progress, seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "eval.json", results)
    names = [s["name"] for s in results["students"]]
    names += list(dict.fromkeys(e["student"] for e in results["metrics"] if e["student"] not in names))  # the floor
    table = Table(title=f"montessori eval: {results['prompts']['examples']} prompts from {cfg.prompts}")
    table.add_column("metric")
    for n in names:
        table.add_column(n)
    by_metric: dict[str, dict[str, dict]] = {}
    for e in results["metrics"]:
        label = f"{e['metric']} vs {e['baseline']}" if e.get("baseline") else e["metric"]
        by_metric.setdefault(label, {})[e["student"]] = e
    for m, row in by_metric.items():
        table.add_row(m, *[_entry_text(row.get(n)) for n in names])
    Console().print(table)
    print(f"wrote {out / 'eval.json'}")
    return EXIT_OK


def cmd_compare(args) -> int:
    from rich.console import Console
    from rich.table import Table
    from montessori.evaluation.compare import compare, markdown, plot
    columns, metrics, cells = compare(args.sources)
    if not metrics:
        raise InputError("no metrics found in " + ", ".join(args.sources))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = Table(title="montessori compare (95% intervals)")
    table.add_column("metric")
    for c in columns:
        table.add_column(c)
    for m in metrics:
        table.add_row(m, *[_entry_text(cells.get((m, c))) for c in columns])
    Console().print(table)
    (out / "compare.md").write_text(markdown(columns, metrics, cells))
    plot(columns, metrics, cells, out / "compare.png")
    print(f"wrote {out / 'compare.md'} and {out / 'compare.png'}")
    return EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate students: reference-answer loss, judged win rate, grading, benchmarks, "
                                    "IFEval",
                       description="STUDENT is an HF model dir, a model spec (smollm2, tiny-random:N, *.gguf) or a run "
                                   "dir (its latest round's trained student). Win rates are against the first student.")
    p.add_argument("students", nargs="+", metavar="STUDENT")
    p.add_argument("--prompts", help="instruction/response file with trusted answers (default: builtin reference set)")
    p.add_argument("--max-examples", type=int, dest="max_examples")
    p.add_argument("--judge", help="judge model: a local spec (HF dir, smollm2, *.gguf, Hub id), or with --judge-url "
                                   "the model name the endpoint serves")
    p.add_argument("--judge-url", dest="judge_url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    p.add_argument("--judge-api-key-env", dest="judge_api_key_env", metavar="VAR",
                   help="environment variable holding the --judge-url API key (default OPENAI_API_KEY)")
    p.add_argument("--questions", help="MT-Bench-style question file (turns) for 1-10 grading by the judge")
    p.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (mmlu,arc-c,gsm8k,hellaswag,gpqa)")
    p.add_argument("--task-path", dest="task_path", help="folder of extra lm-evaluation-harness task YAMLs")
    p.add_argument("--ifeval", metavar="FILE", help="IFEval prompts (JSONL: key, prompt, instruction_id_list, kwargs): "
                                                   "verifiable instruction following of greedy answers")
    p.add_argument("--ifeval-max-prompts", type=int, dest="ifeval_max_prompts", metavar="N",
                   help="the file's first N prompts")
    p.add_argument("--ifeval-max-new-tokens", type=int, dest="ifeval_max_new_tokens", metavar="N",
                   help="answer budget for IFEval prompts (default 1280)")
    p.add_argument("--temperature", type=float, help="answer sampling temperature (0 = greedy, the default)")
    p.add_argument("--max-new-tokens", type=int, dest="max_new_tokens")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--max-length", type=int, dest="max_length")
    p.add_argument("--bootstrap", type=int, dest="bootstrap_samples", help="bootstrap resamples (default 1000)")
    p.add_argument("--config", help="take eval settings from this run config's eval section")
    p.add_argument("--out", default="montessori-eval", help="output folder (eval.json, judgements)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lenient", action="store_true", help="skip bad records of the prompt file instead of failing")
    p.add_argument("--no-progress", action="store_true", dest="no_progress")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="table and plot of every metric of several runs, with intervals")
    p.add_argument("sources", nargs="+", metavar="RUN", help="run dirs, `montessori eval` output dirs or JSON files")
    p.add_argument("--out", default=".", help="folder for compare.md and compare.png (default: here)")
    p.set_defaults(func=cmd_compare)
