"""Influence speed on one GPU: this engine (exact / linear, each precision) side by side with the
public code's strategy, on randomly initialised real architectures.

    python bench/influence.py --device cuda --arch tinyllama-1.1b
    python bench/influence.py --device cuda --arch llama3-8b --methods linear-bf16grad,exact-bf16 --no-public
    python bench/influence.py --device cpu --arch tiny --candidates 2      # smoke test
    python bench/influence.py --methods linear-bf16grad,linear-bf16grad@perparam --profile --no-public

A linear method name may end in `@hooks` (eager: the candidate gradient consumed in buckets of
engine.BUCKET_BYTES during backward), `@perparam` (the same, one parameter at a time: the engine's
earlier layout), `@flat` (fast.py: a fused update pass per parameter) or `@graphed` (flat + CUDA
graphs); no suffix = the engine's default (auto: graphed on CUDA, hooks on the CPU). Column "vs row
1" compares each method's values with the first method's (median relative difference, Spearman
correlation); column "repeat" the same engine's two scorings of the same candidates (linear: the
untimed pass and the timed one), i.e. the kernels' own run-to-run nondeterminism (--sdpa,
--deterministic to hunt it). The moments start on the host each time, as `load_warmup` leaves them;
the engine picks its memory layout (`auto`) and the table shows it with the peak device memory.

Setup: random weights (fp32 master), a synthetic AdamW state (moments of a plausible size, step 1000),
the 256 reference examples' real (prompt, response) lengths (the public code's Alpaca-Eval/GPT-4 set,
SmolLM2 tokenizer, cut at 1024), random candidates of 300-600 tokens. Timings exclude an untimed
warm-up: one candidate for exact, every candidate once for linear (the graphed kernel captures one
CUDA graph per padded length on first sight; `setup` includes it); the fast path's step time is the
timed loop's wall time per candidate (it keeps one candidate queued ahead: `score_many`). For each method: seconds per
candidate split into the step (candidate forward/backward + the elementwise AdamW pass) and the
reference evaluation, achieved FLOP/s of the evaluation against a matmul of the same precision, and
bytes/s of the step's update pass against a device copy, both measured in the same run. `public`: save weights + optimizer to disk once, then per
candidate torch.load + load_state_dict, a torch.optim.AdamW step and the reference loss under bf16
autocast with full logits (the page cache usually holds the file after the first load: a warm read).
Needs torch and transformers only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import montessori.influence.engine as engine_module  # noqa: E402
from montessori.influence.engine import AdamWState, InfluenceEngine  # noqa: E402
from montessori.models.batching import Example, length_batches, precision_context  # noqa: E402

from bench.archs import ARCHS, build_model  # noqa: E402
from montessori.influence.metrics import spearman  # noqa: E402
METHODS = {  # name: (estimator, precision of the reference pass, precision of the candidate gradient)
    "linear-fp32": ("linear", "float32", "float32"),
    "linear-bf16grad": ("linear", "float32", "bfloat16"),
    "linear-tf32": ("linear", "tf32", "tf32"),
    "linear-tf32-bf16grad": ("linear", "tf32", "bfloat16"),
    "exact-fp32": ("exact", "float32", "float32"),
    "exact-tf32": ("exact", "tf32", "tf32"),
    "exact-bf16": ("exact", "bfloat16", "bfloat16"),
}
# (prompt, response) token lengths of the 256 reference examples (SmolLM2 tokenizer + chat template, cut at 1024).
REFERENCE_LENGTHS = """
45:539 38:788 65:735 44:732 38:580 38:537 58:80 35:352 41:594 80:831 49:327 46:612 80:637 38:504
43:398 39:637 37:566 51:867 42:347 60:846 39:620 43:462 39:308 37:586 36:84 41:591 36:455 54:567
40:585 38:598 37:700 48:751 39:551 39:437 37:76 34:289 38:658 37:471 61:556 44:534 35:382 39:721
51:622 37:211 39:681 39:650 43:463 80:630 40:439 40:543 40:106 44:161 81:605 43:418 53:515 38:714
39:659 80:639 81:555 63:402 39:763 45:659 53:613 37:591 80:538 37:416 38:509 82:484 43:804 44:487
56:85 43:116 65:525 39:624 43:543 42:585 81:628 80:631 41:443 38:610 53:528 40:534 56:704 39:622
43:645 84:692 62:549 48:787 39:222 52:829 44:775 37:188 51:830 37:141 81:741 55:578 40:627 40:362
42:486 39:517 84:497 38:629 39:159 57:614 41:520 34:130 57:281 42:661 52:471 46:310 73:729 82:772
43:264 35:335 39:440 87:613 54:715 59:583 36:260 37:471 41:78 43:263 47:162 37:545 47:543 36:227
77:728 48:529 38:299 64:937 52:585 47:332 45:586 58:277 44:446 39:225 73:843 117:592 83:941 49:863
39:567 135:542 68:153 53:420 98:106 66:785 159:494 50:718 47:963 93:361 70:136 40:709 39:604 179:845
41:646 40:436 78:895 43:391 42:209 57:170 48:581 38:77 103:910 54:312 46:117 90:268 66:474 49:331
63:62 76:492 41:542 83:870 108:248 43:244 46:215 78:568 57:967 48:762 37:321 45:603 87:781 38:447
59:965 44:568 46:488 69:704 54:674 43:423 317:707 47:482 137:7 43:428 38:447 64:630 38:651 57:45
46:444 39:508 55:271 34:2 38:419 91:804 57:220 153:871 43:829 51:678 59:586 45:139 83:812 82:478
38:94 39:267 85:755 41:707 93:52 42:651 47:714 127:540 45:658 57:359 47:562 86:840 66:660 59:523
74:374 47:190 105:661 85:328 57:967 47:437 56:216 41:577 40:148 61:487 157:101 61:837 41:623 68:611
77:523 105:461 41:680 41:691 47:344 35:648 60:546 40:62 55:626 37:425 114:910 40:248 64:492 171:131
38:722 37:630 52:495 48:634"""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int = 5) -> float:
    fn()
    sync(device)
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - started) / repeat


def matmul_rate(device: torch.device, precision: str) -> float:
    """FLOP/s of a square matmul in this precision (the evaluation's ceiling)."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    with precision_context("tf32" if precision == "tf32" else "float32", device):
        return 2 * n ** 3 / timed(lambda: a @ b, device)


def copy_rate(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy (read + write): the update pass's ceiling."""
    x = torch.empty(2 ** 28 if device.type == "cuda" else 2 ** 24, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / timed(lambda: y.copy_(x), device)


def synthetic_state(model) -> AdamWState:
    """Moments of a plausible size after a warm-up: |g| ~ 1e-3, so m ~ 1e-4 and v ~ 1e-6."""
    ps = list(model.parameters())
    m = [torch.randn_like(p).mul_(1e-4) for p in ps]
    v = [torch.randn_like(p).square_().mul_(1e-6) for p in ps]
    return AdamWState(m, v, step=1000, lr=5e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def examples(lengths: list[tuple[int, int]], vocab: int, prefix: str, rng: random.Random) -> list[Example]:
    out = []
    for i, (n_prompt, n_response) in enumerate(lengths):
        ids = [rng.randrange(3, vocab) for _ in range(n_prompt + n_response)]
        out.append(Example(f"{prefix}{i}", ids, [-100] * n_prompt + ids[n_prompt:]))
    return out


def eval_flops(model, ref: list[Example]) -> float:
    """Forward FLOPs of one reference pass: dense layers on every token, lm_head on response tokens only,
    causal attention (QK^T and AV over half the square)."""
    cfg = model.config
    head = cfg.hidden_size * cfg.vocab_size
    dense = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    tokens = sum(len(e.input_ids) for e in ref)
    attention = sum(2 * cfg.num_hidden_layers * cfg.hidden_size * len(e.input_ids) ** 2 for e in ref)
    return 2 * dense * tokens + 2 * head * sum(e.num_targets for e in ref) + attention


def profile(engine, cands, device) -> None:
    """torch.profiler over a few candidates: where the step's time goes (kernels and host)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in engine.score_many(cands):
            pass
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


def run_engine(model, state, ref, cands, method, args, device):
    name, _, variant = method.partition("@")
    estimator, precision, grad_precision = METHODS[name]
    bucket = engine_module.BUCKET_BYTES
    engine_module.BUCKET_BYTES = 1 if variant == "perparam" else bucket
    kernel = {"perparam": "hooks", "": "auto"}.get(variant, variant)
    state.to("cpu")  # as load_warmup leaves it: the engine moves the moments after ∇L_ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        started = time.perf_counter()
        engine = InfluenceEngine(model, state, ref, pad_id=0, estimator=estimator, precision=precision,
                                 grad_precision=grad_precision, eval_batch_size=args.eval_batch_size,
                                 compile=args.compile, linear_kernel=kernel,
                                 pad_multiple=args.pad_multiple, ref_grad_dtype=args.ref_grad_dtype)
        # Untimed: allocator, kernels, compilation; the linear methods see every candidate once (one CUDA
        # graph per padded length is captured on first sight: a one-off cost, counted in `setup`).
        first = [r.influence for r in engine.score_many(cands if estimator == "linear" else cands[:1])]
        sync(device)
        setup = time.perf_counter() - started
        steps, evals, values = [], [], []
        started = time.perf_counter()
        for r in engine.score_many(cands[1:]):  # the fast path keeps one candidate queued ahead
            steps.append(engine.timing["step"])
            evals.append(engine.timing["eval"] if estimator == "exact" else 0.0)
            values.append(r.influence)
        if engine.fast is not None:  # pipelined: the loop's wall time per candidate
            steps = [(time.perf_counter() - started) / len(values)] * len(values)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
        if args.profile and estimator == "linear":
            print(f"\nprofile of {method}:")
            profile(engine, cands[1:4], device)
        layout = (f"{engine.ref_grad_dtype} ∇L_ref, {engine.linear_kernel}" if estimator == "linear"
                  else engine.shadow_mode + " shadow")
        if engine.fast is not None:
            layout += f" ({len(engine.fast.graphs)} graphs)" if engine.fast.graphs else ""
            layout += ", θ offloaded" if engine.fast.host is not None else ""
        engine.close()
        del engine
    finally:
        engine_module.BUCKET_BYTES = bucket
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # The same candidates scored twice by one engine (linear: the untimed pass, then the timed one):
    # any difference is run-to-run nondeterminism of the kernels themselves.
    repeat = max_rel_diff(first[1:], values) if estimator == "linear" else None
    return dict(method=method, precision=precision, grad_precision=grad_precision, setup=setup,
                step=sum(steps) / len(steps), eval=sum(evals) / len(evals), peak_gib=peak, values=values,
                layout=layout, repeat=repeat)


def max_rel_diff(a: list, b: list) -> float:
    return max((abs(x - y) / abs(y) if y else abs(x - y) for x, y in zip(a, b)), default=0.0)


def run_public(model, state, ref, cands, args, device):
    """The public code's loop: reload the whole checkpoint from disk, step, evaluate under bf16 autocast."""
    import torch.nn.functional as F
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=state.lr, betas=state.betas, eps=state.eps, weight_decay=0.0)
    for p, m, v in zip(params, state.exp_avg, state.exp_avg_sq):
        optimizer.state[p] = {"step": torch.tensor(float(state.step)), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    folder = Path(tempfile.mkdtemp(dir=args.ckpt_dir))
    path = folder / "warmup.pt"
    started = time.perf_counter()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    save = time.perf_counter() - started
    batches = [length_batches(  # unsorted, in file order
        ref[i:i + args.eval_batch_size], args.eval_batch_size, 0, device)[0]
        for i in range(0, len(ref), args.eval_batch_size)]
    loads, steps, evals = [], [], []
    try:
        for k, c in enumerate(cands):
            t0 = time.perf_counter()
            ckpt = torch.load(path, map_location=device, weights_only=True)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            del ckpt
            sync(device)
            t1 = time.perf_counter()
            ids = torch.tensor([c.input_ids], device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                model(input_ids=ids, labels=torch.tensor([c.labels], device=device), use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            t2 = time.perf_counter()
            losses = []
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                for b in batches:  # full logits, mean of batch means (the public code's reduction)
                    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
                    losses.append(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b.labels[:, 1:].flatten()))
                    del logits
            float(torch.stack(losses).mean())
            t3 = time.perf_counter()
            if k:  # the first candidate is untimed, as for the engine
                loads.append(t1 - t0), steps.append(t2 - t1), evals.append(t3 - t2)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    n = len(loads)
    return dict(method="public (reload + bf16)", precision="bfloat16", grad_precision="bfloat16", setup=save,
                load=sum(loads) / n, step=sum(steps) / n, eval=sum(evals) / n, peak_gib=float("nan"), values=[],
                layout="disk")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arch", default="tinyllama-1.1b", choices=list(ARCHS))
    ap.add_argument("--methods", default="linear-bf16grad,linear-fp32,linear-tf32,exact-bf16,exact-tf32,exact-fp32")
    ap.add_argument("--candidates", type=int, default=4, help="timed candidates per method (+1 untimed)")
    ap.add_argument("--reference", type=int, default=256, help="reference examples (of the 256 real lengths)")
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                    help="influence.compile: auto (the library default: the graphed step's copy, layer by layer, "
                         "on CUDA), on (also the eager passes and the flat step), off")
    ap.add_argument("--pad-multiple", type=int, default=64, help="graphed/flat: candidates padded to a multiple")
    ap.add_argument("--ref-grad-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--no-public", action="store_true", help="skip the public code's reload strategy")
    ap.add_argument("--ckpt-dir", default=None, help="where the public strategy saves its checkpoint")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of each linear method's step")
    ap.add_argument("--no-flash", action="store_true", help="disable the flash SDPA backend (determinism check)")
    ap.add_argument("--sdpa", default=None, choices=["math", "flash", "efficient", "cudnn"],
                    help="allow only this SDPA backend in every pass (fails where the fp32 reference pass has "
                         "no kernel in it: 'Invalid backend'); --fast-sdpa restricts only the fast step")
    ap.add_argument("--fast-sdpa", default=None, choices=["all", "no-cudnn", "cudnn", "flash", "efficient", "math"],
                    help="attention backends of the fast path's step (default: fast.SDPA_BACKENDS, math)")
    ap.add_argument("--out", default=None, help="append each method's row (and its values) to this JSONL file")
    ap.add_argument("--deterministic", nargs="?", const="warn", choices=["warn", "strict"],
                    help="torch.use_deterministic_algorithms and a fixed cuBLAS workspace; warn (default): "
                         "nondeterministic kernels still run, with a warning; strict: the deterministic "
                         "algorithm where one exists (cuDNN attention's, say), an error where none does")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.no_flash:
        torch.backends.cuda.enable_flash_sdp(False)
    if args.sdpa:
        for backend in ("math", "flash", "mem_efficient", "cudnn"):
            getattr(torch.backends.cuda, f"enable_{backend}_sdp")(args.sdpa in backend)
    if args.fast_sdpa:
        import montessori.influence.fast as fast
        from torch.nn.attention import SDPBackend as B
        fast.SDPA_BACKENDS = {"all": [B.MATH, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.CUDNN_ATTENTION],
                              "math": [B.MATH],
                              "cudnn": [B.CUDNN_ATTENTION, B.MATH],
                              "flash": [B.FLASH_ATTENTION, B.MATH],
                              "efficient": [B.EFFICIENT_ATTENTION, B.MATH],
                              "no-cudnn": [B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH]}[args.fast_sdpa]
    if args.deterministic:  # before the first cuBLAS call
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=args.deterministic == "warn")
    rng = random.Random(0)
    lengths = [tuple(int(x) for x in pair.split(":")) for pair in REFERENCE_LENGTHS.split()][: args.reference]
    if args.arch == "tiny":
        lengths = [(min(a, 32), min(b, 64)) for a, b in lengths]
    model = build_model(args.arch, device, torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    state = synthetic_state(model).to("cpu")
    ref = examples(lengths, model.config.vocab_size, "ref", rng)
    cand_lengths = [(rng.randint(40, 100), 0) for _ in range(args.candidates + 1)]
    cand_lengths = [(a, rng.randint(300, 600) - a) for a, _ in cand_lengths]
    cands = examples(cand_lengths, model.config.vocab_size, "cand", rng)
    if args.arch == "tiny":
        cands = examples([(20, 40)] * (args.candidates + 1), model.config.vocab_size, "cand", rng)

    gib = n_params * 4 / 2 ** 30
    print(f"arch {args.arch}: {n_params / 1e9:.3f}B parameters; fp32 θ {gib:.1f} GiB, m+v {2 * gib:.1f} GiB, "
          f"shadow or ∇L_ref {gib:.1f} GiB -> resident {4 * gib:.1f} GiB + activations")
    print(f"reference: {len(ref)} examples, {sum(len(e.input_ids) for e in ref)} tokens "
          f"({sum(e.num_targets for e in ref)} response); candidates {[len(c.input_ids) for c in cands]} tokens")
    rates = {p: matmul_rate(device, p) for p in ("float32", "tf32", "bfloat16")}
    copy = copy_rate(device)
    print("matmul TFLOP/s: " + ", ".join(f"{p} {r / 1e12:.1f}" for p, r in rates.items()) +
          f"; device copy {copy / 1e9:.0f} GB/s")
    flops = eval_flops(model, ref)
    update_bytes = 5 * 4 * n_params  # read θ, g, m, v; write θ_z (exact) - the same for linear (reads ∇L_ref)

    print(f"\n{args.arch} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{args.candidates} timed candidates, eval batch {args.eval_batch_size}, compile={args.compile}, "
          f"pad multiple {args.pad_multiple}, ref grad dtype {args.ref_grad_dtype}, sdpa {args.sdpa or 'default'}"
          f"{', no flash' if args.no_flash else ''}{', fast-path sdpa ' + args.fast_sdpa if args.fast_sdpa else ''}{', deterministic ' + args.deterministic if args.deterministic else ''}")
    # The step's floor: forward + backward (3x the forward FLOPs) of the mean candidate at the gradient's
    # precision, plus the update pass over θ, g, m, v (and ∇L_ref or the shadow) at device-copy speed.
    cand_flops = sum(eval_flops(model, [c]) for c in cands[1:]) / max(1, len(cands) - 1)
    header = ("| method | layout | s/candidate | step s | step floor s | reference eval s | reload s "
              "| eval TFLOP/s (% of matmul) | eval floor s | setup s | peak GiB | vs row 1: median rel. diff / Spearman "
              "| repeat: max rel. diff |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(header, flush=True)
    lines, first = [], None
    runs = [lambda m=m: run_engine(model, state, ref, cands, m, args, device) for m in args.methods.split(",") if m]
    if not args.no_public:
        runs.append(lambda: run_public(model, state, ref, cands, args, device))
    for run in runs:  # each row as soon as it is measured: a later method that fails loses only itself
        r = run()
        first = r["values"] if first is None else first
        rel = sorted(abs(a - b) / abs(b) for a, b in zip(r["values"], first) if b)
        diff = f"{rel[len(rel) // 2]:.1e} / {spearman(r['values'], first):.3f}" if rel else "-"
        total = r["step"] + r["eval"] + r.get("load", 0.0)
        rate = rates[r["precision"]]
        achieved = f"{flops / r['eval'] / 1e12:.1f} ({100 * flops / r['eval'] / rate:.0f}%)" if r["eval"] else "-"
        floor = f"{flops / rate:.3f}" if r["eval"] else "-"
        step_floor = 3 * cand_flops / rates[r["grad_precision"]] + update_bytes / copy
        repeat = "-" if r.get("repeat") is None else f"{r['repeat']:.1e}"
        line = (f"| {r['method']} | {r['layout']} | {total:.4f} | {r['step']:.4f} | {step_floor:.4f} | {r['eval']:.4f} | "
                f"{r.get('load', 0.0):.3f} | {achieved} | {floor} | {r['setup']:.2f} | {r['peak_gib']:.1f} | "
                f"{diff} | {repeat} |")
        lines.append(line)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(dict(r, arch=args.arch, total=total, step_floor=step_floor, argv=sys.argv[1:])) + "\n")
    print("\n" + header + "\n" + "\n".join(lines))

if __name__ == "__main__":
    main()
