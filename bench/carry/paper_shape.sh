#!/usr/bin/env bash
# Issue 14 on one GPU machine that receives its models in pieces (bench/carry/env.sh), started once in
# the background (setsid: it outlives the call that starts it) as soon as the teacher is there:
#   setsid nohup bash bench/carry/paper_shape.sh > ~/runs/go.log 2>&1 < /dev/null &
# It works while later calls carry the student's pieces and report (bench/carry/status.sh):
#   1. the teacher's stages of the sweep's data run and of every seed's two arms (4 processes at once:
#      the models are small, so one process leaves the GPU mostly idle);
#   2. once the student's GGUF is assembled: the untrained student's evaluation, the sweep (its data run,
#      then the SFT and DPO rows at once), then every seed's runs and evaluation, one process per seed.
# SWEEP=0 skips the sweep (the preset's learning rates); STUDY=1 also runs experiments/dpo_study.py on
# the probing rounds carried as .study/study-S.txz, alongside the teacher stages; RELIABILITY=1 runs
# experiments/reliability.py on every seed's run once its evaluation is done.
# Everything resumes from its records, so starting it again after a lost machine redoes only what is lost.
set -u
R=$HOME/runs L=$HOME/runs/logs C=$HOME/code
mkdir -p $L $C $HOME/shared
# A copy: every later call re-syncs the checkout under the running jobs.
cp -r montessori experiments bench pyproject.toml $C/ && cp -rn .gpu/data $HOME/shared/
export PYTHONPATH=$HOME/tf:$C:$HOME/site OMP_NUM_THREADS=${THREADS:-4}
SEEDS=${SEEDS:-0 1 2}
SIZE="${SIZE:---probing 4096 --pairs 4096} --rounds ${ROUNDS:-1}"
EVAL="--step eval --batch-size 64 --max-length 1024 --quiet"
G=${STUDENT_FILE:-$HOME/m/gemma-3-270m-q4_k_m.gguf}
paper() { python3 $C/experiments/paper_shape.py --out $R/paper "$@"; }
sw() { python3 $C/experiments/sweep.py --out $R/sweep --quiet ${SWEEP_ARGS:-} "$@"; }
say() { echo "$(date +%T) $*"; }

python3 -c "from montessori.models.load import resolve_model_dir as r; r('smollm2')"  # convert once, not 4x
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
TEACHER=()
for s in $SEEDS; do paper --seeds $s $SIZE --step teacher --quiet > $L/teacher-$s.log 2>&1 & TEACHER+=($!); done
while [ ! -f $G ]; do sleep 5; done
say student here
python3 -c "from montessori.models.load import resolve_model_dir as r; r('gemma3-270m')"
paper --seeds ${SEEDS%% *} $SIZE $EVAL > $L/eval-untrained.log 2>&1 &  # no trained student yet: the untrained one
USE_SWEEP=()
if [ "${SWEEP:-1}" = 1 ]; then
  wait $SWEEP_TEACHER; say sweep data
  sw --step data > $L/sweep-data.log 2>&1
  # 3e-6 was added after the first 3-seed run (docs/experiments.md), which chose 1e-5 from the rest.
  sw --step sft --sft-lrs 3e-6 1e-5 3e-5 1e-4 3e-4 > $L/sweep-sft.log 2>&1 & A=$!
  sw --step dpo --dpo-lrs 5e-6 2e-5 5e-5 --betas 0.1 > $L/sweep-dpo.log 2>&1 & B=$!
  wait $A $B
  sw --step table > $L/sweep-table.log 2>&1; say sweep done
  USE_SWEEP=(--sweep $R/sweep/sweep.json)
fi  # SWEEP=0: the preset's learning rates as they stand
wait "${TEACHER[@]}"; say teacher stages done
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
paper --seeds $SEEDS $SIZE "${USE_SWEEP[@]}" --step summary --quiet > $L/summary.log 2>&1
say all done
