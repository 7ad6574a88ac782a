#!/usr/bin/env bash
# What bench/carry/paper_shape.sh has done so far; the small result files go to $OUT/small.tgz, the
# held-out answers (IFEval's and the judge's) and losses to $OUT/eval.tgz.
R=$HOME/runs
tail -n 20 $R/go.log 2>/dev/null
for f in $R/logs/*.log; do [ -f "$f" ] && { echo "== $(basename $f)"; tail -c 600 "$f" | tail -n 3; }; done
for round in $R/sweep/run/round-* $R/paper/seed-*/*/round-* $R/paper/style/*/round-*; do  # done stages, (running or stale) ones
  [ -d "$round" ] || continue
  echo "$round: $(cd $round && for d in *; do [ -f $d/manifest.json ] && printf '%s ' $d || printf '(%s) ' $d; done)"
done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
# Separate archives: if the data ever outgrew what comes back (16 MiB a file), the results would still come.
cd $R && find paper sweep dpo-study* reliability-* logs go.log -size -1024k \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.log' -o -name '*.yaml' \) \
  -not -path '*/model/*' -not -path '*/.*' -not -path 'paper/ifeval/*' -not -path 'paper/answers/*' 2>/dev/null | tar czf $OUT/small.tgz -T -
find paper/ifeval paper/answers paper/held-out -name '*.json*' 2>/dev/null | tar czf $OUT/eval.tgz -T -
for d in sweep paper/seed-*; do  # one archive per run folder: each must stay under 16 MiB
  find $d -size +1023k -size -12288k -name '*.jsonl' -not -path '*/model/*' -not -path '*/.*' 2>/dev/null \
    | tar czf $OUT/data-$(basename $d).tgz -T -
done
ls -la $OUT
