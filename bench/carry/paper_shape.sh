#!/usr/bin/env bash
# The paper-shape experiments on one GPU machine that receives its models in pieces (bench/carry/env.sh),
# started once in the background (setsid: it outlives the call that starts it), in call 1 already:
#   setsid nohup bash bench/carry/paper_shape.sh > ~/runs/go.log 2>&1 < /dev/null &
# It works while later calls carry the models' pieces and report (bench/carry/status.sh):
#   0. it waits for the teacher's GGUF and converts it once; STYLE=1 measures which prompt style the
#      teacher follows (paper_shape.py --step style) beside the runs;
#   1. the teacher's stages of the sweep's data run and of every seed's arms (one process each: the
#      models are small, so one process leaves the GPU mostly idle);
#   2. once the student's GGUF is assembled: the untrained student's evaluation, the sweep (its data run,
#      then the SFT and DPO rows at once), then every seed's runs and evaluation, one process per seed.
# Issue 28 (Qwen2.5-Coder-1.5B teaches Gemma-3-270M; four arms; IFEval answers in the eval step):
#   PRESET=qwen-gemma TEACHER=qwen2.5-coder-1.5b STYLE=1 ARMS="self-instruct montessori montessori-n4" \
#     SIZE="--probing 2048 --pairs 2048" DPO_LRS="2e-5 1e-4 3e-4" USE_SWEEP_LRS=0 CODE=.code \
#     setsid nohup bash bench/carry/paper_shape.sh ...
# SWEEP=0 skips the sweep (the preset's learning rates); STUDY=1 also runs experiments/dpo_study.py on
# the probing rounds carried as .study/study-S.txz, alongside the teacher stages; RELIABILITY=1 runs
# experiments/reliability.py on every seed's run once its evaluation is done.
# Everything resumes from its records, so starting it again after a lost machine redoes only what is lost.
set -u
R=$HOME/runs L=$HOME/runs/logs C=$HOME/code
mkdir -p $L $C $HOME/shared
# A copy: every later call re-syncs the checkout under the running jobs. CODE=.code takes a snapshot of
# a commit carried in call 1 (`git archive HEAD | tar x -C .code`) instead of the working tree.
CODE=${CODE:-.}
cp -r $CODE/montessori $CODE/experiments $CODE/bench $CODE/pyproject.toml $C/
export PYTHONPATH=$HOME/tf:$C:$HOME/site OMP_NUM_THREADS=${THREADS:-4}
PRESET=${PRESET:-paper-shape} TEACHER=${TEACHER:-smollm2}
SEEDS=${SEEDS:-0 1 2}
SIZE="${SIZE:---probing 4096 --pairs 4096} --rounds ${ROUNDS:-1} --preset $PRESET --arms ${ARMS:-self-instruct montessori}"
EVAL="--step eval --batch-size 64 --max-length 1024 --quiet"
G=${STUDENT_FILE:-$HOME/m/gemma-3-270m-q4_k_m.gguf}
T=${TEACHER_FILE:-$(python3 -c "from montessori.models.load import NAMED_MODELS as N; print('$HOME/m/' + N['$TEACHER'].gguf)")}
say() { echo "$(date +%T) $*"; }
say waiting for the teacher $T
while [ ! -f $T ]; do sleep 5; done
python3 -c "from montessori.models.load import resolve_model_dir as r; r('$TEACHER')"  # convert once, not 4x
# STYLE=1: the share of well-formed instructions under each prompt style, measured beside the runs (which
# keep the preset's style; SET="generation.prompt_style=list" changes it for all of them).
[ "${STYLE:-0}" = 1 ] && python3 $C/experiments/paper_shape.py --out $R/paper $SIZE --step style --quiet > $L/style.log 2>&1 &
paper() { python3 $C/experiments/paper_shape.py --out $R/paper "$@" --set ${SET:-}; }
sw() { python3 $C/experiments/sweep.py --out $R/sweep --preset $PRESET --quiet ${SWEEP_ARGS:-} "$@" --set ${SET:-}; }
STUDY_PIDS=()
if [ "${STUDY:-0}" = 1 ]; then  # earlier runs' probing rounds, .study/study-S.txz (carried in call 1)
  mkdir -p $HOME/study && for t in .study/study-*.txz; do tar xJf $t -C $HOME/study; done
  say dpo study
  for d in $HOME/study/paper/seed-*; do s=${d##*-}
    python3 $C/experiments/dpo_study.py --out $R/dpo-study-$s --runs $d/montessori --quiet ${STUDY_ARGS:-} \
      > $L/dpo-study-$s.log 2>&1 & STUDY_PIDS+=($!)
  done
fi
say teacher stages
SWEEP_TEACHER=
[ "${SWEEP:-1}" = 1 ] && { sw --step teacher > $L/sweep-teacher.log 2>&1 & SWEEP_TEACHER=$!; }
TEACHER_PIDS=()
for s in $SEEDS; do paper --seeds $s $SIZE --step teacher --quiet > $L/teacher-$s.log 2>&1 & TEACHER_PIDS+=($!); done
while [ ! -f $G ]; do sleep 5; done
say student here
python3 -c "from montessori.models.load import resolve_model_dir as r; r('gemma3-270m')"
paper --seeds ${SEEDS%% *} $SIZE $EVAL > $L/eval-untrained.log 2>&1 &  # no trained student yet: the untrained one
sweep() {
  while kill -0 $SWEEP_TEACHER 2>/dev/null; do sleep 5; done; say sweep data  # (also from a subshell)
  sw --step data > $L/sweep-data.log 2>&1
  # 3e-6 was added after the first 3-seed run (docs/experiments.md), which chose 1e-5 from the rest.
  sw --step sft --sft-lrs ${SFT_LRS:-3e-6 1e-5 3e-5 1e-4 3e-4} > $L/sweep-sft.log 2>&1 & A=$!
  sw --step dpo --dpo-lrs ${DPO_LRS:-5e-6 2e-5 5e-5} --betas 0.1 > $L/sweep-dpo.log 2>&1 & B=$!
  wait $A $B
  sw --step table > $L/sweep-table.log 2>&1; say sweep done
}
USE_SWEEP=()
if [ "${SWEEP:-1}" = 1 ] && [ "${USE_SWEEP_LRS:-1}" = 1 ]; then  # the seeds wait for the sweep's choice
  sweep; USE_SWEEP=(--sweep $R/sweep/sweep.json)
elif [ "${SWEEP:-1}" = 1 ]; then  # USE_SWEEP_LRS=0: the sweep measures beside the seeds, which keep the preset's
  sweep &
fi  # SWEEP=0: the preset's learning rates as they stand, no sweep
wait "${TEACHER_PIDS[@]}"; say teacher stages done
for s in $SEEDS; do
  (paper --seeds $s $SIZE "${USE_SWEEP[@]}" --step runs --quiet > $L/runs-$s.log 2>&1 &&
   paper --seeds $s $SIZE "${USE_SWEEP[@]}" $EVAL > $L/eval-$s.log 2>&1; say seed $s: rc $?
   if [ "${RELIABILITY:-0}" = 1 ]; then  # the influence's test-retest on this seed's warm-up state
     python3 $C/experiments/reliability.py --run $R/paper/seed-$s/montessori --out $R/reliability-$s --quiet \
       > $L/reliability-$s.log 2>&1; say reliability $s: rc $?
   fi) &
done
if [ ${#STUDY_PIDS[@]} -gt 0 ]; then
  wait "${STUDY_PIDS[@]}"; mkdir -p $R/dpo-study && cat $R/dpo-study-*/study.jsonl > $R/dpo-study/study.jsonl
  python3 $C/experiments/dpo_study.py --out $R/dpo-study --step table > $L/dpo-study-table.log 2>&1; say dpo study done
fi
wait
say all done
